"""Credit metrics and the residual stream against definitions and hand-computed cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from mbe_helpers import credit, stream
from mbe_helpers.errors import MBEInputError
from mbe_helpers.models import MLP, ResidualMLP, ViTMini


def linear_softmax(n=64, d=12, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, c, generator=g, dtype=torch.float64)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)

    def loss(state):
        logits = state @ w
        return -torch.log_softmax(logits, -1).gather(-1, y.expand(*state.shape[:-2], -1)[..., None])[..., 0]

    exact = (torch.softmax(h @ w, -1) - F.one_hot(y, c).double()) @ w.T
    return h, exact, loss


# ----------------------------------------------------------------- perturbation correlation

def test_exact_gradient_gives_rho_one():
    h, grad, loss = linear_softmax()
    rho = credit.perturbation_correlation(h, grad, loss, eps=1e-4, n_directions=16)
    assert rho > 0.999


def test_quadratic_exact_gradient():
    h = torch.randn(32, 6, dtype=torch.float64)
    rho = credit.perturbation_correlation(h, h.clone(), lambda s: 0.5 * s.pow(2).sum(-1), eps=1e-5)
    assert rho > 0.9999


def test_random_signal_gives_rho_near_zero():
    h, grad, loss = linear_softmax(n=256)
    noise = torch.randn(h.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    rho = credit.perturbation_correlation(h, noise, loss, n_directions=32)
    assert abs(rho) < 0.05            # 8192 pooled pairs: sd of r under the null ~ 0.011


def test_batched_equals_loop_definition():
    h, grad, loss = linear_softmax(n=20)
    a = grad + 0.5 * torch.randn_like(grad)
    eps, m = 1e-3, 7
    rho = credit.perturbation_correlation(h, a, loss, eps=eps, n_directions=m, seed=3, chunk=3)
    directions = credit.random_directions(h.shape, m, 3, h.dtype)
    pred, true = [], []
    for v in directions:                                # one direction at a time
        for i in range(len(h)):                         # one sample at a time
            pred.append(float(a[i] @ (eps * v[i])))
            true.append(float(loss(h + eps * v)[i] - loss(h)[i]))
    expected = torch.corrcoef(torch.tensor([pred, true], dtype=torch.float64))[0, 1]
    assert abs(rho - float(expected)) < 1e-10


def test_directions_are_unit_and_seeded():
    v = credit.random_directions(torch.Size([5, 3, 4]), 6, seed=1)
    assert v.shape == (6, 5, 3, 4)
    assert torch.allclose(v.flatten(2).norm(dim=-1), torch.ones(6, 5))
    assert torch.equal(v, credit.random_directions(torch.Size([5, 3, 4]), 6, seed=1))


def test_degenerate_signals_are_nan_with_reason():
    h, grad, loss = linear_softmax()
    zero = credit.perturbation_correlation(h, torch.zeros_like(h), loss)
    assert math.isnan(zero) and "credit signal" in zero.reason
    flat = credit.perturbation_correlation(h, grad, lambda s: s.sum(-1) * 0.0)
    assert math.isnan(flat) and "loss does not change" in flat.reason
    with pytest.raises(MBEInputError, match="shape"):
        credit.perturbation_correlation(h, grad[:, :3], loss)
    with pytest.raises(MBEInputError, match="NaN or inf"):
        credit.perturbation_correlation(h, grad * float("nan"), loss)


# ----------------------------------------------------------------- nudging, cosine, drift

def test_nudging_sign():
    h, grad, loss = linear_softmax()
    assert credit.nudging_test(h, grad, loss, eta=0.05) < 0
    assert credit.nudging_test(h, -grad, loss, eta=0.05) > 0
    assert math.isnan(credit.nudging_test(h, torch.zeros_like(h), loss))


def test_nudging_matches_hand_computation():
    h = torch.tensor([[3.0, 4.0]], dtype=torch.float64)       # loss = 0.5 |h|^2, a = h
    rms = math.sqrt((9 + 16) / 2)
    step = 0.1 * h / rms
    expected = 0.5 * float((h - step).pow(2).sum() - h.pow(2).sum())
    got = credit.nudging_test(h, h, lambda s: 0.5 * s.pow(2).sum(-1), eta=0.1)
    assert got == pytest.approx(expected)


def test_bp_cosine():
    g = torch.randn(10, 4)
    assert credit.bp_cosine(2 * g, g) == pytest.approx(1.0)
    assert credit.bp_cosine(-g, g) == pytest.approx(-1.0)
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    assert credit.bp_cosine(a, b) == pytest.approx((0 + 1 / math.sqrt(2)) / 2)   # third sample left out
    assert "BP gradient" in credit.bp_cosine(g, torch.zeros_like(g)).reason


def test_feature_drift():
    w0 = {"w": torch.tensor([3.0, 4.0]), "b": torch.zeros(2)}
    w1 = {"w": torch.tensor([3.0, 5.0]), "b": torch.ones(2)}
    drift = credit.feature_drift(w0, w1)
    assert drift["w"] == pytest.approx(1 / 5)
    assert math.isnan(drift["b"]) and "zero" in drift["b"].reason


# ----------------------------------------------------------------- bridge residual

class SumValue(torch.nn.Module):
    def forward(self, h, t, s):
        return h.sum(-1) + t


def test_soft_min_limits_and_residual():
    h = torch.randn(4, 3, dtype=torch.float64)
    t, s = torch.zeros(4, dtype=torch.float64), torch.zeros(4, 0, dtype=torch.float64)
    nxt = torch.stack([h, h + 1.0, h + 2.0])                  # next values: V, V+3, V+6
    v = SumValue()
    cold = credit.soft_min_target(v, nxt, t, s, temperature=1e-3)
    assert torch.allclose(cold, h.sum(-1) + math.log(3) * 1e-3, atol=1e-9)   # -> min + lam log K
    hot = credit.soft_min_target(v, nxt, t, s, temperature=1e4)
    assert torch.allclose(hot, h.sum(-1) + 3.0, atol=1e-2)                   # -> mean
    same = torch.stack([h, h])
    assert credit.bridge_residual(v, v, h, t, s, same, t, temperature=0.5) == pytest.approx(0.0, abs=1e-12)


def test_value_net_and_ema():
    online, target = credit.ValueNet(3, 2, hidden=8), credit.ValueNet(3, 2, hidden=8)
    out = online(torch.randn(5, 3), torch.arange(5), torch.randn(5, 2))
    assert out.shape == (5,)
    before = [p.clone() for p in target.parameters()]
    credit.ema_update(target, online, decay=0.9)
    for b, p_t, p_o in zip(before, target.parameters(), online.parameters()):
        assert torch.allclose(p_t, 0.9 * b + 0.1 * p_o)


# ----------------------------------------------------------------- the residual stream

@pytest.mark.parametrize("make", [lambda: ResidualMLP(16, 8, 3, 3),
                                  lambda: ViTMini((1, 4, 4), 3, patch=2, width=8, n_blocks=2)])
def test_stream_matches_the_model(make):
    torch.manual_seed(0)
    model = make().double()
    x, y = torch.randn(6, 16, dtype=torch.float64), torch.randint(0, 3, (6,))
    hidden, logits = stream.forward_stream(model, x)
    assert torch.allclose(logits, model(x)) and len(hidden) == len(model.blocks) + 1
    _, grads, _ = stream.stream_gradients(model, x, y)
    for layer in (0, len(model.blocks)):
        fn = stream.tail_loss(model, layer, y)
        assert torch.allclose(fn(hidden[layer]), F.cross_entropy(model(x), y, reduction="none"))
        twice = fn(torch.stack([hidden[layer]] * 2))          # leading dimension of directions
        assert twice.shape == (2, 6) and torch.allclose(twice[1], twice[0])
        # the BP gradient of the mean loss is the per-sample gradient over N
        per_sample = torch.autograd.functional.jacobian(lambda s: fn(s).sum(), hidden[layer])
        assert torch.allclose(grads[layer] * len(x), per_sample)


def test_true_gradient_on_residual_model_gives_rho_near_one():
    torch.manual_seed(1)
    model = ResidualMLP(16, 12, 4, 3).double()
    x, y = torch.randn(40, 16, dtype=torch.float64), torch.randint(0, 4, (40,))
    hidden, grads, _ = stream.stream_gradients(model, x, y)
    rho = credit.perturbation_correlation(hidden[1], grads[1] * len(x), stream.tail_loss(model, 1, y),
                                          eps=1e-4)
    assert rho > 0.999


def test_contract_names_what_is_missing():
    with pytest.raises(MBEInputError, match="lacks an embedding .* `blocks`"):
        stream.forward_stream(MLP(4, [8], 2), torch.randn(2, 4))
    with pytest.raises(MBEInputError, match="layer must be between 0 and 2"):
        stream.tail_loss(ResidualMLP(4, 8, 2, 2), 5, torch.zeros(2, dtype=torch.long))


def test_output_error():
    logits = torch.tensor([[0.0, 0.0]])
    assert torch.allclose(stream.output_error(logits, torch.tensor([1])), torch.tensor([[0.5, -0.5]]))


# ----------------------------------------------------------------- tables and the calibrated scale

def test_measure_layers_controls_land_where_they_must():
    torch.manual_seed(2)
    model = ResidualMLP(16, 12, 4, 2).double()
    x, y = torch.randn(64, 16, dtype=torch.float64), torch.randint(0, 4, (64,))
    pos = credit.measure_layers(model, x, y, credit.bp_signals(model, x, y), eps=1e-4)
    neg = credit.measure_layers(model, x, y, credit.random_signals(model, x, seed=1), eps=1e-4)
    assert list(pos.layer) == [0, 1, 2]
    assert (pos.rho > 0.999).all() and (pos.bp_cosine > 0.9999).all() and (pos.nudge < 0).all()
    assert (neg.rho.abs() < 0.1).all() and (neg.bp_cosine.abs() < 0.2).all()
    skip = credit.measure_layers(model, x, y, [None, torch.zeros(64, 12, dtype=torch.float64), None])
    assert list(skip.layer) == [1] and math.isnan(skip.rho[0]) and "zero" in skip.reason[0]
    with pytest.raises(MBEInputError, match="got 1 signals for 3 stream states"):
        credit.measure_layers(model, x, y, [None])


def test_calibrated_scale_hand_computed():
    import pandas as pd

    table = pd.DataFrame({
        "layer": [1] * 6 + [2] * 4,
        "condition": ["positive", "positive", "negative", "negative", "dfa", "dfa",
                      "positive", "negative", "negative", "dfa"],
        "rho": [0.9, 1.1, -0.01, 0.03, 0.2, 0.3, 0.05, 0.0, 0.0, 0.1],
    })
    out = credit.calibrated_scale(table).set_index(["layer", "condition"])
    assert out.loc[(1, "dfa"), "fraction_of_ceiling"] == pytest.approx(0.25)
    sd = pd.Series([-0.01, 0.03]).std()
    assert out.loc[(1, "dfa"), "noise_units"] == pytest.approx((0.25 - 0.01) / sd)
    # layer 2: the positive control failed and the negative one has no spread: NaN, with reasons
    assert math.isnan(out.loc[(2, "dfa"), "fraction_of_ceiling"])
    assert math.isnan(out.loc[(2, "dfa"), "noise_units"])
    assert "ceiling" in out.loc[(2, "dfa"), "reason"] and "spread" in out.loc[(2, "dfa"), "reason"]
    with pytest.raises(MBEInputError, match="control 'bp' is not among the conditions"):
        credit.calibrated_scale(table, positive="bp")
