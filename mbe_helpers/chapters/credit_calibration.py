r"""Chapter 03, "Calibration controls": a credit-assignment metric read between two controls.

* :func:`calibration_runs` -- per-layer :math:`\rho`, BP cosine and nudging
  for the positive control (the true gradient), the negative control (a random
  signal) and the test conditions, over seeds;
* :func:`place_on_scale` -- each condition placed on the scale the two
  controls anchor, with a reading in words;
* :func:`sensitivity` -- :math:`\rho` as a function of eps and of the number
  of directions;
* :func:`literature_contrast` -- the sentence comparing a reading with the
  CIFAR-10 source experiment (tested on constructed tables).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from mbe_helpers import credit, runtime, stream
from mbe_helpers.data import Dataset
from mbe_helpers.errors import MBEInputError
from mbe_helpers.residual import (CONDITIONS, MEASURES, check_measurement, check_names, check_seeds,
                                  check_train_kw, credit_signals, eval_set, measure_condition,
                                  measurement_copy, rule_of, seed_intervals, train_residual)

def calibration_runs(data: Dataset, conditions: Sequence[str] = CONDITIONS,
                     seeds: Sequence[int] = (0, 1, 2), *, eval_size: int = 512,
                     eps: float = 1e-3, n_directions: int = 32, progress: bool = False,
                     **train_kw) -> tuple[pd.DataFrame, dict]:
    r"""Chapter 3: credit metrics of every condition, seed and stream state.

    Each (rule, seed) network is trained once with :func:`train_residual`
    (``train_kw``: ``width, n_blocks, epochs, lr, batch_size, penalty``);
    both controls are read on the BP network of the same seed, every test
    condition on its own network with its own signal.  Measurements
    (:func:`measure_condition`) use the first ``eval_size`` test samples.

    Returns
    -------
    (table, models)
        ``table`` has one row per (condition, seed, layer) with ``rho,
        bp_cosine, nudge, reason, test_acc``; ``models[(rule, seed)]`` is
        ``(model, rule, record)``.

    Examples
    --------
    >>> from mbe_helpers.data import load_dataset
    >>> data = load_dataset("digits", n_train=100)
    >>> table, models = calibration_runs(data, ("positive", "negative", "dfa"), seeds=(0, 1),
    ...                                  eval_size=16, n_directions=4, width=16, n_blocks=1,
    ...                                  epochs=1)
    >>> table.shape, table.columns.tolist()
    ((12, 8), ['condition', 'seed', 'layer', 'rho', 'bp_cosine', 'nudge', 'reason', 'test_acc'])
    >>> sorted(models)          # both controls read the BP network of their seed
    [('bp', 0), ('bp', 1), ('dfa', 0), ('dfa', 1)]
    """
    conditions = check_names(conditions, CONDITIONS, "condition")
    seeds = check_seeds(seeds)
    check_measurement(eval_size, eps, n_directions)
    check_train_kw(train_kw)
    x, y = eval_set(data, eval_size)
    models, rows = {}, []
    jobs = [(c, s) for s in seeds for c in conditions]
    for condition, seed in runtime.progress(jobs, desc="calibration", enabled=progress):
        key = (rule_of(condition), seed)
        if key not in models:
            models[key] = train_residual(key[0], data, seed=seed, **train_kw)
        model, rule, record = models[key]
        table = measure_condition(condition, model, rule, x, y, eps=eps,
                                  n_directions=n_directions, seed=seed)
        rows.append(table.assign(condition=condition, seed=seed, test_acc=record["test_acc"]))
    columns = ["condition", "seed", "layer", *MEASURES, "reason", "test_acc"]
    return pd.concat(rows, ignore_index=True)[columns], models


def place_on_scale(deep: pd.DataFrame, value: str = "rho", *, floor_units: float = 3.0,
                   near_ceiling: float = 0.9, level: float = 0.95) -> pd.DataFrame:
    r"""Each condition's deep-layer value on the scale anchored by the two controls.

    Combines :func:`seed_intervals` (mean and t-interval over seeds) with
    :func:`mbe_helpers.credit.calibrated_scale`: ``fraction_of_ceiling``
    :math:`= \bar v_c / \bar v_+` and ``noise_units`` :math:`= (\bar v_c -
    \bar v_-)/s_-` (:math:`s_-` the negative control's spread over seeds).
    ``reading`` is, in this order of precedence:

    * *not placeable* (with the reason) when the noise units are NaN;
    * *within the noise floor* when ``noise_units < floor_units``;
    * *not separable from the negative control* when the condition's own
      t-interval still contains the negative control's mean -- its seeds
      scatter more than the control's, so distance in noise units alone
      would overstate it;
    * *near the ceiling* when the fraction of the ceiling is at least ``near_ceiling``;
    * *above the noise floor* otherwise.

    Examples
    --------
    >>> deep = pd.DataFrame({"condition": ["positive"] * 3 + ["negative"] * 3 + ["dfa"] * 3,
    ...                      "seed": [0, 1, 2] * 3, "layers": "1-2",
    ...                      "rho": [0.95, 0.97, 0.99, 0.01, -0.02, 0.03, 0.30, 0.35, 0.40]})
    >>> placed = place_on_scale(deep)
    >>> placed[["condition", "mean", "noise_units", "reading"]].round(2)
      condition  mean  noise_units                 reading
    0  positive  0.97        38.28        near the ceiling
    1  negative  0.01         0.00  within the noise floor
    2       dfa  0.35        13.64   above the noise floor
    """
    intervals = seed_intervals(deep, value, by=("condition",), level=level)
    scale = credit.calibrated_scale(deep, value=value, by=("layers",))
    merged = intervals.merge(scale[["condition", "fraction_of_ceiling", "noise_units", "reason"]],
                             on="condition", how="left")
    negative = float(merged.loc[merged.condition == "negative", "mean"].iloc[0])
    merged["reading"] = [_reading(r, negative, floor_units, near_ceiling) for r in merged.itertuples()]
    return merged


FLOOR_READINGS = ("within the noise floor", "not separable from the negative control")
"""Readings of :func:`place_on_scale` that do not put a condition above the noise floor."""


def _reading(row, negative: float, floor_units: float, near_ceiling: float) -> str:
    if not np.isfinite(row.noise_units):
        return f"not placeable ({row.reason})"
    if row.noise_units < floor_units:
        return FLOOR_READINGS[0]
    if row.condition != "negative" and np.isfinite(row.ci_lo) and row.ci_lo <= negative <= row.ci_hi:
        return FLOOR_READINGS[1]
    if np.isfinite(row.fraction_of_ceiling) and row.fraction_of_ceiling >= near_ceiling:
        return "near the ceiling"
    return "above the noise floor"


def sensitivity(model, rule, condition: str, data: Dataset, layer: int, *,
                eps_values: Sequence[float] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0),
                m_values: Sequence[int] = (1, 4, 16, 64), repeats: int = 5,
                eval_size: int = 512, eps: float = 1e-3, n_directions: int = 32,
                dtype: torch.dtype = torch.float64) -> pd.DataFrame:
    r"""Rho at one stream state as a function of eps (at ``n_directions``) and of M (at ``eps``).

    Each point is repeated with ``repeats`` direction seeds, so the spread
    that M controls is visible.  ``dtype`` is the precision of the
    measurement copy (float32 shows the rounding floor at small eps).

    Returns
    -------
    DataFrame
        ``condition, dtype, sweep ("eps" | "M"), value, repeat, rho``.

    Examples
    --------
    >>> from mbe_helpers.data import load_dataset
    >>> data = load_dataset("digits", n_train=100)
    >>> model, rule, _ = train_residual("bp", data, width=16, n_blocks=1, epochs=1)
    >>> sweep = sensitivity(model, rule, "positive", data, layer=1, eps_values=(1e-4, 1e-1),
    ...                     m_values=(1, 4), repeats=2, eval_size=16, n_directions=4)
    >>> sweep.shape, sweep.columns.tolist()
    ((8, 6), ['condition', 'dtype', 'sweep', 'value', 'repeat', 'rho'])
    >>> sweep.sweep.value_counts().to_dict()
    {'eps': 4, 'M': 4}
    """
    check_measurement(eval_size, eps, n_directions)
    if not (isinstance(repeats, int) and repeats >= 1):
        raise MBEInputError(f"repeats must be a positive integer, got {repeats!r}")
    n_states = len(model.blocks) + 1
    if not (isinstance(layer, int) and 0 <= layer < n_states):
        raise MBEInputError(f"layer must be a stream state between 0 and {n_states - 1}, got {layer!r}")
    model_c, rule_c = measurement_copy(model, rule, dtype)
    x, y = eval_set(data, eval_size, dtype)
    signal = credit_signals(condition, model_c, rule_c, x, y, seed=10_000)[layer]
    hidden, _ = stream.forward_stream(model_c, x)
    h, loss_fn = hidden[layer].detach(), stream.tail_loss(model_c, layer, y)

    def rho(e: float, m: int, r: int) -> float:
        return float(credit.perturbation_correlation(h, signal, loss_fn, eps=e, n_directions=m,
                                                     seed=r))

    rows = [{"sweep": "eps", "value": e, "repeat": r, "rho": rho(e, n_directions, r)}
            for r in range(repeats) for e in eps_values]
    rows += [{"sweep": "M", "value": m, "repeat": r, "rho": rho(eps, m, r)}
             for r in range(repeats) for m in m_values]
    return pd.DataFrame(rows).assign(condition=condition, dtype=str(dtype).removeprefix("torch."))[
        ["condition", "dtype", "sweep", "value", "repeat", "rho"]]


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
