"""Tests of mbe_helpers.fisher against a one-backward-per-sample oracle and hand-computed cases."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from mbe_helpers import fisher
from mbe_helpers.errors import MBEInputError
from mbe_helpers.fisher import FIM_KEYS, fim_metrics, gram_metrics, per_sample_gram
from mbe_helpers.models import MLP, ResidualMLP, SmallCNN, ViTMini

N = 10
CLASSES = 5
METHODS = ("auto", "pairs", "materialise", "func")


# --------------------------------------------------------------------------- #
# The oracle: the definition, one backward per sample, in float64             #
# --------------------------------------------------------------------------- #

def oracle_grads(model, x, y, loss=nn.functional.cross_entropy) -> torch.Tensor:
    """G (N, P): row i is the gradient of the loss of sample i alone."""
    model = copy.deepcopy(model).double()
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        xi = x[i:i + 1].double() if x.is_floating_point() else x[i:i + 1]
        yi = y[i:i + 1].double() if y.is_floating_point() else y[i:i + 1]
        grads = torch.autograd.grad(loss(model(xi), yi), params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten()
                               for g, p in zip(grads, params)]))
    return torch.stack(rows)


def oracle_gram(model, x, y, loss=nn.functional.cross_entropy) -> torch.Tensor:
    g = oracle_grads(model, x, y, loss)
    return g @ g.T / len(x)


def rel_err(d: torch.Tensor, ref: torch.Tensor) -> float:
    return float((d.double().cpu() - ref).abs().max() / ref.abs().max())


def make_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    models = {
        "mlp": (MLP(12, [9, 7], CLASSES), (N, 12)),
        "residual_mlp": (ResidualMLP(12, 8, CLASSES, n_blocks=2, hidden=6), (N, 12)),
        "small_cnn": (SmallCNN((1, 8, 8), CLASSES, channels=(3, 4)), (N, 64)),
        "vit_mini": (ViTMini((1, 8, 8), CLASSES, patch=4, width=8, n_blocks=1, n_heads=2), (N, 64)),
    }
    model, shape = models[name]
    return model.eval(), torch.randn(*shape)


def labels(n: int = N) -> torch.Tensor:
    return torch.arange(n) % CLASSES


# --------------------------------------------------------------------------- #
# Engine equals the oracle                                                    #
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["mlp", "residual_mlp", "small_cnn", "vit_mini"])
def test_gram_equals_oracle(name, method):
    model, x = make_model(name)
    y = labels()
    ref = oracle_gram(model, x, y)
    d64 = per_sample_gram(model, x, y, dtype=torch.float64, method=method)
    d32 = per_sample_gram(model, x, y, method=method)
    assert d64.dtype == torch.float64 and d32.dtype == torch.float32 and d64.shape == (N, N)
    assert rel_err(d64, ref) < 1e-10
    assert rel_err(d32, ref) < 1e-5


class Zoo(nn.Module):
    """Layers the basic models do not exercise: every engine rule and every fallback."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(4, 6, 3, stride=2, dilation=1, padding=1, groups=2)
        self.conv_b = nn.Conv2d(6, 4, 2, padding="same", padding_mode="reflect", bias=False)
        self.conv_c = nn.Conv2d(4, 4, 3, dilation=2, padding="same")
        self.bn = nn.BatchNorm2d(4)
        self.tok = nn.Linear(4, 5)                # applied over 16 positions (T > 1)
        self.ln = nn.LayerNorm(5, bias=False)
        self.shared = nn.Linear(5, 5)             # called twice
        self.frozen_w = nn.Linear(5, 5)           # weight frozen, bias trainable
        self.frozen_w.weight.requires_grad_(False)
        self.tied_a = nn.Linear(5, 5, bias=False)
        self.tied_b = nn.Linear(5, 5, bias=False)
        self.tied_b.weight = self.tied_a.weight   # tied: must go to torch.func
        self.emb = nn.Embedding(3, 5)
        self.scale = nn.Parameter(torch.ones(5))  # bare parameter
        self.head = nn.Linear(5, CLASSES)

    def forward(self, x):
        h = torch.tanh(self.conv_a(x.view(-1, 4, 8, 8)))
        h = self.conv_c(torch.tanh(self.conv_c(self.conv_b(h))))  # a convolution called twice
        h = self.bn(torch.tanh(h))
        h = self.ln(self.tok(h.flatten(2).transpose(1, 2)))          # (N, 16, 5)
        h = self.shared(torch.tanh(self.shared(h))).mean(1)
        h = torch.relu_(self.frozen_w(h))                            # in-place on a recorded output
        h = self.tied_b(torch.tanh(self.tied_a(h)))
        return self.head(h * self.scale + self.emb((x.flatten(1)[:, 0] > 0).long()))


