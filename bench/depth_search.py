"""Where do the deep blocks matter? BP against the frozen-blocks baseline of chapter 4.

Chapter 4's diagnostic (d) fires when a learning rule beats the *frozen-blocks*
network -- the same ``ResidualMLP`` with its residual blocks left at
initialisation, only the embedding, the final LayerNorm and the head trained
-- by less than ``frozen_margin``.  On a task that is solved without deep
blocks (sklearn digits: BP 0.977, frozen 0.974, no blocks 0.972) it fires for
every rule, BP included, and separates nothing.

For each candidate configuration (data set, width, n_blocks, epochs, lr,
batch size, optional training-set size) this trains, over the seeds, with
:func:`train_residual` exactly as chapter 4 does:

* ``bp`` and ``frozen`` (always), and any further rules asked for (``--methods``
  or ``--full`` for the chapter's fa, dfa, dfa_penalized, dfa_shuffled);
* the two shallow baselines of :func:`shallow_baselines`
  (``linear``; ``no_blocks``: the ResidualMLP with zero blocks).

It prints one row per configuration: mean test accuracy of BP and frozen, the
*depth gap* (BP minus frozen, in accuracy points, mean over seeds), its
smallest per-seed value, the no-blocks and linear accuracies, and the mean
wall-clock and CPU (``time.process_time``) seconds of one BP run and the CPU
seconds of one frozen run (and of one run of every other rule); on a busy
machine the CPU time is the better estimate of the time on an idle one.  With
``--full`` it also estimates the chapter's time: every (rule, seed) training,
the shallow baselines, and a fixed allowance for the measurements
(``--measure-s``, about 30 s).  Chapter 4's default budget is the whole
chapter in under 4 minutes on 2 cores, i.e. one BP training of at most about
5-8 s on one thread; a configuration qualifies when its gap is at least
``--min-gap`` points (5).

Torch is pinned to one thread (``--threads``), as in the chapter.  Times on a
shared machine are noisy: compare them within one invocation.

    python bench/depth_search.py                       # the built-in grid, bp + frozen
    python bench/depth_search.py --full --config "dataset=mnist1d width=64 n_blocks=4"
    python bench/depth_search.py --list                # show the built-in grid
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from mbe_helpers.data import load_dataset

try:
    from mbe_helpers.experiments import shallow_baselines, train_residual
except ImportError:  # after the split of experiments.py into residual.py and chapters/
    from mbe_helpers.chapters.fa_diagnostics import shallow_baselines
    from mbe_helpers.residual import train_residual

#: Chapter 4's training defaults; a configuration overrides some of them.
BASE = {"dataset": "mnist1d", "width": 64, "n_blocks": 4, "epochs": 30, "lr": 1e-3,
        "batch_size": 128, "n_train": None}
TYPES = {"dataset": str, "width": int, "n_blocks": int, "epochs": int, "lr": float,
         "batch_size": int, "n_train": int}
#: The chapter's rules besides bp and frozen (``--full``).
OTHERS = ("fa", "dfa", "dfa_penalized", "dfa_shuffled")

GRID = [
    # digits, today's chapter default: the contrast
    {"dataset": "digits", "width": 256, "n_blocks": 4},
    {"dataset": "digits", "width": 64, "n_blocks": 4},
    # mnist1d around lr 1e-3: width, depth, epochs, learning rate, batch size
    {"width": 64, "n_blocks": 4},
    {"width": 128, "n_blocks": 4},
    {"width": 32, "n_blocks": 4},
    {"width": 64, "n_blocks": 2},
    {"width": 64, "n_blocks": 8},
    {"width": 64, "n_blocks": 4, "epochs": 15},
    {"width": 64, "n_blocks": 4, "epochs": 60},
    {"width": 64, "n_blocks": 4, "lr": 3e-3},
    {"width": 64, "n_blocks": 4, "lr": 3e-4},
    {"width": 64, "n_blocks": 4, "batch_size": 64},
    {"width": 64, "n_blocks": 4, "batch_size": 256},
    # lr 3e-3: both networks near their plateaus within the budget
    {"width": 64, "n_blocks": 4, "epochs": 40, "lr": 3e-3},
    {"width": 128, "n_blocks": 4, "epochs": 40, "lr": 3e-3},
    {"width": 128, "n_blocks": 4, "epochs": 30, "lr": 3e-3},
    {"width": 64, "n_blocks": 4, "epochs": 60, "lr": 3e-3, "batch_size": 256},
    {"width": 128, "n_blocks": 4, "epochs": 60, "lr": 3e-3, "batch_size": 256},
    # plateau checks (over budget): is the gap still there when frozen has converged?
    {"width": 64, "n_blocks": 4, "epochs": 120, "lr": 1e-3},
    {"width": 64, "n_blocks": 4, "epochs": 120, "lr": 3e-3},
]


def parse_config(spec: str) -> dict:
    """``"dataset=mnist1d width=64 lr=3e-3"`` -> a full configuration (BASE + overrides)."""
    config = dict(BASE)
    for item in spec.replace(",", " ").split():
        key, _, value = item.partition("=")
        if key not in TYPES or not value:
            raise SystemExit(f"bad configuration item {item!r}; use key=value with keys "
                             f"{', '.join(TYPES)}")
        config[key] = None if value.lower() == "none" else TYPES[key](value)
    return config


def label(config: dict) -> str:
    """Short name of a configuration, e.g. ``mnist1d w64 L4 e30 lr1e-03 b128``."""
    text = (f"{config['dataset']} w{config['width']} L{config['n_blocks']} e{config['epochs']} "
            f"lr{config['lr']:.0e} b{config['batch_size']}")
    return text + (f" n{config['n_train']}" if config["n_train"] else "")


def datasets(config: dict, seeds: list[int]):
    """One data set per seed (the seed draws the training subset when ``n_train`` is set)."""
    if config["n_train"] is None:
        data = load_dataset(config["dataset"])
        return {s: data for s in seeds}
    return {s: load_dataset(config["dataset"], seed=s, n_train=config["n_train"]) for s in seeds}


def measure(config: dict, methods: list[str], seeds: list[int]) -> tuple[dict, pd.DataFrame]:
    """Train every (method, seed) of one configuration; a summary row and the per-run table."""
    train_kw = {k: config[k] for k in ("width", "n_blocks", "epochs", "lr", "batch_size")}
    data = datasets(config, seeds)
    runs = []
    for seed in seeds:
        for method in methods:
            start, cpu = time.perf_counter(), time.process_time()
            _, _, record = train_residual(method, data[seed], seed=seed, **train_kw)
            runs.append({"method": method, "seed": seed, "test_acc": record["test_acc"],
                         "status": record["status"],
                         "seconds": time.perf_counter() - start,
                         "cpu_s": time.process_time() - cpu})
    start, cpu = time.perf_counter(), time.process_time()
    shallow = pd.concat([shallow_baselines(
        data[s], [s], width=config["width"], epochs=config["epochs"], lr=config["lr"],
        batch_size=config["batch_size"]) for s in seeds])
    shallow_s, shallow_cpu = time.perf_counter() - start, time.process_time() - cpu
    runs = pd.DataFrame(runs)
    acc = runs.pivot(index="seed", columns="method", values="test_acc")
    seconds = runs.groupby("method").seconds.mean()
    cpu_s = runs.groupby("method").cpu_s.mean()
    gap = 100 * (acc["bp"] - acc["frozen"])
    shallow_acc = shallow.groupby("model").test_acc.mean()
    row = {"config": label(config), "bp": acc["bp"].mean(), "frozen": acc["frozen"].mean(),
           "gap_pp": gap.mean(), "gap_min_pp": gap.min(), "no_blocks": shallow_acc["no_blocks"],
           "linear": shallow_acc["linear"], "bp_s": seconds["bp"], "bp_cpu": cpu_s["bp"],
           "held_out": len(data[seeds[0]].y_val) + len(data[seeds[0]].y_test)}
    for method in methods:
        if method != "bp":
            row[f"{method}_s"] = seconds[method]
            row[f"{method}_cpu"] = cpu_s[method]
            if method != "frozen":
                row[method] = acc[method].mean()
    diverged = runs[runs.status != "ok"]
    row["diverged"] = ", ".join(f"{r.method}/{r.seed}" for r in diverged.itertuples()) or "none"
    row["shallow_s"] = shallow_s
    row["train_s"] = runs.seconds.sum() + shallow_s
    row["train_cpu"] = runs.cpu_s.sum() + shallow_cpu
    return row, runs.assign(config=label(config))


def print_row(row: dict, methods: list[str], min_gap: float) -> None:
    mark = "yes" if row["gap_pp"] >= min_gap else "no"
    print(f"{row['config']:<40}{row['bp']:>7.3f}{row['frozen']:>8.3f}{row['gap_pp']:>7.1f}"
          f"{row['gap_min_pp']:>8.1f}{row['no_blocks']:>8.3f}{row['linear']:>8.3f}"
          f"{row['bp_s']:>7.2f}{row['bp_cpu']:>7.2f}{row.get('frozen_cpu', np.nan):>7.2f}  {mark}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[],
                        help="a configuration as 'key=value ...' over the base "
                             f"({' '.join(f'{k}={v}' for k, v in BASE.items())}); repeatable; "
                             "default: the built-in grid")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=[], choices=OTHERS,
                        help="rules trained besides bp and frozen")
    parser.add_argument("--full", action="store_true",
                        help="train all of chapter 4's rules and estimate the chapter's time")
    parser.add_argument("--min-gap", type=float, default=5.0,
                        help="depth gap (points) a configuration needs to qualify")
    parser.add_argument("--measure-s", type=float, default=30.0,
                        help="allowance for the chapter's measurements in the time estimate")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--csv", help="write the summary table here")
    parser.add_argument("--list", action="store_true", help="print the built-in grid and stop")
    args = parser.parse_args()
    configs = ([parse_config(s) for s in args.config] if args.config
               else [{**BASE, **c} for c in GRID])
    if args.list:
        for config in configs:
            print(label(config))
        return
    torch.set_num_threads(args.threads)
    methods = ["bp", "frozen", *(OTHERS if args.full else args.methods)]
    print(f"seeds {args.seeds}; methods {', '.join(methods)} + linear, no_blocks; "
          f"torch threads {args.threads}; gap = BP - frozen in points, mean (min) over seeds")
    print(f"{'config':<40}{'bp':>7}{'frozen':>8}{'gap':>7}{'gapmin':>8}{'noblk':>8}"
          f"{'linear':>8}{'bp_s':>7}{'bp_cpu':>7}{'frzcpu':>7}  gap>={args.min_gap:g}")
    # warm-up, so that the first timed run does not pay for torch's first call
    train_residual("bp", load_dataset(configs[0]["dataset"]), width=8, n_blocks=1, epochs=1)
    rows, per_run = [], []
    for config in configs:
        row, runs = measure(config, methods, args.seeds)
        print_row(row, methods, args.min_gap)
        rows.append(row)
        per_run.append(runs)
    table = pd.DataFrame(rows)
    if len(methods) > 2:
        print()
        print("other rules (mean test accuracy over seeds, mean seconds per run):")
        for row in rows:
            parts = [f"{m} {row[m]:.3f} ({row[f'{m}_s']:.1f} s, cpu {row[f'{m}_cpu']:.1f} s)"
                     for m in methods if m in OTHERS]
            print(f"  {row['config']}: {'; '.join(parts)}; diverged runs: {row['diverged']}")
    if args.full:
        print()
        print(f"chapter time estimate = all trainings ({len(methods)} rules x {len(args.seeds)} "
              f"seeds + shallow baselines) + {args.measure_s:g} s of measurements:")
        for row in rows:
            print(f"  {row['config']}: wall {row['train_s']:.0f} s + {args.measure_s:g} s = "
                  f"{(row['train_s'] + args.measure_s) / 60:.1f} min; CPU "
                  f"{row['train_cpu']:.0f} s + {args.measure_s:g} s = "
                  f"{(row['train_cpu'] + args.measure_s) / 60:.1f} min; held-out samples "
                  f"{row['held_out']}")
    if args.csv:
        table.to_csv(args.csv, index=False)
        pd.concat(per_run).to_csv(args.csv.replace(".csv", "_runs.csv"), index=False)


if __name__ == "__main__":
    main()
