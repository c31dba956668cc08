"""Chapter 03, "Calibration controls": the sentences its prose glues.

The runs and the scale live in :mod:`mbe_helpers.experiments`; this module
turns their tables into words (tested on constructed tables).
"""

from __future__ import annotations

import pandas as pd

from mbe_helpers.experiments import FLOOR_READINGS


def literature_contrast(by: pd.DataFrame, condition: str, literature: str) -> str:
    """'as' or 'unlike' the CIFAR-10 source experiment, where the condition was at ``literature``.

    ``by`` is the scale table indexed by condition with a ``reading`` column;
    ``literature`` is ``"floor"`` or ``"above"``.

    Examples
    --------
    >>> by = pd.DataFrame({"reading": ["within the noise floor"]}, index=["dfa"])
    >>> literature_contrast(by, "dfa", "floor")
    'as there, dfa is within the noise floor here'
    >>> literature_contrast(by, "dfa", "above")
    'unlike there, dfa is within the noise floor here'
    >>> literature_contrast(by, "fa", "floor")
    'fa was not run'
    """
    if condition not in by.index:
        return f"{condition} was not run"
    reading = by.loc[condition, "reading"]
    here = "floor" if reading in FLOOR_READINGS else "above"
    return f"{'as' if here == literature else 'unlike'} there, {condition} is {reading} here"