@pytest.mark.parametrize("method", METHODS)
def test_zoo_equals_oracle(method):
    torch.manual_seed(1)
    model = Zoo().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    x, y = torch.randn(N, 256), labels()
    ref = oracle_gram(model, x, y)
    assert rel_err(per_sample_gram(model, x, y, dtype=torch.float64, method=method), ref) < 1e-10
    assert rel_err(per_sample_gram(model, x, y, method=method), ref) < 1e-5


@pytest.mark.parametrize("method", ["pairs", "materialise"])
def test_chunked_paths_equal_oracle(monkeypatch, method):
    """Tiny memory budget: the chunk loops over samples and output features run many times."""
    monkeypatch.setattr(fisher, "_MAX_ELEMENTS", 64)
    model, x = make_model("vit_mini")
    y = labels()
    got = per_sample_gram(model, x, y, dtype=torch.float64, method=method, chunk_size=3)
    assert rel_err(got, oracle_gram(model, x, y)) < 1e-10


def test_mse_and_callable_losses_equal_oracle():
    model, x = make_model("residual_mlp")
    target = torch.randn(N, CLASSES)

    def mse(out, t):
        return (out - t).pow(2).mean(1)

    ref = oracle_gram(model, x, target, loss=lambda o, t: mse(o, t).sum())
    assert rel_err(per_sample_gram(model, x, target, loss="mse", dtype=torch.float64), ref) < 1e-10
    assert rel_err(per_sample_gram(model, x, target, loss=mse, dtype=torch.float64), ref) < 1e-10


def test_auto_rule_picks_by_cost():
    """One position: pair sum.  A 32x32 feature map (1024 positions): materialise, by far."""
    n = 64
    dense = fisher._Kernel(torch.zeros(n, 1, 784), torch.zeros(n, 1, 256), True)
    assert dense._pair_cost() < dense._materialise_cost()
    conv = fisher._ConvKernel(nn.Conv2d(3, 16, 3, padding=1),
                              [(torch.zeros(n, 3, 32, 32), (1, 1), torch.zeros(n, 16, 32, 32))], True, True)
    assert conv._pair_cost() > 100 * conv._materialise_cost()


def test_model_is_left_untouched():
    model, x = make_model("vit_mini")
    model.blocks.train()  # no BatchNorm or Dropout inside: allowed, and must stay in train mode
    before = copy.deepcopy(model.state_dict())
    per_sample_gram(model, x, labels())
    assert all(p.grad is None for p in model.parameters())
    assert model.blocks.training and not model.head.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())


