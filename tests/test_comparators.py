"""The field's yardsticks (mbe_helpers.comparators) against hand-computed cases and the peer mbe-eval 0.5."""

from __future__ import annotations

import doctest
import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mbe_eval import comparators as peer
from mbe_eval import robust_sign_error as peer_rse

from mbe_helpers import comparators
from mbe_helpers.cli import main
from mbe_helpers.comparators import (conditional_mi, granulated_kendall, hoeffding_weight,
                                     robust_sign_error, sign_error_environments)
from mbe_helpers.errors import MBEInputError

HPS = ["lr", "width", "depth", "opt"]


def factorial_grid(seed: int = 0, seeds: int = 4) -> pd.DataFrame:
    """3 x 3 x 2 x 2 = 36 configurations x ``seeds`` seeds; continuous metric and gap (no ties)."""
    rng = np.random.default_rng(seed)
    grid = pd.DataFrame(list(itertools.product([1e-3, 1e-2, 1e-1], [32, 64, 128], [2, 4], ["sgd", "adam"])),
                        columns=HPS)
    grid["config"] = [f"c{i:02d}" for i in range(len(grid))]
    df = grid.loc[grid.index.repeat(seeds)].reset_index(drop=True)
    skill = (-0.3 * np.log10(df.lr) + 0.2 * np.log2(df.width) - 0.1 * df.depth
             + 0.2 * (df.opt == "adam")).to_numpy()
    df["gap"] = np.clip(0.1 + 0.05 * skill + rng.normal(0, 0.03, len(df)), 0, 1)
    df["metric"] = skill + rng.normal(0, 0.5, len(df))
    return df


def tied_grid(seed: int = 1) -> pd.DataFrame:
    """The factorial grid with 6 seeds, 15 % of the runs lost (unequal seeds, some cells short),
    the metric rounded to integers and the gap to 1/100 (many ties), and 5 metrics missing."""
    df = factorial_grid(seed, seeds=6).sample(frac=0.85, random_state=seed).reset_index(drop=True)
    df["metric"] = df.metric.round(0)
    df["gap"] = df.gap.round(2)
    df.loc[np.random.default_rng(seed).choice(len(df), 5, replace=False), "metric"] = np.nan
    return df


GRIDS = {"factorial": factorial_grid, "ties_and_seeds": tied_grid}


# --------------------------------------------------------------------------- #
# Hand-computed cases                                                         #
# --------------------------------------------------------------------------- #

def test_granulated_kendall_by_hand() -> None:
    # lr x width = 3 x 2, one run each. Cells of lr: width=8 holds mu (1, 2, 3) vs gap (.1, .2, .3):
    # 3 concordant pairs, tau = 1; width=16 holds mu (4, 6, 5) vs gap (.4, .5, .6): pairs (4,6) +,
    # (4,5) +, (6,5) -, tau = (2 - 1) / 3. psi_lr = (1 + 1/3) / 2 = 2/3. Cells of width: one pair per
    # lr, all concordant, psi_width = 1. Psi = (2/3 + 1) / 2 = 5/6.
    runs = pd.DataFrame({"lr": [1, 2, 3, 1, 2, 3], "width": [8, 8, 8, 16, 16, 16],
                         "mu": [1.0, 2.0, 3.0, 4.0, 6.0, 5.0], "gap": [.1, .2, .3, .4, .5, .6]})
    table = granulated_kendall(runs, "mu", "gap", ["lr", "width"])
    assert table.hyperparameter.tolist() == ["lr", "width", "overall"]
    np.testing.assert_allclose(table.value, [2 / 3, 1.0, 5 / 6], rtol=0, atol=1e-15)
    assert table.cells.tolist() == [2, 3, 5] and table.finite_cells.tolist() == [2, 3, 5]


