"""Chapter 02, "The heterogeneous grid": the sampled design, its audits and the sentences of the prose.

:func:`grid_space` is the sampled design, :func:`add_positive_control` the
noisy copy of the target, :func:`baseline_audits` runs the audit given (a)
early validation loss, (b) the design variables, (c) both,
:func:`audit_summary` collects them in one table, :func:`temporal_audit`
repeats the audit at every probe epoch, :func:`control_checks` says whether
the positive and negative controls landed where they must,
:func:`rank_associations` shows what a metric follows instead, and
:func:`trajectory` and :func:`fim_story` put the results into words (each
branch of the story is tested on constructed tables, without executing the
notebook). The runs are :data:`mbe_helpers.probes.grid_run`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from mbe_helpers.audit import AuditResult, audit, check_alpha
from mbe_helpers.errors import MBEInputError
from mbe_helpers.probes import BatteryRun, columns_at

DESIGN = ("lr", "weight_decay", "width", "depth", "optimizer", "label_noise", "n_train")
"""The design variables of the heterogeneous grid (Chapter 2) that serve as controls.  The
seed is sampled too, but it is not a control: it has no order that could relate to accuracy."""


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

    Examples
    --------
    >>> space = grid_space(widths=(16, 32), epochs=20)
    >>> space["lr"], space["width"], space["epochs"]
    (LogUniform(low=0.0001, high=0.1, integer=False), Choice(options=(16, 32)), 20)
    >>> grid_space(lr=(0.1, 0.001))
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: lr must be a range [low, high] with low <= high, got
    (0.1, 0.001)
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
    """The sampled dimensions of a space as a table: ``variable, distribution, values``.

    Examples
    --------
    >>> space_table(grid_space(widths=(16, 32), depths=(1, 2), epochs=20))
           variable         distribution         values
    0            lr          log-uniform  [0.0001, 0.1]
    1  weight_decay          log-uniform  [1e-06, 0.01]
    2         width               choice         16, 32
    3         depth               choice           1, 2
    4     optimizer               choice      adam, sgd
    5   label_noise              uniform       [0, 0.4]
    6       n_train  log-uniform integer    [100, 1079]
    7          seed      uniform integer      [0, 9999]
    """
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
    """``"washout: a, b; survives: c"``: the metrics of each outcome class in ``column``.

    Examples
    --------
    >>> summary = pd.DataFrame({"metric": ["fim_norm", "sci", "random_metric", "positive"],
    ...                         "class_both": ["washout", "washout", "weak-or-mixed", "survives"]})
    >>> classes_sentence(summary, "class_both", exclude=["positive"])
    'washout: fim_norm, sci; weak-or-mixed: random_metric'
    """
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

    Examples
    --------
    >>> runs = pd.DataFrame({"test_acc": np.linspace(0.5, 0.9, 20)})
    >>> runs = add_positive_control(runs, noise=0.5, seed=0)
    >>> runs.columns.tolist(), round(float(runs.corr(method="spearman").iloc[0, 1]), 2)
    (['test_acc', 'positive_control'], 0.91)
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

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> skill, lr = rng.normal(size=100), rng.uniform(-4, -1, 100)
    >>> runs = pd.DataFrame({"lr": lr, "val_loss": -skill + rng.normal(0, .1, 100),
    ...                      "test_acc": skill + rng.normal(0, .3, 100)})
    >>> runs["proxy"] = -runs.val_loss + rng.normal(0, .01, 100)       # a disguised loss proxy
    >>> audits = baseline_audits(runs, ["proxy"], "test_acc", baseline=["val_loss"],
    ...                          design=["lr"], adjust="rank")
    >>> {name: result.classification("proxy") for name, result in audits.items()}
    {'baseline': 'washout', 'design': 'survives', 'both': 'washout'}
    """
    sets = {"baseline": list(baseline), "design": list(design),
            "both": [*baseline, *design]}
    return {name: audit(frame, list(metrics), target, controls, **kwargs)
            for name, controls in sets.items()}


