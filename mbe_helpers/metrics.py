r"""The probe battery of the FIM_norm case study, and the runs of Chapters 1 and 2.

A *metric* is ``metric(model, batch) -> dict`` (see :mod:`mbe_helpers.train`);
every metric here is a module-level function or a small picklable class, so a
run function built from them travels to process and Dask workers.

The battery (:func:`probe_battery`)
-----------------------------------
* :class:`FimProbe` -- the FIM family of :func:`mbe_helpers.fisher.fim_metrics`
  (``fim_norm`` = erank(D) / N of the dual Gram of per-sample gradients, its
  unit-normalised twin ``fim_norm_unit``, trace, spectral norm, stable rank,
  noise scale, ...) on a fixed subset of ``n_samples`` rows of the probe batch;
* :func:`weight_spectrum` -- SCI (mean erank(W) / min(n_out, n_in) over
  layers), the mean stable rank of the weights and alpha-hat
  (:func:`mbe_helpers.spectral.spectral_metrics`);
* :func:`weight_norm` -- :math:`\lVert\theta\rVert_2` over all trainable parameters;
* :class:`RandomMetric` -- the negative control: a uniform number in [0, 1)
  drawn from a hash of the model's parameters and a seed.  It is reproducible
  (same weights, same value) yet carries no information about them.

Both chapters run :data:`grid_run` (a :class:`BatteryRun`) over their
configs with :func:`run_with_ledger`, which also says how many runs a rerun reused.

Chapter 1 (the acid test)
-------------------------
:func:`acid_test_configs` builds the capacity and label-noise probes,
:func:`acid_test_frame` labels the finished runs by probe and condition,
:func:`acid_test` computes per probe and metric Spearman's rho with the
target, a bootstrap interval that resamples whole *conditions*, the p-value
and whether the result is significant, and :func:`acid_verdict` applies the
rule: PASS when both probes are significant with the same sign.

Chapter 2 (the heterogeneous grid)
----------------------------------
:func:`grid_space` is the sampled design, :func:`add_positive_control` the
noisy copy of the target, :func:`baseline_audits` runs the audit given (a)
early validation loss, (b) the design variables, (c) both,
:func:`audit_summary` collects them in one table, :func:`temporal_audit`
repeats the audit at every probe epoch, :func:`control_checks` says whether
the positive and negative controls landed where they must,
:func:`rank_associations` shows what a metric follows instead and
:func:`outcome_sentence` puts an outcome class into words.

Parameter checks
----------------
:func:`check_parameters` with the rules :class:`Int`, :class:`Num`,
:class:`OneOf`, :class:`ListOf`, :class:`Range`, :class:`Maybe` and
:class:`Text` is the validation cell of both chapters: it refuses the first
bad value in one sentence (:class:`~mbe_helpers.errors.MBEInputError`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from mbe_helpers.audit import OUTCOME_SENTENCES, AuditResult, audit
from mbe_helpers.errors import MBEInputError

FIM_SAMPLES = 256
"""Default number of probe-batch rows the FIM family is computed on."""

FIM_METRICS = ("fim_norm", "fim_norm_unit", "fisher_trace", "fisher_spectral",
               "fisher_stable_rank", "grad_noise_scale")
"""FIM-family metrics audited by the chapters.  ``fim_erank`` and
``fisher_entropy`` are left out: with N fixed they are monotone functions of
``fim_norm`` (``fim_erank = N fim_norm = exp(fisher_entropy)``), so every rank
statistic of theirs equals that of ``fim_norm``."""

WEIGHT_METRICS = ("sci", "weight_stable_rank", "alpha_hat", "weight_norm")
"""Weight-spectrum metrics audited by the chapters."""

NEGATIVE_CONTROL = "random_metric"
BATTERY = (*FIM_METRICS, *WEIGHT_METRICS, NEGATIVE_CONTROL)
"""Every audited metric the battery records, in display order."""

DESIGN = ("lr", "weight_decay", "width", "depth", "optimizer", "label_noise", "n_train")
"""The design variables of the heterogeneous grid (Chapter 2) that serve as controls.  The
seed is sampled too, but it is not a control: it has no order that could relate to accuracy."""


# --------------------------------------------------------------------------- #
# The battery                                                                 #
# --------------------------------------------------------------------------- #

class FimProbe:
    """The FIM family on a fixed subset of the probe batch.

    The subset is the same ``n_samples`` rows (drawn once from ``seed``,
    without replacement) at every epoch and for every run that sees the same
    batch, so values differ only through the model.  A batch with at most
    ``n_samples`` rows is used whole.

    Parameters
    ----------
    n_samples : int
        N, the number of per-sample gradients (at least 2).  The cost grows
        like N^2 (the Gram matrix) plus one batched backward pass.
    seed : int
        Seed of the subset.
    dtype : {"float32", "float64"}
        Precision of the computation.

    Returns (when called)
    ---------------------
    dict
        :data:`mbe_helpers.fisher.FIM_KEYS` and ``fim_reason``.
    """

    def __init__(self, n_samples: int = FIM_SAMPLES, seed: int = 0, dtype: str = "float32"):
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2:
            raise MBEInputError(f"n_samples must be an integer of at least 2, got {n_samples!r}")
        if dtype not in ("float32", "float64"):
            raise MBEInputError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        self.n_samples, self.seed, self.dtype = n_samples, int(seed), dtype

    def __repr__(self) -> str:
        return f"FimProbe(n_samples={self.n_samples}, seed={self.seed}, dtype={self.dtype!r})"

    def rows(self, n: int) -> np.ndarray:
        """Sorted row indices of the subset of a batch of ``n`` rows."""
        if n <= self.n_samples:
            return np.arange(n)
        return np.sort(np.random.default_rng(self.seed).choice(n, self.n_samples, replace=False))

    def __call__(self, model, batch) -> dict[str, float | str]:
        import torch

        from mbe_helpers.fisher import fim_metrics

        x, y = batch
        rows = torch.as_tensor(self.rows(len(y)), device=y.device)
        return fim_metrics(model, x[rows], y[rows], dtype=getattr(torch, self.dtype))


def weight_spectrum(model, batch=None) -> dict[str, float]:
    """SCI, mean stable rank and alpha-hat of the model's Linear / Conv2d weights.

    ``sci`` is the mean over layers of erank(W) / min(n_out, n_in);
    ``weight_stable_rank`` the mean of :math:`\\lVert W\\rVert_F^2 / \\lVert
    W\\rVert_2^2`; ``alpha_hat`` the mean over layers with a power-law fit of
    :math:`\\alpha_l \\ln \\lambda_{\\max,l}` (NaN when no layer has a tail of
    at least 10 eigenvalues), ``alpha_mean`` the mean fitted exponent.  The
    batch is ignored: weights need no data.
    """
    from mbe_helpers.spectral import spectral_metrics

    values = spectral_metrics(model, log_base="e")
    return {"sci": values["sci"], "weight_stable_rank": values["stable_rank_mean"],
            "alpha_hat": values["alpha_hat_ln"], "alpha_mean": values["alpha_mean"]}


def weight_norm(model, batch=None) -> dict[str, float]:
    r"""``weight_norm`` :math:`= \lVert\theta\rVert_2 = (\sum_p \lVert p \rVert_F^2)^{1/2}`
    over all trainable parameters (weights and biases); the batch is ignored."""
    total = sum(float(p.detach().double().pow(2).sum()) for p in model.parameters()
                if p.requires_grad)
    return {"weight_norm": math.sqrt(total)}


class RandomMetric:
    """Negative control: a uniform number in [0, 1) that depends on nothing measurable.

    The value is read off the SHA-256 digest of ``seed`` and the bytes of
    every parameter, so it is reproducible (the same weights give the same
    value) but, like any good hash, independent of every property of the
    weights.  Two different ``seed`` values give independent controls.
    """

    def __init__(self, seed: int = 0, name: str = NEGATIVE_CONTROL):
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise MBEInputError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed, self.name = seed, name

    def __repr__(self) -> str:
        return f"RandomMetric(seed={self.seed}, name={self.name!r})"

    def __call__(self, model, batch=None) -> dict[str, float]:
        digest = hashlib.sha256(str(self.seed).encode())
        for p in model.parameters():
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
        return {self.name: int.from_bytes(digest.digest()[:8], "big") / 2.0 ** 64}


random_metric = RandomMetric(0)
"""The default negative control (seed 0)."""


def probe_battery(fim_samples: int = FIM_SAMPLES, seed: int = 0) -> dict[str, Any]:
    """The metrics evaluated at every probe epoch, as ``name -> metric``.

    ``fim`` (:class:`FimProbe` on ``fim_samples`` rows), ``spectrum``
    (:func:`weight_spectrum`), ``norm`` (:func:`weight_norm`) and ``random``
    (:class:`RandomMetric` with ``seed``).  Together they report the columns
    of :data:`BATTERY` (plus the other FIM keys, ``alpha_mean`` and ``fim_reason``).
    """
    return {"fim": FimProbe(fim_samples, seed=seed), "spectrum": weight_spectrum,
            "norm": weight_norm, "random": RandomMetric(seed)}


BATTERY_DEFAULTS: dict[str, Any] = {"fim_samples": FIM_SAMPLES, "probe_seed": 0}
"""Config keys of :class:`BatteryRun` on top of :data:`mbe_helpers.train.TRAIN_DEFAULTS`."""


class BatteryRun:
    """The grid run function of both chapters: train one config, probe it with the battery.

    ``BatteryRun()(config)`` reads ``fim_samples`` and ``probe_seed`` (see
    :data:`BATTERY_DEFAULTS`) off the config, passes the rest to
    :class:`mbe_helpers.train.TrainRun` with :func:`probe_battery` evaluated
    on the validation split at every probe epoch, and returns its flat
    record.  Because the battery settings are part of the config, they are
    part of its ledger key: a rerun with another ``fim_samples`` trains
    afresh instead of reusing runs probed differently.  Picklable, so it runs
    in process, on any ``concurrent.futures`` executor or on Dask.  Models
    are trained one at a time: the battery costs more than training these
    small models, so stacking them into an ensemble does not pay.
    """

    def __init__(self, probe_split: str = "val"):
        if probe_split not in ("train", "val", "test"):
            raise MBEInputError(f"unknown probe_split {probe_split!r}; choose 'train', 'val' "
                                "or 'test'")
        self.probe_split = probe_split

    def __repr__(self) -> str:
        return f"BatteryRun(probe_split={self.probe_split!r})"

    def __call__(self, config: Mapping[str, Any]) -> dict[str, Any]:
        from mbe_helpers.train import TrainRun

        cfg = dict(config)
        settings = {k: cfg.pop(k, v) for k, v in BATTERY_DEFAULTS.items()}
        battery = probe_battery(int(settings["fim_samples"]), int(settings["probe_seed"]))
        return TrainRun(battery, probe_split=self.probe_split, ensemble=False)(cfg)


grid_run = BatteryRun()
"""``grid_run(config) -> record``: the run function of Chapters 1 and 2."""


def run_with_ledger(configs: pd.DataFrame, run_fn, ledger_path, *, executor: Any = None,
                    progress: bool = False) -> tuple[pd.DataFrame, int]:
    """:func:`mbe_helpers.grid.run_grid`, also counting the runs reused from the ledger.

    Returns ``(runs, n_reused)``: one row per config and how many of them
    had already finished (``ok`` or ``diverged``) in the ledger before the call.
    When the environment variable ``MBE_TRACK`` is ``mlflow://EXPERIMENT`` (as
    ``mbe-book run CHAPTER --track mlflow://EXPERIMENT`` sets it), the grid's
    runs are also logged there, at ``MLFLOW_TRACKING_URI``.
    """
    import os
    from pathlib import Path

    from mbe_helpers.grid import FINISHED, read_ledger, run_grid

    if not progress:
        _quiet_tqdm()
    ledger = Path(ledger_path)
    before = read_ledger(ledger) if ledger.exists() else pd.DataFrame(columns=["config_hash",
                                                                                "status"])
    finished = set(before.config_hash[before.status.isin(FINISHED)])
    runs = run_grid(configs, run_fn, ledger, executor=executor, progress=progress,
                    tracker=os.environ.get("MBE_TRACK") or None)
    return runs, int(runs.config_hash.isin(finished).sum())


def resolve_device(device: str) -> str:
    """``"auto"`` becomes ``"cuda"`` when a GPU is visible, else ``"cpu"``; other names pass through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def at(metrics: Sequence[str], epoch: int | str) -> list[str]:
    """Ledger column names ``<metric>@<epoch>``."""
    return [f"{m}@{epoch}" for m in metrics]


