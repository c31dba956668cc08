"""Size of the cross-fitted test on conditional nulls that the learner was not chosen on.

The scenarios of :mod:`mbe_helpers.simulate` chose the learner; these are
held out: a step whose place moves with a categorical control, a staircase,
a metric with a step the target lacks, heavy-tailed (t, 3 df) noise, a
target with many ties (an accuracy on 50 test items), an additive proxy
through three controls, a smooth bump in two controls, an additive proxy
through five controls and a grid-like proxy through five controls (an
optimum learning rate that moves with the optimizer, a width x depth
interaction; one run per configuration): ``additive_proxy_5`` and
``grid_proxy_5`` of :mod:`mbe_helpers.simulate`, which chapter 05 also runs, and the
same with three idle controls (``grid_proxy_8``). Four more were written after the
learner was final: a metric that is an exact function of two controls, a sharp
optimum in log lr, a V whose bottom moves with the batch size, and a U-shaped
proxy rounded to integers. Each is a
conditional null (the metric's noise is independent of the target's given
the controls). Prints the rejection rate at alpha = 0.05 with Wilson 95 %
intervals for each scenario and n.

Nine more come from a fuzzing pass over the finished audit (see the comment above
``UNSEEN``); ``--claims`` prints how often the classes claim information on each.

Run: ``python bench/unseen_nulls.py [--reps 200] [--n 150 300 1000] [--only NAME ...]
[--link probit|identity] [--claims]``.
"""

from __future__ import annotations

import argparse
import functools

import numpy as np
import pandas as pd

from heldout import add_link_argument, print_rates  # bench/heldout.py, beside this script
from mbe_helpers import simulate
from mbe_helpers.simulate import Scenario


def _moving_step(rng, n):
    b = rng.uniform(0, 1, n)
    optimizer = rng.choice(["adam", "sgd"], n)
    f = (b > np.where(optimizer == "adam", 0.3, 0.7)) + 0.3 * b
    return pd.DataFrame({"b": b, "optimizer": optimizer, "metric": f + rng.normal(0, 0.3, n),
                         "target": f + rng.normal(0, 0.3, n)})


def _staircase(rng, n):
    b = rng.uniform(0, 1, n)
    f = np.floor(4 * b) / 3
    return pd.DataFrame({"b": b, "metric": f + rng.normal(0, 0.25, n),
                         "target": f + rng.normal(0, 0.25, n)})


def _metric_step_only(rng, n):
    b = rng.uniform(0, 1, n)
    return pd.DataFrame({"b": b, "metric": (b > 0.5) + rng.normal(0, 0.3, n),
                         "target": np.sin(4 * b) + rng.normal(0, 0.3, n)})


def _heavy_tails(rng, n):
    b = rng.uniform(-2, 2, n)
    f = np.abs(b)
    return pd.DataFrame({"b": b, "metric": f + 0.3 * rng.standard_t(3, n),
                         "target": f + 0.3 * rng.standard_t(3, n)})


def _tied_accuracy(rng, n):
    lr = rng.uniform(-1, 1, n)
    skill = 1 / (1 + np.exp(-(1.5 - 4 * lr**2)))
    return pd.DataFrame({"lr": lr, "metric": skill + rng.normal(0, 0.1, n),
                         "target": rng.binomial(50, 0.3 + 0.6 * skill) / 50})


def _additive_three(rng, n):
    b = rng.uniform(-1, 1, (n, 3))
    f = np.sin(2 * b[:, 0]) + b[:, 1] ** 2 + np.exp(b[:, 2])
    return pd.DataFrame({"b1": b[:, 0], "b2": b[:, 1], "b3": b[:, 2],
                         "metric": f + rng.normal(0, 0.4, n), "target": f + rng.normal(0, 0.4, n)})


def _bump(rng, n):
    b = rng.uniform(-1, 1, (n, 2))
    f = 2 * np.exp(-4 * ((b[:, 0] - 0.3) ** 2 + (b[:, 1] + 0.2) ** 2))
    return pd.DataFrame({"b1": b[:, 0], "b2": b[:, 1], "metric": f + rng.normal(0, 0.4, n),
                         "target": f + rng.normal(0, 0.4, n)})


