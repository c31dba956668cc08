"""Twin placebos in the audit: how often they flag each scenario, and what that does to the claims.

The proxy placebos of :func:`mbe_helpers.audit.audit` are random smooth functions
of the controls; they do not share the target's misfit, so they miss a shape the
learner fails on (a proxy shaped like a training grid, ``grid_proxy_5``).
The *twin* placebos copy the target's own dependence on the controls
(:func:`mbe_helpers.crossfit.cv_ridge_fit`, :func:`mbe_helpers.crossfit.twin_columns`).
When the twins' Wilson lower bound exceeds alpha, the audit withholds a cross-fitted
claim of that group (class ``inconclusive``) unless the metric's GCM statistic is beyond
the twins' (twin-referenced p at most a tenth of alpha).

Per scenario and n this prints, over ``reps`` ledgers audited with ``adjust="auto"``
and ``placebos=200``: the metric's cross-fitted rejection rate (``adj_p < alpha``),
the mean twin rejection rate, the share of ledgers flagged by the twins and by any
kind, the share rejected and not flagged, and the claim rate (a class in
:data:`mbe_helpers.audit.CLAIMS`) without placebos and with them.

    python bench/twin_placebos.py [reps] [n,n,...] [scenario,...]
"""

from __future__ import annotations

import sys
import time
import warnings
from multiprocessing import Pool

import numpy as np
import pandas as pd

from mbe_helpers import simulate
from mbe_helpers.audit import CLAIMS, audit

PLACEBOS, ALPHA = 200, 0.05


def one_ledger(job):
    name, n, seed = job
    from threadpoolctl import threadpool_limits

    scenario = simulate.SCENARIOS[name]
    frame = scenario.generate(np.random.default_rng([seed, n]), n)
    kwargs = dict(cluster=scenario.cluster, seed=seed, alpha=ALPHA)
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")
        plain = audit(frame, "metric", "target", list(scenario.controls), **kwargs)
        checked = audit(frame, "metric", "target", list(scenario.controls), placebos=PLACEBOS,
                        **kwargs)
    row = checked.table.iloc[0]
    calibration = checked.calibration.set_index("kind")
    flagged = calibration.lo > calibration.alpha
    twin = calibration.rate.get("twin", np.nan)
    return dict(scenario=name, n=n, metric_rejected=bool(row.adj_p < ALPHA), twin_rate=twin,
                twin_flag=bool(flagged.get("twin", False)), any_flag=bool(flagged.any()),
                claim_plain=plain.table.classification.iloc[0] in CLAIMS,
                claim_checked=row.classification in CLAIMS)


def main(argv: list[str]) -> None:
    reps = int(argv[0]) if argv else 30
    sizes = [int(x) for x in argv[1].split(",")] if len(argv) > 1 else [150, 300]
    names = argv[2].split(",") if len(argv) > 2 else list(simulate.SCENARIOS)
    jobs = [(name, n, seed) for name in names for n in sizes for seed in range(reps)]
    start = time.perf_counter()
    with Pool(2) as pool:
        out = pd.DataFrame(pool.map(one_ledger, jobs, chunksize=4))
    out["kind"] = out.scenario.map(lambda s: simulate.SCENARIOS[s].kind)
    out["rejected_unflagged"] = out.metric_rejected & ~out.any_flag
    columns = ["metric_rejected", "twin_rate", "twin_flag", "any_flag", "rejected_unflagged",
               "claim_plain", "claim_checked"]
    table = out.groupby(["kind", "scenario", "n"])[columns].mean()
    with pd.option_context("display.width", 200):
        print(table.round(3).to_string())
    print(f"{len(jobs)} ledgers ({reps} per cell) in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
