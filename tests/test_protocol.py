"""FA diagnostics on constructed networks where each must fire, and must not."""

import io

import pytest
import torch
from rich.console import Console

from mbe_helpers import protocol
from mbe_helpers.errors import MBEInputError
from mbe_helpers.models import MLP, ResidualMLP, ViTMini
from mbe_helpers.stream import forward_stream


def net(seed=0, **kw):
    torch.manual_seed(seed)
    return ResidualMLP(16, 32, 4, 4, **kw).eval()


TEACHER = torch.randn(16, 4, generator=torch.Generator().manual_seed(123))


def batches(n_batches=8, size=128, seed=0, same=False):
    """Disjoint batches of a learnable task: y = argmax(x @ TEACHER)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(size, 16, generator=g)
        y = (x @ TEACHER).argmax(1)
        if same:                                   # every batch the same class, nearly the same input
            x = torch.ones(size, 16) + 0.01 * x
            y = torch.zeros(size, dtype=torch.long)
        out.append((x, y))
    return out


@pytest.fixture(scope="module")
def trained():
    """A briefly BP-trained network: at initialisation the mean gradient is a shared drift."""
    model = net()
    (x, y), = batches(1, 512, seed=99)
    opt = torch.optim.Adam(model.parameters(), 5e-3)
    for _ in range(40):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def test_healthy_network_passes_everything(trained):
    report = protocol.diagnose(trained, batches(), headline_acc=0.9, frozen_baseline_acc=0.6)
    states = {k: v[0] for k, v in report.verdicts.items()}
    assert states == dict.fromkeys(states, "ok"), report.verdicts
    assert report.verdict == "face value"


def test_norms_are_along_the_feature_dimension():
    model, (x, _) = net(), batches(1)[0]
    hidden, _ = forward_stream(model, x)
    assert protocol.residual_norms(model, x)[2] == pytest.approx(float(hidden[2].detach().norm(dim=-1).median()))


def test_scaled_stream_puts_bp_gradient_below_the_floor():
    model = net()
    with torch.no_grad():                          # a huge stream: the terminal LN divides it away
        model.embed.weight.mul_(1e9)
        model.embed.bias.mul_(1e9)
    report = protocol.diagnose(model, batches(), 0.9)
    assert report.verdicts["b_bp_gradient_floor"][0] == "fires"
    assert min(report.bp_grad_norms) < 1e-7


def test_exploding_block_fires_growth():
    model = net()
    with torch.no_grad():
        model.blocks[2].fc2.weight.mul_(1e4)
    report = protocol.diagnose(model, batches(), 0.9)
    assert report.verdicts["a_residual_growth"][0] == "fires" and report.max_growth > 50


def test_batches_sharing_one_direction_fire_stability(trained):
    shared = protocol.diagnose(trained, batches(same=True), 0.9)
    assert shared.verdicts["c_direction_stability"][0] == "fires"
    assert shared.stability[shared.stability_layer] > 0.9
    healthy = protocol.diagnose(trained, batches(), 0.9)
    assert healthy.stability[healthy.stability_layer] < 0.3


def test_stability_is_the_mean_pairwise_cosine():
    model, bs = net(), batches(3, 32)
    got = protocol.direction_stability(model, bs)[1]
    dirs = []
    for x, y in bs:
        h = model.embed(x)
        h.retain_grad()
        h1 = h + model.blocks[0](h)
        h1.retain_grad()
        out = h1
        for b in model.blocks[1:]:
            out = out + b(out)
        torch.nn.functional.cross_entropy(model.out_head(model.out_ln(out)), y).backward()
        g = h1.grad.mean(0)
        dirs.append(g / g.norm())
    expected = sum(float(dirs[i] @ dirs[j]) for i in range(3) for j in range(i + 1, 3)) / 3
    assert got == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("headline, frozen, state", [(0.90, 0.89, "fires"), (0.95, 0.80, "ok"),
                                                      (0.90, None, "skipped")])
def test_frozen_margin(headline, frozen, state):
    report = protocol.diagnose(net(), batches(2, 16), headline, frozen)
    assert report.verdicts["d_frozen_baseline"][0] == state


def test_thresholds_are_overridable():
    strict = protocol.Thresholds(frozen_margin=0.5)
    report = protocol.diagnose(net(), batches(2, 16), 0.95, 0.80, thresholds=strict)
    assert report.verdicts["d_frozen_baseline"][0] == "fires"


def test_token_model_reads_the_cls_token():
    torch.manual_seed(0)
    model = ViTMini((1, 4, 4), 4, patch=2, width=8, n_blocks=2).eval()
    bs = batches(2, 16)
    report = protocol.diagnose(model, bs, 0.5)
    hidden, _ = forward_stream(model, bs[0][0])
    assert report.residual_norms[1] == pytest.approx(float(hidden[1][:, 0].detach().norm(dim=-1).median()))
    assert len(report.layers()) == 3


def test_report_renders():
    report = protocol.diagnose(net(), batches(2, 16), 0.9, 0.5, method="DFA")
    assert "| c_direction_stability |" in report.to_markdown()
    assert "<table" in report._repr_html_()
    assert report.to_dict()["verdict"] == report.verdict
    assert list(report.to_frame().columns) == ["method", "diagnostic", "state", "detail"]


def test_bad_input():
    with pytest.raises(MBEInputError, match="lacks an embedding"):
        protocol.diagnose(MLP(16, [8], 4), batches(2, 8), 0.9)
    with pytest.raises(MBEInputError, match="at least 2 disjoint batches"):
        protocol.diagnose(net(), batches(1, 8), 0.9)
    with pytest.raises(MBEInputError, match="fraction between 0 and 1, got 91"):
        protocol.diagnose(net(), batches(2, 8), 91)
    with pytest.raises(MBEInputError, match="stability_layer must be between 0 and 4"):
        protocol.diagnose(net(), batches(2, 8), 0.9, stability_layer=9)


def test_non_finite_inputs_are_refused_in_one_sentence():
    bad = batches(2, 8)
    bad[1][0][3, 5] = float("nan")
    with pytest.raises(MBEInputError, match=r"eval_batches\[1\] holds 1 NaN or infinite inputs; "
                                            "drop or impute them"):
        protocol.diagnose(net(), bad, 0.9)


def test_non_finite_activations_give_nan_states_never_ok():
    model = net()
    with torch.no_grad():
        model.blocks[1].fc2.weight[0, 0] = float("nan")
    report = protocol.diagnose(model, batches(2, 16), 0.9, 0.5)
    states = {k: v for k, v in report.verdicts.items()}
    for name in ("a_residual_growth", "b_bp_gradient_floor", "c_direction_stability"):
        assert states[name][0] == protocol.NAN, states
    assert "stream norm of h_2 is not finite" in states["a_residual_growth"][1]
    assert report.verdict.startswith("not at face value: a_residual_growth (nan)")
    assert "| nan |" in report.to_markdown() and "nanx" not in report.to_markdown()
    report.show(console=Console(file=io.StringIO()))


class Strange(torch.nn.Module):
    """The stream contract's names, but ``blocks`` is not a list of branches."""

    def __init__(self, blocks):
        super().__init__()
        inner = net()
        self.embed, self.out_ln, self.out_head, self.blocks = (inner.embed, inner.out_ln,
                                                               inner.out_head, blocks)