def _grid_proxy_8(rng, n):
    frame = simulate.SCENARIOS["grid_proxy_5"].generate(rng, n)
    frame.insert(5, "momentum", rng.uniform(0, 1, n))           # three controls that do nothing
    frame.insert(6, "noise", rng.uniform(0, 0.4, n))
    frame.insert(7, "arch", rng.choice(["mlp", "cnn", "res"], n))
    return frame


# Four more, written after the learner (and the single index) was final. Seed 21, 200
# repetitions, crossfit size at n = 60 / 150 / 300 / 1000: exact_proxy 6.5 / 4.5 / 7 / 10 %
# (the last significantly above alpha: a metric without noise of its own is all learner
# misfit, whose correlation with the target's misfit shrinks slower than the test's error;
# 40 audits at n = 1000 still classed it washout 31 times, inconclusive 9, never a claim);
# narrow_peak 7 / 8 / 6.5 / 4.5 %; ratio_proxy 7 / 2.5 / 3.5 / 2.5 %; discrete_metric
# 6 / 2.5 / 5.5 / 3.5 %.


def _exact_proxy(rng, n):
    lr, wd = rng.uniform(-4, -1, n), rng.uniform(-6, -2, n)
    return pd.DataFrame({"lr": lr, "wd": wd, "metric": (lr + 2.5) ** 2 + 0.1 * wd,
                         "target": np.exp(-(lr + 2.3) ** 2) + 0.05 * wd + rng.normal(0, 0.2, n)})


def _narrow_peak(rng, n):
    lr, width = rng.uniform(-4, -1, n), rng.choice([32, 64, 128, 256], n)
    f = np.exp(-(((lr + 2.5) / 0.25) ** 2)) + 0.1 * np.log2(width)
    return pd.DataFrame({"lr": lr, "width": width,
                         "metric": np.tanh(2 * f) + rng.normal(0, 0.15, n),
                         "target": f**2 + rng.normal(0, 0.15, n)})


def _ratio_proxy(rng, n):
    lr, batch = rng.uniform(-4, -1, n), rng.choice([16, 32, 64, 128, 256], n)
    f = -np.abs(lr - np.log10(batch) + 0.5)
    return pd.DataFrame({"lr": lr, "batch": batch, "metric": f + rng.normal(0, 0.3, n),
                         "target": f + rng.normal(0, 0.3, n)})


def _discrete_metric(rng, n):
    b = rng.uniform(-2, 2, n)
    return pd.DataFrame({"b": b, "metric": np.round(b**2 + rng.normal(0, 0.5, n)),
                         "target": b**2 + rng.normal(0, 0.5, n)})


