"""Glue for the chapters' prose that a reader in JupyterLab can also see.

``myst_nb.glue`` stores a value for the ``{glue:text}`` roles of the built
site, but JupyterLab shows those roles as raw text. :func:`glue` forwards to
``myst_nb.glue`` and keeps a copy; :func:`glued_table`, the last cell of each
chapter (tagged ``remove-cell``, so the site, which renders the roles inline,
leaves it out), lists every glued value, so a reader of the notebook sees the
numbers of the prose.

Examples
--------
>>> _GLUED.clear()
>>> _remember("n_runs", 60)
>>> glued_table().to_dict("records")
[{'key': 'n_runs', 'value': '60'}]
"""

from __future__ import annotations

from typing import Any

import pandas as pd

_GLUED: dict[str, Any] = {}


def _remember(name: str, value: Any) -> None:
    _GLUED[name] = value


def glue(name: str, value: Any, display: bool = True) -> None:
    """``myst_nb.glue(name, value, display)``, remembering the value for :func:`glued_table`.

    Examples
    --------
    >>> _GLUED.clear()
    >>> glue("n_runs", 60, display=False)        # the site's {glue:text}`n_runs` shows 60
    >>> _GLUED
    {'n_runs': 60}
    """
    import numpy as np
    from myst_nb import glue as myst_glue

    if isinstance(value, np.generic):      # np.float64(0.3) would be glued as its repr
        value = value.item()
    _remember(name, value)
    myst_glue(name, value, display=display)


def glue_all(values: dict[str, Any]) -> None:
    """Glue every ``key: value`` of a chapter module's ``*_values`` dict (keys listed in its docstring).

    Examples
    --------
    >>> from unittest import mock
    >>> with mock.patch("myst_nb.glue"):
    ...     glue_all({"replication_n": 200})
    >>> _GLUED["replication_n"]
    200
    """
    for name, value in values.items():
        glue(name, value, display=False)


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (str, int)):
        return str(value)
    kind = type(value).__name__
    return f"({kind}, shown above)" if kind in ("Figure", "DataFrame", "Styler") else str(value)[:200]


def glued_table() -> pd.DataFrame:
    """Every value glued so far in this kernel, in order: ``key`` and its text.

    Examples
    --------
    >>> _GLUED.clear()
    >>> glue("n_runs", 60, display=False)
    >>> glue("rho", 0.123456, display=False)
    >>> glued_table()
          key   value
    0  n_runs      60
    1     rho  0.1235
    """
    return pd.DataFrame({"key": list(_GLUED), "value": [_text(v) for v in _GLUED.values()]})
