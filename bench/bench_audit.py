"""Bootstrap speed of ``mbe_helpers.audit`` against the published ``mbe-eval``.

Same ledger (680 runs, 7 controls: 5 numeric, 2 categorical), same number of
bootstrap resamples, both run in this process, median of several repetitions.
Prints point estimates side by side (they must agree) and the speed ratio.

    python bench/bench_audit.py [--reps 5] [--bootstrap 1000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pandas as pd

from mbe_helpers import audit


def make_ledger(n: int = 680, seed: int = 0) -> pd.DataFrame:
    """A heterogeneous-grid-like ledger: the metric partly proxies the early loss."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "lr": 10 ** rng.uniform(-4, -1, n), "wd": 10 ** rng.uniform(-6, -2, n),
        "width": rng.choice([32, 64, 128, 256], n), "depth": rng.integers(1, 5, n),
        "noise": rng.uniform(0, 0.4, n),
        "optimizer": rng.choice(["adam", "sgd"], n), "arch": rng.choice(["mlp", "cnn", "res"], n),
    })
    skill = -np.log10(df.lr) * 0.3 - df.noise * 2 + rng.normal(0, 0.5, n)
    df["val_loss_e10"] = -skill + rng.normal(0, 0.3, n)
    df["test_acc"] = skill + rng.normal(0, 0.3, n)
    df["metric"] = df.val_loss_e10 + rng.normal(0, 0.4, n)
    return df


def timed(fn, reps: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def interval(lo: float, hi: float) -> str:
    return f"[{lo:+.3f}, {hi:+.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    from mbe_eval import audit_metric  # the peer, installed from PyPI (mbe-eval 0.5.0)

    df = make_ledger()
    controls = ["val_loss_e10", "lr", "wd", "width", "depth", "optimizer", "arch"]
    ours_s, ours = timed(lambda: audit(df, "metric", "test_acc", controls,
                                       bootstrap=args.bootstrap, seed=0).table.iloc[0], args.reps)
    peer_s, peer = timed(lambda: audit_metric(df, "metric", "test_acc", controls,
                                              bootstrap=args.bootstrap, seed=0), max(1, args.reps // 2))
    print(f"ledger: {len(df)} rows, {len(controls)} controls, bootstrap={args.bootstrap}")
    print(f"{'':<12}{'raw_r':>12}{'partial_r':>12}{'partial CI':>22}{'median s':>11}")
    print(f"{'mbe_helpers':<12}{ours.raw_r:>12.6f}{ours.partial_r:>12.6f}"
          f"{interval(ours.partial_lo, ours.partial_hi):>22}{ours_s:>11.3f}")
    print(f"{'mbe-eval':<12}{peer['raw_r']:>12.6f}{peer['partial_r']:>12.6f}"
          f"{interval(peer['partial_ci_low'], peer['partial_ci_high']):>22}{peer_s:>11.3f}")
    same = np.isclose(ours.raw_r, peer["raw_r"], atol=1e-12) and \
        np.isclose(ours.partial_r, peer["partial_r"], atol=1e-12)
    print(f"point estimates equal (1e-12): {same}")
    ours_ci = np.array([ours.partial_lo, ours.partial_hi])
    peer_ci = np.array([peer["partial_ci_low"], peer["partial_ci_high"]])
    print(f"bootstrap intervals equal (same seed draws the same resamples): "
          f"{np.allclose(ours_ci, peer_ci, atol=1e-12)}")
    print(f"speed-up (mbe-eval / mbe_helpers): {peer_s / ours_s:.1f}x")


if __name__ == "__main__":
    main()