# --------------------------------------------------------------------------- #
# Chapter 1: the acid test                                                    #
# --------------------------------------------------------------------------- #

PROBES = ("capacity", "noise")


def _quiet_tqdm() -> None:
    """Import ``tqdm.auto`` without its warning about missing ipywidgets.

    In a kernel without ipywidgets the first import of ``tqdm.auto`` warns
    (``TqdmWarning: IProgress not found``) even when no bar is shown; the
    warning would land in the executed chapter.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import tqdm.auto  # noqa: F401


def acid_test_configs(sizes: Sequence[int], noises: Sequence[float], *, noise_n_train: int,
                      seeds: Sequence[int], **fixed: Any) -> pd.DataFrame:
    """Training configs of the two probes of the acid test (duplicates removed).

    The capacity probe varies ``n_train`` over ``sizes`` without label noise;
    the noise probe varies ``label_noise`` over ``noises`` at ``n_train =
    noise_n_train``.  Every condition is run with every seed; ``fixed`` holds
    the remaining keys of :data:`mbe_helpers.train.TRAIN_DEFAULTS`.  A config
    that belongs to both probes (``noise_n_train`` in ``sizes`` and 0 in
    ``noises``) appears once and is trained once.
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
    """
    ok = runs[runs.status == "ok"] if "status" in runs else runs
    capacity = ok[(ok.label_noise == 0) & ok.n_train.isin([int(n) for n in sizes])]
    noise = ok[(ok.n_train == noise_n_train) & np.isclose(
        ok.label_noise.to_numpy()[:, None], np.asarray(noises, dtype=float)[None]).any(1)]
    return pd.concat([capacity.assign(probe="capacity", condition=capacity.n_train.astype(float)),
                      noise.assign(probe="noise", condition=noise.label_noise.astype(float))],
                     ignore_index=True)


def acid_test(frame: pd.DataFrame, metrics: Sequence[str], target: str = "test_acc", *,
              bootstrap: int = 1000, alpha: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """Stage 1 of the protocol: does each metric track the target in each probe?

    Per probe and metric: Spearman's rho between the metric and ``target``
    over all runs of the probe (conditions x seeds), its two-sided p-value
    (t test on n - 2 degrees of freedom) and a percentile bootstrap interval
    that resamples whole conditions (all seeds of a condition together),
    because the conditions, not the runs, are the independent units of the
    design.  A result is ``significant`` when p < ``alpha`` *and* the
    interval excludes zero.

    Returns
    -------
    DataFrame
        One row per (probe, metric): ``probe, metric, n, n_conditions, rho,
        lo, hi, p, significant`` (rows of metrics with fewer than four
        complete runs in a probe have NaN and ``significant=False``).
    """
    _check_alpha(alpha)
    rows = []
    for probe, part in frame.groupby("probe", sort=False):
        usable = [m for m in metrics if part[[m, target]].replace([np.inf, -np.inf], np.nan)
                  .dropna().pipe(lambda d: len(d) >= 4 and d[m].nunique() > 1)]
        result = audit(part, usable, target, bootstrap=bootstrap, cluster="condition",
                       seed=seed, adjust="rank") if usable else None
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


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise MBEInputError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")


def acid_verdict(table: pd.DataFrame) -> pd.DataFrame:
    """PASS or FAIL per metric from :func:`acid_test`'s table.

    PASS when the metric is significant in every probe and rho has the same
    sign in all of them; ``reason`` says which condition failed.
    Returns one row per metric: ``metric``, then ``rho_<probe>, lo_<probe>,
    hi_<probe>, p_<probe>`` for every probe, ``verdict`` and ``reason``.
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


