"""The peer's own Monte Carlo calibration, for comparison with ``run_calibration``.

Runs ``mbe_eval.calibration.run_monte_carlo_calibration`` at n = 300 with its
default polynomial-ridge learner (degree 2), 199 permutations and the given
repetitions, on its own scenarios, and prints the rejection rates of its
legacy partial test and of its cross-fitted residual test with Wilson
intervals, then ours on the same scenarios (``--our-reps`` repetitions).
Run: ``python bench/peer_calibration.py [--reps 200] [--our-reps 1000]``.
"""

from __future__ import annotations

import argparse
import time

from mbe_eval.calibration import run_monte_carlo_calibration

from mbe_helpers.audit import wilson_interval

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--reps", type=int, default=200)
parser.add_argument("--bootstrap", type=int, default=0)
parser.add_argument("--our-reps", type=int, default=None,
                    help="repetitions of our test on the peer's scenarios (default: --reps)")
args = parser.parse_args()
start = time.perf_counter()
runs, _ = run_monte_carlo_calibration(sample_sizes=(300,), degrees=(2,), repetitions=args.reps,
                                      permutations=199, bootstrap=args.bootstrap)
print(f"mbe-eval 0.5 Monte Carlo, n = 300, {args.reps} repetitions, degree 2, 199 permutations "
      f"({time.perf_counter() - start:.0f} s)")
print(f"{'scenario':34s} {'signal':>6s} {'legacy partial':>24s} {'crossfit residual':>24s}")
for (name, signal), part in runs.groupby(["scenario", "expected_signal"], sort=False):
    cells = []
    for column in ("legacy_partial_reject", "crossfit_residual_reject"):
        k = int(part[column].sum())
        lo, hi = wilson_interval(k, len(part))
        cells.append(f"{k / len(part):6.1%} [{lo:.1%}, {hi:.1%}]")
    print(f"{name:34s} {str(signal):>6s} {cells[0]:>24s} {cells[1]:>24s}")

# Our cross-fitted test on the peer's own scenarios (same n, repetitions, grouped folds).
import numpy as np  # noqa: E402
from mbe_eval.calibration import SCENARIOS as PEER_SCENARIOS  # noqa: E402

from mbe_helpers.simulate import Scenario, method_pvalues  # noqa: E402

our_reps = args.our_reps or args.reps
print(f"\nmbe_helpers crossfit (cluster = config_id) on the peer's scenarios, n = 300, {our_reps} reps")
start = time.perf_counter()
for peer in PEER_SCENARIOS:
    signal = peer.expected_profile in ("increment-survives", "increment-after-environment-control")
    ours = Scenario(peer.name, "signal" if signal else "null",
                    tuple(peer.controls), peer.generator, peer.explanation, cluster="config_id")
    hits = [method_pvalues(peer.generator(np.random.default_rng([rep, 300]), 300), ours,
                           np.random.default_rng(rep), methods=("crossfit",))["crossfit"] < 0.05
            for rep in range(our_reps)]
    lo, hi = wilson_interval(int(np.sum(hits)), len(hits))
    print(f"{peer.name:34s} {ours.kind:>6s} {np.mean(hits):6.1%} [{lo:.1%}, {hi:.1%}]")
print(f"({time.perf_counter() - start:.0f} s)")
