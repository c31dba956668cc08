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
from mbe_helpers.probes import columns_at

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
    ...                          design=["lr"])
    >>> {name: result.classification("proxy") for name, result in audits.items()}
    {'baseline': 'washout', 'design': 'survives', 'both': 'washout'}
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
    >>> summary.columns.tolist()
    ['metric', 'raw_r', 'raw_lo', 'raw_hi', 'partial_baseline', 'q_baseline',
    'class_baseline', 'partial_design', 'q_design', 'class_design', 'partial_both',
    'q_both', 'class_both']
    >>> summary[["metric", "class_baseline", "class_design", "class_both"]]
      metric class_baseline class_design class_both
    0  proxy        washout     survives    washout
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
    kwargs.setdefault("adjust", "rank")
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


def control_checks(summary: pd.DataFrame, *, positive: str, negative: str, audit_name: str = "both",
                   alpha: float = 0.05) -> pd.DataFrame:
    """Did the controls land where they must in the audit ``audit_name``?

    * the positive control must be classified ``survives`` with a
      significant permutation p-value (< ``alpha``);
    * the negative control must not be significant (permutation p >= ``alpha``)
      and must not be classified ``survives``.

    Returns one row per control: ``control, metric, partial, perm_p, class,
    expected, landed``.

    Examples
    --------
    >>> summary = pd.DataFrame({"metric": ["positive_control", "random_metric"],
    ...                         "partial_both": [0.6, 0.02], "perm_p_both": [0.001, 0.7],
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
    >>> fim_story(0.5, "survives", 0.2)
    'FIM_norm is classified survives given early validation loss, which contradicts the washout of the original study'
    """
    if baseline_class == "washout":
        return ("FIM_norm washes out given early validation loss, as in the original study: "
                "in this grid it is a disguised loss proxy")
    if abs(raw_r) < effect and baseline_class == "weak-or-mixed":
        return ("FIM_norm has no raw association with final test accuracy in this grid, so there "
                "is nothing for the baseline to explain away. This differs from the original "
                "study, where a raw association washed out, but the conclusion for a user is the "
                "same: across heterogeneous configurations FIM_norm does not predict accuracy, "
                "and the correlation of the acid test does not carry over")
    return (f"FIM_norm is classified {baseline_class} given early validation loss, which "
            "contradicts the washout of the original study")