# Seven more from a fuzzing pass over the finished audit (families chosen to break it; periodic_4
# and periodic_6 find where its resolution ends). Claims
# of adjust="auto" without placebos (--claims, 100 ledgers, seed 21, n = 60 / 150 / 300 / 1000):
# three_way 84 / 100 / 100 / 100 before the three-way block, 0 / 4 / 1 / 0 with it;
# three_way_cat 82 / 97 / 99 / 100, then 3 / 1 / 1 / 0 (their crossfit size, 200 repetitions:
# 9 / 16 / 15 / 28 % and 9.5 / 12 / 10 / 8.5 %). Still open (README, "Where the cross-fitted
# test is not calibrated"), before the neighbour check of claims -> with it: periodic 98 / 100 /
# 100 / 100 -> 90 / 66 / 39 / 38 (where the learner's resolution ends: periodic_4 12 / 8 / 2 / 0
# -> 11 / 8 / 2 / 0, periodic_6 68 / 81 / 83 / 11 -> 62 / 45 / 24 / 5); many_level_peak 0 / 58 /
# 5 / 0 -> 0 / 52 / 4 / 0; many_level_step 22 / 67 / 21 / 1 -> 19 / 37 / 12 / 1; rare_levels
# 14 / 27 / 16 / 0 -> 11 / 21 / 7 / 0 (none with placebos=200: the twins withhold them);
# diagonal_step 21 / 20 / 22 / 21 -> 19 / 19 / 19 / 18, and 2 / 2 / 1 / 0 with the target's oblique
# step (crossfit._oblique_step; its crossfit size, 100 repetitions at n = 150 / 300 / 1000: 48 /
# 67 / 100 % before, 23 / 19 / 26 % with it). Every other family moved by at most 1 ledger in 100.
# With the beyond-neighbour check extrapolated from two neighbours (crossfit.beyond_neighbour_p):
# periodic 77 / 16 / 13 / 10, periodic_6 63 / 29 / 12 / 3, periodic_4 12 / 7 / 2 / 0,
# many_level_peak 0 / 41 / 4 / 0, many_level_step 20 / 32 / 7 / 1; every other family unchanged.
# With the escape also extrapolated from the nearest runs of the run's own fold
# (audit._beyond_neighbours_p): periodic 77 / 4 / 3 / 2, periodic_6 63 / 29 / 4 / 0,
# many_level_peak 0 / 39 / 4 / 0, many_level_step 20 / 31 / 7 / 1; every other family unchanged.
# With claims in thin one-hot cells (median < 20 runs) required to hold beyond the nearest runs
# (audit._withhold_thin_cells): many_level_peak 0 / 14 / 2 / 0, many_level_step 7 / 8 / 7 / 1,
# rare_levels 0 / 5 / 3 / 0; every other family unchanged.


def _three_way(rng, n):
    b = rng.uniform(-1, 1, (n, 3))
    f = 3 * b.prod(axis=1)
    return pd.DataFrame({"lr": b[:, 0], "wd": b[:, 1], "width": b[:, 2],
                         "metric": f + rng.normal(0, 0.3, n), "target": f + rng.normal(0, 0.3, n)})


def _three_way_cat(rng, n):
    lr, wd = rng.uniform(-1, 1, (2, n))
    optimizer = rng.choice(["adam", "sgd"], n)
    f = 2 * np.where(optimizer == "adam", 1, -1) * lr * wd
    return pd.DataFrame({"lr": lr, "wd": wd, "optimizer": optimizer,
                         "metric": f + rng.normal(0, 0.3, n), "target": f + rng.normal(0, 0.3, n)})


def _periodic(rng, n, periods=8):
    b = rng.uniform(0, 1, n)
    f = np.sin(2 * periods * np.pi * b)
    return pd.DataFrame({"epochs": b, "metric": f + rng.normal(0, 0.3, n),
                         "target": f + rng.normal(0, 0.3, n)})


def _tasks(rng, n, levels):
    task = rng.integers(0, levels, n)
    return task, np.array([f"t{t:02d}" for t in task])


def _many_level_peak(rng, n):
    task, names = _tasks(rng, n, 20)
    lr = rng.uniform(-1, 1, n)
    f = 2 * np.exp(-(((lr - rng.uniform(-0.8, 0.8, 20)[task]) / 0.3) ** 2))
    return pd.DataFrame({"task": names, "lr": lr, "metric": f + rng.normal(0, 0.3, n),
                         "target": f + rng.normal(0, 0.3, n)})


def _many_level_step(rng, n):
    task, names = _tasks(rng, n, 12)
    b = rng.uniform(0, 1, n)
    f = (b > rng.uniform(0.2, 0.8, 12)[task]) + 0.3 * b
    return pd.DataFrame({"task": names, "b": b, "metric": f + rng.normal(0, 0.3, n),
                         "target": f + rng.normal(0, 0.3, n)})


def _rare_levels(rng, n):
    weights = 1 / np.arange(1, 31) ** 1.5
    task = rng.choice(30, n, p=weights / weights.sum())
    lr = rng.uniform(-1, 1, n)
    f = rng.normal(0, 1, 30)[task] - lr**2
    return pd.DataFrame({"task": [f"t{t:02d}" for t in task], "lr": lr,
                         "metric": f + rng.normal(0, 0.4, n), "target": f + rng.normal(0, 0.4, n)})


