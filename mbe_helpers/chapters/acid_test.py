"""Chapter 01, "The acid test": capacity and label-noise probes of one architecture.

:func:`acid_test_configs` builds the capacity and label-noise probes,
:func:`acid_test_frame` labels the finished runs by probe and condition,
:func:`acid_test` computes per probe and metric Spearman's rho with the
target, a bootstrap interval that resamples whole *conditions*, the p-value
and whether the result is significant, and :func:`acid_verdict` applies the
rule: PASS when both probes are significant with the same sign. The runs are
:data:`mbe_helpers.probes.grid_run`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from mbe_helpers.audit import audit, check_alpha
from mbe_helpers.errors import MBEInputError

PROBES = ("capacity", "noise")


def acid_test_configs(sizes: Sequence[int], noises: Sequence[float], *, noise_n_train: int,
                      seeds: Sequence[int], **fixed: Any) -> pd.DataFrame:
    """Training configs of the two probes of the acid test (duplicates removed).

    The capacity probe varies ``n_train`` over ``sizes`` without label noise;
    the noise probe varies ``label_noise`` over ``noises`` at ``n_train =
    noise_n_train``.  Every condition is run with every seed; ``fixed`` holds
    the remaining keys of :data:`mbe_helpers.train.TRAIN_DEFAULTS`.  A config
    that belongs to both probes (``noise_n_train`` in ``sizes`` and 0 in
    ``noises``) appears once and is trained once.

    Examples
    --------
    >>> configs = acid_test_configs([50, 200], [0.0, 0.3], noise_n_train=200, seeds=[0, 1],
    ...                             epochs=5)
    >>> configs[["n_train", "label_noise", "seed", "epochs"]]        # (200, 0.0) is trained once
       n_train  label_noise  seed  epochs
    0       50          0.0     0       5
    1       50          0.0     1       5
    2      200          0.0     0       5
    3      200          0.0     1       5
    4      200          0.3     0       5
    5      200          0.3     1       5
    """
    if not sizes or not noises or not seeds:
        raise MBEInputError("the acid test needs at least one size, one noise level and one seed")
    rows = [{**fixed, "n_train": int(n), "label_noise": 0.0, "seed": int(s)}
            for n in sizes for s in seeds]
    rows += [{**fixed, "n_train": int(noise_n_train), "label_noise": float(p), "seed": int(s)}
             for p in noises for s in seeds]
    frame = pd.DataFrame(rows)
    return frame.loc[~frame.drop(columns=[c for c in frame if _unhashable(frame[c])])
                     .duplicated()].reset_index(drop=True)


def _unhashable(column: pd.Series) -> bool:
    return column.map(lambda v: isinstance(v, (list, dict))).any()


def acid_test_frame(runs: pd.DataFrame, sizes: Sequence[int], noises: Sequence[float], *,
                    noise_n_train: int) -> pd.DataFrame:
    """Label finished runs by probe: one row per (probe, condition, seed).

    Adds ``probe`` (``capacity`` / ``noise``) and ``condition`` (the value
    the probe varies); a run shared by both probes appears in both.  Runs
    that did not finish with status ``ok`` are dropped.

    Examples
    --------
    >>> configs = acid_test_configs([50, 200], [0.0, 0.3], noise_n_train=200, seeds=[0, 1])
    >>> runs = configs.assign(status=["ok"] * 5 + ["diverged"])
    >>> frame = acid_test_frame(runs, [50, 200], [0.0, 0.3], noise_n_train=200)
    >>> frame[["probe", "condition", "seed"]]
          probe  condition  seed
    0  capacity       50.0     0
    1  capacity       50.0     1
    2  capacity      200.0     0
    3  capacity      200.0     1
    4     noise        0.0     0
    5     noise        0.0     1
    6     noise        0.3     0
    """
    ok = runs[runs.status == "ok"] if "status" in runs else runs
    capacity = ok[(ok.label_noise == 0) & ok.n_train.isin([int(n) for n in sizes])]
    noise = ok[(ok.n_train == noise_n_train) & np.isclose(
        ok.label_noise.to_numpy()[:, None], np.asarray(noises, dtype=float)[None]).any(1)]
    return pd.concat([capacity.assign(probe="capacity", condition=capacity.n_train.astype(float)),
                      noise.assign(probe="noise", condition=noise.label_noise.astype(float))],
                     ignore_index=True)


def _condition_cluster(part: pd.DataFrame, bootstrap: int) -> str | None:
    """``"condition"`` where the bootstrap resamples conditions of several runs, else ``None``
    (one run per condition is a row bootstrap, which audit() asks to be named as such)."""
    return "condition" if bootstrap and part.condition.duplicated().any() else None


def acid_test(frame: pd.DataFrame, metrics: Sequence[str], target: str = "test_acc", *,
              bootstrap: int = 1000, alpha: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """Stage 1 of the protocol: does each metric track the target in each probe?

    Per probe and metric: Spearman's rho between the metric and ``target``
    over all runs of the probe (conditions x seeds), its two-sided p-value
    (t test on n - 2 degrees of freedom) and a bootstrap interval (the
    Fisher-z interval, :func:`mbe_helpers.audit.audit`'s default) that
    resamples whole conditions (all seeds of a condition together),
    because the conditions, not the runs, are the independent units of the
    design.  A result is ``significant`` when p < ``alpha`` *and* the
    interval excludes zero.

    Returns
    -------
    DataFrame
        One row per (probe, metric): ``probe, metric, n, n_conditions, rho,
        lo, hi, p, significant`` (rows of metrics with fewer than four
        complete runs in a probe have NaN and ``significant=False``).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> condition = np.repeat(np.arange(1.0, 11.0), 2)                # ten conditions, two seeds
    >>> acc = condition / 10 + rng.normal(0, 0.1, 20)
    >>> frame = pd.DataFrame({"probe": "capacity", "condition": condition, "test_acc": acc,
    ...                       "tracks": acc + rng.normal(0, 0.1, 20), "noise": rng.normal(size=20)})
    >>> table = acid_test(frame, ["tracks", "noise"], bootstrap=200)
    >>> table[["probe", "metric", "n", "n_conditions", "significant"]]
          probe  metric   n  n_conditions  significant
    0  capacity  tracks  20            10         True
    1  capacity   noise  20            10        False
    >>> table[["rho", "lo", "hi"]].round(2).values.tolist()
    [[0.98, 0.89, 1.0], [-0.28, -0.64, 0.18]]
    """
    check_alpha(alpha)
    rows = []
    for probe, part in frame.groupby("probe", sort=False):
        usable = [m for m in metrics if part[[m, target]].replace([np.inf, -np.inf], np.nan)
                  .dropna().pipe(lambda d: len(d) >= 4 and d[m].nunique() > 1)]
        result = audit(part, usable, target, bootstrap=bootstrap,
                       cluster=_condition_cluster(part, bootstrap), seed=seed,
                       adjust="rank") if usable else None
        table = result.table.set_index("metric") if result else pd.DataFrame()
        for metric in metrics:
            row = {"probe": probe, "metric": metric, "n_conditions": part.condition.nunique()}
            if metric in table.index:
                r = table.loc[metric]
                row.update(n=int(r.n), rho=r.raw_r, lo=r.raw_lo, hi=r.raw_hi, p=r.raw_p)
            else:
                row.update(n=0, rho=np.nan, lo=np.nan, hi=np.nan, p=np.nan)
            row["significant"] = bool(row["p"] < alpha and (row["lo"] > 0 or row["hi"] < 0))
            rows.append(row)
    return pd.DataFrame(rows)

def acid_verdict(table: pd.DataFrame) -> pd.DataFrame:
    """PASS or FAIL per metric from :func:`acid_test`'s table.

    PASS when the metric is significant in every probe and rho has the same
    sign in all of them; ``reason`` says which condition failed.
    Returns one row per metric: ``metric``, then ``rho_<probe>, lo_<probe>,
    hi_<probe>, p_<probe>`` for every probe, ``verdict`` and ``reason``.

    Examples
    --------
    >>> table = pd.DataFrame({"probe": ["capacity", "noise"] * 3,
    ...                       "metric": ["a", "a", "b", "b", "c", "c"],
    ...                       "rho": [0.8, 0.7, 0.8, -0.6, 0.8, 0.1],
    ...                       "lo": [0.5, 0.4, 0.5, -0.9, 0.5, -0.3],
    ...                       "hi": [0.9, 0.9, 0.9, -0.2, 0.9, 0.5], "p": [1e-3] * 5 + [0.6],
    ...                       "significant": [True] * 5 + [False]})
    >>> verdicts = acid_verdict(table)
    >>> verdicts.verdict.tolist()
    ['PASS', 'FAIL', 'FAIL']
    >>> for reason in verdicts.reason:
    ...     print(reason)
    significant in every probe with the same sign
    significant in every probe, but with opposite signs
    not significant in the noise probe
    """
    rows = []
    for metric, part in table.groupby("metric", sort=False):
        row: dict[str, Any] = {"metric": metric}
        for r in part.itertuples():
            row.update({f"rho_{r.probe}": r.rho, f"lo_{r.probe}": r.lo, f"hi_{r.probe}": r.hi,
                        f"p_{r.probe}": r.p})
        weak = [r.probe for r in part.itertuples() if not r.significant]
        signs = {np.sign(r.rho) for r in part.itertuples()}
        if weak:
            reason = ("not significant in the " + " and ".join(weak)
                      + (" probes" if len(weak) > 1 else " probe"))
        elif len(signs) > 1:
            reason = "significant in every probe, but with opposite signs"
        else:
            reason = "significant in every probe with the same sign"
        row.update(verdict="PASS" if not weak and len(signs) == 1 else "FAIL", reason=reason)
        rows.append(row)
    return pd.DataFrame(rows)


def _rho_with_interval(rho: float, lo: float, hi: float) -> str:
    return "–" if not np.isfinite(rho) else f"{rho:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def verdict_view(verdict: pd.DataFrame) -> pd.DataFrame:
    """:func:`acid_verdict`'s table for the page: one ``rho [lo, hi]`` cell per probe.

    Examples
    --------
    >>> v = pd.DataFrame({"metric": ["m"], "rho_capacity": [0.9], "lo_capacity": [0.8],
    ...                   "hi_capacity": [0.95], "p_capacity": [1e-4], "rho_noise": [0.7],
    ...                   "lo_noise": [0.5], "hi_noise": [0.8], "p_noise": [1e-3],
    ...                   "verdict": ["PASS"], "reason": ["significant in every probe"]})
    >>> verdict_view(v).iloc[0].tolist()
    ['m', '+0.90 [+0.80, +0.95]', '+0.70 [+0.50, +0.80]', 'PASS']
    """
    out = pd.DataFrame({"metric": verdict.metric})
    for probe in PROBES:
        if f"rho_{probe}" in verdict:
            out[f"{probe} ρ [CI]"] = [_rho_with_interval(r, lo, hi) for r, lo, hi in zip(
                verdict[f"rho_{probe}"], verdict[f"lo_{probe}"], verdict[f"hi_{probe}"])]
    out["verdict"] = verdict.verdict
    return out


def acid_story(fim_passes: bool, loss_passes: bool) -> str:
    """What the acid test says of FIM_norm beside validation loss, against the original study.

    Examples
    --------
    >>> acid_story(True, True)[:41]
    'FIM_norm passes the acid test, as in the '
    """
    return {
        (True, True): "FIM_norm passes the acid test, as in the original study, and so does "
                      "validation loss: passing cannot tell a candidate metric from a loss proxy",
        (True, False): "FIM_norm passes the acid test, as in the original study, but validation "
                       "loss does not, which differs from the expected result",
        (False, True): "FIM_norm fails the acid test, contrary to the original study, while "
                       "validation loss passes",
        (False, False): "neither FIM_norm nor validation loss passes the acid test, contrary to "
                        "the expected result",
    }[(bool(fim_passes), bool(loss_passes))]


def control_sentence(random_passes: bool) -> str:
    """How the random metric, the negative control, fared.

    Examples
    --------
    >>> control_sentence(False)
    'failed, as a negative control must'
    """
    return ("passed, which a negative control must not: treat this run with suspicion"
            if random_passes else "failed, as a negative control must")
