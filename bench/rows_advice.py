"""Is the row count an inconclusive note asks for true: does it give 80 % power?

An ``inconclusive`` row whose cross-fitted adjusted association is not
significant says how many rows would show it ("|rho| = 0.37 would need about
285 rows"): the plain Fisher-z rows for 80 % power at two-sided alpha = 0.05,
:func:`mbe_helpers.crossfit.rows_to_detect`, scaled by :math:`f^2`, where
:math:`f` is how much wider the row's own 90 % interval is than the plain
Fisher-z one (:func:`mbe_helpers.audit._interval_inflation`,
:func:`mbe_helpers.audit._inflated_rows`).

This script measures whether that advice holds on a known truth: eight
controls (six numeric, an optimizer and an architecture), a metric and a
target that both follow the controls nonlinearly (different functions) and
share an independent per-run trait whose weight :data:`TRAIT` puts the
metric's adjusted (partial) correlation with the target near 0.3. The true
value is printed twice: analytically (Pearson partial correlation,
``TRAIT**2 / (TRAIT**2 + NOISE**2)``) and as the cross-fitted ``adj_r`` of
one audit of ``--truth-rows`` rows, the population value the test estimates
(ranks and a probit link make it smaller than the Pearson one); the latter
is the ``r_true`` the advice is computed for.

For each ``n0`` (``--n0``, default 60 and 150) it

1. audits ``--reps`` ledgers of ``n0`` rows (``adjust="crossfit"``,
   ``placebos=0``), records each row's inflation ``f`` (its 95 % interval
   narrowed to 90 % as the audit does, :func:`mbe_helpers.audit._narrow`)
   and forms the advised rows ``N = _inflated_rows(rows_to_detect(r_true),
   median f)``; it also prints the advice as users read it, from each
   row's observed ``adj_r`` and own ``f`` (median and quartiles, over all
   ledgers and over the ledgers whose note carries the advice);
2. audits ``--reps`` ledgers at ``N`` rows and at the plain Fisher-z rows
   ``rows_to_detect(r_true)`` and prints the measured power (the fraction
   with ``adj_p < 0.05``) with a Wilson 95 % interval. The advice is good
   if the power at ``N`` is near 80 % (70-90 %).

Last it measures the power at a few multiples of the plain rows (``--curve``)
and finds the rows that give 80 % power from a probit fit over every cell
(:func:`rows_for_power`). A cell is measured once per row count (its power
does not depend on ``n0``).

Run: ``python bench/rows_advice.py [--reps 200] [--n0 60 150] [--seed 5]
[--truth-rows 20000] [--curve 1.25 1.6 2]`` (about 2 minutes on one core at the defaults;
its peak memory, 2.7 GB, is the 20,000-row truth audit's).
"""

from __future__ import annotations

import argparse
import re
import time
import warnings

import numpy as np
import pandas as pd
from scipy import optimize, stats
from tqdm import tqdm

from mbe_helpers import crossfit
from mbe_helpers.audit import (_inflated_rows, _interval_inflation, _narrow, audit,
                               wilson_interval)

NUMERIC = [f"c{i}" for i in range(6)]
CONTROLS = NUMERIC + ["optimizer", "arch"]
#: Weight of the shared trait and sd of each column's own noise: Pearson partial r = 0.329,
#: the cross-fitted adj_r about 0.30.
TRAIT, NOISE = 0.42, 0.6
_ADVICE = re.compile(r"would need about ([\d,]+) rows")


def trait_ledger(rng: np.random.Generator, n: int, trait: float = TRAIT) -> pd.DataFrame:
    """Eight controls (``pure_noise_8``'s), a metric and a target that follow them through
    different nonlinear functions and share an independent trait of weight ``trait``."""
    frame = pd.DataFrame(rng.normal(size=(n, 6)), columns=NUMERIC)
    frame["optimizer"] = rng.choice(["adam", "sgd"], n)
    frame["arch"] = rng.choice(["mlp", "cnn", "vit"], n)
    c = frame[NUMERIC].to_numpy()
    adam = (frame.optimizer == "adam").to_numpy(float)
    cnn = (frame.arch == "cnn").to_numpy(float)
    shared = trait * rng.normal(size=n)
    frame["metric"] = (np.sin(1.5 * c[:, 0]) + 0.5 * c[:, 2] ** 2 + 0.5 * cnn + shared
                       + rng.normal(0, NOISE, n))
    frame["target"] = (c[:, 0] - 0.5 * c[:, 1] ** 2 + adam + 0.5 * np.abs(c[:, 2]) + shared
                       + rng.normal(0, NOISE, n))
    return frame


def _audit_row(n: int, seed: int, rep: int) -> pd.Series:
    rng = np.random.default_rng([seed, n, rep])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = audit(trait_ledger(rng, n), "metric", "target", CONTROLS, adjust="crossfit",
                      placebos=0, seed=rep).table
    return table.iloc[0]


def ledgers(n: int, reps: int, seed: int, label: str) -> pd.DataFrame:
    """``adj_r, adj_p, f`` and the note's advised rows (NaN without one) of ``reps`` audits."""
    out = []
    for rep in tqdm(range(reps), desc=label, leave=False, mininterval=2):
        row = _audit_row(n, seed, rep)
        lo90, hi90 = _narrow(row.adj_r, row.adj_lo, row.adj_hi)
        found = _ADVICE.search(str(row.note))
        out.append(dict(adj_r=row.adj_r, adj_p=row.adj_p, f=_interval_inflation(lo90, hi90, n),
                        note_rows=float(found.group(1).replace(",", "")) if found else np.nan))
    return pd.DataFrame(out)