def test_granulated_kendall_ties_tau_a_and_tau_b_by_hand() -> None:
    # One cell, mu (1, 1, 2), gap (1, 2, 3): pair (1,2) is tied in mu and counts 0, the other two
    # are concordant. Jiang's tau (tau-a) = 2 / 3 pairs; tau-b = 2 / sqrt((3 - 1) * (3 - 0)).
    runs = pd.DataFrame({"lr": [1, 2, 3], "mu": [1.0, 1.0, 2.0], "gap": [.1, .2, .3]})
    a = granulated_kendall(runs, "mu", "gap", "lr").value.iloc[0]
    b = granulated_kendall(runs, "mu", "gap", "lr", tau="b").value.iloc[0]
    assert a == pytest.approx(2 / 3, abs=1e-15) and b == pytest.approx(2 / math.sqrt(6), abs=1e-15)
    # a constant metric: tau-a is 0, tau-b undefined (a NaN row that says why)
    flat = runs.assign(mu=1.0)
    assert granulated_kendall(flat, "mu", "gap", "lr").value.iloc[0] == 0.0
    row = granulated_kendall(flat, "mu", "gap", "lr", tau="b").iloc[0]
    assert np.isnan(row.value) and "undefined in all 1 cells" in row.note


def test_granulated_kendall_group_averages_seeds_first() -> None:
    # two seeds per configuration; their means are mu (1.5, 2.5, 2.0), gap (.15, .25, .35) over lr:
    # pairs (1,2) +, (1,3) +, (2,3) -: tau = 1/3. Without group the six runs are six points.
    runs = pd.DataFrame({"cfg": ["a", "a", "b", "b", "c", "c"], "lr": [1, 1, 2, 2, 3, 3],
                         "mu": [1.0, 2.0, 2.0, 3.0, 1.5, 2.5], "gap": [.1, .2, .2, .3, .3, .4]})
    assert granulated_kendall(runs, "mu", "gap", "lr", group="cfg").value.iloc[0] == pytest.approx(1 / 3)
    assert granulated_kendall(runs, "mu", "gap", "lr").value.iloc[0] != pytest.approx(1 / 3)


def test_granulated_kendall_incomplete_grid_and_min_levels() -> None:
    # width=16 has only lr=1 (one level: not an eligible cell of lr); lr=2, 3 have one width each
    # (not eligible cells of width).
    runs = pd.DataFrame({"lr": [1, 2, 3, 1], "width": [8, 8, 8, 16],
                         "mu": [1.0, 3.0, 2.0, 5.0], "gap": [.1, .2, .3, .4]})
    table = granulated_kendall(runs, "mu", "gap", ["lr", "width"]).set_index("hyperparameter")
    assert table.loc["lr", "cells"] == 1 and table.loc["lr", "value"] == pytest.approx(1 / 3)
    assert table.loc["width", "cells"] == 1 and table.loc["width", "value"] == 1.0
    strict = granulated_kendall(runs, "mu", "gap", ["lr", "width"], min_levels=3).set_index("hyperparameter")
    assert np.isnan(strict.loc["width", "value"]) and "at least 3 levels" in strict.loc["width", "note"]
    assert strict.loc["overall", "value"] == pytest.approx(1 / 3)


def test_conditional_mi_by_hand() -> None:
    # mu (1, 2, 3), gap (.1, .3, .2). The six ordered pairs (V_mu, V_g): (0,1) 00, (1,0) 11, (0,2) 00,
    # (2,0) 11, (1,2) 01, (2,1) 10. Unconditionally p(00) = p(11) = 1/3, p(01) = p(10) = 1/6, the
    # marginals are 1/2:  I = 2/3 log(4/3) + 1/3 log(2/3), H(V_g) = log 2.
    # Given depth (2, 2, 4) of both runs: U = (2,2) holds 00 and 11 (I = H = log 2 there, p(U) = 1/3);
    # U = (2,4) holds 00, 01 and U = (4,2) holds 11, 10: V_mu constant, I = 0, H = log 2.
    # So I(.|U) = log(2) / 3, H(.|U) = log 2 and the normalised CMI is 1/3; K = the minimum.
    runs = pd.DataFrame({"mu": [1.0, 2.0, 3.0], "gap": [.1, .3, .2], "depth": [2, 2, 4]})
    table = conditional_mi(runs, "mu", "gap", ["depth"]).set_index("conditioning")
    none = 2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)
    assert table.loc["none", "information"] == pytest.approx(none, abs=1e-15)
    assert table.loc["none", "entropy"] == pytest.approx(math.log(2), abs=1e-15)
    assert table.loc["none", "normalized_cmi"] == pytest.approx(none / math.log(2), abs=1e-15)
    assert table.loc["depth", "information"] == pytest.approx(math.log(2) / 3, abs=1e-15)
    assert table.loc["depth", "normalized_cmi"] == pytest.approx(1 / 3, abs=1e-15)
    assert table.loc["depth", "conditions"] == 3 and table.loc["depth", "pairs"] == 6
    assert table.loc["overall", "normalized_cmi"] == table.loc["none", "normalized_cmi"]
    assert "at none" in table.loc["overall", "note"]


