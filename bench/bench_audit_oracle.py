"""Agreement of ``partial_rank_corr`` with ``pingouin.partial_corr(method="spearman")``.

Random ledgers with 1, 2 and 5 numeric controls (with and without ties),
many seeds; prints the largest absolute difference of r and of p.

    python bench/bench_audit_oracle.py [--seeds 50]
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pingouin as pg

from mbe_helpers import partial_rank_corr


def ledger(n: int, k: int, seed: int, ties: bool) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(size=(n, k + 2)), columns=["m", "y", *[f"c{i}" for i in range(k)]])
    df["m"] += df.c0
    df["y"] += df.c0 + 0.3 * df.m
    return df.round(1) if ties else df


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=50)
    args = parser.parse_args()
    print(f"{'controls':>8} {'ties':>5} {'max |r - r_pg|':>15} {'max |p - p_pg|':>15}")
    for k in (1, 2, 5):
        for ties in (False, True):
            dr = dp = 0.0
            for seed in range(args.seeds):
                df = ledger(int(np.random.default_rng(seed).integers(30, 400)), k, seed, ties)
                covar = [f"c{i}" for i in range(k)]
                r, p, _ = partial_rank_corr(df, "m", "y", covar)
                ref = pg.partial_corr(df, x="m", y="y", covar=covar, method="spearman")
                dr = max(dr, abs(r - ref["r"].iloc[0]))
                dp = max(dp, abs(p - ref["p_val"].iloc[0]))
            print(f"{k:>8} {str(ties):>5} {dr:>15.2e} {dp:>15.2e}")


if __name__ == "__main__":
    main()