def audit_summary(audits: Mapping[str, AuditResult], *, strip: str = "") -> pd.DataFrame:
    """One row per metric: raw rho and the adjusted rho (with interval) of every audit.

    Columns ``metric, raw_r, raw_lo, raw_hi``, then per audit name ``X``: the
    rank-linear ``partial_X``, ``lo_X``, ``hi_X``, ``perm_p_X``; the
    cross-fitted ``adj_X``, ``adj_lo_X``, ``adj_hi_X`` (where it ran);
    ``adjust_X`` (which decided the class), ``adjusted_X``, ``adjusted_lo_X``,
    ``adjusted_hi_X`` and ``q_X`` (the correlation, interval and FDR q-value of
    that adjustment) and ``class_X``. ``strip`` is removed from the metric names (e.g. ``"@20"``).

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> skill, lr = rng.normal(size=100), rng.uniform(-4, -1, 100)
    >>> runs = pd.DataFrame({"lr": lr, "val_loss@20": -skill + rng.normal(0, .1, 100),
    ...                      "test_acc": skill + rng.normal(0, .3, 100)})
    >>> runs["proxy@20"] = -runs["val_loss@20"] + rng.normal(0, .01, 100)
    >>> audits = baseline_audits(runs, ["proxy@20"], "test_acc", baseline=["val_loss@20"],
    ...                          design=["lr"])
    >>> summary = audit_summary(audits, strip="@20")
    >>> {"adjusted_both", "adjusted_lo_both", "q_both", "class_both"} <= set(summary.columns)
    True
    """
    first = next(iter(audits.values())).table.set_index("metric")
    out = pd.DataFrame({"raw_r": first.raw_r, "raw_lo": first.get("raw_lo"),
                        "raw_hi": first.get("raw_hi")})
    for name, result in audits.items():
        t = result.table.set_index("metric")
        out[f"partial_{name}"] = t.partial_r
        for src, dst in (("partial_lo", "lo"), ("partial_hi", "hi"), ("perm_p", "perm_p"),
                         ("adj_r", "adj"), ("adj_lo", "adj_lo"), ("adj_hi", "adj_hi"),
                         ("adjust", "adjust"), ("q", "q")):
            if src in t:
                out[f"{dst}_{name}"] = t[src]
        crossfit = t.adjust == "crossfit" if "adjust" in t else pd.Series(False, index=t.index)
        if "adj_q" in t:
            out[f"q_{name}"] = t.adj_q.where(crossfit, t.get("q"))
        for src, dst in (("r", ""), ("lo", "_lo"), ("hi", "_hi")):   # the deciding adjustment's
            rank = t[f"partial_{src}"] if f"partial_{src}" in t else np.nan
            out[f"adjusted{dst}_{name}"] = t[f"adj_{src}"].where(crossfit, rank) if f"adj_{src}" in t else rank
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

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> skill = rng.normal(size=40)
    >>> runs = pd.DataFrame({"test_acc": skill + rng.normal(0, .3, 40)})
    >>> for epoch, noise in ((5, 1.0), (20, 0.2)):       # the baseline sharpens with training
    ...     runs[f"val_loss@{epoch}"] = -skill + rng.normal(0, noise, 40)
    ...     runs[f"proxy@{epoch}"] = -runs[f"val_loss@{epoch}"] + rng.normal(0, .1, 40)
    >>> table = temporal_audit(runs, ["proxy"], "test_acc", [5, 20])
    >>> table[["epoch", "metric", "raw_r", "partial_r"]].round(2)
       epoch metric  raw_r  partial_r
    0      5  proxy   0.56      -0.04
    1     20  proxy   0.85      -0.06
    """
    parts = []
    for epoch in epochs:
        columns = [m for m in columns_at(metrics, epoch) if m in frame] + list(fixed_metrics)
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

    Examples
    --------
    >>> runs = pd.DataFrame({"fim_norm": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
    ...                      "lr": [0.1, 0.2, 0.3, 0.4, 0.6, 0.5],
    ...                      "width": [64, 16, 32, 16, 64, 32],
    ...                      "optimizer": ["adam", "adam", "sgd", "sgd", "sgd", "sgd"]})
    >>> rank_associations(runs, "fim_norm", ["lr", "width", "optimizer"]).round(2)
            variable   rho  n
    0             lr  0.94  6
    1  optimizer=sgd  0.83  6
    2          width  0.00  6
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


def varying_columns(frame: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """The columns that take more than one value among the rows (constant ones cannot be controls).

    Examples
    --------
    >>> runs = pd.DataFrame({"lr": [0.1, 0.01], "width": [32, 32], "depth": [1, 2]})
    >>> varying_columns(runs, ["lr", "width", "depth", "optimizer"])
    ['lr', 'depth']
    """
    return [c for c in columns if c in frame and frame[c].nunique(dropna=True) > 1]


def control_checks(summary: pd.DataFrame, *, positive: str, negative: str | None = None,
                   audit_name: str = "both", alpha: float = 0.05) -> pd.DataFrame:
    """Did the controls land where they must in the audit ``audit_name``?

    * the positive control must be classified ``survives`` with an FDR
      q-value below ``alpha`` (``q_<audit>``, of the adjustment that decided its class);
    * the negative control (optional) must not be significant (permutation
      p >= ``alpha``) and must not be classified ``survives``.

    Returns one row per control: ``control, metric, partial, p`` (the q-value
    judged for the positive control, the permutation p-value for the negative
    one; ``expected`` says which), ``class, expected, landed``.

    Examples
    --------
    >>> summary = pd.DataFrame({"metric": ["positive_control", "random_metric"],
    ...                         "partial_both": [0.6, 0.02], "perm_p_both": [0.001, 0.7],
    ...                         "q_both": [0.002, 0.8],
    ...                         "class_both": ["survives", "weak-or-mixed"]})
    >>> checks = control_checks(summary, positive="positive_control", negative="random_metric")
    >>> checks[["control", "metric", "class", "landed"]]
        control            metric          class  landed
    0  positive  positive_control       survives    True
    1  negative     random_metric  weak-or-mixed    True
    """
    check_alpha(alpha)
    table = summary.set_index("metric")
    rows = []
    for kind, metric in (("positive", positive), ("negative", negative)):
        if metric is None:
            continue
        if metric not in table.index:
            raise MBEInputError(f"control {metric!r} is not in the summary; metrics: "
                                f"{', '.join(table.index)}")
        r = table.loc[metric]
        p = r.get(f"q_{audit_name}" if kind == "positive" else f"perm_p_{audit_name}", np.nan)
        cls = r[f"class_{audit_name}"]
        if kind == "positive":
            landed, expected = cls == "survives" and p < alpha, f"survives, q < {alpha}"
        else:
            landed = cls != "survives" and not p < alpha
            expected = f"not survives, permutation p >= {alpha}"
        rows.append({"control": kind, "metric": metric, "partial": r[f"partial_{audit_name}"],
                     "p": p, "class": cls, "expected": expected, "landed": bool(landed)})
    return pd.DataFrame(rows)

def trajectory(temporal: pd.DataFrame, metric: str) -> str:
    """The metric's partial correlation at each probe epoch, e.g. ``"+0.10 at epoch 5, ..."``.

    Examples
    --------
    >>> t = pd.DataFrame({"metric": ["m", "m"], "epoch": [10, 5], "partial_r": [0.2, -0.1]})
    >>> trajectory(t, "m")
    '-0.10 at epoch 5, +0.20 at epoch 10'
    """
    part = temporal[temporal.metric == metric].sort_values("epoch")
    return ", ".join(f"{r.partial_r:+.2f} at epoch {r.epoch}" for r in part.itertuples())


def fim_story(raw_r: float, baseline_class: str, effect: float) -> str:
    """What the grid says of FIM_norm given early validation loss, against the original washout.

    Examples
    --------
    >>> fim_story(-0.6, "washout", 0.2).startswith("FIM_norm washes out")
    True
    >>> fim_story(0.05, "weak-or-mixed", 0.2).startswith("FIM_norm has no raw association")
    True
    >>> fim_story(-0.4, "inconclusive", 0.2).startswith("given early validation loss the audit cannot")
    True
    >>> fim_story(0.5, "survives", 0.2)
    'FIM_norm is classified survives given early validation loss, which contradicts the washout of the original study'
    """
    if baseline_class == "washout":
        return ("FIM_norm washes out given early validation loss, as in the original study: "
                "in this grid it is a disguised loss proxy")
    if baseline_class == "inconclusive":
        return ("given early validation loss the audit cannot tell, at this number of runs, "
                "whether FIM_norm adds anything: its adjusted interval is too wide for either a "
                "washout or an increment")
    if abs(raw_r) < effect and baseline_class == "weak-or-mixed":
        return ("FIM_norm has no raw association with final test accuracy in this grid, so there "
                "is nothing for the baseline to explain away. This differs from the original "
                "study, where a raw association washed out, but the conclusion for a user is the "
                "same: across heterogeneous configurations FIM_norm does not predict accuracy, "
                "and the correlation of the acid test does not carry over")
    return (f"FIM_norm is classified {baseline_class} given early validation loss, which "
            "contradicts the washout of the original study")


# ------------------------------------------------------------------ the replication
#: The original study's fixed architecture and optimiser (MLP 64-64-64-10, tanh, full-batch Adam).
REPLICATION = {"dataset": "digits", "model": "mlp", "width": 64, "depth": 3, "activation": "tanh",
               "optimizer": "adam", "batch_size": None}
#: What the original study reports over 1,000 runs: FIM_norm's raw and partial rho given (lr, wd).
ORIGINAL = {"raw_r": -0.80, "partial_r": 0.06, "runs": 1000}

replication_run = BatteryRun(probe_split="train")
"""Run function of the replication: the battery probes the *training* split, as the original did."""


def replication_space(*, lr: Sequence[float], weight_decay: Sequence[float], epochs: int,
                      epoch: int, fim_samples: int, seed: int = 0, **fixed: Any) -> dict[str, Any]:
    """The replication's design: :data:`REPLICATION`, learning rate and weight decay log-uniform.

    Every run draws a fresh seed; the battery is read at the original's probe
    epochs 5, 10, 20, 50 (and ``epoch``, the audited one) up to ``epochs``,
    FIM_norm on ``fim_samples`` training samples.

    Examples
    --------
    >>> space = replication_space(lr=[1e-4, 1e-2], weight_decay=[1e-5, 1e-3], epochs=200,
    ...                           epoch=20, fim_samples=100)
    >>> space["width"], space["depth"], space["batch_size"], space["probe_epochs"]
    (64, 3, None, [5, 10, 20, 50])
    """
    probe_epochs = sorted({e for e in (5, 10, 20, 50, epoch) if e <= epochs})
    from mbe_helpers.grid import LogUniform, Uniform

    for name, pair in (("lr", lr), ("weight_decay", weight_decay)):
        if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
            raise MBEInputError(f"{name} must be a range [low, high] with 0 < low <= high, got {pair!r}")
    return {"lr": LogUniform(*lr), "weight_decay": LogUniform(*weight_decay),
            "seed": Uniform(0, 9999, integer=True), **REPLICATION, **fixed, "epochs": epochs,
            "probe_epochs": probe_epochs, "fim_samples": fim_samples, "probe_seed": seed}


def replication_audits(frame: pd.DataFrame, metric: str, target: str, *, baseline: str,
                       design: Sequence[str] = ("lr", "weight_decay"),
                       **kwargs: Any) -> dict[str, AuditResult]:
    """The metric audited given the design (lr, wd: the original's question) and given the baseline.

    ``kwargs`` go to :func:`mbe_helpers.audit.audit` (``adjust``, ``placebos``,
    ``bootstrap``, ...); each table holds the rank-partial and, where it ran,
    the cross-fitted correlation.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> lr = rng.uniform(0, 1, 80)
    >>> frame = pd.DataFrame({"lr": lr, "weight_decay": rng.uniform(0, 1, 80),
    ...                       "m": lr + rng.normal(0, .3, 80), "y": lr + rng.normal(0, .3, 80),
    ...                       "val": lr + rng.normal(0, .3, 80)})
    >>> audits = replication_audits(frame, "m", "y", baseline="val", placebos=20)
    >>> list(audits), audits["design"].table.adjust.iloc[0]
    (['design', 'baseline'], 'crossfit')
    """
    return {"design": audit(frame, [metric], target, list(design), **kwargs),
            "baseline": audit(frame, [metric], target, [baseline], **kwargs)}


def _placebo_rows(result: AuditResult, kind: str) -> pd.DataFrame:
    table = result.calibration
    return table[table.kind == kind] if table is not None and len(table) else pd.DataFrame()


def _placebo_rate(result: AuditResult, kind: str) -> float:
    rows = _placebo_rows(result, kind)
    return float(rows.rate.iloc[0]) if len(rows) else float("nan")


def replication_table(audits: Mapping[str, AuditResult]) -> pd.DataFrame:
    """One row per control set: raw, rank-partial and cross-fitted rho with intervals, class, placebos.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> lr = rng.uniform(0, 1, 80)
    >>> frame = pd.DataFrame({"lr": lr, "weight_decay": rng.uniform(0, 1, 80),
    ...                       "m": lr + rng.normal(0, .3, 80), "y": lr + rng.normal(0, .3, 80),
    ...                       "val": lr + rng.normal(0, .3, 80)})
    >>> table = replication_table(replication_audits(frame, "m", "y", baseline="val", placebos=20))
    >>> table.given.tolist(), table.columns[:4].tolist()
    (['lr, weight_decay', 'val'], ['given', 'n', 'raw', 'rank partial'])
    """
    rows = []
    for result in audits.values():
        r = result.table.iloc[0]
        rows.append({"given": r.controls.replace(",", ", "), "n": int(r.n),
                     "raw": _with_interval(r.raw_r, r.get("raw_lo"), r.get("raw_hi")),
                     "rank partial": _with_interval(r.partial_r, r.get("partial_lo"), r.get("partial_hi")),
                     "cross-fitted": _with_interval(r.get("adj_r"), r.get("adj_lo"), r.get("adj_hi")),
                     "class": r.classification, "adjustment": r.adjust,
                     "noise placebos": _placebo_rate(result, "noise"),
                     "proxy placebos": _placebo_rate(result, "proxy"),
                     "twin placebos": _placebo_rate(result, "twin")})
    return pd.DataFrame(rows)


def _with_interval(value, lo, hi) -> str:
    """``"+0.12 [-0.03, +0.27]"`` (the interval left out where there is none)."""
    if value is None or not np.isfinite(value):
        return "–"
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{value:+.2f}"
    return f"{value:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def adjusted(row: pd.Series, field: str = "r") -> float:
    """``field`` (``r``, ``lo`` or ``hi``) of the adjustment that decided the class.

    The cross-fitted ``adj_<field>`` where it ran and gave an estimate, else
    the rank-linear ``partial_<field>`` (NaN where the row has none).

    Examples
    --------
    >>> adjusted(pd.Series({"adjust": "crossfit", "adj_r": 0.1, "partial_r": 0.3}))
    0.1
    >>> adjusted(pd.Series({"adjust": "rank", "adj_r": float("nan"), "partial_r": 0.3}))
    0.3
    """
    crossfit = row.get("adjust") == "crossfit" and np.isfinite(row.get("adj_r", np.nan))
    return float(row.get(f"adj_{field}" if crossfit else f"partial_{field}", np.nan))


def replication_values(audits: Mapping[str, AuditResult]) -> dict[str, Any]:
    """Every number and sentence the replication section glues.

    Keys: ``replication_raw_r``, ``replication_partial_r`` (given lr and wd,
    under the chapter's adjustment), ``replication_class``, the same given the
    baseline (``replication_baseline_*``), ``replication_n``, the placebo rates
    and ``replication_story`` (the comparison with the original's -0.80 -> +0.06).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> lr = rng.uniform(0, 1, 80)
    >>> frame = pd.DataFrame({"lr": lr, "weight_decay": rng.uniform(0, 1, 80),
    ...                       "m": lr + rng.normal(0, .3, 80), "y": lr + rng.normal(0, .3, 80),
    ...                       "val": lr + rng.normal(0, .3, 80)})
    >>> audits = replication_audits(frame, "m", "y", baseline="val", placebos=20)
    >>> values = replication_values(audits)
    >>> values["replication_n"], values["replication_adjust"]
    (80, 'cross-fitted')
    """
    design = audits["design"].table.iloc[0]
    base = audits["baseline"].table.iloc[0]
    values = {"replication_n": int(design.n), "replication_raw_r": float(design.raw_r),
              "replication_raw_lo": float(design.get("raw_lo", np.nan)),
              "replication_raw_hi": float(design.get("raw_hi", np.nan)),
              "replication_rank_r": float(design.partial_r),
              "replication_partial_r": adjusted(design),
              "replication_partial_lo": adjusted(design, "lo"),
              "replication_partial_hi": adjusted(design, "hi"),
              "replication_adjust": "cross-fitted" if design.adjust == "crossfit" else "rank-linear",
              "replication_class": design.classification,
              "replication_baseline_r": adjusted(base),
              "replication_baseline_class": base.classification,
              "replication_noise_rate": _placebo_rate(audits["design"], "noise"),
              "replication_proxy_rate": _placebo_rate(audits["design"], "proxy"),
              "replication_trustworthy": bool(audits["design"].trustworthy
                                              and audits["baseline"].trustworthy)}
    values["replication_story"] = replication_story(values)
    values["replication_why"] = evidence_sentence(design)
    return values


def evidence_sentence(row: pd.Series) -> str:
    """The audit's own reason for an ``inconclusive`` class (what more data would settle it).

    Examples
    --------
    >>> evidence_sentence(pd.Series({"classification": "inconclusive",
    ...     "note": "x; washout not shown: the interval is wide; about 417 rows would show it"}))
    "The audit's reason: washout not shown: the interval is wide; about 417 rows would show it."
    >>> evidence_sentence(pd.Series({"classification": "washout", "note": ""}))
    'The audit found the evidence that class needs.'
    """
    if row.classification != "inconclusive":
        return "The audit found the evidence that class needs."
    parts = [p.strip() for p in str(row.note).split(";")]
    start = next((i for i, p in enumerate(parts) if " not shown:" in p), None)
    if start is None:
        return "The audit lacks the evidence for any claiming class at this number of runs."
    return "The audit's reason: " + "; ".join(parts[start:]).rstrip(".") + "."


def replication_story(values: Mapping[str, Any]) -> str:
    """How the replication compares with the original study's washout, in one sentence.

    Examples
    --------
    >>> replication_story({"replication_raw_r": -0.7, "replication_class": "washout",
    ...                    "replication_trustworthy": True})[:43]
    'as in the original study, FIM_norm washes o'
    >>> replication_story({"replication_raw_r": -0.7, "replication_class": "inconclusive",
    ...                    "replication_trustworthy": True})[:45]
    'the learning rate and the weight decay explai'
    >>> replication_story({"replication_raw_r": -0.7, "replication_class": "survives",
    ...                    "replication_trustworthy": False})[:38]
    "the audit's own placebos rejected too "
    """
    if not values["replication_trustworthy"]:
        return ("the audit's own placebos rejected too often on these runs, so its verdict on "
                "FIM_norm cannot be taken at face value here")
    cls, raw = values["replication_class"], values["replication_raw_r"]
    if cls == "washout":
        return ("as in the original study, FIM_norm washes out: its strong raw association "
                "with test accuracy is explained by the learning rate and the weight decay")
    if cls == "inconclusive" and abs(raw) >= 0.3:
        return ("the learning rate and the weight decay explain away most of FIM_norm's raw "
                "association, as in the original study, but what is left is too uncertain at "
                "this number of runs to call a washout or an increment")
    if cls == "inconclusive":
        return ("the association left after the learning rate and the weight decay is too "
                "uncertain at this number of runs to call a washout or an increment")
    if raw < 0 and cls in ("weak-or-mixed",):
        return ("FIM_norm's raw association is largely, but not cleanly, explained by the "
                "learning rate and the weight decay")
    return (f"unlike the original study, FIM_norm is classified {cls} given the learning rate "
            "and the weight decay")


# ------------------------------------------------------- the calibrated grid audit
def calibration_values(audits: Mapping[str, AuditResult], name: str = "both") -> dict[str, Any]:
    """``placebo_rate``, ``proxy_placebo_rate``, ``twin_placebo_rate`` of audit ``name`` and
    whether it can be trusted.

    Examples
    --------
    >>> calibration_values({})["placebo_rate"] != calibration_values({})["placebo_rate"]  # NaN
    True
    """
    if name not in audits:
        return {"placebo_rate": float("nan"), "proxy_placebo_rate": float("nan"),
                "twin_placebo_rate": float("nan"), "twins_flagged": False, "trustworthy": False,
                "thin_withheld": {}}
    result = audits[name]
    twins = _placebo_rows(result, "twin")
    return {"placebo_rate": _placebo_rate(result, "noise"),
            "proxy_placebo_rate": _placebo_rate(result, "proxy"),
            "twin_placebo_rate": _placebo_rate(result, "twin"),
            "twins_flagged": bool(len(twins) and (twins.lo > twins.alpha).any()),
            "trustworthy": bool(result.trustworthy),
            "thin_withheld": _thin_withheld(result.table)}


def _thin_withheld(table: pd.DataFrame) -> dict[str, str]:
    """Metric -> why its claim was withheld for want of rows (the audit's note), for each metric
    whose cross-fitted claim the audit withheld because its smooth block could not enter.

    Examples
    --------
    >>> note = ("survives withheld: 60 rows for 8 controls, and the learner's smooth block "
    ...         "needs 82; without it ...")
    >>> _thin_withheld(pd.DataFrame({"metric": ["m", "k"], "note": [note, ""]}))
    {'m': "60 rows for 8 controls, and the learner's smooth block needs 82"}
    """
    found = table.note.str.extract(r"(\d+ rows for \d+ controls, and the learner's smooth "
                                   r"block needs \d+)")[0]
    return {m: why for m, why in zip(table.metric, found) if isinstance(why, str)}


def calibration_table(audits: Mapping[str, AuditResult]) -> pd.DataFrame:
    """The placebo self-calibration of every audit, one row per (audit, kind).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> lr = rng.uniform(0, 1, 80)
    >>> frame = pd.DataFrame({"lr": lr, "weight_decay": rng.uniform(0, 1, 80),
    ...                       "m": lr + rng.normal(0, .3, 80), "y": lr + rng.normal(0, .3, 80),
    ...                       "val": lr + rng.normal(0, .3, 80)})
    >>> audits = replication_audits(frame, "m", "y", baseline="val", placebos=20)
    >>> calibration_table(audits)[["audit", "kind", "K"]].values.tolist()
    [['design', 'noise', 20], ['design', 'proxy', 20], ['design', 'twin', 20], ['baseline', 'noise', 20], ['baseline', 'proxy', 20], ['baseline', 'twin', 20]]
    """
    parts = [r.calibration.assign(audit=name) for name, r in audits.items()
             if r.calibration is not None and len(r.calibration)]
    if not parts:
        return pd.DataFrame(columns=["audit", "kind", "K", "rejections", "rate", "lo", "hi"])
    table = pd.concat(parts, ignore_index=True)
    return table[["audit", "kind", "adjust", "K", "rejections", "rate", "lo", "hi", "note"]]


def disagreements(audits: Mapping[str, AuditResult], name: str = "both") -> pd.DataFrame:
    """Metrics whose class under the rank-linear adjustment differs from the calibrated class.

    Returns ``metric, rank class, calibrated class, why`` (the audit's own note).

    Examples
    --------
    >>> disagreements({}).columns.tolist()
    ['metric', 'rank class', 'calibrated class', 'why']
    """
    columns = ["metric", "rank class", "calibrated class", "why"]
    if name not in audits:
        return pd.DataFrame(columns=columns)
    from mbe_helpers.audit import classify

    result = audits[name]
    rows = []
    for r in result.table.itertuples():
        rank = classify(r.raw_r, r.partial_r, result.settings["effect"], result.settings["washout"])
        if rank != r.classification:
            parts = [part.strip() for part in str(r.note).split(";")]
            at = next((i for i, part in enumerate(parts) if "rank-linear control says" in part), None)
            why = ("; ".join(parts[at:at + 2]) if at is not None else
                   "the class needs evidence the audit does not have at this number of runs")
            rows.append({"metric": r.metric, "rank class": rank,
                         "calibrated class": r.classification, "why": why})
    return pd.DataFrame(rows, columns=columns)


def beyond_sentence(summary: pd.DataFrame, trustworthy: bool, alpha: float,
                    exclude: Sequence[str] = ()) -> str:
    """Which metrics carry information beyond both baseline and design, or why the chapter cannot say.

    A metric counts when its calibrated class given both is ``survives`` or
    ``hidden-after-control`` with FDR q below ``alpha``; nothing is claimed
    when the audit's placebo calibration failed.

    Examples
    --------
    >>> s = pd.DataFrame({"metric": ["a", "b"], "class_both": ["survives", "washout"],
    ...                   "q_both": [0.01, 0.2]})
    >>> beyond_sentence(s, True, 0.05)
    'a carries information beyond both the baseline and the design'
    >>> beyond_sentence(s, False, 0.05)[:46]
    'no metric is claimed to carry information: the'
    """
    if not trustworthy:
        return ("no metric is claimed to carry information: the audit's placebos rejected more "
                "often than alpha on this grid, so its adjustment cannot be trusted here")
    chosen = summary[summary.class_both.isin(["survives", "hidden-after-control"])
                     & (summary.q_both < alpha) & ~summary.metric.isin(list(exclude))].metric.tolist()
    if not chosen:
        return ("no metric is shown to carry information beyond both the baseline and the design "
                "(no class claims it with FDR q below alpha)")
    verb = "carries" if len(chosen) == 1 else "carry"
    return f"{', '.join(chosen)} {verb} information beyond both the baseline and the design"


def trust_sentence(checks: pd.DataFrame, calibration: Mapping[str, Any], alpha: float) -> str:
    """Can this run's audit be trusted? Its placebos must hold alpha and the positive control survive.

    Examples
    --------
    >>> checks = pd.DataFrame({"control": ["positive"], "metric": ["pos"], "class": ["survives"],
    ...                        "landed": [True]})
    >>> trust_sentence(checks, {"placebo_rate": 0.04, "proxy_placebo_rate": 0.05,
    ...                         "trustworthy": True}, 0.05)[:52]
    'the placebos rejected at 4.0 % (noise) and 5.0 % (pr'
    """
    rates = (f"the placebos rejected at {calibration['placebo_rate']:.1%} (noise) and "
             f"{calibration['proxy_placebo_rate']:.1%} (proxy) for alpha = {alpha:g}")
    rates = rates.replace("%", " %")
    missed = checks[~checks.landed]
    if not calibration["trustworthy"]:
        return (f"{rates}: the Wilson interval of a rejection rate lies above alpha, so the "
                "adjustment is not trustworthy on this grid and no class below is claimed")
    if len(missed):
        r = missed.iloc[0]
        thin = calibration.get("thin_withheld", {}).get(r.metric) if r.control == "positive" else None
        if thin:                                          # withheld for want of rows
            return (f"{rates}, within their Wilson intervals, but the positive control "
                    f"({r.metric}) came out {r['class']}: its claim was withheld ({thin}, and "
                    "without that block a grid-shaped proxy passes as information), so on this "
                    "grid the audit cannot claim information beyond the controls, and a null "
                    "result is not evidence")
        twins = calibration.get("twins_flagged") and r.control == "positive"
        twin_rate = f"{calibration.get('twin_placebo_rate', np.nan):.0%}".replace("%", " %")
        if twins and r.get("p", np.nan) < alpha:          # significant, but withheld by the twins
            return (f"{rates}, within their Wilson intervals, but the twin placebos (copies of "
                    f"the target's own dependence on the controls) were called associated "
                    f"{twin_rate} of the time, and the positive control ({r.metric}) did not "
                    f"beat them, so it came out {r['class']}: on this grid the audit cannot tell "
                    "information beyond the controls from the controls' own shape, and a null "
                    "result is not evidence")
        weak = (f"{rates}, within their Wilson intervals, but the {r.control} control "
                f"({r.metric}) came out {r['class']}, so this audit lacks the power to trust a "
                "null result")
        if twins:
            weak += (f"; the twin placebos (copies of the target's own dependence on the "
                     f"controls) were also called associated {twin_rate} of the time, so even a "
                     "significant metric would have to beat them")
        return weak
    return (f"{rates}, within their Wilson intervals, and the positive control survives: the "
            "audit of this run can be trusted")


# ------------------------------------------------------------------ the comparators
def binned(frame: pd.DataFrame, columns: Sequence[str], bins: int = 3) -> pd.DataFrame:
    """``frame`` with ``<column>_bin``: quantile bins of each (log-spaced) continuous hyperparameter.

    The comparators of Jiang et al. and Dziugaite et al. need discrete levels;
    a sampled design has none, so each column is cut into ``bins`` equally
    filled bins of its logarithm.

    Examples
    --------
    >>> out = binned(pd.DataFrame({"lr": [1e-4, 1e-3, 1e-2, 1e-1]}), ["lr"], bins=2)
    >>> out.lr_bin.tolist()
    [0, 0, 1, 1]
    """
    out = frame.copy()
    for column in columns:
        out[f"{column}_bin"] = pd.qcut(np.log10(out[column].astype(float)), bins, labels=False)
    return out


def comparator_summary(frame: pd.DataFrame, metrics: Sequence[str], target: str,
                       hyperparameters: Sequence[str]) -> pd.DataFrame:
    """The field's yardsticks per metric, beside the audit.

    Each metric is oriented by the sign of its raw Spearman correlation with
    the target (the comparators score agreement in one direction). Columns:
    ``metric, sign``, Jiang's granulated Kendall ``kendall`` (overall Ψ),
    the unconditioned ``cmi_none`` and Jiang's score ``cmi`` (the minimum of
    the normalised conditional mutual information over conditioning sets) with
    the set attaining it, and Dziugaite's sign-error ``sign_error_mean`` and
    ``sign_error_max`` (the robust one) over coupled environments.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> grid = pd.DataFrame({"a": np.repeat([0, 1, 2], 20), "b": np.tile([0, 1], 30)})
    >>> grid["acc"] = 0.6 + 0.1 * grid.a + rng.normal(0, .05, 60)
    >>> grid["m"] = grid.a + rng.normal(0, .5, 60)
    >>> summary = comparator_summary(grid, ["m"], "acc", ["a", "b"])
    >>> summary.columns.tolist()[:4], bool(summary.kendall.iloc[0] > 0)
    (['metric', 'sign', 'kendall', 'cmi_none'], True)
    """
    from mbe_helpers import comparators

    rows = []
    for metric in metrics:
        sign = 1.0 if stats.spearmanr(frame[metric], frame[target]).statistic >= 0 else -1.0
        oriented = frame.assign(**{metric: sign * frame[metric]})
        kendall = comparators.granulated_kendall(oriented, metric, target, list(hyperparameters))
        cmi = comparators.conditional_mi(oriented, metric, target, list(hyperparameters)).set_index("conditioning")
        sign_error = comparators.robust_sign_error(oriented, metric, target, list(hyperparameters))
        overall = sign_error.set_index("hyperparameter").loc["overall"]
        finite = cmi.drop(index="overall").normalized_cmi.dropna()
        rows.append({"metric": metric, "sign": "+" if sign > 0 else "−",
                     "kendall": float(kendall.set_index("hyperparameter").loc["overall", "value"]),
                     "cmi_none": float(cmi.loc["none", "normalized_cmi"]),
                     "cmi": float(cmi.loc["overall", "normalized_cmi"]),
                     "cmi_given": finite.idxmin() if len(finite) else "–",
                     "sign_error_mean": float(overall["mean"]), "sign_error_max": float(overall["max"])})
    return pd.DataFrame(rows)


def comparator_sentence(summary: pd.DataFrame, metric: str) -> str:
    """Whether conditioning on the hyperparameters removes what ``metric`` says of the target.

    Examples
    --------
    >>> s = pd.DataFrame({"metric": ["m"], "cmi_none": [0.23], "cmi": [0.02], "cmi_given": ["lr_bin"]})
    >>> comparator_sentence(s, "m")[:62]
    'conditioning on lr_bin removes most of what m says about the t'
    """
    row = summary.set_index("metric").loc[metric]
    if row.cmi < 0.5 * row.cmi_none:
        return (f"conditioning on {row.cmi_given} removes most of what {metric} says about the "
                f"target (normalised CMI {row.cmi_none:.2f} without conditioning, {row.cmi:.2f} "
                "given it), the same explanation the audit gives")
    return (f"conditioning on the hyperparameters leaves most of what {metric} says about the "
            f"target (normalised CMI {row.cmi_none:.2f} without conditioning, at least "
            f"{row.cmi:.2f} given any set)")