def test_conditional_mi_perfect_order_and_undefined_entropy() -> None:
    runs = pd.DataFrame({"mu": [1.0, 2.0, 3.0, 4.0], "gap": [.1, .2, .3, .4], "lr": [1, 2, 3, 4]})
    table = conditional_mi(runs, "mu", "gap", ["lr"]).set_index("conditioning")
    assert table.loc["none", "normalized_cmi"] == pytest.approx(1.0)   # V_mu = V_g in every pair
    # given the levels of both runs every condition holds one pair: the target's order is fixed
    assert np.isnan(table.loc["lr", "normalized_cmi"]) and "fixes the target's order" in table.loc["lr", "note"]
    assert table.loc["overall", "normalized_cmi"] == pytest.approx(1.0)


def naive_cmi(df: pd.DataFrame, metric: str, target: str, subset: list[str]) -> tuple[float, float]:
    """I and H from a Python loop over the ordered pairs: the definition, written out."""
    counts: dict = {}
    rows = df.to_dict("records")
    for a, b in itertools.permutations(range(len(rows)), 2):
        u = tuple(rows[a][h] for h in subset) + tuple(rows[b][h] for h in subset)
        key = (u, rows[a][metric] > rows[b][metric], rows[a][target] > rows[b][target])
        counts[key] = counts.get(key, 0) + 1
    total = sum(counts.values())
    cu, cux, cuy = {}, {}, {}
    for (u, v, w), c in counts.items():
        cu[u] = cu.get(u, 0) + c
        cux[u, v] = cux.get((u, v), 0) + c
        cuy[u, w] = cuy.get((u, w), 0) + c
    info = sum(c / total * math.log(c * cu[u] / (cux[u, v] * cuy[u, w])) for (u, v, w), c in counts.items())
    entropy = -sum(c / total * math.log(c / cu[u]) for (u, w), c in cuy.items())
    return info, entropy


def test_conditional_mi_equals_the_definition_in_small_blocks(monkeypatch) -> None:
    df = tied_grid().dropna().groupby("config").head(1).reset_index(drop=True)  # 36 runs, ties
    monkeypatch.setattr(comparators, "PAIR_BLOCK", 100)  # many row blocks
    table = conditional_mi(df, "metric", "gap", HPS[:3])
    for row in table.iloc[:-1].itertuples():
        subset = [] if row.conditioning == "none" else row.conditioning.split(",")
        info, entropy = naive_cmi(df, "metric", "gap", subset)
        assert row.information == pytest.approx(info, abs=1e-12)
        assert row.entropy == pytest.approx(entropy, abs=1e-12)


def test_hoeffding_weight_by_hand() -> None:
    # w = max(0, 1 - 2 exp(-2 n (d/2)^2))^2: n = 100, d = 0.2 gives (1 - 2 e^-2)^2; d = 0.1 gives
    # 1 - 2 e^-0.5 < 0, so 0.
    np.testing.assert_allclose(hoeffding_weight(np.array([0.2, 0.1, 0.4]), 100),
                               [(1 - 2 * math.exp(-2)) ** 2, 0.0, (1 - 2 * math.exp(-8)) ** 2], rtol=1e-15)


