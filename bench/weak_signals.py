"""Power of the audit's tests on weak signals, with either fit of the responses under test.

Ten ledgers where the metric does carry information beyond the controls,
each weak enough that no test has all the power at small n: a linear
control, an additive signal through four controls, a U-shape, a skewed
(log-normal) metric, a heavy-tailed (t, 2 df) metric, an optimum that moves
with the optimizer, a near-deterministic confounder, two signals beside eight
controls as in chapter 2's grid, and an accuracy with its noisy copy (chapter
2's positive control) beside seven. Prints the rejection rate at
alpha = 0.05 of ``rank-t`` and ``crossfit`` with Wilson 95 % intervals.
``--link identity`` fits the metric's ranks like the target's instead of
the probit link (:data:`mbe_helpers.crossfit.TESTED_LINK`), for comparison.

Run: ``python bench/weak_signals.py [--reps 200] [--n 60 150 300] [--link probit|identity]``.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from heldout import add_link_argument, print_rates  # bench/heldout.py, beside this script
from mbe_helpers.simulate import Scenario


def _weak_linear(rng, n):
    b, trait = rng.normal(size=(2, n))
    return pd.DataFrame({"b": b, "metric": b + trait + rng.normal(0, 0.5, n),
                         "target": b + 0.25 * trait + rng.normal(0, 1, n)})


def _weak_four(rng, n):
    b, trait = rng.uniform(-1, 1, (n, 4)), rng.normal(size=n)
    f = np.sin(2 * b[:, 0]) + b[:, 1] ** 2 + np.exp(b[:, 2]) + np.abs(b[:, 3])
    frame = pd.DataFrame(b, columns=["b1", "b2", "b3", "b4"])
    frame["metric"] = f + trait + rng.normal(0, 0.4, n)
    frame["target"] = f + 0.2 * trait + rng.normal(0, 0.4, n)
    return frame


def _weak_u(rng, n):
    b, trait = rng.uniform(-2.5, 2.5, n), rng.normal(size=n)
    return pd.DataFrame({"b": b, "metric": b**2 + trait + rng.normal(0, 0.5, n),
                         "target": b**2 + 0.35 * trait + rng.normal(0, 1, n)})


def _weak_skewed(rng, n):
    b, trait = rng.normal(size=(2, n))
    return pd.DataFrame({"b": b, "metric": np.exp(b + trait),
                         "target": b + 0.25 * trait + rng.normal(0, 1, n)})


def _weak_heavy(rng, n):
    b, trait = rng.normal(size=(2, n))
    return pd.DataFrame({"b": b, "metric": b + trait + rng.standard_t(2, n),
                         "target": b + 0.3 * trait + rng.normal(0, 1, n)})


def _weak_grid(rng, n):
    lr, optimizer = rng.uniform(-4, -1, n), rng.choice(["adam", "sgd"], n)
    trait = rng.normal(size=n)
    skill = -(lr - np.where(optimizer == "adam", -3.2, -1.8)) ** 2
    return pd.DataFrame({"lr": lr, "optimizer": optimizer,
                         "metric": np.tanh(skill) + 0.5 * trait + rng.normal(0, 0.3, n),
                         "target": np.exp(skill / 2) + 0.12 * trait + rng.normal(0, 0.2, n)})


def _weak_near_deterministic(rng, n):
    b, trait = rng.uniform(-1, 1, (n, 3)), rng.normal(size=n)
    frame = pd.DataFrame(b, columns=["b1", "b2", "b3"])
    frame["metric"] = b.sum(axis=1) + 0.3 * trait + rng.normal(0, 0.05, n)
    frame["target"] = b.sum(axis=1) + 0.15 * trait + rng.normal(0, 0.2, n)
    return frame


def _eight_controls(rng, n, weight):
    frame = pd.DataFrame(rng.normal(size=(n, 6)), columns=[f"c{i}" for i in range(6)])
    frame["optimizer"] = rng.choice(["adam", "sgd"], n)
    frame["arch"] = rng.choice(["mlp", "cnn", "vit"], n)
    c = frame[[f"c{i}" for i in range(6)]].to_numpy()
    f = (np.sin(c[:, 0]) + 0.5 * c[:, 1] ** 2 + 0.5 * c[:, 2] + 0.5 * (frame.optimizer == "adam")
         + 0.3 * c[:, 3] * (frame.arch == "vit"))
    trait = rng.normal(size=n)
    frame["metric"] = f + trait + rng.normal(0, 0.5, n)
    frame["target"] = f + weight * trait + rng.normal(0, 0.5, n)
    return frame


def _accuracy_positive_control(rng, n):
    frame = pd.DataFrame(rng.normal(size=(n, 5)), columns=[f"c{i}" for i in range(5)])
    frame["optimizer"] = rng.choice(["adam", "sgd"], n)
    frame["arch"] = rng.choice(["mlp", "cnn", "vit"], n)
    c = frame[[f"c{i}" for i in range(5)]].to_numpy()
    skill = (-c[:, 0] ** 2 + 0.5 * c[:, 1] + 0.7 * (frame.optimizer == "adam")
             + 0.3 * c[:, 2] * (frame.arch == "vit") + 0.4 * rng.normal(size=n))
    accuracy = 1 / (1 + np.exp(-skill))
    frame["target"] = accuracy                       # chapter 2's positive control: target + noise
    frame["metric"] = accuracy + 0.5 * accuracy.std() * rng.normal(size=n)
    return frame


EIGHT = ("c0", "c1", "c2", "c3", "c4", "c5", "optimizer", "arch")
WEAK = [
    Scenario("weak_linear", "signal", ("b",), _weak_linear, "a linear control"),
    Scenario("weak_four", "signal", ("b1", "b2", "b3", "b4"), _weak_four,
             "an additive signal through four controls"),
    Scenario("weak_u", "signal", ("b",), _weak_u, "a U-shape in the control"),
    Scenario("weak_skewed", "signal", ("b",), _weak_skewed, "a log-normal metric"),
    Scenario("weak_heavy", "signal", ("b",), _weak_heavy, "a metric with t(2) noise"),
    Scenario("weak_grid", "signal", ("lr", "optimizer"), _weak_grid,
             "an optimum that moves with the optimizer"),
    Scenario("weak_near_deterministic", "signal", ("b1", "b2", "b3"), _weak_near_deterministic,
             "a near-deterministic confounder"),
    Scenario("weak_eight", "signal", EIGHT, lambda rng, n: _eight_controls(rng, n, 0.3),
             "eight controls, as chapter 2's grid"),
    Scenario("mid_eight", "signal", EIGHT, lambda rng, n: _eight_controls(rng, n, 0.6),
             "eight controls, a stronger trait"),
    Scenario("accuracy_positive_control", "signal", EIGHT[:5] + EIGHT[6:],
             _accuracy_positive_control, "an accuracy and its noisy copy, seven controls"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--n", type=int, nargs="+", default=[60, 150, 300])
    parser.add_argument("--seed", type=int, default=4)
    add_link_argument(parser)
    args = parser.parse_args()
    print_rates(WEAK, [s.name for s in WEAK], args)


if __name__ == "__main__":
    main()
