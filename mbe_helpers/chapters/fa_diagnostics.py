"""Chapter 04, "FA diagnostics": the sentences its prose glues.

The runs and the protocol live in :mod:`mbe_helpers.experiments` and
:mod:`mbe_helpers.protocol`; this module turns their tables into words
(tested on constructed tables).
"""

from __future__ import annotations

import pandas as pd


def dfa_pattern(per_method: pd.DataFrame, max_growth: float, grad_floor: float) -> str:
    """Does vanilla DFA show a larger stream and smaller BP gradients than backprop?

    ``per_method`` is indexed by method with ``max_growth`` and
    ``min_grad_norm`` columns; the thresholds are diagnostics (a) and (b).

    Examples
    --------
    >>> t = pd.DataFrame({"max_growth": [2.0, 9.0], "min_grad_norm": [1e-3, 1e-5]},
    ...                  index=["bp", "dfa"])
    >>> dfa_pattern(t, max_growth=50.0, grad_floor=1e-7)
    'Vanilla DFA shows the pattern the diagnostics were built for, but without crossing either threshold'
    >>> dfa_pattern(t.loc[["bp"]], 50.0, 1e-7)
    'Without both vanilla DFA and backprop in this run there is nothing to compare'
    """
    if not {"dfa", "bp"} <= set(per_method.index):
        return "Without both vanilla DFA and backprop in this run there is nothing to compare"
    dfa, bp = per_method.loc["dfa"], per_method.loc["bp"]
    if not (dfa.max_growth > bp.max_growth and dfa.min_grad_norm < bp.min_grad_norm):
        return ("Vanilla DFA does not show the pattern the diagnostics were built for (a larger "
                "stream and smaller gradients than backprop)")
    crossed = dfa.max_growth > max_growth or dfa.min_grad_norm < grad_floor
    return "Vanilla DFA shows the pattern the diagnostics were built for, " + (
        "strongly enough to cross a threshold" if crossed else "but without crossing either threshold")