def test_sign_error_by_hand() -> None:
    # Two configurations lr = 1 (mu 1, 4; gap .1, .3) and lr = 2 (mu 2, 3; gap .2, .5): four pairs of
    # seeds. Signs agree in (1,2), (1,3), (4,2) and disagree in (4,3): gap .3 < .5 but mu 4 > 3.
    runs = pd.DataFrame({"lr": [1, 1, 2, 2], "mu": [1.0, 4.0, 2.0, 3.0], "gap": [.1, .3, .2, .5]})
    # n = 10000: every |gap difference| >= 0.1 has weight 1, shifted to 0.5: L = 1/4, ESS = 2^2 / 1 = 4
    env = sign_error_environments(runs, "mu", "gap", ["lr"], min_ess=4)
    assert env.sign_error.tolist() == [0.25, 0.25] and env.effective_sample_size.tolist() == [4.0, 4.0]
    assert env.pairs.tolist() == [4, 4] and env.kept.all()
    # n = 100: the pairs differ by .1 (weight 0), .4, .1 (weight 0) and .2; only (4,3) at d = .2 errs
    w2, w4 = (1 - 2 * math.exp(-2)) ** 2 - 0.5, (1 - 2 * math.exp(-8)) ** 2 - 0.5
    env = sign_error_environments(runs, "mu", "gap", ["lr"], test_size=100, min_ess=0)
    assert env.sign_error.iloc[0] == pytest.approx(w2 / (w2 + w4), abs=1e-15)
    assert env.weight_sum.iloc[0] == pytest.approx(w2 + w4, abs=1e-15)
    assert env.effective_sample_size.iloc[0] == pytest.approx((w2 + w4) ** 2 / (w2 ** 2 + w4 ** 2), abs=1e-12)
    # the default minimum ESS of 12 drops both: a NaN summary that says why
    summary = robust_sign_error(runs, "mu", "gap", ["lr"])
    assert summary.environments.tolist() == [0, 0] and summary.dropped.tolist() == [2, 2]
    assert summary["max"].isna().all() and "minimum effective sample size 12" in summary.note.iloc[0]


def test_robust_sign_error_summary_by_hand() -> None:
    # A (lr 1, wd 1), B (lr 2, wd 1), C (lr 1, wd 2), two seeds each, n = 10000 (every weight 0.5):
    # A-B differs in lr: mu A (1, 4), B (2, 3), gap A (.1, .3), B (.2, .5): L = 1/4 (as above).
    # A-C differs in wd: mu C (0, 5), gap C (.6, .7): every gap of C is larger, mu 0 < 1, 0 < 4 err,
    # 5 > 1, 5 > 4 agree: L = 1/2. B-C differ in both: no environment.
    runs = pd.DataFrame({"lr": [1, 1, 2, 2, 1, 1], "wd": [1, 1, 1, 1, 2, 2],
                         "mu": [1.0, 4.0, 2.0, 3.0, 0.0, 5.0], "gap": [.1, .3, .2, .5, .6, .7]})
    table = robust_sign_error(runs, "mu", "gap", ["lr", "wd"], min_ess=4).set_index("hyperparameter")
    # overall: [1/4, 1/4, 1/2, 1/2] (both orders): mean 3/8, 90th percentile (linear) at 2.7 -> 1/2
    assert table.loc["overall", ["environments", "mean", "p90", "max"]].tolist() == [4, 0.375, 0.5, 0.5]
    assert table.loc["lr", ["environments", "mean", "max"]].tolist() == [2, 0.25, 0.25]
    assert table.loc["wd", ["environments", "mean", "max"]].tolist() == [2, 0.5, 0.5]


def test_pair_blocks_enumerate_each_pair_of_a_cell_once() -> None:
    cell = np.random.default_rng(0).integers(0, 7, 200)
    expected = {(i, j) for i in range(200) for j in range(i + 1, 200) if cell[i] == cell[j]}
    for block in (1, 13, 10_000):
        found = [tuple(sorted(p)) for i, j in comparators._pair_blocks(cell, block) for p in zip(i, j)]
        assert len(found) == len(expected) and set(found) == expected