def test_deterministic():
    model, x = make_model("small_cnn")
    assert torch.equal(per_sample_gram(model, x, labels()), per_sample_gram(model, x, labels()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["mlp", "small_cnn", "vit_mini"])
def test_cuda_equals_oracle(name):
    model, x = make_model(name)
    y = labels()
    ref = oracle_gram(model, x, y)
    got = per_sample_gram(model.cuda(), x, y, dtype=torch.float64)
    assert got.is_cuda and rel_err(got, ref) < 1e-10
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    assert rel_err(per_sample_gram(model, x, y), ref) < 1e-5  # float32 without TF32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags
    assert fim_metrics(model, x, y)["fim_reason"] == ""


# --------------------------------------------------------------------------- #
# Metrics                                                                     #
# --------------------------------------------------------------------------- #

def metrics_by_definition(g: np.ndarray) -> dict[str, float]:
    """Every metric straight from G with numpy (float64, relative floor of float64)."""
    n = g.shape[0]
    eigs = np.linalg.eigvalsh(g @ g.T / n)
    norms = np.linalg.norm(g, axis=1)
    unit = g / norms[:, None]
    eigs_unit = np.linalg.eigvalsh(unit @ unit.T / n)

    def entropy(lam):
        lam = lam[lam > n * np.finfo(float).eps * lam.max()]
        p = lam / lam.sum()
        return -(p * np.log(p)).sum(), lam

    h, kept = entropy(eigs)
    mean = g.mean(0)
    return {
        "fim_norm": math.exp(h) / n, "fim_erank": math.exp(h), "fisher_entropy": h,
        "fisher_trace": (norms ** 2).mean(), "fisher_spectral": eigs.max(),
        "fisher_stable_rank": (norms ** 2).mean() / eigs.max(), "fisher_condition": kept.max() / kept.min(),
        "grad_noise_scale": ((g - mean) ** 2).sum(1).mean() / (mean ** 2).sum(),
        "grad_norm_mean": norms.mean(), "grad_norm_std": norms.std(),
        "fim_norm_unit": math.exp(entropy(eigs_unit)[0]) / n,
    }


@pytest.mark.parametrize("n", [6, 40])  # P = 103 > N = 6 (Gram side); P < N = 40 (parameter side)
def test_fim_metrics_equal_definitions(n):
    torch.manual_seed(2)
    model = MLP(6, [8], CLASSES).eval()
    x, y = torch.randn(n, 6), labels(n)
    expected = metrics_by_definition(oracle_grads(model, x, y).numpy())
    got = fim_metrics(model, x, y, dtype=torch.float64)
    assert set(got) == set(FIM_KEYS) | {"fim_reason"} and got["fim_reason"] == ""
    for key in FIM_KEYS:
        assert got[key] == pytest.approx(expected[key], rel=1e-8), key


def test_parameter_side_equals_gram_side():
    torch.manual_seed(3)
    model = MLP(4, [3], CLASSES).eval()  # P = 35 < N = 60: fim_metrics takes the parameter side
    x, y = torch.randn(60, 4), labels(60)
    via_grads = fim_metrics(model, x, y, dtype=torch.float64)
    via_gram = gram_metrics(per_sample_gram(model, x, y, dtype=torch.float64))
    for key in FIM_KEYS:
        assert via_grads[key] == pytest.approx(via_gram[key], rel=1e-7), key
    assert via_grads["fim_erank"] <= 35


def test_hand_computed_orthogonal_gradients():
    """Linear 2 -> 1 at w = 0, squared error: g_i = -2 y_i x_i with x_i = e_i, y = 1."""
    model = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(model.weight)
    got = fim_metrics(model, torch.eye(2), torch.ones(2, 1), loss="mse", dtype=torch.float64)
    expected = {"fim_norm": 1.0, "fim_erank": 2.0, "fisher_entropy": math.log(2), "fisher_trace": 4.0,
                "fisher_spectral": 2.0, "fisher_stable_rank": 2.0, "fisher_condition": 1.0,
                "grad_noise_scale": 1.0, "grad_norm_mean": 2.0, "grad_norm_std": 0.0, "fim_norm_unit": 1.0}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_hand_computed_parallel_gradients():
    """x_1 = x_2 = e_1, y = (1, 2): g = (-2, 0), (-4, 0); D = [[2, 4], [4, 8]], eigenvalues 10, 0."""
    model = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(model.weight)
    x, y = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0], [2.0]])
    d = per_sample_gram(model, x, y, loss="mse", dtype=torch.float64)
    assert torch.allclose(d, torch.tensor([[2.0, 4.0], [4.0, 8.0]], dtype=torch.float64))
    for dtype in (torch.float32, torch.float64):
        got = fim_metrics(model, x, y, loss="mse", dtype=dtype)
        expected = {"fim_norm": 0.5, "fim_erank": 1.0, "fisher_entropy": 0.0, "fisher_trace": 10.0,
                    "fisher_spectral": 10.0, "fisher_stable_rank": 1.0, "fisher_condition": 1.0,
                    "grad_noise_scale": 1 / 9, "grad_norm_mean": 3.0, "grad_norm_std": 1.0,
                    "fim_norm_unit": 0.5}
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-6), (dtype, key)