# --------------------------------------------------------------------------- #
# Chapter 2: the heterogeneous grid                                           #
# --------------------------------------------------------------------------- #

def grid_space(*, lr: Sequence[float] = (1e-4, 1e-1), weight_decay: Sequence[float] = (1e-6, 1e-2),
               widths: Sequence[int] = (16, 32, 64, 128), depths: Sequence[int] = (1, 2, 3),
               optimizers: Sequence[str] = ("adam", "sgd"),
               label_noise: Sequence[float] = (0.0, 0.4),
               n_train: Sequence[int] = (100, 1079), seeds: int = 10_000,
               **fixed: Any) -> dict[str, Any]:
    """The sampled design of the heterogeneous grid, for :func:`mbe_helpers.grid.sample_configs`.

    ``lr`` and ``weight_decay`` are log-uniform on ``[low, high]``; width,
    depth and optimizer are uniform choices; ``label_noise`` uniform on
    ``[low, high]``; ``n_train`` log-uniform integers on ``[low, high]``;
    ``seed`` a uniform integer below ``seeds``.  ``fixed`` keys (dataset,
    epochs, probe_epochs, ...) are constants of every config.
    """
    from mbe_helpers.grid import Choice, LogUniform, Uniform

    for name, pair in (("lr", lr), ("weight_decay", weight_decay), ("label_noise", label_noise),
                       ("n_train", n_train)):
        if len(pair) != 2 or not pair[0] <= pair[1]:
            raise MBEInputError(f"{name} must be a range [low, high] with low <= high, got {pair!r}")
    return {"lr": LogUniform(*lr), "weight_decay": LogUniform(*weight_decay),
            "width": Choice(tuple(widths)), "depth": Choice(tuple(depths)),
            "optimizer": Choice(tuple(optimizers)), "label_noise": Uniform(*label_noise),
            "n_train": LogUniform(*n_train, integer=True),
            "seed": Uniform(0, seeds - 1, integer=True), **fixed}