def _diagonal_step(rng, n):
    lr, width = rng.uniform(0, 1, (2, n))
    f = (lr > 0.2 + 0.6 * width).astype(float)
    return pd.DataFrame({"lr": lr, "width": width, "metric": f + rng.normal(0, 0.3, n),
                         "target": -f + rng.normal(0, 0.3, n)})


UNSEEN = [
    Scenario("moving_step", "null", ("b", "optimizer"), _moving_step,
             "a step whose place moves with the optimizer"),
    Scenario("staircase", "null", ("b",), _staircase, "four steps in one control"),
    Scenario("metric_step_only", "null", ("b",), _metric_step_only,
             "the metric steps, the target is smooth"),
    Scenario("heavy_tails", "null", ("b",), _heavy_tails, "a V in the control, t(3) noise"),
    Scenario("tied_accuracy", "null", ("lr",), _tied_accuracy,
             "an inverted U; the target is an accuracy on 50 items (many ties)"),
    Scenario("additive_three", "null", ("b1", "b2", "b3"), _additive_three,
             "a smooth additive proxy through three controls"),
    Scenario("bump", "null", ("b1", "b2"), _bump, "a smooth bump in two controls"),
    simulate.SCENARIOS["additive_proxy_5"],    # held out as well; chapter 05 runs it
    simulate.SCENARIOS["grid_proxy_5"],        # likewise
    Scenario("grid_proxy_8", "null", ("lr", "wd", "width", "depth", "optimizer", "momentum",
                                      "noise", "arch"), _grid_proxy_8,
             "grid_proxy_5 beside three controls that do nothing (chapter 2's eight)"),
    Scenario("exact_proxy", "null", ("lr", "wd"), _exact_proxy,
             "the metric is an exact function of the controls (no noise of its own)"),
    Scenario("narrow_peak", "null", ("lr", "width"), _narrow_peak,
             "a sharp optimum in log lr (width 0.25 of a 3-decade range), read through two links"),
    Scenario("ratio_proxy", "null", ("lr", "batch"), _ratio_proxy,
             "a V in log lr whose bottom moves with log batch size (lr / batch)"),
    Scenario("discrete_metric", "null", ("b",), _discrete_metric,
             "a U-shaped proxy read as a rounded integer (few distinct values)"),
    Scenario("three_way", "null", ("lr", "wd", "width"), _three_way,
             "a product of three controls"),
    Scenario("three_way_cat", "null", ("lr", "wd", "optimizer"), _three_way_cat,
             "an lr x wd product whose sign flips with the optimizer"),
    Scenario("periodic", "null", ("epochs",), _periodic, "eight periods over one control"),
    Scenario("periodic_6", "null", ("epochs",), functools.partial(_periodic, periods=6),
             "six periods over one control (where the learner's resolution ends)"),
    Scenario("periodic_4", "null", ("epochs",), functools.partial(_periodic, periods=4),
             "four periods over one control"),
    Scenario("many_level_peak", "null", ("task", "lr"), _many_level_peak,
             "an optimum lr of its own for each of 20 tasks"),
    Scenario("many_level_step", "null", ("task", "b"), _many_level_step,
             "a step of its own for each of 12 tasks"),
    Scenario("rare_levels", "null", ("task", "lr"), _rare_levels,
             "30 tasks with Zipf frequencies and large effects, a U in lr"),
    Scenario("diagonal_step", "null", ("lr", "width"), _diagonal_step,
             "a step in lr whose place moves with the width; the target reads it with the "
             "opposite sign"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--n", type=int, nargs="+", default=[150, 300, 1000])
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--only", nargs="+", choices=[s.name for s in UNSEEN],
                        help="run only these scenarios")
    add_link_argument(parser)
    args = parser.parse_args()
    print_rates(UNSEEN, args.only or [s.name for s in UNSEEN], args)


if __name__ == "__main__":
    main()
