"""Measured calibration of the audit's tests, classes and intervals (numbers for the book and notes).

Prints, on simulated data with a known truth:

1. the size of the permutation p-value at n = 60 with chapter 2's eight controls
   over 2,000 noise columns: Freedman-Lane (now) vs Kennedy (before) vs Student t;
2. the false-claim rate of the classes (a class claiming information beyond the
   controls where there is none): pure noise at n = 60 with eight controls (1,000
   metrics in one table, and 1,000 ledgers of one metric each), and
   every null scenario at n = 300, under ``adjust="rank"`` and ``"auto"``;
3. the coverage of the 95 % intervals at n = 60 and 300: the bootstrap
   intervals of raw and partial rho (Fisher-z and percentile) and the
   cross-fitted ``adj`` interval, against the value at n = 40,000.

Run: ``python bench/calibration_audit.py [--reps 200]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from scipy import stats

from mbe_helpers import audit
from mbe_helpers.audit import CLAIMS, _build_design, _permutation_p, _rank_correlations, wilson_interval
from mbe_helpers.simulate import SCENARIOS


def rate(hits: np.ndarray) -> str:
    lo, hi = wilson_interval(int(np.sum(hits)), len(hits))
    return f"{np.mean(hits):6.1%} [{lo:.1%}, {hi:.1%}] of {len(hits)}"


def kennedy_p(design, n_perm, rng) -> float:
    """The previous scheme: permute the metric's residuals, no second residualisation."""
    ranked = np.column_stack([stats.rankdata(design.metric), stats.rankdata(design.target)])
    z = np.column_stack([np.ones(design.n), *[stats.rankdata(c) for c in design.numeric.T],
                         *design.onehot.T])
    res = ranked - z @ np.linalg.lstsq(z, ranked, rcond=None)[0]
    e_m, e_y = res[:, 0], res[:, 1]
    denominator = np.linalg.norm(e_m) * np.linalg.norm(e_y)
    observed = abs(e_m @ e_y) / denominator
    perms = np.argsort(rng.random((n_perm, design.n)), axis=1)
    return (1 + np.sum(np.abs(e_m[perms] @ e_y) / denominator >= observed - 1e-12)) / (1 + n_perm)


def permutation_size(columns: int = 2000, n: int = 60, n_perm: int = 999) -> None:
    scenario = SCENARIOS["pure_noise_8"]
    controls = list(scenario.controls)
    p_fl, p_k, p_t = [], [], []
    rng = np.random.default_rng(11)
    for j in range(columns):
        frame = scenario.generate(rng, n)
        design = _build_design(frame, "metric", "target", controls)
        p_fl.append(_permutation_p(design, n_perm, None, rng))
        p_k.append(kennedy_p(design, n_perm, rng))
        r = float(_rank_correlations(design, np.ones((1, n)))[1][0])
        dof = n - 2 - design.k
        p_t.append(2 * stats.t.sf(abs(r * np.sqrt(dof / (1 - r * r))), dof))
    print(f"\n1. permutation size, n = {n}, 8 controls, {columns} noise columns, alpha = 0.05")
    for name, p in (("Freedman-Lane (now)", p_fl), ("Kennedy (before)", p_k), ("Student t", p_t)):
        print(f"   {name:22s} {rate(np.array(p) < 0.05)}")


def false_claims(reps: int) -> None:
    print("\n2. false-claim rate of the classes (class in "
          f"{', '.join(CLAIMS)}) on nulls, alpha = 0.05")
    scenario = SCENARIOS["pure_noise_8"]
    rng = np.random.default_rng(3)
    frame = scenario.generate(rng, 60)
    noise = pd.DataFrame(rng.normal(size=(60, 1000)), columns=[f"n{i}" for i in range(1000)])
    wide = pd.concat([frame, noise], axis=1)
    for adjust in ("rank", "auto"):
        table = audit(wide, list(noise), "target", list(scenario.controls), adjust=adjust).table
        other = ~table.classification.isin(["weak-or-mixed", "inconclusive"])
        print(f"   pure noise, n = 60, 8 controls, 1000 metrics in one table (FDR over all), "
              f"adjust={adjust:4s}: claims {rate(table.classification.isin(CLAIMS).to_numpy())}; "
              f"any class but weak-or-mixed/inconclusive {other.mean():.1%}")
    hits = {"rank": [], "auto": []}              # one metric per ledger: no FDR to hide behind
    for rep in range(1000):
        frame = scenario.generate(np.random.default_rng([rep, 60, 8]), 60)
        for adjust in hits:
            cls = audit(frame, "metric", "target", list(scenario.controls), adjust=adjust,
                        seed=rep).table.classification.iloc[0]
            hits[adjust].append(cls in CLAIMS)
    print(f"   pure noise, n = 60, 8 controls, 1000 ledgers of one metric: rank "
          f"{rate(np.array(hits['rank']))} | auto {rate(np.array(hits['auto']))}")
    for name, s in SCENARIOS.items():
        if s.kind != "null":
            continue
        hits = {"rank": [], "auto": []}
        for rep in range(reps):
            frame = s.generate(np.random.default_rng([rep, 300]), 300)
            for adjust in hits:
                cluster = s.cluster if adjust != "rank" else None  # rank without bootstrap ignores it
                cls = audit(frame, "metric", "target", list(s.controls), adjust=adjust,
                            cluster=cluster).table.classification.iloc[0]
                hits[adjust].append(cls in CLAIMS)
        print(f"   {name:22s} n = 300: rank {rate(np.array(hits['rank']))} | "
              f"auto {rate(np.array(hits['auto']))}")


def coverage(reps: int) -> None:
    print("\n3. coverage of 95 % intervals (truth: the estimate at n = 40,000)")
    for name in ("linear_proxy", "genuine_increment", "nonlinear_increment", "u_proxy",
                 "simpson_increment"):
        s = SCENARIOS[name]
        big = audit(s.generate(np.random.default_rng(999), 40_000), "metric", "target",
                    list(s.controls), adjust="crossfit", placebos=0).table.iloc[0]
        for n in (60, 300):
            hit = {k: [] for k in ("raw fisher-z", "partial fisher-z", "raw percentile",
                                   "partial percentile", "adj")}
            for rep in range(reps):
                frame = s.generate(np.random.default_rng([rep, n, 5]), n)
                for interval in ("fisher-z", "percentile"):
                    row = audit(frame, "metric", "target", list(s.controls), bootstrap=500,
                                adjust="rank" if interval == "percentile" else "crossfit",
                                interval=interval, seed=rep).table.iloc[0]
                    for what in ("raw", "partial"):
                        hit[f"{what} {interval}"].append(
                            row[f"{what}_lo"] <= big[f"{what}_r"] <= row[f"{what}_hi"])
                    if interval == "fisher-z" and row.adjust == "crossfit":
                        hit["adj"].append(row.adj_lo <= big.adj_r <= row.adj_hi)
            cells = ", ".join(f"{k} {np.mean(v):.1%}" for k, v in hit.items() if v)
            print(f"   {name:20s} n = {n:4d}: {cells}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--columns", type=int, default=2000)
    parser.add_argument("--only", default="123")
    args = parser.parse_args()
    start = time.perf_counter()
    if "1" in args.only:
        permutation_size(args.columns)
    if "2" in args.only:
        false_claims(args.reps)
    if "3" in args.only:
        coverage(args.reps)
    print(f"\n({time.perf_counter() - start:.0f} s)")