def test_small_blocks_change_nothing(monkeypatch) -> None:
    df = tied_grid()
    before = (granulated_kendall(df, "metric", "gap", HPS, tau="b"),
              robust_sign_error(df, "metric", "gap", HPS, group="config"))
    monkeypatch.setattr(comparators, "PAIR_BLOCK", 50)
    after = (granulated_kendall(df, "metric", "gap", HPS, tau="b"),
             robust_sign_error(df, "metric", "gap", HPS, group="config"))
    for a, b in zip(before, after):
        pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-12)


def test_docstring_examples() -> None:
    result = doctest.testmod(comparators, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 10 and result.failed == 0


# --------------------------------------------------------------------------- #
# Equality with the peer (mbe-eval 0.5)                                       #
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("group", [None, "config"])
def test_granulated_kendall_equals_peer(grid: str, group: str | None) -> None:
    df = GRIDS[grid]()
    psi, detail = peer.granulated_kendall(df, "metric", "gap", HPS, group_col=group)
    ours = granulated_kendall(df, "metric", "gap", HPS, group=group, tau="b")  # the peer uses tau-b
    assert np.max(np.abs(ours.value.to_numpy()[:-1] - detail.granulated_kendall.to_numpy())) <= 1e-9
    assert abs(ours.value.iloc[-1] - psi) <= 1e-9
    assert ours.cells.tolist()[:-1] == detail.eligible_cells.tolist()
    assert ours.finite_cells.tolist()[:-1] == detail.finite_cells.tolist()
    paper = granulated_kendall(df, "metric", "gap", HPS, group=group)     # Jiang's tau-a
    if grid == "factorial":  # nothing tied: the two coefficients agree
        assert np.max(np.abs(paper.value.to_numpy() - ours.value.to_numpy())) <= 1e-12
    else:
        assert np.max(np.abs(paper.value.to_numpy() - ours.value.to_numpy())) > 1e-3


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("group", [None, "config"])
def test_conditional_mi_equals_peer(grid: str, group: str | None) -> None:
    df = GRIDS[grid]()
    score, detail = peer.jiang_normalized_cmi(df, "metric", "gap", HPS, group_col=group)
    ours = conditional_mi(df, "metric", "gap", HPS, group=group)
    body = ours.iloc[:-1]
    assert body.conditioning.tolist() == detail.conditioning.tolist()
    for mine, theirs in (("normalized_cmi", "normalized_cmi"), ("information", "conditional_mutual_information"),
                         ("entropy", "target_conditional_entropy")):
        assert np.max(np.abs(body[mine].to_numpy() - detail[theirs].to_numpy())) <= 1e-9
    assert body.conditions.tolist() == detail.conditions.tolist()
    assert body.pairs.tolist() == detail.ordered_pairs.tolist()
    assert abs(ours.normalized_cmi.iloc[-1] - score) <= 1e-9


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("group", [None, "config"])
def test_robust_sign_error_equals_peer(grid: str, group: str | None) -> None:
    df = GRIDS[grid]()
    env = peer_rse.robust_sign_error_environments(df, ["metric"], HPS, target="gap", config_column="config")
    theirs = peer_rse.robust_sign_error_summary(env, ["metric"]).set_index("hyperparameter")
    ours = robust_sign_error(df, "metric", "gap", HPS, group=group).set_index("hyperparameter")
    ours = ours.rename(index={"overall": "all"}).loc[theirs.index]
    assert ours.environments.tolist() == theirs.environments.tolist()
    assert ours.environments.iloc[0] > 20
    assert np.max(np.abs(ours[["mean", "p90", "max"]].to_numpy()
                         - theirs[["mean_sign_error", "p90_sign_error", "max_sign_error"]].to_numpy())) <= 1e-9
    # environment by environment
    mine = sign_error_environments(df, "metric", "gap", HPS, group="config")
    mine = mine[mine.kept].set_index(["source", "destination"]).sort_index()
    env = env.set_index(["source_config", "destination_config"]).sort_index()
    assert mine.index.tolist() == env.index.tolist()
    assert np.max(np.abs(mine.sign_error.to_numpy() - env.metric.to_numpy())) <= 1e-9
    assert np.max(np.abs(mine.effective_sample_size.to_numpy() - env.effective_sample_size.to_numpy())) <= 1e-9


# --------------------------------------------------------------------------- #
# Bad input                                                                   #
# --------------------------------------------------------------------------- #

RUNS = factorial_grid().assign(word="x", flag=True, cplx=1j, acc=lambda d: 100 * d.gap)
ALL = [granulated_kendall, conditional_mi, robust_sign_error]


@pytest.mark.parametrize("fn", ALL, ids=lambda f: f.__name__)
@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(metric="nope"), r"unknown column 'nope'; available columns: lr, width"),
    (dict(metric="word"), r"column 'word' must be numeric \(it has dtype (object|str)\)"),
    (dict(metric="flag"), r"column 'flag' must be numeric"),
    (dict(metric="cplx"), r"column 'cplx' holds complex numbers"),
    (dict(metric=["metric"]), r"metric must be one column name"),
    (dict(hyperparameters=[]), r"no hyperparameter given"),
    (dict(hyperparameters=["lr", "lr"]), r"hyperparameter 'lr' is listed twice"),
    (dict(hyperparameters=["lr", "word"]), r"hyperparameter 'word' has one level \('x'\) in the complete rows"),
    (dict(hyperparameters=["lr", "gap"]), r"the target 'gap' is also listed as a hyperparameter"),
    (dict(target="metric"), r"the metric and the target are the same column 'metric'"),
    (dict(group="lr"), r"the group 'lr' is also listed as a hyperparameter"),
    (dict(group="opt", hyperparameters=["lr"]), r"group '(sgd|adam)' mixes levels 0.001 and 0.01 of hyperparameter 'lr'; a group must be one"),
    (dict(df=RUNS.assign(metric=np.nan)), r"no complete row: every run misses 'metric'"),
    (dict(df=[1, 2]), r"expected a pandas DataFrame"),
])
def test_bad_input_is_one_sentence(fn, kwargs: dict, message: str) -> None:
    args = dict(df=RUNS, metric="metric", target="gap", hyperparameters=HPS)
    args.update(kwargs)
    with pytest.raises(MBEInputError, match=message) as info:
        fn(args.pop("df"), args.pop("metric"), args.pop("target"), args.pop("hyperparameters"), **args)
    assert "\n" not in str(info.value)


