"""Jiang's and Dziugaite's yardsticks of ``mbe_helpers.comparators`` against the published ``mbe-eval``.

Two grids of a few thousand runs over 5 hyperparameters of 3 levels each (243
configurations, a column ``config`` naming each):

(a) ``factorial``: every configuration with 10 seeds (2430 runs), continuous
    metric and gap (nothing tied);
(b) ``ties_and_seeds``: 4 to 16 seeds per configuration (unequal), 10 % of
    the configurations missing (an incomplete grid), the metric rounded to
    one decimal and the gap to 1/100 (many ties), 1 % of the metrics missing.

For each grid and statistic: the largest absolute difference from the peer
over every reported number (per hyperparameter or conditioning set and the
overall score; for the sign-error the mean, 90th percentile and maximum of
each scope), and the median time of alternating calls after one warm-up of
each. Statistics: granulated Kendall on the runs and on the configurations
(``group``/``group_col`` = config; ``tau="b"`` as the peer, and the paper's
tau-a shown against the peer's tau-b), Jiang's CMI (max 2 conditioning
hyperparameters) on the runs and on the configurations, and the robust
sign-error (configurations = config). The peer's run-level CMI takes a minute
or more per call, so it is timed ``--cmi-reps`` times without a warm-up.

    python bench/bench_comparators.py [--reps 5] [--cmi-reps 1]
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import pandas as pd

from mbe_helpers.comparators import conditional_mi, granulated_kendall, robust_sign_error
from timing import alternating, speed  # bench/timing.py, beside this script

HPS = ["lr", "wd", "width", "depth", "dropout"]


def make_grid(kind: str, seed: int = 0) -> pd.DataFrame:
    """243 configurations (3 levels of each of 5 hyperparameters) times their seeds."""
    rng = np.random.default_rng(seed)
    grid = pd.DataFrame(list(itertools.product([1e-3, 1e-2, 1e-1], [0.0, 1e-4, 1e-3], [64, 128, 256],
                                               [2, 4, 8], [0.0, 0.25, 0.5])), columns=HPS)
    grid["config"] = [f"c{i:03d}" for i in range(len(grid))]
    if kind == "factorial":
        seeds = np.full(len(grid), 10)
    else:
        grid = grid.sample(frac=0.9, random_state=seed).sort_index().reset_index(drop=True)
        seeds = rng.integers(4, 17, len(grid))
    df = grid.loc[grid.index.repeat(seeds)].reset_index(drop=True)
    n = len(df)
    skill = (-0.4 * (np.log10(df.lr) + 2) ** 2 + 0.3 * np.log2(df.width / 64) - 0.2 * np.log2(df.depth)
             + 2 * df.dropout - 100 * df.wd).to_numpy()
    config_shock = rng.normal(0, 0.1, len(grid))[pd.factorize(df.config)[0]]
    df["gap"] = np.clip(0.15 - 0.03 * skill + 0.02 * config_shock + rng.normal(0, 0.02, n), 0, 1)
    df["metric"] = -skill + rng.normal(0, 0.4, n) + config_shock
    if kind != "factorial":
        df["metric"] = df.metric.round(1)
        df["gap"] = df.gap.round(2)
        df.loc[rng.choice(n, n // 100, replace=False), "metric"] = np.nan
    return df




def kendall_pair(df: pd.DataFrame, group: str | None):
    from mbe_eval.comparators import granulated_kendall as peer  # the peer, installed from PyPI

    def diff(ours: pd.DataFrame, theirs) -> float:
        psi, detail = theirs
        return float(max(np.nanmax(np.abs(ours.value.to_numpy()[:-1] - detail.granulated_kendall.to_numpy())),
                         abs(ours.value.iloc[-1] - psi)))

    return ({"ours": lambda: granulated_kendall(df, "metric", "gap", HPS, group=group, tau="b"),
             "peer": lambda: peer(df, "metric", "gap", HPS, group_col=group)}, diff)


def cmi_pair(df: pd.DataFrame, group: str | None):
    from mbe_eval.comparators import jiang_normalized_cmi as peer

    def diff(ours: pd.DataFrame, theirs) -> float:
        score, detail = theirs
        body = ours.iloc[:-1]
        parts = [np.abs(body[a].to_numpy() - detail[b].to_numpy()) for a, b in
                 (("normalized_cmi", "normalized_cmi"), ("information", "conditional_mutual_information"),
                  ("entropy", "target_conditional_entropy"))]
        return float(max(np.nanmax(np.concatenate(parts)), abs(ours.normalized_cmi.iloc[-1] - score)))

    return ({"ours": lambda: conditional_mi(df, "metric", "gap", HPS, group=group),
             "peer": lambda: peer(df, "metric", "gap", HPS, group_col=group)}, diff)


def sign_error_pair(df: pd.DataFrame, group: str | None):
    from mbe_eval.robust_sign_error import robust_sign_error_environments, robust_sign_error_summary

    def peer():
        env = robust_sign_error_environments(df, ["metric"], HPS, target="gap", config_column="config")
        return robust_sign_error_summary(env, ["metric"])

    def diff(ours: pd.DataFrame, theirs: pd.DataFrame) -> float:
        theirs = theirs.set_index("hyperparameter")
        mine = ours.set_index("hyperparameter").rename(index={"overall": "all"}).loc[theirs.index]
        assert mine.environments.tolist() == theirs.environments.tolist()
        return float(np.nanmax(np.abs(mine[["mean", "p90", "max"]].to_numpy() - theirs[
            ["mean_sign_error", "p90_sign_error", "max_sign_error"]].to_numpy())))

    return ({"ours": lambda: robust_sign_error(df, "metric", "gap", HPS, group=group), "peer": peer}, diff)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--cmi-reps", type=int, default=1)
    args = parser.parse_args()
    print(f"hyperparameters: {', '.join(HPS)} (3 levels each); median of {args.reps} alternating runs "
          f"after one warm-up ({args.cmi_reps} without warm-up for the run-level CMI)")
    totals = {"ours": 0.0, "peer": 0.0}
    for label, kind in (("a", "factorial"), ("b", "ties_and_seeds")):
        df = make_grid(kind)
        print()
        print(f"== ({label}) {kind}: {len(df)} runs, {df.config.nunique()} configurations, "
              f"{df.metric.isna().sum()} metrics missing, {df.metric.nunique()} distinct metric values, "
              f"{df.gap.nunique()} distinct gaps")
        print(f"{'statistic':<40}{'max |diff|':>12}{'ours s':>10}{'peer s':>10}  speed (peer / ours)")
        cases = [("granulated Kendall, runs, tau-b", kendall_pair(df, None), args.reps, True),
                 ("granulated Kendall, configs, tau-b", kendall_pair(df, "config"), args.reps, True),
                 ("conditional MI, runs", cmi_pair(df, None), args.cmi_reps, False),
                 ("conditional MI, configs", cmi_pair(df, "config"), args.reps, True),
                 ("robust sign-error, configs", sign_error_pair(df, "config"), args.reps, True)]
        for name, (fns, diff), reps, warmup in cases:
            medians, outs = alternating(fns, reps, warmup)
            for side in totals:
                totals[side] += medians[side]
            print(f"{name:<40}{diff(outs['ours'], outs['peer']):>12.1e}{medians['ours']:>10.3f}"
                  f"{medians['peer']:>10.3f}  {speed(medians['peer'] / medians['ours'])} "
                  f"({medians['peer'] / medians['ours']:.1f})")
        fns, diff = kendall_pair(df, None)
        paper = granulated_kendall(df, "metric", "gap", HPS, tau="a")
        print(f"{'(paper tau-a vs peer tau-b, runs)':<40}{diff(paper, fns['peer']()):>12.1e}"
              f"   (ties: Jiang's tau-a counts a tied pair 0 in n(n-1); tau-b shrinks the denominator)")
    print()
    print(f"overall: {totals['ours']:.2f} s ours vs {totals['peer']:.2f} s peer summed over the medians, "
          f"{speed(totals['peer'] / totals['ours'])}")


if __name__ == "__main__":
    main()
