"""Placebo self-calibration of chapter 2's grid (its three audits, K = 200 per kind).

Reads the chapter's ledger from ``results/<profile>/02_heterogeneous_grid``
(run ``mbe-book run 02_heterogeneous_grid`` first), rebuilds the chapter's
table of runs and audits it with ``adjust="auto"`` and ``placebos=200``.
Run: ``python bench/chapter2_placebos.py [--profile default]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from mbe_helpers import probes
from mbe_helpers.chapters import grid
from mbe_helpers.grid import read_ledger

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--profile", default="default")
parser.add_argument("--epoch", type=int, default=20)
args = parser.parse_args()
folder = Path("results") / args.profile / "02_heterogeneous_grid"
runs = read_ledger(folder / "ledger.jsonl")
frame = grid.add_positive_control(runs[runs.status == "ok"], "test_acc", noise=0.5, seed=0)
design = grid.varying_columns(frame, grid.DESIGN)
audited = [*probes.columns_at(probes.BATTERY, args.epoch), "positive_control"]
start = time.perf_counter()
audits = grid.baseline_audits(frame, audited, "test_acc", baseline=[f"val_loss@{args.epoch}"],
                                 design=design, adjust="auto", placebos=200, seed=0)
print(f"{len(frame)} runs; controls: val_loss@{args.epoch} and {', '.join(design)} "
      f"({time.perf_counter() - start:.1f} s)\n")
pd.set_option("display.width", 200)
for name, result in audits.items():
    print(f"== {name}")
    table = result.table
    print(table[["metric", "n", "raw_r", "partial_r", "adj_r", "adj_p", "adjust",
                 "classification"]].round(3).to_string(index=False))
    print(result.calibration[["kind", "adjust", "K", "rejections", "rate", "lo", "hi"]]
          .round(3).to_string(index=False), "\n")