def space_table(space: Mapping[str, Any]) -> pd.DataFrame:
    """The sampled dimensions of a space as a table: ``variable, distribution, values``."""
    from mbe_helpers.grid import Choice, LogUniform, Uniform

    rows = []
    for name, spec in space.items():
        if isinstance(spec, LogUniform):
            kind, values = "log-uniform", f"[{spec.low:g}, {spec.high:g}]"
        elif isinstance(spec, Uniform):
            kind, values = "uniform", f"[{spec.low:g}, {spec.high:g}]"
        elif isinstance(spec, Choice):
            kind, values = "choice", ", ".join(map(str, spec.options))
        else:
            continue
        rows.append({"variable": name, "distribution": kind + (" integer" if getattr(
            spec, "integer", False) else ""), "values": values})
    return pd.DataFrame(rows)


def classes_sentence(summary: pd.DataFrame, column: str, exclude: Sequence[str] = ()) -> str:
    """``"washout: a, b; survives: c"``: the metrics of each outcome class in ``column``."""
    part = summary[~summary.metric.isin(exclude)]
    groups = part.groupby(column, sort=True).metric.apply(list)
    return "; ".join(f"{cls}: {', '.join(names)}" for cls, names in groups.items())


def add_positive_control(frame: pd.DataFrame, target: str = "test_acc", *, noise: float = 0.5,
                         seed: int = 0, name: str = "positive_control") -> pd.DataFrame:
    r"""Add a noisy copy of the target: the positive control of the audit.

    ``name`` :math:`= Y + \text{noise} \cdot \operatorname{sd}(Y) \cdot Z`,
    :math:`Z \sim N(0, 1)` from ``seed``.  It carries, by construction,
    information about the target that no baseline can explain away, so an
    audit that cannot find it is too weak to trust.  Rows with a missing
    target get NaN.
    """
    if not noise >= 0:
        raise MBEInputError(f"noise must be a non-negative number, got {noise!r}")
    y = frame[target].to_numpy(dtype=float)
    z = np.random.default_rng(seed).standard_normal(len(y))
    return frame.assign(**{name: y + noise * np.nanstd(y) * z})


