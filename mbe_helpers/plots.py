"""Figures used by the chapters (matplotlib + seaborn).

Every function returns the ``Figure`` it drew and never calls ``show``;
chapters glue or save it.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from scipy import stats

RAW_COLOUR, PARTIAL_COLOUR = "#4c72b0", "#dd8452"


#: Width (inches) of the book's content column: wider figures are scaled down on the page, and
#: their 8 pt text with them, so every figure is drawn at most this wide.
PAGE_WIDTH = 7.5


def page_size(width: float, height: float) -> tuple[float, float]:
    """``(width, height)`` with the width capped at :data:`PAGE_WIDTH` (text stays readable on the page).

    Examples
    --------
    >>> page_size(11, 4), page_size(6, 3)
    ((7.5, 4), (6, 3))
    """
    return (min(width, PAGE_WIDTH), height)


def audit_figure(result, metric: str | None = None, group: str = "all"):
    """The two-panel MBE figure of an :class:`~mbe_helpers.audit.AuditResult`.

    Left: the chosen metric against the target (ranks, with a least-squares
    fit), annotated with raw and partial rho.  Right: the absolute raw and
    partial rho of every metric in ``group``, with bootstrap intervals when the audit has
    them and the effect / washout thresholds drawn.

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import pandas as pd
    >>> from mbe_helpers.audit import audit
    >>> rng = np.random.default_rng(0)
    >>> b = rng.normal(size=30)
    >>> runs = pd.DataFrame({"b": b, "m": b + rng.normal(0, .3, 30),
    ...                      "y": b + rng.normal(0, .3, 30)})
    >>> fig = audit_figure(audit(runs, "m", "y", "b", adjust="rank"))
    >>> type(fig).__name__, len(fig.axes)
    ('Figure', 2)
    >>> plt.close(fig)
    """
    rows = result.table[result.table.group == group]
    metric = metric or rows.metric.iloc[0]
    if metric not in set(rows.metric):
        raise ValueError(f"unknown metric {metric!r}; audited metrics: {', '.join(rows.metric)}")
    fig, (left, right) = plt.subplots(1, 2, figsize=page_size(11, 4.2), width_ratios=(1, 1.3))
    _rank_scatter(left, result, rows.set_index("metric").loc[metric], metric)
    _collapse_bars(right, rows, result.settings)
    fig.tight_layout()
    return fig


def _rank_scatter(ax, result, row, metric: str) -> None:
    data = result.data[[metric, result.target]].replace([np.inf, -np.inf], np.nan).dropna()
    x, y = stats.rankdata(data[metric]), stats.rankdata(data[result.target])
    sns.regplot(x=x, y=y, ax=ax, scatter_kws={"s": 14, "alpha": 0.6}, color=RAW_COLOUR,
                line_kws={"color": "black", "lw": 1})
    ax.set(xlabel=f"rank of {metric}", ylabel=f"rank of {result.target}",
           title=f"{metric}: raw ρ = {row.raw_r:+.2f}, partial ρ = {row.partial_r:+.2f}\n"
                 f"→ {row.classification}")


def _collapse_bars(ax, rows, settings: dict) -> None:
    positions = np.arange(len(rows))
    for offset, kind, colour in ((-0.2, "raw", RAW_COLOUR), (0.2, "partial", PARTIAL_COLOUR)):
        values = rows[f"{kind}_r"].to_numpy()
        err = None
        if f"{kind}_lo" in rows:
            err = _abs_interval(values, rows[f"{kind}_lo"].to_numpy(), rows[f"{kind}_hi"].to_numpy())
        ax.bar(positions + offset, np.abs(values), width=0.4, color=colour, yerr=err, capsize=3,
               label=f"|{kind} ρ|")
    ax.axhline(settings.get("effect", 0.2), color="grey", ls="--", lw=1, label="effect threshold")
    ax.axhline(settings.get("washout", 0.1), color="grey", ls=":", lw=1, label="washout threshold")
    ax.set_xticks(positions, rows.metric, rotation=30, ha="right")
    ax.set(ylim=(0, 1.05), ylabel="|Spearman ρ| with the target",
           title="Raw vs partial (controlling for the baseline)")
    ax.legend(fontsize=8, loc="upper right")


def _abs_interval(values, lo, hi):
    """Error bars for |value| from an interval on the signed value."""
    a, b = np.abs(lo), np.abs(hi)
    low = np.where(lo * hi <= 0, 0.0, np.minimum(a, b))
    high = np.maximum(a, b)
    mag = np.abs(values)
    return np.vstack([np.clip(mag - low, 0, None), np.clip(high - mag, 0, None)])


def plot_esd(model, conv: str = "flatten", *, layers=None, min_tail: int = 10, bins: int = 40):
    """The ESD of each Linear / Conv2d weight with its fitted power-law tail, one panel per layer.

    Each panel shows the density of the eigenvalues of W^T W / N on log-log
    axes, the fitted tail density (n_tail / n) p(x) from x_min on, and x_min
    dashed; the title gives alpha and its phenomenology bin, or why there is
    no fit.  ``model``, ``conv`` and ``min_tail`` are as in
    :func:`mbe_helpers.spectral.weight_spectra`; ``layers`` picks panels by name.

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> rng = np.random.default_rng(0)
    >>> fig = plot_esd({"fc1": rng.normal(size=(64, 32))})
    >>> fig.axes[0].get_title()
    'fc1: α = 3.38 (moderately heavy-tailed)'
    >>> plt.close(fig)
    """
    from mbe_helpers.errors import MBEInputError
    from mbe_helpers.spectral import fit_power_law, layer_esds

    esds = layer_esds(model, conv)
    names = list(esds) if layers is None else list(layers)
    unknown = [name for name in names if name not in esds]
    if unknown or not names:
        raise MBEInputError(f"unknown or no layers {unknown}; the model has {', '.join(esds)}.")
    n_cols = min(3, len(names))
    n_rows = -(-len(names) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=page_size(4.2 * n_cols, 3.3 * n_rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        _esd_panel(ax, name, esds[name], fit_power_law(esds[name], min_tail=min_tail), bins)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def _esd_panel(ax, name: str, eigs, fit, bins: int) -> None:
    from mbe_helpers.spectral import phenomenology

    if eigs.size == 0:
        ax.set_title(f"{name}: no non-zero eigenvalue", fontsize=9)
        return
    edges = np.geomspace(eigs.min(), eigs.max(), bins + 1) if eigs.min() < eigs.max() else 1
    ax.hist(eigs, bins=edges, density=True, color=RAW_COLOUR, alpha=0.6, label="ESD")
    ax.set(xscale="log", yscale="log", xlabel="eigenvalue of $W^T W / N$", ylabel="density")
    if fit.ok:
        grid = np.geomspace(fit.x_min, eigs.max(), 100)
        ax.plot(grid, fit.n_tail / fit.n * fit.pdf(grid), color=PARTIAL_COLOUR, lw=2,
                label=f"power law, α = {fit.alpha:.2f}")
        ax.axvline(fit.x_min, color="grey", ls="--", lw=1, label="$x_{min}$")
        ax.set_title(f"{name}: α = {fit.alpha:.2f} ({phenomenology(fit.alpha)})", fontsize=9)
    else:
        ax.set_title(f"{name}: no fit ({fit.reason})", fontsize=9)
    ax.legend(fontsize=8)


# --------------------------------------------------------------------------- #
# The FIM_norm case study (Chapters 1 and 2)                                  #
# --------------------------------------------------------------------------- #

PROBE_AXES = {"capacity": ("training-set size", "log"), "noise": ("label-noise fraction", "linear")}


def acid_test_figure(frame, metrics, target: str = "test_acc", probes=("capacity", "noise")):
    """Target and metrics against the condition of each acid-test probe.

    One row per variable (``target`` first), one column per probe; every seed
    is a point, the line joins the means over seeds.  ``frame`` is
    :func:`mbe_helpers.chapters.acid_test.acid_test_frame`'s output.

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import pandas as pd
    >>> frame = pd.DataFrame({"probe": ["capacity"] * 4 + ["noise"] * 4,
    ...                       "condition": [100, 100, 1000, 1000, 0.0, 0.0, 0.4, 0.4],
    ...                       "test_acc": [0.80, 0.82, 0.95, 0.94, 0.94, 0.95, 0.70, 0.72],
    ...                       "fim_norm": [0.30, 0.32, 0.20, 0.21, 0.20, 0.22, 0.40, 0.38]})
    >>> fig = acid_test_figure(frame, ["fim_norm"])
    >>> [ax.get_title() for ax in fig.axes[:2]], len(fig.axes)      # one row per variable
    (['capacity probe', 'noise probe'], 4)
    >>> plt.close(fig)
    """
    rows = [target, *metrics]
    fig, axes = plt.subplots(len(rows), len(probes), figsize=page_size(4.6 * len(probes), 2.3 * len(rows)),
                             sharex="col", squeeze=False)
    for j, probe in enumerate(probes):
        part = frame[frame.probe == probe]
        label, scale = PROBE_AXES.get(probe, (probe, "linear"))
        for i, name in enumerate(rows):
            ax = axes[i, j]
            ax.scatter(part.condition, part[name], s=12, alpha=0.5,
                       color=PARTIAL_COLOUR if i == 0 else RAW_COLOUR)
            means = part.groupby("condition")[name].mean()
            ax.plot(means.index, means.to_numpy(), color="black", lw=1.2, marker="o", ms=3)
            ax.set_xscale(scale)
            ax.set_ylabel(name if j == 0 else "")
            if i == 0:
                ax.set_title(f"{probe} probe")
        axes[-1, j].set_xlabel(label)
    fig.tight_layout()
    return fig


def rho_forest_figure(table, metrics=None):
    """Spearman rho with the target and its condition-bootstrap interval, per metric and probe.

    ``table`` is :func:`mbe_helpers.chapters.acid_test.acid_test`'s output; filled
    markers are significant results, hollow ones are not.

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import pandas as pd
    >>> table = pd.DataFrame({"probe": ["capacity", "noise"] * 2,
    ...                       "metric": ["fim_norm"] * 2 + ["sci"] * 2,
    ...                       "rho": [-0.8, -0.7, 0.1, 0.3], "lo": [-0.9, -0.85, -0.3, -0.1],
    ...                       "hi": [-0.6, -0.5, 0.5, 0.6], "significant": [True, True, False, False]})
    >>> fig = rho_forest_figure(table)
    >>> [t.get_text() for t in fig.axes[0].get_yticklabels()]
    ['fim_norm', 'sci']
    >>> plt.close(fig)
    """
    metrics = list(dict.fromkeys(table.metric)) if metrics is None else list(metrics)
    probes = list(dict.fromkeys(table.probe))
    fig, ax = plt.subplots(figsize=page_size(7, 0.34 * len(metrics) + 1.2))
    colours = sns.color_palette("deep", len(probes))
    for k, (probe, colour) in enumerate(zip(probes, colours)):
        part = table[table.probe == probe].set_index("metric").reindex(metrics)
        y = np.arange(len(metrics)) + (k - (len(probes) - 1) / 2) * 0.25
        lo = np.clip((part.rho - part.lo).to_numpy(), 0, None)
        hi = np.clip((part.hi - part.rho).to_numpy(), 0, None)
        ax.errorbar(part.rho, y, xerr=[lo, hi], fmt="none", ecolor=colour, lw=1)
        sig = part.significant.fillna(False).to_numpy(dtype=bool)
        ax.scatter(part.rho[sig], y[sig], color=colour, s=22, label=f"{probe} (significant)")
        ax.scatter(part.rho[~sig], y[~sig], facecolor="white", edgecolor=colour, s=22,
                   label=f"{probe} (not significant)")
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(np.arange(len(metrics)), metrics)
    ax.invert_yaxis()
    ax.set(xlim=(-1.05, 1.05), xlabel="Spearman ρ with the target (95 % interval over conditions)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def design_figure(configs, columns, hue: str | None = "optimizer",
                  log_columns=("lr", "weight_decay", "n_train")):
    """Pair plot of a sampled design; ``log_columns`` are drawn as log10.

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import pandas as pd
    >>> rng = np.random.default_rng(0)
    >>> configs = pd.DataFrame({"lr": 10 ** rng.uniform(-4, -1, 20),
    ...                         "width": rng.choice([16, 32], 20),
    ...                         "optimizer": rng.choice(["adam", "sgd"], 20)})
    >>> fig = design_figure(configs, ["lr", "width"], hue="optimizer")
    >>> type(fig).__name__, sorted({ax.get_xlabel() for ax in fig.axes} - {""})
    ('Figure', ['log10 lr', 'width'])
    >>> plt.close(fig)
    """
    data = configs[list(dict.fromkeys([*columns, *([hue] if hue else [])]))].copy()
    for name in log_columns:
        if name in data and name in columns:
            data[f"log10 {name}"] = np.log10(data.pop(name).astype(float))
    grid = sns.pairplot(data, hue=hue, corner=True, height=1.35, plot_kws={"s": 14},
                        diag_kind="hist")
    return grid.figure


def baseline_figure(summary, audits=("baseline", "design", "both"), labels=None,
                    effect: float = 0.2, washout: float = 0.1):
    """Raw rho and the partial rho of each audit, with intervals, one row per metric.

    ``summary`` is :func:`mbe_helpers.chapters.grid.audit_summary`'s output; the
    dashed lines are the effect threshold, the dotted ones the washout threshold.

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import pandas as pd
    >>> summary = pd.DataFrame({"metric": ["fim_norm", "random_metric"], "raw_r": [-0.6, 0.05],
    ...                         "raw_lo": [-0.7, -0.2], "raw_hi": [-0.5, 0.3]})
    >>> for name, value in (("baseline", 0.02), ("design", -0.3), ("both", 0.01)):
    ...     summary[f"partial_{name}"] = [value, 0.0]
    >>> fig = baseline_figure(summary)
    >>> [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    ['raw', 'partial | baseline', 'partial | design', 'partial | both']
    >>> plt.close(fig)
    """
    labels = dict(labels or {})
    metrics = list(summary.metric)
    fig, ax = plt.subplots(figsize=page_size(7.5, 0.36 * len(metrics) + 1.3))
    series = [("raw", "raw_r", "raw_lo", "raw_hi")]
    series += [(labels.get(a, f"partial | {a}"), f"partial_{a}", f"lo_{a}", f"hi_{a}")
               for a in audits]
    colours = sns.color_palette("deep", len(series))
    for k, ((label, col, lo, hi), colour) in enumerate(zip(series, colours)):
        y = np.arange(len(metrics)) + (k - (len(series) - 1) / 2) * 0.18
        value = summary[col].to_numpy(dtype=float)
        if lo in summary and hi in summary:
            err = [np.clip(value - summary[lo], 0, None), np.clip(summary[hi] - value, 0, None)]
            ax.errorbar(value, y, xerr=err, fmt="none", ecolor=colour, lw=0.9)
        ax.scatter(value, y, color=colour, s=18, label=label, zorder=3)
    for x, style in ((effect, "--"), (washout, ":")):
        for sign in (-1, 1):
            ax.axvline(sign * x, color="grey", ls=style, lw=0.8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(np.arange(len(metrics)), metrics)
    ax.invert_yaxis()
    ax.set(xlim=(-1.05, 1.05), xlabel="Spearman ρ with the target (raw or partial)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def temporal_figure(temporal, highlight=("fim_norm",), effect: float = 0.2):
    """Partial rho given the same-epoch validation loss, against the probe epoch.

    ``temporal`` is :func:`mbe_helpers.chapters.grid.temporal_audit`'s output.
    Metrics in ``highlight`` are drawn thick with their bootstrap band (when
    present); the others are thin lines.

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import pandas as pd
    >>> temporal = pd.DataFrame({"epoch": [5, 10, 20] * 2, "metric": ["fim_norm"] * 3 + ["sci"] * 3,
    ...                          "partial_r": [0.3, 0.1, 0.0, 0.1, 0.2, 0.1],
    ...                          "partial_lo": [0.1, -0.1, -0.2, -0.1, 0.0, -0.1],
    ...                          "partial_hi": [0.5, 0.3, 0.2, 0.3, 0.4, 0.3]})
    >>> fig = temporal_figure(temporal, highlight=("fim_norm",))
    >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
    ['5', '10', '20']
    >>> plt.close(fig)
    """
    fig, ax = plt.subplots(figsize=page_size(7.5, 4.2))
    others = [m for m in dict.fromkeys(temporal.metric) if m not in highlight]
    palette = dict(zip(others, sns.color_palette("husl", len(others))))
    palette.update(zip(highlight, sns.color_palette("dark", len(highlight))))
    for metric in [*others, *[h for h in highlight if h in set(temporal.metric)]]:
        part = temporal[temporal.metric == metric].sort_values("epoch")
        strong = metric in highlight
        ax.plot(part.epoch, part.partial_r, marker="o", ms=4 if strong else 2.5,
                lw=2.4 if strong else 1, alpha=1 if strong else 0.7, color=palette[metric],
                label=metric)
        if strong and "partial_lo" in part:
            ax.fill_between(part.epoch, part.partial_lo, part.partial_hi, color=palette[metric],
                            alpha=0.15, lw=0)
    for sign in (-1, 1):
        ax.axhline(sign * effect, color="grey", ls="--", lw=0.8)
    ax.axhline(0, color="black", lw=0.8)
    ax.set(xscale="log", ylim=(-1.05, 1.05), xlabel="probe epoch",
           ylabel="partial ρ given validation loss at that epoch")
    epochs = sorted(set(temporal.epoch))
    ax.set_xticks(epochs, [str(e) for e in epochs])
    ax.minorticks_off()
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- #
# Credit assignment: calibration controls and FA diagnostics (Chapters 3, 4)  #
# --------------------------------------------------------------------------- #

CONTROL_STYLE = {"positive": {"color": "black", "ls": "--"}, "negative": {"color": "grey", "ls": ":"}}
MEASURE_LABELS = {"rho": "perturbation correlation ρ", "bp_cosine": "BP cosine Γ",
                  "nudge": "nudging Δloss (negative = downhill)"}


def _grid_subplots(*args, **kwargs):
    """``plt.subplots`` with seaborn's whitegrid style for the new axes only."""
    with sns.axes_style("whitegrid"):
        return plt.subplots(*args, **kwargs)


def method_colours(names) -> dict:
    """One colour per learning rule or condition, the same in chapters 03 and 04.

    The true gradient (``positive``, and ``bp`` whose own signal it is) is black,
    the random signal grey, each feedback rule a fixed colour of seaborn's
    ``deep`` palette; any other name gets the next unused ``deep`` colour.

    Examples
    --------
    >>> method_colours(["fa", "bp"])["fa"] == method_colours(["positive", "negative", "fa"])["fa"]
    True
    """
    deep = sns.color_palette("deep", 10)
    fixed = {"positive": "black", "bp": "black", "negative": "grey", "fa": deep[0], "dfa": deep[1],
             "dfa_penalized": deep[2], "dfa_shuffled": deep[3], "frozen": deep[7], "init": deep[5]}
    spare = iter([deep[i] for i in (4, 6, 8, 9)] * 10)
    return {name: fixed[name] if name in fixed else next(spare) for name in names}


def _condition_colours(conditions):
    """Controls in black / grey, every other condition its colour of :func:`method_colours`."""
    return method_colours(conditions)


def credit_layers_figure(summary, measures=("rho", "bp_cosine", "nudge")):
    """Each credit measure against the stream state, one line per condition, t-intervals over seeds.

    ``summary`` stacks :func:`mbe_helpers.residual.seed_intervals` tables
    with a ``measure`` column; controls are drawn black dashed (positive) and
    grey dotted (negative).

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import pandas as pd
    >>> summary = pd.DataFrame({"condition": ["positive", "negative", "dfa"] * 2, "measure": "rho",
    ...                         "layer": [0, 0, 0, 1, 1, 1],
    ...                         "mean": [1.0, 0.0, 0.5, 0.99, 0.02, 0.3]})
    >>> summary = summary.assign(ci_lo=summary["mean"] - 0.05, ci_hi=summary["mean"] + 0.05)
    >>> fig = credit_layers_figure(summary, measures=("rho",))
    >>> fig.axes[0].get_ylabel()
    'perturbation correlation ρ'
    >>> plt.close(fig)
    """
    conditions = list(dict.fromkeys(summary.condition))
    colours = _condition_colours(conditions)
    fig, axes = _grid_subplots(1, len(measures), figsize=page_size(4.4 * len(measures), 3.8), squeeze=False)
    for ax, measure in zip(axes.flat, measures):
        part = summary[summary.measure == measure]
        for k, condition in enumerate(conditions):
            rows = part[part.condition == condition].sort_values("layer")
            x = rows.layer.to_numpy() + (k - (len(conditions) - 1) / 2) * 0.05
            err = np.nan_to_num([np.clip(rows["mean"] - rows.ci_lo, 0, None),
                                 np.clip(rows.ci_hi - rows["mean"], 0, None)])
            ax.errorbar(x, rows["mean"], yerr=err, color=colours[condition], marker="o", ms=4,
                        capsize=2, lw=1.3, ls=CONTROL_STYLE.get(condition, {}).get("ls", "-"),
                        label=condition)
        ax.axhline(0, color="grey", lw=0.6)
        ax.set(xlabel="stream state $h_l$", ylabel=MEASURE_LABELS.get(measure, measure))
        ax.set_xticks(sorted(set(part.layer)))
    axes.flat[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def calibrated_scale_figure(deep, placed, per_layer, floor_units: float = 3.0):
    """The calibrated scale: deep-layer rho per condition and the fraction of the ceiling per layer.

    Left: per-seed deep-layer rho (points) and the mean with its t-interval;
    the dashed line is the positive-control ceiling, the grey band the
    negative control's mean ± ``floor_units`` of its spread over seeds.
    Right: ``fraction_of_ceiling`` of every condition at every stream state
    (``per_layer`` from :func:`mbe_helpers.credit.calibrated_scale`).

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import pandas as pd
    >>> from mbe_helpers.credit import calibrated_scale
    >>> from mbe_helpers.residual import seed_intervals
    >>> table = pd.DataFrame({"condition": ["positive", "negative", "dfa"] * 3, "layer": 1,
    ...                       "seed": np.repeat([0, 1, 2], 3), "layers": "1-1",
    ...                       "rho": [0.95, 0.01, 0.3, 0.97, -0.02, 0.35, 0.99, 0.03, 0.4]})
    >>> placed = seed_intervals(table, "rho", by=("condition",))
    >>> fig = calibrated_scale_figure(table, placed, calibrated_scale(table))
    >>> len(fig.axes)                                   # the scale, the heatmap and its colour bar
    3
    >>> plt.close(fig)
    """
    conditions = list(placed.condition)
    colours = _condition_colours(conditions)
    fig, (left, right) = _grid_subplots(1, 2, figsize=page_size(11.5, 0.45 * len(conditions) + 2.2),
                                      width_ratios=(1.1, 1))
    stats_ = placed.set_index("condition")
    for y, condition in enumerate(conditions):
        seeds = deep[deep.condition == condition].rho
        left.scatter(seeds, np.full(len(seeds), y + 0.15), s=14, alpha=0.6, color=colours[condition])
        row = stats_.loc[condition]
        err = [[max(row["mean"] - row.ci_lo, 0)], [max(row.ci_hi - row["mean"], 0)]]
        left.errorbar([row["mean"]], [y], xerr=np.nan_to_num(err), fmt="o", color=colours[condition],
                      capsize=3)
    if "negative" in stats_.index:
        neg = stats_.loc["negative"]
        left.axvspan(neg["mean"] - floor_units * neg.sd, neg["mean"] + floor_units * neg.sd,
                     color="grey", alpha=0.2, lw=0, label=f"noise floor (±{floor_units:g} sd)")
    if "positive" in stats_.index:
        left.axvline(stats_.loc["positive", "mean"], color="black", ls="--", lw=1, label="ceiling")
    left.set_yticks(range(len(conditions)), conditions)
    left.invert_yaxis()
    left.set(xlabel=f"deep-layer mean ρ (layers {deep.layers.iloc[0]}), 95 % t-interval")
    left.legend(fontsize=8, loc="lower right")
    grid = per_layer.pivot(index="condition", columns="layer", values="fraction_of_ceiling")
    sns.heatmap(grid.reindex(conditions), ax=right, annot=True, fmt=".2f", cmap="vlag", center=0,
                vmin=-1, vmax=1, cbar_kws={"label": "fraction of the ceiling"})
    right.set(xlabel="stream state $h_l$", ylabel="")
    fig.tight_layout()
    return fig


def sensitivity_figure(sweep):
    """Rho against eps and against the number of directions M (mean ± sd over direction seeds).

    ``sweep`` stacks :func:`mbe_helpers.chapters.credit_calibration.sensitivity` tables; one
    line per condition and precision.

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import pandas as pd
    >>> sweep = pd.DataFrame({"condition": "positive", "dtype": "float64",
    ...                       "sweep": ["eps"] * 4 + ["M"] * 4, "repeat": [0, 1] * 4,
    ...                       "value": [1e-4, 1e-4, 1e-1, 1e-1, 1, 1, 16, 16],
    ...                       "rho": [0.99, 0.98, 0.7, 0.72, 0.9, 0.6, 0.98, 0.97]})
    >>> fig = sensitivity_figure(sweep)
    >>> [ax.get_xlabel() for ax in fig.axes]
    ['perturbation size ε', 'directions per sample M']
    >>> plt.close(fig)
    """
    data = sweep.assign(series=sweep.condition + " (" + sweep.dtype + ")")
    fig, axes = _grid_subplots(1, 2, figsize=page_size(11, 3.8), sharey=True)
    for ax, (name, label) in zip(axes, (("eps", "perturbation size ε"),
                                        ("M", "directions per sample M"))):
        sns.lineplot(data=data[data.sweep == name], x="value", y="rho", hue="series",
                     errorbar="sd", marker="o", ax=ax, legend=name == "M")
        ax.set(xscale="log", xlabel=label, ylabel="ρ")
        ax.axhline(0, color="grey", lw=0.6)
    sns.move_legend(axes[1], "upper left", bbox_to_anchor=(1.01, 1), fontsize=8, title=None)
    fig.tight_layout()
    return fig


def stream_norms_figure(layers, grad_floor: float = 1e-7):
    """Diagnostics (a) and (b): median residual norm and BP-gradient norm per stream state.

    ``layers`` is :meth:`mbe_helpers.chapters.fa_diagnostics.DiagnosticRuns.layers`; the
    line is the mean over seeds, the band their range; log scale, with the
    BP-gradient floor drawn.

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import pandas as pd
    >>> layers = pd.DataFrame({"method": ["bp"] * 3 + ["dfa"] * 3, "seed": 0,
    ...                        "layer": [0, 1, 2] * 2,
    ...                        "residual_norm": [1.0, 1.5, 2.0, 1.0, 10.0, 90.0],
    ...                        "bp_grad_norm": [1e-2, 1e-2, 1e-2, 1e-3, 1e-5, 1e-8]})
    >>> fig = stream_norms_figure(layers)
    >>> [ax.get_yscale() for ax in fig.axes]
    ['log', 'log']
    >>> plt.close(fig)
    """
    fig, axes = _grid_subplots(1, 2, figsize=page_size(11.5, 4))
    palette = method_colours(dict.fromkeys(layers.method))
    for ax, (column, label) in zip(axes, (("residual_norm", "median $\\|h_l\\|_2$"),
                                          ("bp_grad_norm", "median $\\|\\partial L/\\partial h_l\\|_2$"))):
        sns.lineplot(data=layers, x="layer", y=column, hue="method", palette=palette, marker="o",
                     errorbar=("pi", 100), ax=ax, legend=column == "bp_grad_norm")
        ax.set(yscale="log", xlabel="stream state $h_l$", ylabel=label)
        ax.set_xticks(sorted(set(layers.layer)))
    axes[1].axhline(grad_floor, color="red", ls="--", lw=1, label=f"floor {grad_floor:.0e}")
    axes[1].set_ylim(bottom=min(grad_floor / 3, axes[1].get_ylim()[0]))
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def stability_figure(accuracy, ceiling: float = 0.30):
    """Diagnostic (c): cross-batch stability of the BP-gradient direction per method, ceiling drawn.

    ``accuracy`` is :meth:`mbe_helpers.chapters.fa_diagnostics.DiagnosticRuns.accuracy`
    (its ``stability`` column is the value at the judged state); points are
    seeds, the bar their mean.

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import pandas as pd
    >>> accuracy = pd.DataFrame({"method": ["bp", "bp", "dfa", "dfa"], "seed": [0, 1] * 2,
    ...                          "stability": [0.05, 0.08, 0.6, 0.5], "stability_layer": 2})
    >>> fig = stability_figure(accuracy, ceiling=0.3)
    >>> fig.axes[0].get_ylabel()
    'mean pairwise cosine at $h_2$'
    >>> plt.close(fig)
    """
    fig, ax = _grid_subplots(figsize=page_size(7.5, 3.8))
    order = list(dict.fromkeys(accuracy.method))
    sns.barplot(data=accuracy, x="method", y="stability", order=order, errorbar=None,
                color="#c9d6ea", ax=ax)
    sns.stripplot(data=accuracy, x="method", y="stability", order=order, color="#4c72b0", size=5,
                  ax=ax)
    ax.axhline(ceiling, color="red", ls="--", lw=1, label=f"ceiling {ceiling:.2f}")
    layer = int(accuracy.stability_layer.iloc[0])
    ax.set(xlabel="", ylabel=f"mean pairwise cosine at $h_{layer}$", ylim=(min(0, ax.get_ylim()[0]), 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def frozen_margin_figure(accuracy, shallow=None, margin: float = 0.02):
    """Diagnostic (d): test accuracy per method against the frozen-blocks baseline.

    Left: test accuracy per method (points are seeds), with the networks
    without deep blocks (``shallow``, :func:`mbe_helpers.chapters.fa_diagnostics.shallow_baselines`)
    for reference.  Right: accuracy minus the frozen baseline of the same
    seed, in percentage points, with the required margin drawn.

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import pandas as pd
    >>> accuracy = pd.DataFrame({"method": ["bp", "bp", "dfa", "dfa"], "seed": [0, 1] * 2,
    ...                          "test_acc": [0.95, 0.96, 0.90, 0.91],
    ...                          "margin": [0.10, 0.10, 0.01, 0.0]})
    >>> shallow = pd.DataFrame({"model": ["linear"], "seed": [0], "test_acc": [0.88]})
    >>> fig = frozen_margin_figure(accuracy, shallow, margin=0.02)
    >>> [ax.get_ylabel() for ax in fig.axes]
    ['test accuracy', 'accuracy − frozen baseline (pp)']
    >>> plt.close(fig)
    """
    import pandas as pd

    fig, (left, right) = _grid_subplots(1, 2, figsize=page_size(11.5, 3.8))
    absolute = accuracy[["method", "seed", "test_acc"]]
    if shallow is not None:
        absolute = pd.concat([absolute, shallow.rename(columns={"model": "method"})], ignore_index=True)
    sns.stripplot(data=absolute, x="method", y="test_acc", size=5, ax=left, color="#4c72b0")
    left.set(xlabel="", ylabel="test accuracy")
    left.tick_params(axis="x", rotation=35)
    gain = accuracy.dropna(subset=["margin"]).assign(pp=lambda t: 100 * t.margin)
    sns.stripplot(data=gain, x="method", y="pp", size=5, ax=right, color="#dd8452")
    right.axhline(100 * margin, color="red", ls="--", lw=1, label=f"required margin {100 * margin:g} pp")
    right.axhline(0, color="grey", lw=0.8)
    right.set(xlabel="", ylabel="accuracy − frozen baseline (pp)")
    right.tick_params(axis="x", rotation=35)
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig
