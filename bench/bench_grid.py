"""Benchmark the grid engines side by side and print ratios (not a test).

1. K = 8, 32, 128 MLPs 64 -> 64 -> 10 on digits, Adam for a fixed number of
   steps, (a) full batch and (b) minibatches of 32: the sequential loop
   (``train`` per model) against one vmapped ensemble (``train_ensemble``),
   and the group size the automatic rule (``choose_group_size``) picks.
2. The same, full batch, for a wide MLP 784 -> 128 -> 10 (MNIST-shaped
   random inputs), where stacking is expected to stop paying on CPU.
3. A 16-run grid on a 2-worker Dask ``LocalCluster`` against in-process.

Times are medians of ``--repeats`` repetitions; torch uses one thread per
process (``--threads``), as Dask workers do.  Run: ``python bench/bench_grid.py``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mbe_helpers.data import Dataset, load_dataset
from mbe_helpers.grid import LogUniform, Choice, run_grid, sample_configs
from mbe_helpers.train import (TrainRun, build_model, choose_group_size, train,
                               train_ensemble)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def wide_dataset(n: int = 1078, dim: int = 784, device: str = "cpu") -> Dataset:
    """Random MNIST-shaped inputs (the bench needs shapes, not accuracy)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * n, dim, generator=g).to(device)
    y = torch.randint(0, 10, (3 * n,), generator=g).to(device)
    return Dataset("wide", x[:n], y[:n], x[n:2 * n], y[n:2 * n], x[2 * n:], y[2 * n:], 10,
                   None, torch.arange(n), torch.zeros(n, dtype=torch.bool))


def ensemble_vs_sequential(data: Dataset, width: int, sizes: list[int], epochs: int,
                           batch_size: int | None, repeats: int, device: str) -> None:
    config = {"width": width, "depth": 1, "activation": "tanh", "device": device}
    models = [build_model({**config, "seed": s}, data) for s in range(max(sizes))]
    train(copy.deepcopy(models[0]), data, epochs=1, batch_size=batch_size)  # warm-up
    train_ensemble(models[:2], [data] * 2, lr=[1e-3] * 2, weight_decay=[0.0] * 2,
                   seeds=[0, 1], epochs=1, batch_size=batch_size)
    print(f"{'K':>5} {'sequential s':>13} {'ensemble s':>11} {'ratio':>7}")
    for k in sizes:
        lrs, wds, seeds = [1e-3 * (1 + i % 5) for i in range(k)], [0.0] * k, list(range(k))

        def sequential():
            for model, lr in zip(models[:k], lrs):
                train(copy.deepcopy(model), data, optimizer="adam", lr=lr, epochs=epochs,
                      batch_size=batch_size)

        def ensemble():
            train_ensemble(models[:k], [data] * k, optimizer="adam", lr=lrs,
                           weight_decay=wds, seeds=seeds, epochs=epochs, batch_size=batch_size)
        t_seq, t_ens = median_seconds(sequential, repeats), median_seconds(ensemble, repeats)
        print(f"{k:>5} {t_seq:>13.3f} {t_ens:>11.3f} {t_seq / t_ens:>6.1f}x")
    group, costs = choose_group_size(models[0], data, max_group=max(sizes),
                                     batch_size=batch_size)
    per_step = ", ".join(f"{g}: {c * 1e3:.2f}" for g, c in costs.items())
    print(f"automatic rule picks group size {group} (1 = sequential); "
          f"ms per model-step by group size: {per_step}")


def dask_vs_inprocess(n_runs: int, repeats: int) -> None:
    from distributed import Client, LocalCluster
    space = {"width": 64, "depth": 1, "epochs": 100, "lr": LogUniform(1e-3, 1e-1),
             "seed": Choice(tuple(range(8)))}
    configs = sample_configs(space, n_runs, seed=0)
    run_fn = TrainRun(ensemble=False)

    def grid(executor) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            run_grid(configs, run_fn, Path(tmp) / "ledger.jsonl", executor, progress=False)

    start = time.perf_counter()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(lambda: __import__("mbe_helpers.train"))  # warm the workers
        startup = time.perf_counter() - start
        t_dask = median_seconds(lambda: grid(client), repeats)
    t_local = median_seconds(lambda: grid(None), repeats)
    print(f"{n_runs} runs: in-process {t_local:.2f} s, Dask 2 workers {t_dask:.2f} s "
          f"(cluster start {startup:.1f} s, not counted): ratio {t_local / t_dask:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="full-batch steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-dask", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {args.threads} thread(s) per "
          f"process, Adam, median of {args.repeats}")
    digits = load_dataset("digits", device=args.device)
    print(f"\n1a. MLP 64 -> 64 -> 10 on digits, full batch (n_train = {digits.n_train}), "
          f"{args.steps} steps")
    ensemble_vs_sequential(digits, 64, [8, 32, 128], args.steps, None, args.repeats,
                           args.device)
    print("\n1b. The same with minibatches of 32, 2 epochs (68 steps)")
    ensemble_vs_sequential(digits, 64, [8, 32, 128], 2, 32, args.repeats, args.device)
    print(f"\n2. MLP 784 -> 128 -> 10 on MNIST-shaped random inputs (n = 1078), full batch, "
          f"{args.steps} steps")
    ensemble_vs_sequential(wide_dataset(device=args.device), 128, [8, 32], args.steps, None,
                           args.repeats, args.device)
    if not args.skip_dask:
        print("\n3. Grid of MLPs 64 -> 64 -> 10, 100 epochs each")
        dask_vs_inprocess(16, args.repeats)


if __name__ == "__main__":
    main()
