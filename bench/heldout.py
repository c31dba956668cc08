"""Run extra scenarios through :func:`mbe_helpers.simulate.run_calibration` and print their rates.

Shared by ``unseen_nulls.py`` and ``weak_signals.py`` (imported from the script's own folder):
both register scenarios the package does not ship, pick how the tested column is fitted
(``--link``), and print ``rank-t`` and ``crossfit`` with Wilson intervals per n.
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


def print_rates(scenarios: list[Scenario], names: list[str], args: argparse.Namespace) -> None:
    """Register ``scenarios``, run ``names`` at ``args.n`` / ``reps`` / ``seed`` with ``args.link``
    and print one table per n."""
    crossfit.TESTED_LINK = args.link                  # the worker processes fork after this
    simulate.SCENARIOS.update({s.name: s for s in scenarios})
    start = time.perf_counter()
    table = run_calibration(names, n=args.n, reps=args.reps,
                            methods=("rank-t", "crossfit"), seed=args.seed, progress=False)
    pd.set_option("display.width", 200)
    print(f"{args.reps} repetitions per cell, seed {args.seed}, link {args.link} "
          f"({time.perf_counter() - start:.0f} s)")
    for n in args.n:
        print(rates_at(table, n).to_string(), end="\n\n")
