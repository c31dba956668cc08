r"""The field's other yardsticks: Jiang et al.'s granulated Kendall and CMI, Dziugaite et al.'s sign-error.

Three published ways of judging whether a measure :math:`\mu` of trained
networks tracks a target :math:`g` (a generalization gap, an error, an
accuracy) across a grid of hyperparameters, next to the MBE audit:

* :func:`granulated_kendall`: Jiang et al. (2020, "Fantastic generalization
  measures and where to find them") Kendall's :math:`\tau` inside each cell
  where one hyperparameter varies and the others are held fixed, averaged
  per hyperparameter (:math:`\psi_i`) and over hyperparameters (:math:`\Psi`);
* :func:`conditional_mi`: Jiang et al.'s normalised conditional mutual
  information between the orders of :math:`\mu` and :math:`g` over pairs of
  runs, minimised over conditioning sets of hyperparameters (:math:`\mathcal K`);
* :func:`robust_sign_error` (over :func:`sign_error_environments`): Dziugaite
  et al. (2020, "In search of robust measures of generalization") the
  Hoeffding-weighted sign-error in each environment of coupled networks (two
  configurations that differ in one hyperparameter, every pair of their
  seeds), summarised by its mean, 90th percentile and maximum (the robust
  sign-error) over environments.

All of them read one row per trained run.  Hyperparameters are discrete
levels compared by exact equality (round or bin a continuous one first); rows
with a missing hyperparameter or a missing or infinite metric or target are
dropped.  The numbers are signed against the target as given: against a
generalization gap a good measure has :math:`\tau > 0` and a sign-error near
0; against a test accuracy the same measure shows :math:`\tau < 0` and a
sign-error near 1 (conditional mutual information does not see the sign).
Bad input (an unknown or non-numeric column, a hyperparameter with one level,
a grid with no eligible cell) is refused in one sentence
(:class:`~mbe_helpers.errors.MBEInputError`); a hyperparameter or
conditioning set on which a statistic is undefined gets a NaN row whose
``note`` says why.

Every statistic is counted over pairs of runs by vectorised blocks
(``numpy.bincount`` over pair codes), never by a Python loop over pairs.
:func:`comparator_tables` and :func:`comparators_markdown` assemble the three
for the ``mbe-book audit --comparators`` report.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import combinations

import numpy as np
import pandas as pd

from mbe_helpers.audit import _as_frame, _is_numeric, _names
from mbe_helpers.errors import MBEInputError

__all__ = ["comparator_tables", "comparators_markdown", "conditional_mi", "granulated_kendall",
           "hoeffding_weight", "robust_sign_error", "sign_error_environments"]

#: Pairs of runs handled in one vectorised block (bounds the memory, not the result).
PAIR_BLOCK = 1 << 22
#: Most level combinations a conditioning set may have (its count table has this squared cells).
MAX_CONDITIONS = 2048


# --------------------------------------------------------------------------- #
# Input                                                                       #
# --------------------------------------------------------------------------- #

def _prepare(df, metric, target, hyperparameters, group) -> tuple[pd.DataFrame, list[str]]:
    """The complete rows of the requested columns, or one sentence saying what is wrong."""
    df = _as_frame(df)
    for name, value in (("metric", metric), ("target", target)):
        if not isinstance(value, str):
            raise MBEInputError(f"{name} must be one column name, got {value!r}")
    if group is not None and not isinstance(group, str):
        raise MBEInputError(f"group must be one column name or None, got {group!r}")
    hps = _names(hyperparameters, "hyperparameters")
    if not hps:
        raise MBEInputError("no hyperparameter given; name the columns whose levels form the grid")
    repeated = sorted({h for h in hps if hps.count(h) > 1})
    if repeated:
        raise MBEInputError(f"hyperparameter {repeated[0]!r} is listed twice; list each once")
    wanted = [metric, target, *hps, *([group] if group else [])]
    missing = [name for name in dict.fromkeys(wanted) if name not in df.columns]
    if missing:
        plural = "s" if len(missing) > 1 else ""
        raise MBEInputError(f"unknown column{plural} {', '.join(map(repr, missing))}; "
                            f"available columns: {', '.join(map(str, df.columns))}")
    if metric == target:
        raise MBEInputError(f"the metric and the target are the same column {metric!r}; "
                            "a metric cannot be judged against itself")
    for name, role in ((metric, "metric"), (target, "target"), (group, "group")):
        if name is not None and name in hps:
            raise MBEInputError(f"the {role} {name!r} is also listed as a hyperparameter; "
                                "a column has one role")
    if group is not None and group in (metric, target):
        raise MBEInputError(f"the group {group!r} is also the metric or the target; group by the "
                            "column naming each configuration")
    for name in (metric, target):
        if pd.api.types.is_complex_dtype(df[name]):
            raise MBEInputError(f"column {name!r} holds complex numbers; use its real part or its "
                                "magnitude (np.abs) instead")
        if not _is_numeric(df[name]):
            raise MBEInputError(f"column {name!r} must be numeric (it has dtype {df[name].dtype})")
    frame = df[list(dict.fromkeys(wanted))]
    keep = (np.isfinite(frame[metric].to_numpy(dtype=float, na_value=np.nan))
            & np.isfinite(frame[target].to_numpy(dtype=float, na_value=np.nan))
            & frame[[*hps, *([group] if group else [])]].notna().all(axis=1).to_numpy())
    frame = frame.loc[keep].reset_index(drop=True)
    if frame.empty:
        raise MBEInputError(f"no complete row: every run misses {metric!r}, {target!r} or a "
                            "hyperparameter (NaN, infinite or empty)")
    for h in hps:
        levels = frame[h].nunique()
        if levels < 2:
            value = frame[h].iloc[0]
            value = value.item() if hasattr(value, "item") else value
            raise MBEInputError(f"hyperparameter {h!r} has one level ({value!r}) in the complete "
                                "rows; drop it from the hyperparameters or give runs that vary it")
    return frame, hps


def _check_constant(frame: pd.DataFrame, hps: list[str], group: str) -> None:
    """Refuse a group whose runs differ in a hyperparameter: a group is one configuration."""
    mixed = frame.groupby(group, sort=False)[hps].nunique() > 1
    if mixed.to_numpy().any():
        name, h = next((g, h) for g, row in mixed.iterrows() for h in hps if row[h])
        levels = frame.loc[frame[group] == name, h].unique()[:2].tolist()
        raise MBEInputError(f"group {name!r} mixes levels {levels[0]!r} and {levels[1]!r} of "
                            f"hyperparameter {h!r}; a group must be one configuration (the same "
                            "hyperparameters, different seeds)")


def _configurations(frame: pd.DataFrame, metric: str, target: str, hps: list[str],
                    group: str | None) -> pd.DataFrame:
    """One row per configuration: the mean metric and target over its seeds (``group``), or the runs."""
    if group is None:
        return frame
    _check_constant(frame, hps, group)
    agg = {metric: "mean", target: "mean", **{h: "first" for h in hps}}
    return frame.groupby(group, sort=True).agg(agg).reset_index(drop=True)


def _level_codes(frame: pd.DataFrame, hps: Sequence[str]) -> np.ndarray:
    """(n, len(hps)) integer codes of the hyperparameter levels (sorted where the levels can be)."""
    def factorize(column: pd.Series) -> np.ndarray:
        try:
            return pd.factorize(column, sort=True)[0]
        except TypeError:                      # levels of mixed types: codes in order of appearance
            return pd.factorize(column)[0]

    codes = [factorize(frame[h]) for h in hps]
    return np.column_stack(codes) if codes else np.zeros((len(frame), 0), dtype=np.int64)


def _row_codes(codes: np.ndarray) -> tuple[np.ndarray, int]:
    """Code of each row's combination of levels, and the number of combinations."""
    if codes.shape[1] == 0:
        return np.zeros(len(codes), dtype=np.int64), 1
    unique, inverse = np.unique(codes, axis=0, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64), len(unique)


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise MBEInputError(f"{name} must be an integer of at least {low}, got {value!r}")