def baseline_audits(frame: pd.DataFrame, metrics: Sequence[str], target: str, *,
                    baseline: Sequence[str], design: Sequence[str],
                    **kwargs: Any) -> dict[str, AuditResult]:
    """The audit of ``metrics`` given (a) the baseline, (b) the design, (c) both.

    Returns ``{"baseline": ..., "design": ..., "both": ...}``; ``kwargs`` go
    to :func:`mbe_helpers.audit.audit` (bootstrap, permutations, seed, ...).
    """
    sets = {"baseline": list(baseline), "design": list(design),
            "both": [*baseline, *design]}
    kwargs.setdefault("adjust", "rank")   # the chapters move to the calibrated audit in issue 14
    return {name: audit(frame, list(metrics), target, controls, **kwargs)
            for name, controls in sets.items()}


def audit_summary(audits: Mapping[str, AuditResult], *, strip: str = "") -> pd.DataFrame:
    """One row per metric: raw rho and the partial rho (with interval) of every audit.

    Columns ``metric, raw_r, raw_lo, raw_hi``, then per audit name ``X``:
    ``partial_X``, ``lo_X``, ``hi_X``, ``perm_p_X``, ``q_X``, ``class_X``.
    ``strip`` is removed from the metric names (e.g. ``"@20"``).
    """
    first = next(iter(audits.values())).table.set_index("metric")
    out = pd.DataFrame({"raw_r": first.raw_r, "raw_lo": first.get("raw_lo"),
                        "raw_hi": first.get("raw_hi")})
    for name, result in audits.items():
        t = result.table.set_index("metric")
        out[f"partial_{name}"] = t.partial_r
        for src, dst in (("partial_lo", "lo"), ("partial_hi", "hi"), ("perm_p", "perm_p"),
                         ("q", "q")):
            if src in t:
                out[f"{dst}_{name}"] = t[src]
        out[f"class_{name}"] = t.classification
    out.index = [m.replace(strip, "") if strip else m for m in out.index]
    return out.rename_axis("metric").reset_index()