def truth(rows: int, seed: int) -> float:
    """The cross-fitted ``adj_r`` of one audit of ``rows`` rows."""
    return float(_audit_row(rows, seed, 10**6).adj_r)


def _quartiles(values) -> str:
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if not len(values):
        return "none"
    q1, q2, q3 = np.percentile(values, [25, 50, 75])
    return f"median {q2:,.0f} (quartiles {q1:,.0f}-{q3:,.0f}; {len(values)} ledgers)"


def _power_line(what: str, n: int, frame: pd.DataFrame) -> str:
    hits = int((frame.adj_p < 0.05).sum())
    lo, hi = wilson_interval(hits, len(frame))
    return (f"  {what:<28} {n:>6,}  {hits / len(frame):6.1%}  [{lo:5.1%}, {hi:5.1%}]"
            f"  {frame.adj_r.mean():+.3f}  {frame.f.median():5.2f}")


def rows_for_power(cells: dict[int, pd.DataFrame], power: float = 0.8) -> float:
    r"""Rows at which a probit fit of rejection on :math:`\sqrt{n - 3}` over every measured
    cell, :math:`P(p < 0.05) = \Phi(a + b \sqrt{n - 3})` (the Fisher-z power curve's shape),
    reaches ``power``."""
    root = np.concatenate([np.full(len(frame), np.sqrt(rows - 3.0))
                           for rows, frame in cells.items()])
    hit = np.concatenate([(frame.adj_p < 0.05).to_numpy(float) for frame in cells.values()])

    def loss(ab):
        prob = np.clip(stats.norm.cdf(ab[0] + ab[1] * root), 1e-9, 1 - 1e-9)
        return -np.sum(hit * np.log(prob) + (1 - hit) * np.log(1 - prob))

    a, b = optimize.minimize(loss, [-1.96, 0.27], method="Nelder-Mead").x
    return float((stats.norm.ppf(power) - a) / b) ** 2 + 3 if b > 0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200, help="ledgers per cell")
    parser.add_argument("--n0", type=int, nargs="+", default=[60, 150],
                        help="rows of the audits whose advice is checked")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--truth-rows", type=int, default=20_000,
                        help="rows of the one audit that stands in for the true adj_r")
    parser.add_argument("--curve", type=float, nargs="*", default=[1.25, 1.6, 2.0],
                        help="also measure the power at these multiples of the plain rows")
    args = parser.parse_args()
    start = time.perf_counter()

    r_true = truth(args.truth_rows, args.seed)
    plain = crossfit.rows_to_detect(r_true)
    print(f"trait weight {TRAIT}, noise sd {NOISE}: Pearson partial r = "
          f"{TRAIT**2 / (TRAIT**2 + NOISE**2):.3f}; cross-fitted adj_r on {args.truth_rows:,} "
          f"rows = {r_true:.3f} (r_true)")
    print(f"plain Fisher-z rows for 80 % power at |r| = {r_true:.3f}: {plain}")
    print(f"{args.reps} ledgers per cell, seed {args.seed}\n")

    cells: dict[int, pd.DataFrame] = {}

    def cell(rows: int) -> pd.DataFrame:       # the power at a row count does not depend on n0
        if rows not in cells:
            cells[rows] = ledgers(rows, args.reps, args.seed + 1, f"{rows} rows")
        return cells[rows]

    header = (f"  {'cell':<28} {'rows':>6}  {'power':>6}  {'Wilson 95 %':<16}  "
              f"{'mean r':>6}  {'f':>5}")
    for n0 in args.n0:
        first = cell(n0)
        f_med = float(first.f.median())
        advised = _inflated_rows(plain, f_med)
        observed = [_inflated_rows(crossfit.rows_to_detect(r), f) if 0 < abs(r) < 1 else np.nan
                    for r, f in zip(first.adj_r, first.f)]
        q1, q3 = np.percentile(first.f, [25, 75])
        print(f"n0 = {n0}: inflation f median {f_med:.2f} (quartiles {q1:.2f}-{q3:.2f}); "
              f"advised N = {advised:,} rows for r_true")
        print(f"  advice from each ledger's own adj_r and f, all ledgers: {_quartiles(observed)}")
        print(f"  the notes' advice (ledgers told 'would need about ... rows'): "
              f"{_quartiles(first.note_rows)}")
        print(header)
        print(_power_line("n0 itself", n0, first))
        print(_power_line("plain Fisher z", plain, cell(plain)))
        print(_power_line("advised N (f^2-inflated)", advised, cell(advised)))
        print()

    for multiple in args.curve:
        cell(int(round(plain * multiple)))
    print("power curve (every cell measured above)")
    print(header)
    for rows in sorted(cells):
        print(_power_line(f"{rows / plain:.2f} x plain", rows, cells[rows]))
    needed = rows_for_power(cells)
    print(f"rows for 80 % power (probit fit over the cells): {needed:,.0f} = "
          f"{needed / plain:.2f} x plain, the f^2 scaling of a constant f = "
          f"{np.sqrt((needed - 3) / (plain - 3)):.2f}")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