# --------------------------------------------------------------------------- #
# Pairs within cells                                                          #
# --------------------------------------------------------------------------- #

def _pair_blocks(cell: np.ndarray, block: int = PAIR_BLOCK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every unordered pair of rows sharing a cell code, in blocks of about ``block`` pairs.

    Rows are sorted by cell; the row at sorted position p pairs with the later
    positions of its cell, so a block is a run of consecutive positions and
    its pairs come from ``np.repeat`` (a cell larger than a block is split).
    """
    n = len(cell)
    if n < 2:
        return
    order = np.argsort(cell, kind="stable")
    ordered = cell[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    sizes = np.diff(np.r_[starts, n])
    partners = np.repeat(starts + sizes, sizes) - np.arange(n) - 1
    done = np.r_[0, np.cumsum(partners)]
    start = 0
    while start < n and done[start] < done[-1]:
        stop = max(int(np.searchsorted(done, done[start] + block, side="right")) - 1, start + 1)
        counts = partners[start:stop]
        first = np.repeat(np.arange(start, stop), counts)
        offset = np.arange(len(first)) - np.repeat(done[start:stop] - done[start], counts)
        yield order[first], order[first + 1 + offset]
        start = stop


def _sign(values: np.ndarray) -> np.ndarray:
    return np.sign(values).astype(np.int8)


# --------------------------------------------------------------------------- #
# Granulated Kendall                                                          #
# --------------------------------------------------------------------------- #

def _cell_kendall(cell: np.ndarray, cells: int, x: np.ndarray, y: np.ndarray,
                  tau: str) -> np.ndarray:
    """Kendall's tau of ``x`` and ``y`` within each cell (tau-a, or tau-b with the tie correction)."""
    s = np.zeros(cells)
    pairs = np.zeros(cells)
    tied_x = np.zeros(cells)
    tied_y = np.zeros(cells)
    for i, j in _pair_blocks(cell):
        sx, sy, c = _sign(x[i] - x[j]), _sign(y[i] - y[j]), cell[i]
        s += np.bincount(c, weights=sx * sy, minlength=cells)
        pairs += np.bincount(c, minlength=cells)
        if tau == "b":
            tied_x += np.bincount(c[sx == 0], minlength=cells)
            tied_y += np.bincount(c[sy == 0], minlength=cells)
    with np.errstate(divide="ignore", invalid="ignore"):
        if tau == "a":
            return np.where(pairs > 0, s / pairs, np.nan)
        denominator = np.sqrt((pairs - tied_x) * (pairs - tied_y))
        return np.where(denominator > 0, s / denominator, np.nan)


def granulated_kendall(df, metric: str, target: str, hyperparameters, *, group: str | None = None,
                       min_levels: int = 2, tau: str = "a") -> pd.DataFrame:
    r"""Jiang et al.'s granulated Kendall coefficient: one :math:`\psi_i` per hyperparameter and :math:`\Psi`.

    For hyperparameter :math:`i`, a *cell* holds the runs that share the
    levels of every other hyperparameter, so that only :math:`\theta_i`
    varies inside it. With Kendall's coefficient over the ordered pairs of a
    cell :math:`T`,

    .. math:: \tau(T) = \frac{1}{|T|(|T|-1)} \sum_{a \in T} \sum_{b \in T \setminus a}
              \operatorname{sign}(\mu_a - \mu_b)\, \operatorname{sign}(g_a - g_b),

    (Jiang et al.'s definition, which is tau-a: a tied pair counts 0 in the mean)

    .. math:: \psi_i = \frac{1}{m_i} \sum_{\text{cells } T \text{ of } i} \tau(T), \qquad
              \Psi = \frac{1}{n} \sum_{i=1}^n \psi_i,

    where :math:`m_i` counts the eligible cells (at least ``min_levels``
    levels of :math:`\theta_i`; on a complete grid, every cell) with a finite
    :math:`\tau`, and :math:`\Psi` averages the finite :math:`\psi_i`.

    Parameters
    ----------
    df : DataFrame
        One row per run.
    metric, target : str
        Numeric columns: the measure :math:`\mu` and the target :math:`g`.
    hyperparameters : list of str
        The columns whose levels form the grid (any dtype, exact levels).
    group : str, optional
        Column naming each configuration: its runs (seeds) are averaged into
        one point first; a group whose hyperparameters are not constant is
        refused. Without it every run is a point.
    min_levels : int
        A cell is eligible when :math:`\theta_i` takes at least this many levels in it.
    tau : {"a", "b"}
        ``"a"`` (default): the paper's coefficient above. ``"b"``: Kendall's
        tau-b, :math:`\sum \operatorname{sign}\operatorname{sign} / \sqrt{(n_0 - n_1)(n_0 - n_2)}`
        over unordered pairs with :math:`n_1, n_2` the pairs tied in
        :math:`\mu`, in :math:`g` (``scipy.stats.kendalltau``, what
        ``mbe_eval`` uses); NaN in a cell where either is constant. The two
        agree when nothing is tied.

    Returns
    -------
    DataFrame
        One row per hyperparameter, then ``hyperparameter == "overall"``
        (:math:`\Psi`); columns ``value`` (:math:`\psi_i`, :math:`\Psi`),
        ``cells`` (eligible cells), ``finite_cells`` (those with a finite
        :math:`\tau`) and ``note`` (why a value is NaN; what ``overall`` averages).

    Examples
    --------
    Three learning rates by two widths, one run each; :math:`\mu` orders the
    runs as :math:`g` does except the last pair:

    >>> import pandas as pd
    >>> runs = pd.DataFrame({"lr": [1, 2, 3, 1, 2, 3], "width": [8, 8, 8, 16, 16, 16],
    ...                      "mu": [1.0, 2.0, 3.0, 4.0, 6.0, 5.0],
    ...                      "gap": [.1, .2, .3, .4, .5, .6]})
    >>> table = granulated_kendall(runs, "mu", "gap", ["lr", "width"])
    >>> table[["hyperparameter", "value", "cells"]].round(4).to_dict("list")
    {'hyperparameter': ['lr', 'width', 'overall'], 'value': [0.6667, 1.0, 0.8333], 'cells': [2, 3, 5]}
    """
    _check_int("min_levels", min_levels, 2)
    if tau not in ("a", "b"):
        raise MBEInputError(f"tau must be 'a' (Jiang et al.'s coefficient) or 'b' (tie-corrected), "
                            f"got {tau!r}")
    frame, hps = _prepare(df, metric, target, hyperparameters, group)
    frame = _configurations(frame, metric, target, hps, group)
    codes = _level_codes(frame, hps)
    x, y = frame[metric].to_numpy(dtype=float), frame[target].to_numpy(dtype=float)
    rows = []
    for k, h in enumerate(hps):
        cell, cells = _row_codes(np.delete(codes, k, axis=1))
        observed = np.unique(cell * (codes[:, k].max() + 1) + codes[:, k]) // (codes[:, k].max() + 1)
        eligible = np.bincount(observed, minlength=cells) >= min_levels
        taus = np.full(cells, np.nan)
        if eligible.any():
            inside = eligible[cell]
            taus = _cell_kendall(cell[inside], cells, x[inside], y[inside], tau)
        finite = eligible & np.isfinite(taus)
        value = float(taus[finite].mean()) if finite.any() else np.nan
        note = ("" if finite.any() else
                f"no cell where only {h!r} varies over at least {min_levels} levels" if not eligible.any()
                else f"tau-b undefined in all {int(eligible.sum())} cells (metric or target constant "
                     "within each)")
        rows.append({"hyperparameter": h, "value": value, "cells": int(eligible.sum()),
                     "finite_cells": int(finite.sum()), "note": note})
    table = pd.DataFrame(rows)
    if not table.cells.any():
        raise MBEInputError(f"no eligible cell: no hyperparameter of {', '.join(map(repr, hps))} varies "
                            f"over {min_levels} levels while the others are held fixed; the runs do "
                            "not form a grid over these columns")
    finite = table.value.notna()
    overall = {"hyperparameter": "overall",
               "value": float(table.value[finite].mean()) if finite.any() else np.nan,
               "cells": int(table.cells.sum()), "finite_cells": int(table.finite_cells.sum()),
               "note": (f"mean over {int(finite.sum())} of {len(hps)} hyperparameters" if finite.any()
                        else "no hyperparameter has a finite coefficient")}
    return pd.concat([table, pd.DataFrame([overall])], ignore_index=True)


# --------------------------------------------------------------------------- #
# Conditional mutual information                                              #
# --------------------------------------------------------------------------- #

def _information(counts: np.ndarray) -> tuple[float, float]:
    """I(V_mu; V_g | U) and H(V_g | U) in nats from counts[u, v_mu, v_g]."""
    total = counts.sum()
    cu = counts.sum(axis=(1, 2), keepdims=True)
    cux = counts.sum(axis=2, keepdims=True)
    cuy = counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        joint = np.where(counts > 0, counts * np.log(counts * cu / (cux * cuy)), 0.0)
        marginal = np.where(cuy > 0, cuy * np.log(cuy / cu), 0.0)
    return float(joint.sum() / total), float(-marginal.sum() / total)


def conditional_mi(df, metric: str, target: str, hyperparameters, *, group: str | None = None,
                   max_conditioning: int = 2) -> pd.DataFrame:
    r"""Jiang et al.'s normalised conditional mutual information over ordered pairs of runs.

    Every ordered pair :math:`(a, b)` of distinct runs (or configurations,
    with ``group``) is one draw of :math:`V_\mu = [\mu_a > \mu_b]`,
    :math:`V_g = [g_a > g_b]` and, for a set :math:`S` of hyperparameters,
    :math:`U_S = (\theta_{a,S}, \theta_{b,S})` (the levels of both runs).
    From the empirical joint distribution :math:`p` of these draws

    .. math:: I(V_\mu; V_g \mid U_S) = \sum_{u, v, w} p(u, v, w)
              \log \frac{p(u, v, w)\, p(u)}{p(u, v)\, p(u, w)}, \qquad
              H(V_g \mid U_S) = -\sum_{u, w} p(u, w) \log \frac{p(u, w)}{p(u)},

    .. math:: \hat I_S = \frac{I(V_\mu; V_g \mid U_S)}{H(V_g \mid U_S)}, \qquad
              \mathcal K(\mu) = \min_{|S| \le \text{max\_conditioning}} \hat I_S .

    A low :math:`\mathcal K` means that some choice of hyperparameters
    explains the link between the measure and the target. Natural logs (the
    ratio does not depend on the base); a tie counts as "not greater" in both
    orders. The pairs are counted with ``numpy.bincount`` over the code
    :math:`4 (u_a K + u_b) + 2 V_\mu + V_g` (:math:`u` the index of a run's
    levels of :math:`S`, :math:`K` their number) in blocks of rows.

    Parameters
    ----------
    df, metric, target, hyperparameters, group
        As in :func:`granulated_kendall` (``group`` averages seeds first).
    max_conditioning : int
        Largest conditioning set (Jiang et al. use 2); sets of every size from
        0 (``"none"``) up to it are evaluated.

    Returns
    -------
    DataFrame
        One row per conditioning set, then ``conditioning == "overall"``
        (:math:`\mathcal K`, with the information and entropy of the set that
        attains it); columns ``conditioning`` (comma-joined names),
        ``size``, ``normalized_cmi``, ``information`` and ``entropy`` (nats),
        ``conditions`` (observed values of :math:`U_S`), ``pairs`` and
        ``note`` (why a value is NaN: :math:`H(V_g \mid U_S) = 0`, the
        conditioning fixes the target's order).

    Examples
    --------
    Three runs whose orders agree on one of the three pairs:

    >>> import pandas as pd
    >>> runs = pd.DataFrame({"mu": [1.0, 2.0, 3.0], "gap": [.1, .3, .2], "depth": [2, 2, 4]})
    >>> table = conditional_mi(runs, "mu", "gap", ["depth"])
    >>> table[["conditioning", "normalized_cmi"]].round(4).to_dict("list")
    {'conditioning': ['none', 'depth', 'overall'], 'normalized_cmi': [0.0817, 0.3333, 0.0817]}
    """
    _check_int("max_conditioning", max_conditioning, 0)
    frame, hps = _prepare(df, metric, target, hyperparameters, group)
    frame = _configurations(frame, metric, target, hps, group)
    n = len(frame)
    if n < 3:
        raise MBEInputError(f"conditional_mi needs at least 3 runs (configurations), got {n}")
    x, y = frame[metric].to_numpy(dtype=float), frame[target].to_numpy(dtype=float)
    codes = _level_codes(frame, hps)
    sets = [subset for size in range(min(max_conditioning, len(hps)) + 1)
            for subset in combinations(range(len(hps)), size)]
    names = [",".join(hps[i] for i in subset) or "none" for subset in sets]
    conditions = [_row_codes(codes[:, list(subset)]) for subset in sets]
    for name, (_, k) in zip(names, conditions):
        if k > MAX_CONDITIONS:
            raise MBEInputError(f"conditioning on {name} makes {k} level combinations, more than "
                                f"{MAX_CONDITIONS}; bin its hyperparameters into a few levels first")
    # Every (a, b) including a == b, a block of rows a at a time; code 4 (u_a K + u_b) + 2 V_mu + V_g.
    # A self-pair has V_mu = V_g = 0, so its counts are taken off at the end.
    counts = [np.zeros(4 * k * k, dtype=np.int64) for _, k in conditions]
    step = max(1, PAIR_BLOCK // n)
    for a in range(0, n, step):
        order = 2 * (x[a:a + step, None] > x[None, :]) + (y[a:a + step, None] > y[None, :])
        for total, (u, k) in zip(counts, conditions):
            total += np.bincount((4 * (u[a:a + step, None] * k + u[None, :]) + order).ravel(),
                                 minlength=4 * k * k)
    rows = []
    for subset, name, total, (u, k) in zip(sets, names, counts, conditions):
        total -= np.bincount(4 * (u * k + u), minlength=4 * k * k)
        table = total.reshape(k * k, 2, 2)
        information, entropy = _information(table)
        defined = entropy > 1e-12
        rows.append({"conditioning": name, "size": len(subset),
                     "normalized_cmi": information / entropy if defined else np.nan,
                     "information": information, "entropy": entropy,
                     "conditions": int((table.sum(axis=(1, 2)) > 0).sum()), "pairs": n * (n - 1),
                     "note": "" if defined else
                     "H(V_g | U) = 0: the conditioning fixes the target's order in every pair"})
    table = pd.DataFrame(rows)
    finite = table.normalized_cmi.notna()
    if finite.any():
        best = table.loc[table.normalized_cmi[finite].idxmin()].to_dict()
        best.update(conditioning="overall",
                    note=f"minimum over {int(finite.sum())} conditioning sets, at {best['conditioning']}")
    else:
        best = {"conditioning": "overall", "size": 0, "normalized_cmi": np.nan, "information": np.nan,
                "entropy": np.nan, "conditions": 0, "pairs": n * (n - 1),
                "note": "no conditioning set leaves the target's order uncertain"}
    return pd.concat([table, pd.DataFrame([best])], ignore_index=True)


# --------------------------------------------------------------------------- #
# Robust sign-error                                                           #
# --------------------------------------------------------------------------- #

def hoeffding_weight(delta: np.ndarray, test_size: int) -> np.ndarray:
    r"""Confidence that two targets estimated on ``test_size`` examples really differ by ``delta``.

    .. math:: w(\Delta) = \max\bigl(0,\ 1 - 2 e^{-2 n (\Delta / 2)^2}\bigr)^2

    (Hoeffding's bound for each of the two estimates to lie within
    :math:`\Delta / 2` of its mean, squared for the two independent test sets).

    Examples
    --------
    >>> hoeffding_weight(np.array([0.0, 0.02, 0.1]), 10_000).round(4).tolist()
    [0.0, 0.5319, 1.0]
    """
    phi = 2.0 * np.exp(-2.0 * test_size * np.square(np.asarray(delta, dtype=float) / 2.0))
    return np.square(np.maximum(0.0, 1.0 - phi))


def _check_sign_error_settings(test_size, min_weight, min_ess) -> None:
    _check_int("test_size", test_size, 1)
    for name, value, low, high in (("min_weight", min_weight, 0.0, 1.0), ("min_ess", min_ess, 0.0, np.inf)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
                or not low <= value < high:
            raise MBEInputError(f"{name} must be a number in [{low:g}, {high:g}), got {value!r}")


def sign_error_environments(df, metric: str, target: str, hyperparameters, *,
                            group: str | None = None, test_size: int = 10_000,
                            min_weight: float = 0.5, min_ess: float = 12.0) -> pd.DataFrame:
    r"""Dziugaite et al.'s environments: the weighted sign-error of every pair of coupled configurations.

    An environment :math:`e = (c, c')` is an ordered pair of configurations
    that differ in exactly one hyperparameter; its samples are every pair of
    runs :math:`(a, b)`, :math:`a` a seed of :math:`c` and :math:`b` of
    :math:`c'`. With :math:`\Delta_{ab} = g_a - g_b`, the sign-error and the
    weight (:func:`hoeffding_weight`, shifted by ``min_weight`` as in the
    authors' code) are

    .. math:: \ell_{ab} = \tfrac12 \bigl(1 - \operatorname{sign}(\mu_a - \mu_b)
              \operatorname{sign}(\Delta_{ab})\bigr), \qquad
              v_{ab} = \bigl(w(|\Delta_{ab}|) - w_{\min}\bigr)_+,

    .. math:: L_e = \frac{\sum_{ab} v_{ab}\, \ell_{ab}}{\sum_{ab} v_{ab}}, \qquad
              \mathrm{ESS}_e = \frac{(\sum_{ab} v_{ab})^2}{\sum_{ab} v_{ab}^2},

    and the environment is kept when :math:`\mathrm{ESS}_e \ge` ``min_ess``
    (up to ``np.isclose``). Both orders of a pair are listed (their losses
    are equal), as in the paper's counts.

    Parameters
    ----------
    df, metric, hyperparameters
        As in :func:`granulated_kendall`.
    target : str
        A fraction estimated on ``test_size`` examples (generalization gap,
        error or accuracy in [-1, 1]; a percentage is refused).
    group : str, optional
        Column naming each configuration (its runs are the seeds); by
        default a configuration is a distinct combination of the hyperparameters.
    test_size : int
        Examples behind each target value, for the Hoeffding weight.
    min_weight, min_ess : float
        The weight shift :math:`w_{\min}` and the smallest effective sample size kept.

    Returns
    -------
    DataFrame
        One row per ordered environment: ``hyperparameter`` (the one that
        differs), ``source``, ``destination`` (configuration labels),
        ``pairs`` (pairs of runs), ``weight_sum``, ``effective_sample_size``,
        ``sign_error`` (:math:`L_e`; NaN when every weight is 0) and ``kept``.

    Examples
    --------
    >>> import pandas as pd
    >>> runs = pd.DataFrame({"lr": [1, 1, 2, 2], "mu": [1.0, 4.0, 2.0, 3.0],
    ...                      "gap": [.1, .3, .2, .5]})
    >>> env = sign_error_environments(runs, "mu", "gap", ["lr"], min_ess=4)
    >>> env[["source", "destination", "sign_error", "effective_sample_size", "kept"]].values.tolist()
    [['lr=1', 'lr=2', 0.25, 4.0, True], ['lr=2', 'lr=1', 0.25, 4.0, True]]
    """
    _check_sign_error_settings(test_size, min_weight, min_ess)
    frame, hps = _prepare(df, metric, target, hyperparameters, group)
    y = frame[target].to_numpy(dtype=float)
    if np.abs(y).max() > 1:
        raise MBEInputError(f"the Hoeffding weight needs the target {target!r} as a fraction in [-1, 1] "
                            f"(an error, accuracy or gap), but it reaches {np.abs(y).max():g}; "
                            "divide a percentage by 100")
    x = frame[metric].to_numpy(dtype=float)
    if group is not None:
        _check_constant(frame, hps, group)
        config, uniques = pd.factorize(frame[group], sort=True)
        labels = np.array([v.item() if hasattr(v, "item") else v for v in uniques], dtype=object)
        first = np.unique(config, return_index=True)[1]
    else:
        config, _ = _row_codes(_level_codes(frame, hps))
        first = np.unique(config, return_index=True)[1]
        labels = np.array([",".join(f"{h}={v}" for h, v in zip(hps, row))
                           for row in frame.loc[first, hps].itertuples(index=False)], dtype=object)
    levels = _level_codes(frame, hps)[first]          # one row of levels per configuration
    n_config = len(first)
    parts = []
    for k, h in enumerate(hps):
        cell_of_config, _ = _row_codes(np.delete(levels, k, axis=1))
        for i, j in _pair_blocks(cell_of_config[config]):
            a, b = config[i], config[j]
            differ = levels[a, k] != levels[b, k]
            if not differ.any():
                continue
            i, j, a, b = i[differ], j[differ], a[differ], b[differ]
            delta = y[i] - y[j]
            weight = np.maximum(hoeffding_weight(np.abs(delta), test_size) - min_weight, 0.0)
            loss = (1.0 - _sign(x[i] - x[j]) * _sign(delta)) / 2.0
            pair_of, inverse = np.unique(np.minimum(a, b) * n_config + np.maximum(a, b),
                                         return_inverse=True)
            parts.append(pd.DataFrame({
                "k": k, "env": pair_of, "pairs": np.bincount(inverse),
                "weight_sum": np.bincount(inverse, weights=weight),
                "squared": np.bincount(inverse, weights=weight ** 2),
                "loss": np.bincount(inverse, weights=weight * loss)}))
    if not parts:
        raise MBEInputError(f"no eligible cell: no two configurations differ in exactly one of "
                            f"{', '.join(map(repr, hps))}, so there is no environment")
    env = pd.concat(parts).groupby(["k", "env"], sort=True).sum().reset_index()
    w, w2 = env.weight_sum.to_numpy(), env.squared.to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        ess = np.where(w2 > 0, w * w / w2, 0.0)
        loss = np.where(w > 0, env.loss.to_numpy() / w, np.nan)
    kept = np.isclose(ess, min_ess) | (ess > min_ess)
    low, high = env.env.to_numpy() // n_config, env.env.to_numpy() % n_config
    out = pd.DataFrame({
        "hyperparameter": np.asarray(hps, dtype=object)[env.k.to_numpy()],
        "source": labels[low], "destination": labels[high],
        "pairs": env.pairs.to_numpy(), "weight_sum": w, "effective_sample_size": ess,
        "sign_error": loss, "kept": kept})
    back = out.assign(source=out.destination, destination=out.source)
    order = np.argsort(np.r_[np.arange(len(out)) * 2, np.arange(len(out)) * 2 + 1], kind="stable")
    return pd.concat([out, back], ignore_index=True).iloc[order].reset_index(drop=True)


def robust_sign_error(df, metric: str, target: str, hyperparameters, *, group: str | None = None,
                      test_size: int = 10_000, min_weight: float = 0.5,
                      min_ess: float = 12.0) -> pd.DataFrame:
    r"""Dziugaite et al.'s summary of the sign-error over environments: mean, 90th percentile, maximum.

    Over the kept environments :math:`\mathcal E` of
    :func:`sign_error_environments` (all of them, and those where a given
    hyperparameter differs), the summary is the mean of :math:`L_e`, its 90th
    percentile (``np.percentile``, linear) and the robust sign-error
    :math:`\sup_{e \in \mathcal E} L_e`, the paper's worst case.

    Parameters
    ----------
    df, metric, target, hyperparameters, group, test_size, min_weight, min_ess
        As in :func:`sign_error_environments`.

    Returns
    -------
    DataFrame
        ``hyperparameter == "overall"`` (every environment, the paper's
        "All"), then one row per hyperparameter; columns ``environments``
        (kept), ``dropped`` (below ``min_ess`` or weightless), ``mean``,
        ``p90``, ``max`` and ``note`` (why a row is NaN).

    Examples
    --------
    >>> import pandas as pd
    >>> runs = pd.DataFrame({"lr": [1, 1, 2, 2], "mu": [1.0, 4.0, 2.0, 3.0],
    ...                      "gap": [.1, .3, .2, .5]})
    >>> robust_sign_error(runs, "mu", "gap", ["lr"], min_ess=4)[["hyperparameter", "environments", "max"]]
      hyperparameter  environments   max
    0        overall             2  0.25
    1             lr             2  0.25
    """
    env = sign_error_environments(df, metric, target, hyperparameters, group=group,
                                  test_size=test_size, min_weight=min_weight, min_ess=min_ess)
    hps = _names(hyperparameters, "hyperparameters")
    rows = []
    for scope in ["overall", *hps]:
        inside = env if scope == "overall" else env[env.hyperparameter == scope]
        values = inside.sign_error[inside.kept & inside.sign_error.notna()].to_numpy()
        note = ""
        if not len(values):
            note = (f"no two configurations differ only in {scope!r}" if inside.empty else
                    f"all {len(inside)} environments fall below the minimum effective sample size "
                    f"{min_ess:g} (target differences within the Hoeffding noise of test_size={test_size})")
        rows.append({"hyperparameter": scope, "environments": len(values),
                     "dropped": len(inside) - len(values),
                     "mean": float(values.mean()) if len(values) else np.nan,
                     "p90": float(np.percentile(values, 90)) if len(values) else np.nan,
                     "max": float(values.max()) if len(values) else np.nan, "note": note})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- #
# The report of ``mbe-book audit --comparators``                              #
# --------------------------------------------------------------------------- #

def comparator_tables(df, metrics, target: str, hyperparameters) -> dict[str, pd.DataFrame]:
    """The three comparators for each metric, stacked with a ``metric`` column.

    Runs as given (no seed averaging); the sign-error's configurations are the
    distinct combinations of ``hyperparameters`` with the default
    ``test_size`` and thresholds.

    Returns
    -------
    dict
        ``granulated_kendall``, ``conditional_mi`` and ``robust_sign_error`` frames.

    Examples
    --------
    >>> grid = pd.DataFrame({"lr": [1, 1, 2, 2] * 2, "wd": [1, 2] * 4,
    ...                      "m": [0.1, 0.2, 0.3, 0.5, 0.2, 0.1, 0.4, 0.6],
    ...                      "acc": [0.5, 0.6, 0.7, 0.9, 0.55, 0.5, 0.8, 0.95]})
    >>> sorted(comparator_tables(grid, ["m"], "acc", ["lr", "wd"]))
    ['conditional_mi', 'granulated_kendall', 'robust_sign_error']
    """
    functions = {"granulated_kendall": granulated_kendall, "conditional_mi": conditional_mi,
                 "robust_sign_error": robust_sign_error}
    return {name: pd.concat([fn(df, m, target, hyperparameters).assign(metric=m)
                             .pipe(lambda t: t[["metric", *t.columns[:-1]]])
                             for m in _names(metrics, "metrics")], ignore_index=True)
            for name, fn in functions.items()}


def _cell(value) -> str:
    if isinstance(value, (float, np.floating)):
        return "–" if np.isnan(value) else f"{value:.3f}"
    return str(value)


def comparators_markdown(tables: dict[str, pd.DataFrame], target: str) -> str:
    """Markdown section with the three tables of :func:`comparator_tables` ('' when there are none).

    Examples
    --------
    >>> comparators_markdown({}, "acc")
    ''
    """
    if not tables:
        return ""
    titles = {"granulated_kendall": ("Granulated Kendall (Jiang et al. 2020): psi per hyperparameter, "
                                     "Psi overall", ["metric", "hyperparameter", "value", "cells", "note"]),
              "conditional_mi": ("Normalised conditional mutual information (Jiang et al. 2020): "
                                 "K = minimum over conditioning sets",
                                 ["metric", "conditioning", "normalized_cmi", "information", "entropy",
                                  "conditions", "note"]),
              "robust_sign_error": ("Sign-error over coupled environments (Dziugaite et al. 2020; "
                                    "test_size 10000, minimum ESS 12): the maximum is the robust "
                                    "sign-error",
                                    ["metric", "hyperparameter", "environments", "mean", "p90", "max",
                                     "note"])}
    lines = ["", f"**Comparators** against {target!r} (signed as given: against an accuracy a "
             "good measure of the gap shows negative Kendall and a sign-error near 1)"]
    for name, (title, columns) in titles.items():
        table = tables[name][columns]
        lines += ["", f"_{title}_", "", "| " + " | ".join(columns) + " |",
                  "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"