def temporal_audit(frame: pd.DataFrame, metrics: Sequence[str], target: str,
                   epochs: Sequence[int], *, baseline: str = "val_loss",
                   controls: Sequence[str] = (), fixed_metrics: Sequence[str] = (),
                   **kwargs: Any) -> pd.DataFrame:
    """Partial rho of each metric given the baseline *at the same epoch*, per probe epoch.

    For every epoch e, ``<metric>@e`` is audited against ``target`` given
    ``<baseline>@e`` and ``controls``; ``fixed_metrics`` (columns without an
    epoch, such as a positive control) are audited unchanged at every epoch,
    which shows how the baseline alone gains strength over training.
    ``kwargs`` go to :func:`mbe_helpers.audit.audit`.

    Returns
    -------
    DataFrame
        Tidy: ``epoch``, ``metric`` (without the epoch suffix) and the audit columns.
    """
    parts = []
    kwargs.setdefault("adjust", "rank")
    for epoch in epochs:
        columns = [m for m in at(metrics, epoch) if m in frame] + list(fixed_metrics)
        result = audit(frame, columns, target, [f"{baseline}@{epoch}", *controls], **kwargs)
        table = result.table.assign(epoch=int(epoch))
        table["metric"] = table.metric.str.replace(f"@{epoch}", "", regex=False)
        parts.append(table)
    out = pd.concat(parts, ignore_index=True)
    return out[["epoch", *[c for c in out.columns if c != "epoch"]]]


def rank_associations(frame: pd.DataFrame, column: str, others: Sequence[str]) -> pd.DataFrame:
    """Spearman rho of ``column`` with each of ``others``, strongest first.

    A non-numeric column enters as indicators of its levels after the first
    (named ``<column>=<level>``).  Returns ``variable, rho, n``.
    """
    rows = []
    for other in others:
        values = frame[other]
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            candidates = {other: values.astype(float)}
        else:
            levels = sorted(values.dropna().unique(), key=str)[1:]
            candidates = {f"{other}={v}": (values == v).astype(float) for v in levels}
        for name, series in candidates.items():
            pair = pd.concat([frame[column], series], axis=1).dropna()
            rho = stats.spearmanr(pair.iloc[:, 0], pair.iloc[:, 1]).statistic if len(pair) > 2 \
                else np.nan
            rows.append({"variable": name, "rho": float(rho), "n": len(pair)})
    out = pd.DataFrame(rows, columns=["variable", "rho", "n"])
    return out.reindex(out.rho.abs().sort_values(ascending=False).index).reset_index(drop=True)


