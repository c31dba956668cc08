"""Cross-fitted audit of ``mbe_helpers.audit`` against the published ``mbe-eval``.

Same grid-like ledger shape as ``bench_audit.py`` (``mbe_helpers.simulate.seeded_grid``: 680 runs = 136
configurations x 5 seeds, 7 controls: 5 numeric, 2 categorical), two data sets
with a known truth:

(a) ``proxy``: the metric and the target are both nonlinear (U-shaped in the
    learning rate, with an optimum that moves with the optimizer, and a
    width x depth interaction) functions of the controls plus independent
    noise -- a conditional null, the metric adds nothing;
(b) ``increment``: the same, and the target also depends on an independent
    per-run trait that the metric measures -- a genuine increment.

Ours: ``audit(..., adjust="crossfit", placebos=200, folds=5, cluster="config")``;
peer: ``mbe_eval.crossfit.cross_fitted_audit`` with its default polynomial-ridge
learner, ``group_col="config"``, 5 splits, 199 permutations. Both run in this
process, alternating, median of several repetitions after one warm-up. Also
times our audit with ``placebos=0`` (the cost of the self-calibration).

BLAS is pinned to one thread by default (``--blas-threads 0`` keeps the
library's default): on a small, busy machine multithreaded OpenBLAS turns our
per-fold SVDs from milliseconds into seconds, which would time the scheduler,
not the code.

    python bench/bench_crossfit.py [--reps 5] [--placebos 200] [--permutations 199]
                                   [--blas-threads 1] [--metrics 20]

A last section audits ``--metrics`` metrics in one call (the metric and
partly-noise copies) against the peer called once per metric.
"""

from __future__ import annotations

import argparse
import contextlib
import warnings

import numpy as np
import pandas as pd

from mbe_helpers import crossfit
from mbe_helpers.audit import audit
from mbe_helpers.simulate import SEEDED_GRID_CONTROLS, seeded_grid
from timing import alternating, speed  # bench/timing.py, beside this script

CONTROLS = list(SEEDED_GRID_CONTROLS)
#: 136 configurations x 5 seeds; controls per configuration, noise per run.
make_ledger = seeded_grid
TRUTH = {"proxy": "no increment (conditional null)", "increment": "increment"}