def test_relative_floor_removes_float32_noise():
    """P < N in float32: the exactly-zero eigenvalues of D come out as noise; the default floor drops them."""
    torch.manual_seed(4)
    model = MLP(4, [3], CLASSES).eval()  # P = 35
    x, y = torch.randn(120, 4), labels(120)
    exact = fim_metrics(model, x, y, dtype=torch.float64)  # parameter side, float64
    d32 = per_sample_gram(model, x, y)
    relative = gram_metrics(d32)
    absolute = gram_metrics(d32, eig_floor=1e-12)
    assert relative["fim_erank"] == pytest.approx(exact["fim_erank"], rel=1e-4)
    assert relative["fisher_condition"] == pytest.approx(exact["fisher_condition"], rel=1e-2)
    assert absolute["fisher_condition"] > 1e3 * exact["fisher_condition"]  # noise counted as signal


def test_zero_gradients_give_nan_with_reason():
    model = nn.Linear(3, 2)
    nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
    got = fim_metrics(model, torch.randn(4, 3), torch.zeros(4, 2), loss="mse")
    assert got["fisher_trace"] == 0 and got["grad_norm_mean"] == 0
    assert all(math.isnan(got[k]) for k in ("fim_norm", "fim_erank", "fisher_entropy", "grad_noise_scale",
                                            "fisher_stable_rank", "fim_norm_unit"))
    assert "zero" in got["fim_reason"]


def test_floor_above_everything_gives_nan_with_reason():
    model, x = make_model("mlp")
    got = fim_metrics(model, x, labels(), eig_floor=1e9)
    assert math.isnan(got["fim_norm"]) and "floor" in got["fim_reason"]
    assert got["fisher_trace"] > 0


def test_mean_gradient_zero_gives_nan_noise_scale():
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    got = fim_metrics(model, torch.tensor([[1.0], [1.0]]), torch.tensor([[1.0], [-1.0]]), loss="mse")
    assert math.isnan(got["grad_noise_scale"]) and "noise scale" in got["fim_reason"]
    assert got["fisher_trace"] == pytest.approx(4.0)


def test_diverged_model_gives_nan_with_reason():
    model, x = make_model("mlp")
    with torch.no_grad():
        model.net[0].weight[0, 0] = float("nan")
    got = fim_metrics(model, x, labels())
    assert all(math.isnan(got[k]) for k in FIM_KEYS) and "non-finite" in got["fim_reason"]


# --------------------------------------------------------------------------- #
# Bad input                                                                   #
# --------------------------------------------------------------------------- #

def _frozen_mlp():
    model, _ = make_model("mlp")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.parametrize("build, kwargs, message", [
    (lambda: nn.Sequential(nn.Linear(12, 4), nn.BatchNorm1d(4), nn.Linear(4, CLASSES)), {}, "BatchNorm"),
    (lambda: nn.Sequential(nn.Linear(12, 4), nn.Dropout(0.5), nn.Linear(4, CLASSES)), {}, "Dropout"),
    (_frozen_mlp, {}, "no trainable"),
    (lambda: make_model("mlp")[0], {"loss": "hinge"}, "unknown loss"),
    (lambda: make_model("mlp")[0], {"method": "fast"}, "unknown method"),
    (lambda: make_model("mlp")[0], {"dtype": torch.float16}, "dtype"),
])
def test_refuses_ill_defined_requests(build, kwargs, message):
    with pytest.raises(MBEInputError, match=message):
        per_sample_gram(build(), torch.randn(N, 12), labels(), **kwargs)


def test_refuses_bad_batches():
    model, x = make_model("mlp")
    with pytest.raises(MBEInputError, match="at least N = 2"):
        per_sample_gram(model, x[:1], labels(1))
    with pytest.raises(MBEInputError, match="samples but y"):
        per_sample_gram(model, x, labels(N - 1))
    with pytest.raises(MBEInputError, match="class indices"):
        per_sample_gram(model, x, labels().float())
    with pytest.raises(MBEInputError, match="one loss per sample"):
        per_sample_gram(model, x, labels(), loss=lambda out, t: out.sum())
    with pytest.raises(MBEInputError, match="eig_floor"):
        fim_metrics(model, x, labels(), eig_floor=-1.0)
    with pytest.raises(MBEInputError, match="square"):
        gram_metrics(torch.ones(3, 2))
    assert issubclass(MBEInputError, ValueError)
