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


def audit_figure(result, metric: str | None = None, group: str = "all"):
    """The two-panel MBE figure of an :class:`~mbe_helpers.audit.AuditResult`.

    Left: the chosen metric against the target (ranks, with a least-squares
    fit), annotated with raw and partial rho.  Right: the absolute raw and
    partial rho of every metric in ``group``, with bootstrap intervals when the audit has
    them and the effect / washout thresholds drawn.
    """
    rows = result.table[result.table.group == group]
    metric = metric or rows.metric.iloc[0]
    if metric not in set(rows.metric):
        raise ValueError(f"unknown metric {metric!r}; audited metrics: {', '.join(rows.metric)}")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), width_ratios=(1, 1.3))
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
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 3.3 * n_rows), squeeze=False)
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
    ax.legend(fontsize=7)
