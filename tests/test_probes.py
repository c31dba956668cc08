"""Tests of the probe battery (mbe_helpers.probes) and of chapters 01 and 02's modules (acid test, grid audits)."""

from __future__ import annotations

import math
import pickle

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from mbe_helpers import probes, runtime
from mbe_helpers.chapters import acid_test as acid_chapter
from mbe_helpers.chapters import grid as grid_chapter
from mbe_helpers.audit import CLASSES, OUTCOME_SENTENCES, audit, outcome_sentence
from mbe_helpers.errors import MBEInputError
from mbe_helpers.fisher import FIM_KEYS, fim_metrics
from mbe_helpers.grid import Choice, LogUniform, Uniform, config_hash, sample_configs
from mbe_helpers.models import MLP
from mbe_helpers.spectral import spectral_metrics

matplotlib.use("Agg")

TINY = {"width": 8, "depth": 1, "epochs": 3, "n_train": 120, "probe_epochs": [1, 3],
        "fim_samples": 16}


pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(seed: int = 0, width: int = 8) -> MLP:
    torch.manual_seed(seed)
    return MLP(6, [width], 3, "tanh").eval()


def batch(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


# ----------------------------------------------------------------- the battery


def test_fim_probe_uses_a_fixed_sorted_subset_and_equals_fim_metrics() -> None:
    probe = probes.FimProbe(n_samples=16, seed=3)
    rows = probe.rows(40)
    assert len(rows) == 16 and len(set(rows)) == 16 and np.all(np.diff(rows) > 0)
    assert np.array_equal(rows, probes.FimProbe(16, seed=3).rows(40))
    assert not np.array_equal(rows, probes.FimProbe(16, seed=4).rows(40))
    model, (x, y) = small_model(), batch()
    got = probe(model, (x, y))
    want = fim_metrics(model, x[rows], y[rows])
    assert set(FIM_KEYS) <= set(got)
    for key in FIM_KEYS:
        assert got[key] == pytest.approx(want[key], rel=1e-12, nan_ok=True)
    assert np.array_equal(probe.rows(10), np.arange(10))  # a small batch is used whole


@pytest.mark.parametrize("bad", [1, 2.5, True, "64"])
def test_fim_probe_refuses_bad_sizes(bad) -> None:
    with pytest.raises(MBEInputError, match="n_samples must be an integer"):
        probes.FimProbe(bad)


def test_weight_spectrum_and_norm() -> None:
    model = small_model(width=16)
    got = probes.weight_spectrum(model, None)
    ref = spectral_metrics(model)
    assert got["sci"] == ref["sci"] and got["weight_stable_rank"] == ref["stable_rank_mean"]
    assert got["alpha_hat"] == ref["alpha_hat_ln"] or (math.isnan(got["alpha_hat"])
                                                      and math.isnan(ref["alpha_hat_ln"]))
    flat = torch.cat([p.detach().flatten().double() for p in model.parameters()])
    assert probes.weight_norm(model)["weight_norm"] == pytest.approx(float(flat.norm()), rel=1e-12)


def test_random_metric_is_reproducible_and_changes_with_the_weights() -> None:
    model = small_model()
    value = probes.random_metric(model)["random_metric"]
    assert 0 <= value < 1 and value == probes.random_metric(model)["random_metric"]
    assert value != probes.RandomMetric(1)(model)["random_metric"]
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1e-6
    assert value != probes.random_metric(model)["random_metric"]


def test_random_metric_is_uniform_and_unrelated_to_the_weights() -> None:
    models = [small_model(seed) for seed in range(300)]
    values = np.array([probes.random_metric(m)["random_metric"] for m in models])
    norms = np.array([probes.weight_norm(m)["weight_norm"] for m in models])
    assert stats.kstest(values, "uniform").pvalue > 1e-3
    assert abs(stats.spearmanr(values, norms).statistic) < 0.2


def test_battery_run_is_picklable_and_records_every_metric_at_every_probe_epoch() -> None:
    run = pickle.loads(pickle.dumps(probes.grid_run))
    record = run(TINY)
    assert record["status"] == "ok" and 0 <= record["test_acc"] <= 1
    for epoch in (1, 3):
        for name in (*probes.BATTERY, "val_loss"):
            assert isinstance(record[f"{name}@{epoch}"], float), name
    assert record["fim_norm@3"] > 0
    # the battery settings are part of the config, hence of the ledger key
    assert config_hash(TINY) != config_hash({**TINY, "fim_samples": 32})


@pytest.mark.parametrize("model", ["resmlp", "cnn"])
def test_battery_run_probes_the_paper_architectures(model) -> None:
    record = probes.grid_run({**TINY, "model": model, "epochs": 1, "probe_epochs": [1]})
    assert record["status"] == "ok" and record["fim_norm@1"] > 0 and record["sci@1"] > 0


def test_run_with_ledger_counts_reused_runs(tmp_path) -> None:
    configs = pd.DataFrame([{**TINY, "seed": s} for s in range(2)])
    ledger = tmp_path / "ledger.jsonl"
    runs, reused = probes.run_with_ledger(configs, probes.grid_run, ledger)
    assert len(runs) == 2 and reused == 0 and (runs.status == "ok").all()
    more = pd.DataFrame([{**TINY, "seed": s} for s in range(3)])
    again, reused = probes.run_with_ledger(more, probes.grid_run, ledger)
    assert len(again) == 3 and reused == 2
    pd.testing.assert_series_equal(again.test_acc.iloc[:2], runs.test_acc)


def test_resolve_device() -> None:
    assert runtime.resolve_device("cpu") == "cpu"
    assert runtime.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------- the acid test


def test_acid_test_configs_share_the_common_condition() -> None:
    configs = acid_chapter.acid_test_configs([50, 100, 200], [0.0, 0.2], noise_n_train=200, seeds=[0, 1],
                                  epochs=5, probe_epochs=[1, 5])
    assert len(configs) == (3 + 2 - 1) * 2
    assert set(configs.columns) >= {"n_train", "label_noise", "seed", "epochs", "probe_epochs"}
    with pytest.raises(MBEInputError, match="at least one size"):
        acid_chapter.acid_test_configs([], [0.0], noise_n_train=50, seeds=[0])


def synthetic_acid_frame(seed: int = 0) -> pd.DataFrame:
    """Runs of both probes: accuracy rises with size and falls with noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in (50, 100, 200, 400, 800):
        for s in range(4):
            rows.append({"n_train": n, "label_noise": 0.0, "seed": s, "status": "ok",
                         "test_acc": 0.5 + 0.1 * np.log2(n / 50) + 0.01 * rng.standard_normal()})
    for p in (0.1, 0.2, 0.3, 0.4):
        for s in range(4):
            rows.append({"n_train": 800, "label_noise": p, "seed": s, "status": "ok",
                         "test_acc": 0.9 - p + 0.01 * rng.standard_normal()})
    rows.append({"n_train": 800, "label_noise": 0.3, "seed": 9, "status": "diverged",
                 "test_acc": np.nan})
    runs = pd.DataFrame(rows)
    runs["loss_like"] = -runs.test_acc + 0.005 * rng.standard_normal(len(runs))
    runs["size_only"] = np.log(runs.n_train) + 0.01 * rng.standard_normal(len(runs))
    runs["noise"] = rng.standard_normal(len(runs))
    return runs


def test_acid_test_frame_labels_probes_and_drops_unfinished_runs() -> None:
    runs = synthetic_acid_frame()
    frame = acid_chapter.acid_test_frame(runs, [50, 100, 200, 400, 800], [0.0, 0.1, 0.2, 0.3, 0.4],
                              noise_n_train=800)
    counts = frame.groupby("probe").size()
    assert counts["capacity"] == 20 and counts["noise"] == 20  # the shared condition in both
    assert frame.status.eq("ok").all()
    noise = frame[frame.probe == "noise"]
    assert sorted(noise.condition.unique()) == [0.0, 0.1, 0.2, 0.3, 0.4]


def test_acid_test_and_verdict() -> None:
    runs = synthetic_acid_frame()
    frame = acid_chapter.acid_test_frame(runs, [50, 100, 200, 400, 800], [0.0, 0.1, 0.2, 0.3, 0.4],
                              noise_n_train=800)
    table = acid_chapter.acid_test(frame, ["loss_like", "size_only", "noise"], bootstrap=300, seed=1)
    assert list(table.columns) == ["probe", "metric", "n_conditions", "n", "rho", "lo", "hi", "p",
                                   "significant"]
    row = table.set_index(["probe", "metric"])
    assert row.loc[("capacity", "loss_like"), "rho"] < -0.9
    assert row.loc[("capacity", "loss_like"), "significant"]
    assert row.loc[("noise", "loss_like"), "n_conditions"] == 5
    assert (row.lo <= row.hi).all()
    # the interval resamples whole conditions (all seeds of one together), not rows
    capacity = frame[frame.probe == "capacity"]
    by_condition = audit(capacity, ["loss_like"], "test_acc", bootstrap=300, cluster="condition",
                         seed=1).table.iloc[0]
    by_row = audit(capacity, ["loss_like"], "test_acc", bootstrap=300, seed=1).table.iloc[0]
    assert row.loc[("capacity", "loss_like"), "lo"] == by_condition.raw_lo != by_row.raw_lo
    assert row.loc[("capacity", "loss_like"), "p"] == pytest.approx(by_condition.raw_p)
    verdict = acid_chapter.acid_verdict(table).set_index("metric")
    assert verdict.loc["loss_like", "verdict"] == "PASS"
    assert verdict.loc["noise", "verdict"] == "FAIL"
    assert "not significant" in verdict.loc["noise", "reason"]
    # size_only is constant across the noise probe: no rho there, hence FAIL
    assert verdict.loc["size_only", "verdict"] == "FAIL"
    assert {"rho_capacity", "lo_noise", "hi_noise", "p_capacity"} <= set(verdict.columns)


def test_acid_verdict_needs_the_same_sign() -> None:
    table = pd.DataFrame({"probe": ["capacity", "noise"], "metric": ["m", "m"],
                          "rho": [0.9, -0.9], "lo": [0.8, -0.95], "hi": [0.95, -0.8],
                          "p": [1e-5, 1e-5], "significant": [True, True]})
    verdict = acid_chapter.acid_verdict(table).iloc[0]
    assert verdict.verdict == "FAIL" and "opposite signs" in verdict.reason


def test_acid_test_refuses_a_bad_alpha() -> None:
    with pytest.raises(MBEInputError, match="alpha"):
        acid_chapter.acid_test(synthetic_acid_frame().assign(probe="x", condition=1.0), ["noise"], alpha=1.5)


# ----------------------------------------------------------------- the grid


def test_grid_space_draws_what_it_says() -> None:
    space = grid_chapter.grid_space(epochs=7, probe_epochs=[1, 7])
    assert isinstance(space["lr"], LogUniform) and isinstance(space["label_noise"], Uniform)
    assert isinstance(space["optimizer"], Choice) and space["epochs"] == 7
    configs = sample_configs(space, 200, seed=0)
    assert configs.lr.between(1e-4, 1e-1).all() and configs.n_train.between(100, 1079).all()
    assert configs.n_train.map(lambda v: isinstance(v, int)).all()
    assert set(configs.optimizer) == {"adam", "sgd"} and (configs.probe_epochs.map(len) == 2).all()
    table = grid_chapter.space_table(space)
    assert list(table.variable) == ["lr", "weight_decay", "width", "depth", "optimizer",
                                    "label_noise", "n_train", "seed"]
    with pytest.raises(MBEInputError, match="lr must be a range"):
        grid_chapter.grid_space(lr=(1e-1, 1e-4))


def test_positive_control_is_a_seeded_noisy_copy() -> None:
    frame = pd.DataFrame({"test_acc": np.linspace(0.1, 0.9, 50)})
    exact = grid_chapter.add_positive_control(frame, noise=0.0)
    assert np.array_equal(exact.positive_control, frame.test_acc)
    a, b = grid_chapter.add_positive_control(frame, seed=1), grid_chapter.add_positive_control(frame, seed=1)
    assert np.array_equal(a.positive_control, b.positive_control)
    assert 0.5 < stats.spearmanr(a.positive_control, frame.test_acc).statistic < 1
    with pytest.raises(MBEInputError):
        grid_chapter.add_positive_control(frame, noise=-1)


def synthetic_grid(n: int = 120, seed: int = 0) -> pd.DataFrame:
    """Runs where accuracy = capability + design effect + noise; loss@e sees the capability."""
    rng = np.random.default_rng(seed)
    capability = rng.standard_normal(n)
    lr = rng.uniform(size=n)
    acc = capability + lr + 0.3 * rng.standard_normal(n)
    frame = pd.DataFrame({"lr": lr, "optimizer": rng.choice(["adam", "sgd"], n),
                          "width": np.full(n, 32), "test_acc": acc})
    for e, sharp in ((5, 1.0), (10, 0.5)):
        frame[f"val_loss@{e}"] = -capability + sharp * rng.standard_normal(n)
        frame[f"proxy@{e}"] = frame[f"val_loss@{e}"] + 0.1 * rng.standard_normal(n)
        frame[f"noise@{e}"] = rng.standard_normal(n)
    return grid_chapter.add_positive_control(frame, noise=0.3, seed=seed)


def test_baseline_audits_summary_and_controls() -> None:
    frame = synthetic_grid()
    design = grid_chapter.varying_columns(frame, ["lr", "optimizer", "width"])
    assert design == ["lr", "optimizer"]
    audits = grid_chapter.baseline_audits(frame, ["proxy@10", "noise@10", "positive_control"], "test_acc",
                               baseline=["val_loss@10"], design=design, bootstrap=200,
                               permutations=200, seed=0, adjust="rank")   # the published thresholds
    assert set(audits) == {"baseline", "design", "both"}
    assert audits["both"].controls == ["val_loss@10", "lr", "optimizer"]
    summary = grid_chapter.audit_summary(audits, strip="@10")
    assert list(summary.metric) == ["proxy", "noise", "positive_control"]
    rows = summary.set_index("metric")
    assert rows.loc["proxy", "class_baseline"] == "washout"
    assert rows.loc["positive_control", "class_both"] == "survives"
    for name in ("baseline", "design", "both"):
        assert {f"partial_{name}", f"lo_{name}", f"hi_{name}", f"perm_p_{name}", f"q_{name}",
                f"class_{name}"} <= set(summary.columns)
    checks = grid_chapter.control_checks(summary, positive="positive_control", negative="noise")
    assert checks.landed.all() and list(checks.control) == ["positive", "negative"]
    bad = grid_chapter.control_checks(summary, positive="noise", negative="positive_control")
    assert not bad.landed.any()
    with pytest.raises(MBEInputError, match="not in the summary"):
        grid_chapter.control_checks(summary, positive="absent", negative="noise")
    sentence = grid_chapter.classes_sentence(summary, "class_baseline", exclude=["positive_control"])
    assert "washout: proxy" in sentence and "positive_control" not in sentence


def test_temporal_audit_uses_the_baseline_of_each_epoch() -> None:
    frame = synthetic_grid()
    temporal = grid_chapter.temporal_audit(frame, ["proxy", "noise"], "test_acc", [5, 10],
                                fixed_metrics=["positive_control"])
    assert list(temporal.columns[:3]) == ["epoch", "group", "metric"]
    assert len(temporal) == 6 and set(temporal.metric) == {"proxy", "noise", "positive_control"}
    assert set(temporal.controls) == {"val_loss@5", "val_loss@10"}
    proxy = temporal[temporal.metric == "proxy"].set_index("epoch")
    assert abs(proxy.loc[10, "partial_r"]) < 0.2


def test_outcome_sentences_cover_every_class() -> None:
    assert set(OUTCOME_SENTENCES) == set(CLASSES)
    assert "re-expresses" in outcome_sentence("washout")
    with pytest.raises(MBEInputError, match="unknown outcome class"):
        outcome_sentence("great")


# ----------------------------------------------------------------- figures


def test_case_study_figures_draw() -> None:
    from mbe_helpers import plots

    runs = synthetic_acid_frame()
    frame = acid_chapter.acid_test_frame(runs, [50, 100, 200, 400, 800], [0.0, 0.1, 0.2, 0.3, 0.4],
                              noise_n_train=800)
    table = acid_chapter.acid_test(frame, ["loss_like", "noise"], bootstrap=100)
    grid = synthetic_grid(60)
    audits = grid_chapter.baseline_audits(grid, ["proxy@10", "noise@10"], "test_acc",
                               baseline=["val_loss@10"], design=["lr"], bootstrap=100)
    temporal = grid_chapter.temporal_audit(grid, ["proxy", "noise"], "test_acc", [5, 10], bootstrap=100)
    figures = [plots.acid_test_figure(frame, ["loss_like"]), plots.rho_forest_figure(table),
               plots.design_figure(grid.assign(n_train=100), ["lr", "n_train"], hue="optimizer"),
               plots.baseline_figure(grid_chapter.audit_summary(audits, strip="@10")),
               plots.temporal_figure(temporal, highlight=("proxy",))]
    assert [len(f.axes) for f in figures[:2]] == [4, 1]
    assert all(f.axes for f in figures)
    import matplotlib.pyplot as plt
    plt.close("all")