@pytest.mark.parametrize("blocks, kind", [(3, "int"), (torch.nn.Linear(32, 32), "Linear"),
                                          ("abc", "str")])
def test_blocks_of_the_wrong_type_are_one_sentence(blocks, kind):
    with pytest.raises(MBEInputError, match=f"Strange.blocks must be a list of residual branches "
                                            rf"\(e.g. an nn.ModuleList\), got {kind}"):
        protocol.diagnose(Strange(blocks), batches(2, 8), 0.9)


def test_batches_the_model_cannot_take_are_one_sentence():
    (x, y), second = batches(2, 8)
    cases = [([(x, y + 4), second], r"labels in eval_batches\[0\] must lie between 0 and 3 "
                                    r"\(the model has 4 outputs\), got 4 to 7"),
             ([(x, y.float()), second], r"eval_batches\[0\] needs y as one class label "
                                        r"\(torch.long\) per sample of x"),
             ([(x[:, :10], y), second], r"ResidualMLP cannot take eval_batches\[0\] \(shape "
                                        r"\(8, 10\), torch.float32\): mat1 and mat2"),
             ([(x.double(), y), second], r"cannot take eval_batches\[0\] .*dtype"),
             ([x, second], r"eval_batches\[0\] must be a pair \(x, y\) of tensors")]
    for bs, fragment in cases:
        with pytest.raises(MBEInputError, match=fragment):
            protocol.diagnose(net(), bs, 0.9)
