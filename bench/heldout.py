"""Run extra scenarios through :func:`mbe_helpers.simulate.run_calibration` and print their rates.

Shared by ``unseen_nulls.py`` and ``weak_signals.py`` (imported from the script's own folder):
both register scenarios the package does not ship, pick how the tested column is fitted
(``--link``), and print ``rank-t`` and ``crossfit`` with Wilson intervals per n; with
``--claims``, how often the audit's classes claim information instead.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

from mbe_helpers import crossfit, simulate
from mbe_helpers.chapters.audit_calibration import rates_at
from mbe_helpers.simulate import Scenario, run_calibration


def add_link_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--link", choices=["probit", "identity"], default=crossfit.TESTED_LINK,
                        help="how the metric is fitted (identity: its ranks, like the target)")
    parser.add_argument("--claims", action="store_true",
                        help="print how often the classes claim information (adjust auto and "
                             "rank, no placebos) instead of the tests' rejection rates")


def print_rates(scenarios: list[Scenario], names: list[str], args: argparse.Namespace) -> None:
    """Register ``scenarios``, run ``names`` at ``args.n`` / ``reps`` / ``seed`` with ``args.link``
    and print one table per n."""
    crossfit.TESTED_LINK = args.link                  # the worker processes fork after this
    simulate.SCENARIOS.update({s.name: s for s in scenarios})
    if getattr(args, "claims", False):
        print_claims(names, args)
        return
    start = time.perf_counter()
    table = run_calibration(names, n=args.n, reps=args.reps,
                            methods=("rank-t", "crossfit"), seed=args.seed, progress=False)
    pd.set_option("display.width", 200)
    print(f"{args.reps} repetitions per cell, seed {args.seed}, link {args.link} "
          f"({time.perf_counter() - start:.0f} s)")
    for n in args.n:
        print(rates_at(table, n).to_string(), end="\n\n")


def print_claims(names: list[str], args: argparse.Namespace) -> None:
    """How often ``audit(adjust="auto")`` and ``adjust="rank"`` claim information
    (:func:`mbe_helpers.chapters.audit_calibration.claim_rates`), one table per n."""
    from mbe_helpers.chapters.audit_calibration import claim_rates

    start = time.perf_counter()
    tables = {n: claim_rates(names, n, args.reps, 0.05, args.seed, workers=2) for n in args.n}
    print(f"claims per {args.reps} ledgers, seed {args.seed}, link {args.link} "
          f"({time.perf_counter() - start:.0f} s)")
    for n, table in tables.items():
        shown = table.pivot(index="scenario", columns="adjust", values="claims").loc[names]
        print(f"n = {n}", shown.to_string(), sep="\n", end="\n\n")
