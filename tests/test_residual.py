"""The experiments of the credit chapters, on tiny networks: signals, calibration, diagnostics."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mbe_helpers import residual
from mbe_helpers.chapters import credit_calibration as ch3
from mbe_helpers.chapters import fa_diagnostics as ch4
from mbe_helpers import feedback, protocol, stream
from mbe_helpers.data import load_dataset
from mbe_helpers.errors import MBEInputError
from mbe_helpers.models import ResidualMLP
from mbe_helpers.train import train

TINY = {"width": 16, "n_blocks": 2, "epochs": 2, "batch_size": 128}


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def calibration(data):
    return ch3.calibration_runs(data, ("positive", "negative", "dfa"), seeds=(0, 1), eval_size=64,
                               n_directions=8, **TINY)


@pytest.fixture(scope="module")
def runs(data):
    return ch4.diagnostic_runs(data, ["bp", "dfa", residual.INIT], seeds=(0, 1), n_batches=3,
                              eval_batch_size=32, **TINY)


def tiny_batch(n=7, d=5, c=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, c, (n,), generator=g)


def vjp(fn, at, v):
    return torch.autograd.functional.vjp(fn, at, v)[1]


# ----------------------------------------------------------------- credit signals

def test_fa_signal_is_the_error_propagated_through_the_feedback_matrices():
    torch.manual_seed(0)
    model = ResidualMLP(5, 6, 3, 2, activation="tanh").double()
    x, y = tiny_batch()
    rule = feedback.FeedbackAlignment(seed=3)
    rule._ensure(model)
    signals = residual.credit_signals("fa", model, rule, x, y)
    # by hand: per-sample error e, W^T replaced by B in every linear map, true LN / tanh derivatives
    hidden, logits = stream.forward_stream(model, x)
    b = rule.matrices
    delta = vjp(model.out_ln, hidden[-1], stream.output_error(logits, y) @ b["out_head"])
    expected = [delta]
    for layer in reversed(range(2)):
        block, h = model.blocks[layer], hidden[layer]
        u = block.fc1(block.ln(h))
        through_branch = vjp(block.ln, h, vjp(block.act, u, delta @ b[f"blocks.{layer}.fc2"])
                             @ b[f"blocks.{layer}.fc1"])
        delta = delta + through_branch
        expected.insert(0, delta)
    assert len(signals) == 3
    for got, want in zip(signals, expected):
        assert torch.allclose(got, want, atol=1e-12)
    true = residual.credit_signals("positive", model, rule, x, y)
    assert not torch.allclose(signals[0], true[0], atol=1e-3)


def test_fa_signal_with_b_equal_to_w_is_the_true_gradient():
    torch.manual_seed(0)
    model = ResidualMLP(5, 6, 3, 2).double()
    x, y = tiny_batch()
    rule = feedback.FeedbackAlignment()
    rule.matrices = {n: m.weight.detach().clone() for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear)}
    for fa, bp in zip(residual.credit_signals("fa", model, rule, x, y),
                      residual.credit_signals("positive", model, None, x, y)):
        assert torch.allclose(fa, bp, atol=1e-12)


def test_dfa_signal_is_the_output_error_through_the_training_matrices(data):
    model, rule, _ = residual.train_residual("dfa", data, **TINY)
    x, y = data.x_test[:20], data.y_test[:20]
    signals = residual.credit_signals("dfa", model, rule, x, y)
    error = torch.softmax(model(x), -1) - F.one_hot(y, 10)
    assert len(signals) == TINY["n_blocks"] + 1
    for signal, matrix in zip(signals, rule.matrices):
        assert matrix.shape == (TINY["width"], 10)
        assert torch.allclose(signal, error @ matrix.T, atol=1e-5)


def test_controls_are_the_per_sample_gradient_and_a_seeded_random_vector():
    torch.manual_seed(0)
    model = ResidualMLP(5, 6, 3, 2).double()
    x, y = tiny_batch()
    positive = residual.credit_signals("positive", model, None, x, y)
    hidden, logits = stream.forward_stream(model, x)
    alone = torch.autograd.grad(F.cross_entropy(logits[:1], y[:1]), hidden)  # sample 0's own loss
    for signal, grad in zip(positive, alone):
        assert torch.allclose(signal[0], grad[0], atol=1e-12)
    first, again, other = (residual.credit_signals("negative", model, None, x, y, seed=s) for s in (5, 5, 6))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


def test_a_signal_needs_the_rule_it_names(data):
    model, _, _ = residual.train_residual("bp", data, **{**TINY, "epochs": 0})
    x, y = data.x_test[:4], data.y_test[:4]
    with pytest.raises(MBEInputError, match="needs the DFA rule"):
        residual.credit_signals("dfa", model, feedback.Backprop(), x, y)
    with pytest.raises(MBEInputError, match="needs the FeedbackAlignment rule"):
        residual.credit_signals("fa", model, feedback.Backprop(), x, y)
    with pytest.raises(MBEInputError, match="unknown condition 'exact'"):
        residual.credit_signals("exact", model, None, x, y)


# ----------------------------------------------------------------- training

def test_train_residual_is_seeded_and_leaves_the_global_rng_alone(data):
    state = torch.random.get_rng_state()
    first, _, _ = residual.train_residual("bp", data, seed=3, **{**TINY, "epochs": 1})
    assert torch.equal(state, torch.random.get_rng_state())
    again, _, _ = residual.train_residual("bp", data, seed=3, **{**TINY, "epochs": 1})
    other, _, _ = residual.train_residual("bp", data, seed=4, **{**TINY, "epochs": 1})
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters()))
    assert not torch.equal(first.embed.weight, other.embed.weight)


def test_train_with_dfa_lowers_the_training_loss(data):
    torch.manual_seed(0)
    model = ResidualMLP(data.in_dim, 32, data.n_classes, 2)
    record = train(model, data, epochs=3, batch_size=128, probe_epochs=(0,),
                   rule=feedback.DirectFeedbackAlignment(seed=0))
    assert record["status"] == "ok"
    assert record["train_loss"] < record["train_loss@0"] - 0.3


# ----------------------------------------------------------------- chapter 3

def test_calibration_runs_columns_and_controls(calibration):
    table, models = calibration
    assert list(table.columns) == ["condition", "seed", "layer", "rho", "bp_cosine", "nudge",
                                   "reason", "test_acc"]
    assert len(table) == 3 * 2 * (TINY["n_blocks"] + 1)
    assert set(models) == {("bp", 0), ("bp", 1), ("dfa", 0), ("dfa", 1)}
    positive = table[table.condition == "positive"]
    negative = table[table.condition == "negative"]
    assert (positive.rho > 0.9).all() and (positive.bp_cosine > 0.999).all()
    assert (positive.nudge < 0).all()
    assert negative.rho.abs().max() < 0.2 and negative.bp_cosine.abs().max() < 0.2
    assert (table.reason == "").all()


def test_seed_intervals_are_t_intervals():
    table = pd.DataFrame({"condition": ["a"] * 3 + ["b"], "layer": 1, "rho": [0.1, 0.2, 0.6, 0.5]})
    out = residual.seed_intervals(table).set_index("condition")
    values = np.array([0.1, 0.2, 0.6])
    half = 4.302652729911275 * values.std(ddof=1) / math.sqrt(3)
    assert out.loc["a", "mean"] == pytest.approx(0.3)
    assert out.loc["a", "ci_lo"] == pytest.approx(0.3 - half)
    assert out.loc["a", "ci_hi"] == pytest.approx(0.3 + half)
    assert out.loc["b", "n"] == 1 and math.isnan(out.loc["b", "ci_lo"])
    assert residual.mean_ci(values) == pytest.approx((0.3, 0.3 - half, 0.3 + half))


def test_deep_layer_table_averages_layers_from_min_layer_and_keeps_nan():
    table = pd.DataFrame({"condition": "c", "seed": [0, 0, 0, 1, 1, 1], "layer": [0, 1, 2] * 2,
                          "rho": [9.0, 0.2, 0.4, 9.0, np.nan, 0.4], "bp_cosine": 0.0, "nudge": 0.0})
    deep = residual.deep_layer_table(table, min_layer=1).set_index("seed")
    assert deep.loc[0, "rho"] == pytest.approx(0.3) and math.isnan(deep.loc[1, "rho"])
    assert (deep.layers == "1-2").all()
    with pytest.raises(MBEInputError, match="no layer at or above"):
        residual.deep_layer_table(table, min_layer=5)


def test_place_on_scale_reads_each_condition():
    rows = {"positive": [0.99, 1.0, 1.01], "negative": [-0.01, 0.0, 0.01], "strong": [0.95, 0.96, 0.97],
            "weak": [0.20, 0.21, 0.22], "floor": [0.0, 0.01, 0.02], "scattered": [-0.5, 0.2, 0.9]}
    deep = pd.DataFrame([{"condition": c, "seed": s, "rho": v, "layers": "1-4"}
                         for c, values in rows.items() for s, v in enumerate(values)])
    placed = ch3.place_on_scale(deep).set_index("condition")
    assert placed.loc["positive", "reading"] == "near the ceiling"
    assert placed.loc["strong", "reading"] == "near the ceiling"
    assert placed.loc["weak", "reading"] == "above the noise floor"
    assert placed.loc["weak", "noise_units"] == pytest.approx(21.0)
    assert placed.loc["weak", "fraction_of_ceiling"] == pytest.approx(0.21)
    assert placed.loc["floor", "reading"] == "within the noise floor"
    assert placed.loc["negative", "reading"] == "within the noise floor"
    assert placed.loc["scattered", "noise_units"] > 3
    assert placed.loc["scattered", "reading"] == "not separable from the negative control"


def test_place_on_scale_refuses_to_divide_by_a_failed_ceiling():
    deep = pd.DataFrame({"condition": ["positive", "positive", "negative", "negative", "c", "c"],
                         "seed": [0, 1] * 3, "rho": [0.02, 0.03, 0.0, 0.01, 0.5, 0.5], "layers": "1-2"})
    placed = ch3.place_on_scale(deep).set_index("condition")
    assert math.isnan(placed.loc["c", "fraction_of_ceiling"])
    assert "ceiling below" in placed.loc["c", "reason"]


def test_sensitivity_sweeps_eps_and_m(calibration, data):
    _, models = calibration
    model, rule, _ = models[("bp", 0)]
    sweep = ch3.sensitivity(model, rule, "positive", data, 1, eps_values=(1e-4, 1.0), m_values=(1, 8),
                           repeats=2, eval_size=32)
    assert list(sweep.columns) == ["condition", "dtype", "sweep", "value", "repeat", "rho"]
    assert len(sweep) == 2 * (2 + 2) and set(sweep.dtype) == {"float64"}
    small = sweep[(sweep.sweep == "eps") & (sweep.value == 1e-4)].rho
    assert (small > 0.999).all()
    single = ch3.sensitivity(model, rule, "positive", data, 1, eps_values=(1e-4,), m_values=(1,),
                            repeats=1, eval_size=32, dtype=torch.float32)
    assert set(single.dtype) == {"float32"}


# ----------------------------------------------------------------- chapter 4

def test_diagnostic_runs_shape_and_frozen_baseline_wiring(runs):
    assert set(runs.diagnoses) == {(m, s) for m in ("bp", "dfa", residual.INIT) for s in (0, 1)}
    assert {("frozen", 0), ("frozen", 1)} <= set(runs.models)  # trained though not diagnosed
    for seed in (0, 1):
        frozen_acc = runs.models[("frozen", seed)][2]["test_acc"]
        assert runs.diagnoses[("bp", seed)].frozen_baseline_acc == frozen_acc
        assert runs.diagnoses[("dfa", seed)].frozen_baseline_acc == frozen_acc
        assert runs.diagnoses[(residual.INIT, seed)].frozen_baseline_acc is None
    frozen, init = runs.models[("frozen", 0)][0], runs.models[(residual.INIT, 0)][0]
    assert all(torch.equal(a, b) for a, b in zip(frozen.blocks.parameters(), init.blocks.parameters()))
    assert not torch.equal(frozen.out_head.weight, init.out_head.weight)
    assert len(runs.layers()) == 3 * 2 * (TINY["n_blocks"] + 1)
    assert len(runs.verdicts()) == 3 * 2 * 4


def test_diagnostic_tables(runs):
    table = runs.verdict_table()
    assert list(table.index) == ["bp", "dfa", residual.INIT]
    assert list(table.columns) == ["a_residual_growth", "b_bp_gradient_floor",
                                   "c_direction_stability", "d_frozen_baseline", "face_value"]
    assert table.loc[residual.INIT, "d_frozen_baseline"] == protocol.SKIPPED
    fires = runs.verdicts().query("method == 'dfa' and diagnostic == 'd_frozen_baseline'")
    assert table.loc["dfa", "d_frozen_baseline"] == f"{(fires.state == protocol.FIRES).sum()}/2"
    accuracy = runs.accuracy().set_index(["method", "seed"])
    bp = runs.diagnoses[("bp", 0)]
    assert accuracy.loc[("bp", 0), "margin"] == pytest.approx(bp.headline_acc - bp.frozen_baseline_acc)
    assert math.isnan(accuracy.loc[(residual.INIT, 0), "margin"])
    summary = runs.summary().set_index("method")
    assert summary.loc["bp", "min_grad_norm"] == min(min(runs.diagnoses[("bp", s)].bp_grad_norms)
                                                     for s in (0, 1))


def test_alignment_and_survival(runs, data):
    alignment = ch4.alignment_runs(runs, data, eval_size=32, n_directions=4)
    assert set(alignment.method) == {"bp", "dfa"}
    assert set(alignment.condition) == {"positive", "dfa"}
    assert (alignment[alignment.method == "bp"].rho > 0.9).all()
    survival = ch4.survival(alignment, runs).set_index("method")
    assert list(survival.index) == ["bp", "dfa"]
    v = runs.verdicts()
    c_fires = int(((v.method == "dfa") & (v.diagnostic == "c_direction_stability")
                   & (v.state == protocol.FIRES)).sum())
    assert survival.loc["dfa", "c_fires"] == c_fires
    assert survival.loc["dfa", "alignment_readable"] == (c_fires == 0 and survival.loc["dfa", "b_fires"] == 0)


def test_shallow_baselines(data):
    table = ch4.shallow_baselines(data, (0,), width=16, epochs=2)
    assert list(table.columns) == ["model", "seed", "test_acc"]
    assert list(table.model) == ["linear", "no_blocks"] and (table.test_acc > 0.2).all()


# ----------------------------------------------------------------- bad input

@pytest.mark.parametrize("call, match", [
    (lambda d: ch3.calibration_runs(d, ["positive", "bogus"]), r"unknown condition\(s\) bogus; choose from"),
    (lambda d: ch3.calibration_runs(d, []), "give at least one condition"),
    (lambda d: ch3.calibration_runs(d, seeds=[0, 0]), "seeds must be a non-empty list of distinct"),
    (lambda d: ch3.calibration_runs(d, eval_size=1), "eval_size must be an integer of at least 2"),
    (lambda d: ch3.calibration_runs(d, eps=0), "eps must be positive"),
    (lambda d: ch3.calibration_runs(d, depth=3), r"unknown training option\(s\) depth"),
    (lambda d: ch4.diagnostic_runs(d, ["sgd"]), r"unknown method\(s\) sgd"),
    (lambda d: ch4.eval_batches(d, 100, 100), "100 batches of 100 need 10000 evaluation samples"),
    (lambda d: ch4.eval_batches(d, 1, 10), "need at least 2 batches"),
    (lambda d: residual.train_residual("sgd", d), "unknown learning rule 'sgd'"),
])
def test_bad_input_fails_in_one_sentence(data, call, match):
    with pytest.raises(MBEInputError, match=match) as info:
        call(data)
    message = str(info.value)
    assert "\n" not in message and ". " not in message.rstrip(".")


def test_vit_mini_trains_with_dfa_and_its_signals_cover_every_token(data):
    model, rule, record = residual.train_residual("dfa", data, model="vit", width=8, n_blocks=1,
                                                     epochs=1, seed=0)
    assert record["status"] == "ok" and len(rule.matrices) == 2
    x, y = data.x_test[:6], data.y_test[:6]
    signals = residual.credit_signals("dfa", model, rule, x, y)
    hidden, _ = stream.forward_stream(model, x)
    assert [s.shape for s in signals] == [h.shape for h in hidden]       # (N, tokens, width)
    assert torch.equal(signals[1][:, 0], signals[1][:, 3])               # the same at every token
    with pytest.raises(MBEInputError, match="unknown model 'cnn'; choose one of resmlp, vit"):
        residual.train_residual("bp", data, model="cnn", epochs=0)