DIAGONAL = pd.DataFrame({"lr": [1, 2, 3], "wd": [1, 2, 3], "m": [1.0, 2.0, 3.0], "g": [.1, .3, .2]})


@pytest.mark.parametrize(("call", "message"), [
    (lambda: granulated_kendall(DIAGONAL, "m", "g", ["lr", "wd"]), r"no eligible cell: no hyperparameter"),
    (lambda: robust_sign_error(DIAGONAL, "m", "g", ["lr", "wd"]), r"no eligible cell: no two configurations"),
    (lambda: conditional_mi(DIAGONAL.iloc[:2], "m", "g", ["lr"]), r"needs at least 3 runs"),
    (lambda: robust_sign_error(RUNS, "metric", "acc", HPS), r"fraction in \[-1, 1\].*divide a percentage"),
    (lambda: granulated_kendall(RUNS, "metric", "gap", HPS, min_levels=1), r"min_levels must be an integer"),
    (lambda: granulated_kendall(RUNS, "metric", "gap", HPS, tau="c"), r"tau must be 'a'"),
    (lambda: conditional_mi(RUNS, "metric", "gap", HPS, max_conditioning=-1), r"max_conditioning must be"),
    (lambda: conditional_mi(pd.DataFrame({"u": np.arange(2100), "m": np.arange(2100.0), "g": 0.5}), "m", "g",
                            ["u"]), r"conditioning on u makes 2100 level combinations, more than 2048"),
    (lambda: robust_sign_error(RUNS, "metric", "gap", HPS, test_size=0), r"test_size must be an integer"),
    (lambda: robust_sign_error(RUNS, "metric", "gap", HPS, min_weight=1.5), r"min_weight must be a number"),
])
def test_bad_settings_and_grids_are_one_sentence(call, message: str) -> None:
    with pytest.raises(MBEInputError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_an_axis_without_cells_is_a_nan_row_with_its_reason() -> None:
    # the wd=2 runs exist only at lr=1: wd has one eligible cell, lr's cells exist only at wd=1
    runs = pd.DataFrame({"lr": [1, 2, 3, 1], "wd": [1, 1, 1, 2], "m": [1.0, 2.0, 3.0, 4.0],
                         "g": [.1, .3, .2, .4], "seed": 0})
    table = robust_sign_error(runs, "m", "g", ["lr", "wd"], min_ess=0).set_index("hyperparameter")
    assert table.loc["lr", "environments"] == 6 and table.loc["wd", "environments"] == 2
    runs = runs.iloc[:3].assign(wd=[1, 1, 2])   # only lr=3 has wd=2, no cell of wd has two levels
    kendall = granulated_kendall(runs, "m", "g", ["lr", "wd"]).set_index("hyperparameter")
    assert np.isnan(kendall.loc["wd", "value"]) and "no cell where only 'wd' varies" in kendall.loc["wd", "note"]
    sign = robust_sign_error(runs, "m", "g", ["lr", "wd"], min_ess=0).set_index("hyperparameter")
    assert np.isnan(sign.loc["wd", "max"]) and "no two configurations differ only in 'wd'" in sign.loc["wd", "note"]


# --------------------------------------------------------------------------- #
# The command line                                                            #
# --------------------------------------------------------------------------- #

def test_cli_audit_with_comparators(capsys, tmp_path: Path) -> None:
    df = factorial_grid().assign(other=lambda d: d.metric + np.random.default_rng(5).normal(0, 1, len(d)))
    path = tmp_path / "runs.csv"
    df.to_csv(path, index=False)
    md, csv = tmp_path / "report.md", tmp_path / "report.csv"
    status = main(["audit", str(path), "--metrics", "metric,other", "--target", "gap", "--controls", "lr,width",
                   "--adjust", "rank", "--placebos", "0", "--comparators", "lr,width,depth,opt",
                   "--out", str(md), "--out", str(csv)])
    assert status == 0
    out = capsys.readouterr().out
    assert "Granulated Kendall" in out and "robust sign-error" in out
    text = md.read_text()
    assert "| metric" in text and "**Comparators** against 'gap'" in text
    assert text.count("| other | overall |") == 3 and "| metric | none |" in text
    for name, fn in (("granulated_kendall", granulated_kendall), ("conditional_mi", conditional_mi),
                     ("robust_sign_error", robust_sign_error)):
        written = pd.read_csv(tmp_path / f"report_{name}.csv", keep_default_na=False, na_values=[""])
        assert written.metric.unique().tolist() == ["metric", "other"]
        direct = fn(df, "other", "gap", HPS)
        column = {"conditional_mi": "normalized_cmi", "robust_sign_error": "max"}.get(name, "value")
        np.testing.assert_allclose(written[written.metric == "other"][column].to_numpy(dtype=float),
                                   direct[column].to_numpy(dtype=float), rtol=1e-12)


def test_cli_comparators_bad_column_is_one_line(capsys, tmp_path: Path) -> None:
    path = tmp_path / "runs.csv"
    factorial_grid().to_csv(path, index=False)
    status = main(["audit", str(path), "--metrics", "metric", "--target", "gap", "--adjust", "rank",
                   "--placebos", "0", "--comparators", "lr,nope"])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mbe-book: error: unknown column 'nope'")