def ours(df: pd.DataFrame, placebos: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CalibrationWarning is read from .calibration instead
        return audit(df, "metric", "target", CONTROLS, adjust="crossfit", placebos=placebos,
                     folds=5, cluster="config", seed=0)


def peer(df: pd.DataFrame, permutations: int) -> dict:
    from mbe_eval.crossfit import cross_fitted_audit  # the peer, installed from PyPI

    return cross_fitted_audit(df, "metric", "target", CONTROLS, group_col="config",
                              n_splits=5, permutations=permutations, seed=0)



def factorisation_floor(df: pd.DataFrame, reps: int) -> tuple[float, list[int]]:
    """Median seconds of the eigendecompositions behind one cross-fit of this ledger, alone.

    The learner factorises one Gram matrix per fold and interaction scale
    (:func:`mbe_helpers.crossfit._fold_spectrum`); this times ``_eigh`` on
    symmetric matrices of exactly those sizes, the part of our audit that no
    rewrite of the surrounding code can remove.
    """
    numeric = df[CONTROLS[:5]].to_numpy(float)
    basis = crossfit.control_basis(numeric, df[CONTROLS[5:]].to_numpy(), n=len(df))
    folds = crossfit.fold_ids(len(df), 5, 0, df.config.to_numpy())
    crossfit.crossfit_residuals(basis, df[["target", "metric"]].to_numpy(float), folds, keep=0)
    sizes = [s.left.shape[0] if s.right is None else s.right.shape[0]
             for s in basis.spectra.values() if s.d is not None]
    rng = np.random.default_rng(0)
    grams = [(lambda a: a @ a.T)(rng.normal(size=(m, m))) for m in sizes]
    medians, _ = alternating({"eigh": lambda: [crossfit._eigh(g) for g in grams]}, reps)
    return medians["eigh"], sizes


def rates(calibration: pd.DataFrame) -> str:
    if calibration is None or calibration.empty:
        return "none"
    parts = []
    for row in calibration.itertuples():
        parts.append(f"{row.kind} {row.rejections}/{row.K} = {row.rate:.3f} "
                     f"[{row.lo:.3f}, {row.hi:.3f}]")
    return "; ".join(parts)


def blas_limit(threads: int):
    """Limit BLAS threads where threadpoolctl is installed (0 = leave as is)."""
    if threads <= 0:
        return contextlib.nullcontext("library default")
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext("library default (threadpoolctl not installed)")
    return threadpool_limits(limits=threads, user_api="blas")



def many_metrics(args: argparse.Namespace) -> None:
    """A battery of metrics in one audit (one factorisation per fold serves them all) against
    the peer run once per metric."""
    df = make_ledger("increment")
    rng = np.random.default_rng(1)
    names = ["metric"] + [f"m{i}" for i in range(1, args.metrics)]
    for name in names[1:]:                       # partly the real metric, partly noise
        df[name] = rng.uniform(0, 1) * df["metric"] + rng.normal(0, 1, len(df))

    def ours_many(placebos: int):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return audit(df, names, "target", CONTROLS, adjust="crossfit", placebos=placebos,
                         folds=5, cluster="config", seed=0)

    def peer_many():
        return [peer(df.assign(metric=df[name]), args.permutations) for name in names]

    medians, _ = alternating({"ours": lambda: ours_many(args.placebos), "peer": peer_many,
                              "ours0": lambda: ours_many(0)}, max(1, args.reps // 2))
    print()
    print(f"== {len(names)} metrics in one audit (the increment ledger; peer: one call per metric)")
    print(f"ours placebos={args.placebos}: {medians['ours']:.3f} s, placebos=0: "
          f"{medians['ours0']:.3f} s; mbe-eval: {medians['peer']:.3f} s; at placebos=0 "
          f"mbe_helpers is {speed(medians['peer'] / medians['ours0'])}, at placebos="
          f"{args.placebos} {speed(medians['peer'] / medians['ours'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--placebos", type=int, default=200)
    parser.add_argument("--permutations", type=int, default=199)
    parser.add_argument("--blas-threads", type=int, default=1)
    parser.add_argument("--metrics", type=int, default=20,
                        help="also audit this many metrics in one call (0: skip)")
    args = parser.parse_args()
    with blas_limit(args.blas_threads):
        run(args)


def run(args: argparse.Namespace) -> None:

    print(f"controls: {', '.join(CONTROLS)} (5 numeric, optimizer 2 levels, arch 3 levels); "
          f"ours: adjust=crossfit placebos={args.placebos} folds=5 cluster=config; "
          f"peer: polynomial_ridge n_splits=5 permutations={args.permutations} group_col=config; "
          f"median of {args.reps} alternating runs after one warm-up; "
          f"BLAS threads: {args.blas_threads or 'library default'}")
    summary = []
    for kind in ("proxy", "increment"):
        df = make_ledger(kind)
        medians, outs = alternating({
            "ours": lambda: ours(df, args.placebos),
            "peer": lambda: peer(df, args.permutations),
            "ours0": lambda: ours(df, 0),
        }, args.reps)
        row = outs["ours"].table.iloc[0]
        p = outs["peer"]
        print()
        print(f"== ({'a' if kind == 'proxy' else 'b'}) {kind}: {len(df)} rows, "
              f"{df.config.nunique()} configurations, truth: {TRUTH[kind]}")
        print(f"{'':<13}{'median s':>10}{'resid r':>10}{'p':>10}  verdict")
        print(f"{'mbe_helpers':<13}{medians['ours']:>10.3f}{row.adj_r:>10.4f}{row.adj_p:>10.4f}"
              f"  {row.classification} (raw_r {row.raw_r:+.3f}, rank partial_r {row.partial_r:+.3f})")
        print(f"{'mbe-eval':<13}{medians['peer']:>10.3f}{p['residual_r']:>10.4f}"
              f"{p['residual_p']:>10.4f}  {p['increment_classification']} "
              f"(delta_mse {p['delta_mse']:+.5f}, rel. {p['relative_mse_improvement']:+.3f}, "
              f"units {p['independence_units']})")
        print(f"our placebo rejection rates (alpha {outs['ours'].settings['alpha']}): "
              f"{rates(outs['ours'].calibration)}")
        print(f"speed: mbe_helpers is {speed(medians['peer'] / medians['ours'])} "
              f"(mbe-eval / mbe_helpers = {medians['peer'] / medians['ours']:.3f}, "
              f"placebos={args.placebos})")
        print(f"ours placebos=0: {medians['ours0']:.3f} s; placebos={args.placebos} / placebos=0: "
              f"{medians['ours'] / medians['ours0']:.2f}x; at placebos=0 mbe_helpers is "
              f"{speed(medians['peer'] / medians['ours0'])}")
        columns = 1 + 2 * args.placebos
        print(f"per tested column: ours {1e3 * medians['ours'] / columns:.2f} ms ({columns} columns: "
              f"the metric and {2 * args.placebos} placebos, each with its own wild refit test), "
              f"mbe-eval {1e3 * medians['peer']:.1f} ms (one metric)")
        same = outs["ours0"].table.iloc[0]
        print(f"adj_r/adj_p unchanged by placebos: "
              f"{np.isclose(same.adj_r, row.adj_r) and np.isclose(same.adj_p, row.adj_p)}")
        floor, sizes = factorisation_floor(df, args.reps)
        print(f"floor: the {len(sizes)} fold eigendecompositions alone ({min(sizes)}-{max(sizes)} "
              f"square) take {1e3 * floor:.1f} ms = {floor / medians['peer']:.0%} of mbe-eval's "
              f"whole audit; 5x faster than mbe-eval is {1e3 * medians['peer'] / 5:.1f} ms")
        summary.append((kind, medians))
    if args.metrics > 1:
        many_metrics(args)
    print()
    total = {k: sum(m[k] for _, m in summary) for k in ("ours", "peer", "ours0")}
    print(f"overall: placebos={args.placebos} costs {total['ours'] / total['ours0']:.2f}x "
          f"placebos=0 ({total['ours']:.3f} s vs {total['ours0']:.3f} s summed over both data sets)")


if __name__ == "__main__":
    main()
