"""Chapter 02, "The heterogeneous grid": the sentences its prose glues.

The grid's runs and audits live in :mod:`mbe_helpers.metrics`; this module
turns their tables into words, so each branch of the story is tested on
constructed tables without executing the notebook.
"""

from __future__ import annotations

import pandas as pd


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
