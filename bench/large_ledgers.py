"""Time and peak memory of a cross-fitted audit on large ledgers, against ``mbe-eval``.

A random search with one seed per configuration repeats no row of the
controls, so the wild refits cannot be applied per configuration: each fold
applies its fit to every training row. Built as an (n_test, n_train)
matrix, that fit took 17 GB and 121 s for one metric at n = 20,000 with
``placebos=200`` (``mbe_helpers`` before the factored route); applied through
its factors (:func:`mbe_helpers.crossfit._times`) it never exists.

Ledger: ``bench_crossfit.make_ledger("increment", configs=n, seeds=1)`` (7
controls, every row distinct). Each cell runs in a fresh process (its peak
resident memory is the process's own), one BLAS thread:

* ours: ``audit(..., adjust="crossfit", placebos=P)`` for ``P`` in ``--placebos``;
* peer: ``mbe_eval.crossfit.cross_fitted_audit`` (5 splits, 199 permutations).

    python bench/large_ledgers.py [--rows 2000 5000 10000 20000] [--placebos 0 200]
                                  [--timeout 600]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from timing import speed  # bench/timing.py, beside this script

CHILD = r"""
import json, resource, sys, time, warnings
sys.path.insert(0, {bench!r})
from threadpoolctl import threadpool_limits
import bench_crossfit as b
n, who, placebos = {n}, {who!r}, {placebos}
df = b.make_ledger("increment", configs=n, seeds=1)
with threadpool_limits(1), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    if who == "ours":
        from mbe_helpers.audit import audit
        t = audit(df, "metric", "target", b.CONTROLS, adjust="crossfit", placebos=placebos, seed=0)
        verdict = f"{{t.table.classification.iloc[0]}} (adj_p {{t.table.adj_p.iloc[0]:.3g}})"
    else:
        from mbe_eval.crossfit import cross_fitted_audit
        out = cross_fitted_audit(df, "metric", "target", b.CONTROLS, n_splits=5,
                                 permutations=199, seed=0)
        verdict = f"{{out['increment_classification']}} (p {{out['residual_p']:.3g}})"
    seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                  "verdict": verdict}}))
"""


def cell(n: int, who: str, placebos: int, timeout: float) -> dict:
    code = CHILD.format(bench=str(Path(__file__).parent), n=n, who=who, placebos=placebos)
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"seconds": float("nan"), "gb": float("nan"), "verdict": f"over {timeout:.0f} s"}
    if done.returncode:
        return {"seconds": float("nan"), "gb": float("nan"),
                "verdict": f"failed: {done.stderr.strip().splitlines()[-1][:60]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2000, 5000, 10000, 20000])
    parser.add_argument("--placebos", type=int, nargs="+", default=[0, 200])
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    print(f"{'rows':>7}  {'who':<16} {'seconds':>8} {'peak GB':>8}  verdict")
    for n in args.rows:
        runs = [(f"ours placebos={p}", "ours", p) for p in args.placebos] + [("mbe-eval", "peer", 0)]
        times = {}
        for label, who, placebos in runs:
            out = cell(n, who, placebos, args.timeout)
            times[label] = out["seconds"]
            print(f"{n:>7,}  {label:<16} {out['seconds']:>8.1f} {out['gb']:>8.2f}  {out['verdict']}",
                  flush=True)
        for label, _, _ in runs[:-1]:
            print(f"{'':>7}  {label}: mbe_helpers is "
                  f"{speed(times['mbe-eval'] / times[label])} than mbe-eval")


if __name__ == "__main__":
    main()