def varying(frame: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """The columns that take more than one value among the rows (constant ones cannot be controls)."""
    return [c for c in columns if c in frame and frame[c].nunique(dropna=True) > 1]


def outcome_sentence(classification: str) -> str:
    """The clause of :data:`OUTCOME_SENTENCES` for an outcome class."""
    if classification not in OUTCOME_SENTENCES:
        raise MBEInputError(f"unknown outcome class {classification!r}; known classes: "
                            f"{', '.join(OUTCOME_SENTENCES)}")
    return OUTCOME_SENTENCES[classification]


def control_checks(summary: pd.DataFrame, *, positive: str, negative: str, audit_name: str = "both",
                   alpha: float = 0.05) -> pd.DataFrame:
    """Did the controls land where they must in the audit ``audit_name``?

    * the positive control must be classified ``survives`` with a
      significant permutation p-value (< ``alpha``);
    * the negative control must not be significant (permutation p >= ``alpha``)
      and must not be classified ``survives``.

    Returns one row per control: ``control, metric, partial, perm_p, class,
    expected, landed``.
    """
    _check_alpha(alpha)
    table = summary.set_index("metric")
    rows = []
    for kind, metric in (("positive", positive), ("negative", negative)):
        if metric not in table.index:
            raise MBEInputError(f"control {metric!r} is not in the summary; metrics: "
                                f"{', '.join(table.index)}")
        r = table.loc[metric]
        p = r.get(f"perm_p_{audit_name}", np.nan)
        cls = r[f"class_{audit_name}"]
        if kind == "positive":
            landed, expected = cls == "survives" and p < alpha, f"survives, permutation p < {alpha}"
        else:
            landed = cls != "survives" and not p < alpha
            expected = f"not survives, permutation p >= {alpha}"
        rows.append({"control": kind, "metric": metric, "partial": r[f"partial_{audit_name}"],
                     "perm_p": p, "class": cls, "expected": expected, "landed": bool(landed)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- #
# Parameter checks of the chapters                                            #
# --------------------------------------------------------------------------- #

class Rule:
    """A rule a chapter parameter must obey: ``ok(value)`` and a phrase for the message."""

    phrase = "valid"

    def ok(self, value: Any) -> bool:  # pragma: no cover - overridden
        return True


class Int(Rule):
    """An integer (not a bool) in ``[low, high]`` (``high=None``: no upper bound)."""

    def __init__(self, low: int, high: int | None = None):
        self.low, self.high = low, high
        self.phrase = (f"an integer of at least {low}" if high is None
                       else f"an integer from {low} to {high}")

    def ok(self, value: Any) -> bool:
        return (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
                and self.low <= value and (self.high is None or value <= self.high))


class Num(Rule):
    """A real number in the open interval ``(low, high)``, or ``[low, ...`` with ``closed_low``."""

    def __init__(self, low: float, high: float | None = None, *, closed_low: bool = False):
        self.low, self.high, self.closed_low = low, high, closed_low
        left = f"at least {low}" if closed_low else f"above {low}"
        self.phrase = f"a number {left}" + ("" if high is None else f" and below {high}")

    def ok(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            return False
        above = value >= self.low if self.closed_low else value > self.low
        return bool(above and (self.high is None or value < self.high))


class OneOf(Rule):
    """One of a fixed set of values."""

    def __init__(self, options: Sequence[Any]):
        self.options = tuple(options)
        self.phrase = "one of " + ", ".join(map(str, self.options))

    def ok(self, value: Any) -> bool:
        return any(value == o and type(value) is type(o) for o in self.options)


class ListOf(Rule):
    """A list of at least ``min_len`` distinct values, each obeying ``rule``."""

    def __init__(self, rule: Rule, min_len: int = 1):
        self.rule, self.min_len = rule, min_len
        self.phrase = f"a list of at least {min_len} distinct values, each {rule.phrase}"

    def ok(self, value: Any) -> bool:
        return (isinstance(value, (list, tuple)) and len(value) >= self.min_len
                and len(set(value)) == len(value) and all(self.rule.ok(v) for v in value))


class Range(Rule):
    """A pair ``[low, high]`` with ``low <= high``, both obeying ``rule``."""

    def __init__(self, rule: Rule):
        self.rule = rule
        self.phrase = f"a pair [low, high] with low <= high, each {rule.phrase}"

    def ok(self, value: Any) -> bool:
        return (isinstance(value, (list, tuple)) and len(value) == 2
                and all(self.rule.ok(v) for v in value) and value[0] <= value[1])


class Maybe(Rule):
    """``None`` or a value obeying ``rule``."""

    def __init__(self, rule: Rule):
        self.rule = rule
        self.phrase = f"None or {rule.phrase}"

    def ok(self, value: Any) -> bool:
        return value is None or self.rule.ok(value)


class Text(Rule):
    """A non-empty string."""

    phrase = "a non-empty string"

    def ok(self, value: Any) -> bool:
        return isinstance(value, str) and value.strip() != ""


def check_parameters(checks: Sequence[tuple[str, Any, Rule]]) -> None:
    """Refuse the first parameter that breaks its rule, in one sentence.

    ``checks`` is a list of ``(name, value, rule)``; raises
    :class:`MBEInputError` ``"bad parameter: <name> must be <phrase>, got <value>."``.
    """
    for name, value, rule in checks:
        if not rule.ok(value):
            raise MBEInputError(f"bad parameter: {name} must be {rule.phrase}, got {value!r}.")
