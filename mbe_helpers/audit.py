r"""The Marginal Baseline Evaluation (MBE): does a metric say anything new?

Given one row per trained model, a candidate metric :math:`M`, a target
:math:`Y` (e.g. final test accuracy) and controls :math:`B` (a baseline such
as early validation loss and/or design variables), the audit reports

* the raw association, Spearman's :math:`\rho(M, Y)`;
* the partial rank correlation :math:`\rho(M, Y \mid B)`: rank :math:`M` and
  :math:`Y`, regress each on :math:`Z = [1, \operatorname{rank}(B_{num}),
  \operatorname{onehot}(B_{cat})]` and correlate the residuals,

  .. math:: \rho(M, Y \mid B) = \frac{\langle e_M, e_Y \rangle}
            {\lVert e_M \rVert\,\lVert e_Y \rVert},\qquad
            e_V = (I - Z Z^{+})\operatorname{rank}(V),

  with a two-sided p-value from :math:`t = r\sqrt{\nu / (1 - r^2)}`,
  :math:`\nu = n - 2 - k` (:math:`k` = rank of the control columns);
* an outcome class from (raw, partial) (see :func:`classify`);
* optionally bootstrap percentile intervals (rows or whole clusters), a
  permutation p-value and Benjamini-Hochberg q-values.

Every statistic, the point estimate included, is computed by one weighted
engine: a bootstrap resample is represented by integer row weights (the
multiplicity of each row), so ranks, regressions and correlations over
:math:`B` resamples are evaluated as a few batched array operations instead of
a Python loop.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from mbe_helpers.errors import MBEInputError

EFFECT = 0.20
WASHOUT = 0.10
CLASSES = ("insufficient-data", "washout", "sign-inversion", "reverse-inversion",
           "hidden-after-control", "survives", "weak-or-mixed")
_CHUNK_ELEMENTS = 2_000_000  # bootstrap work is chunked to bound memory


# --------------------------------------------------------------------------- #
# Outcome classes                                                             #
# --------------------------------------------------------------------------- #

def classify(raw: float, partial: float, effect: float = EFFECT, washout: float = WASHOUT) -> str:
    r"""Outcome class of a metric from its raw and partial rank correlations.

    The first matching rule wins (``e`` = effect, ``w`` = washout):

    ==========================  ===============================================
    ``insufficient-data``       either value is NaN
    ``washout``                 :math:`|raw| \ge e` and :math:`|partial| < w`
    ``sign-inversion``          :math:`raw \le -e` and :math:`partial \ge e`
    ``reverse-inversion``       :math:`raw \ge e` and :math:`partial \le -e`
    ``hidden-after-control``    :math:`|raw| < e` and :math:`|partial| \ge e`
    ``survives``                same sign and :math:`|partial| \ge e`
    ``weak-or-mixed``           otherwise
    ==========================  ===============================================
    """
    if np.isnan(raw) or np.isnan(partial):
        return "insufficient-data"
    if abs(raw) >= effect and abs(partial) < washout:
        return "washout"
    if raw <= -effect and partial >= effect:
        return "sign-inversion"
    if raw >= effect and partial <= -effect:
        return "reverse-inversion"
    if abs(raw) < effect and abs(partial) >= effect:
        return "hidden-after-control"
    if np.sign(raw) == np.sign(partial) and abs(partial) >= effect:
        return "survives"
    return "weak-or-mixed"


# --------------------------------------------------------------------------- #
# The weighted engine: ranks, residuals, correlations over a batch of weights #
# --------------------------------------------------------------------------- #

def weighted_ranks(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    r"""Average ranks of ``values`` in the data set where row i appears ``w_i`` times.

    For weights ``(B, n)`` returns ``(B, n)`` ranks with
    :math:`r_i = \sum_{j: v_j < v_i} w_j + (\sum_{j: v_j = v_i} w_j + 1)/2`,
    which is exactly the average (mid) rank of row i's copies in the expanded
    resample.  With unit weights this is ``scipy.stats.rankdata``.
    """
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts_group = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    group_of = np.cumsum(starts_group) - 1
    group_start = np.flatnonzero(starts_group)
    group_end = np.r_[group_start[1:], len(values)]
    cum = np.concatenate([np.zeros((weights.shape[0], 1)), np.cumsum(weights[:, order], axis=1)],
                         axis=1)
    below = cum[:, group_start]
    tied = cum[:, group_end] - below
    ranks = np.empty(weights.shape, dtype=float)
    ranks[:, order] = (below + (tied + 1.0) / 2.0)[:, group_of]
    return ranks


def _weighted_center(v: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Subtract the weighted column means; ``v`` is (B, n, m), ``weights`` (B, n)."""
    mean = (weights[:, None, :] @ v) / weights.sum(axis=1)[:, None, None]
    return v - mean


def weighted_residuals(values: np.ndarray, controls: np.ndarray | None,
                       weights: np.ndarray) -> np.ndarray:
    r"""Weighted least-squares residuals of ``values`` on ``[1, controls]``.

    ``values`` is (B, n, m), ``controls`` (B, n, k) or None, ``weights`` (B, n).
    Solves :math:`\beta = (Z_c^\top W Z_c)^{+} Z_c^\top W v_c` on weighted-centred
    columns; the pseudo-inverse keeps rank-deficient designs (a category absent
    from a resample, collinear controls) well defined.
    """
    centred = _weighted_center(values, weights)
    if controls is None or controls.shape[2] == 0:
        return centred
    z = _weighted_center(controls, weights)
    zw = (z * weights[..., None]).transpose(0, 2, 1)
    beta = np.linalg.pinv(zw @ z, rcond=1e-10, hermitian=True) @ (zw @ centred)
    return centred - z @ beta


def _corr_from_cov(cov: np.ndarray, total_weight: np.ndarray) -> np.ndarray:
    r"""Correlation from a batch of 2 x 2 (co)variance sums, NaN without spread.

    A variable whose weighted sum of squares is below ``1e-9`` of that of
    untied ranks (:math:`W^3 / 12`, :math:`W = \sum w`) has no spread
    (constant, or fully explained by the controls).
    """
    ss_a, ss_b, cross = cov[:, 0, 0], cov[:, 1, 1], cov[:, 0, 1]
    floor = 1e-9 * total_weight ** 3 / 12.0
    ok = (ss_a > floor) & (ss_b > floor)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = cross / np.sqrt(ss_a * ss_b)
    return np.where(ok, np.clip(r, -1.0, 1.0), np.nan)


@dataclass(frozen=True)
class _Design:
    """One metric's complete-case data: metric, target, controls as arrays."""

    metric: np.ndarray          # (n,)
    target: np.ndarray          # (n,)
    numeric: np.ndarray         # (n, k_num) raw numeric controls (ranked per resample)
    onehot: np.ndarray          # (n, k_cat) one-hot of categorical controls (drop first)

    @property
    def n(self) -> int:
        return len(self.metric)

    @property
    def k(self) -> int:
        """Number of control columns (the intercept excluded)."""
        return self.numeric.shape[1] + self.onehot.shape[1]


def _rank_correlations(design: _Design, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""Raw and partial Spearman correlations for each row of ``weights`` (B, n).

    All columns are (re-)ranked under the weights and centred; from the
    weighted Gram matrix :math:`S` of ``[rank M, rank Y, Z]`` the raw
    correlation reads off :math:`S_{vv}` and the partial one off the Schur
    complement :math:`S_{vv} - S_{vz} S_{zz}^{+} S_{zv}` (the covariance of the
    residuals), so no residual vector is ever formed.
    """
    columns = [weighted_ranks(design.metric, weights), weighted_ranks(design.target, weights)]
    columns += [weighted_ranks(column, weights) for column in design.numeric.T]
    columns += [np.broadcast_to(column, weights.shape) for column in design.onehot.T]
    x = np.stack(columns, axis=1)                       # (B, p, n): one row per variable
    x -= (x @ weights[:, :, None]) / weights.sum(axis=1)[:, None, None]
    gram = (x * weights[:, None, :]) @ x.transpose(0, 2, 1)
    total = weights.sum(axis=1)
    raw = _corr_from_cov(gram[:, :2, :2], total)
    if design.k == 0:
        return raw, raw.copy()
    s_vz, s_zz = gram[:, :2, 2:], gram[:, 2:, 2:]
    explained = s_vz @ np.linalg.pinv(s_zz, rcond=1e-10, hermitian=True) @ s_vz.transpose(0, 2, 1)
    return raw, _corr_from_cov(gram[:, :2, :2] - explained, total)


def _t_pvalue(r: float, dof: int) -> float:
    """Two-sided p-value of a (partial) correlation from Student's t with ``dof`` degrees."""
    if np.isnan(r) or dof <= 0:
        return float("nan")
    if abs(r) >= 1.0:
        return 0.0
    t = r * np.sqrt(dof / (1.0 - r * r))
    return float(2.0 * stats.t.sf(abs(t), dof))


def _control_rank(design: _Design) -> int:
    """Rank of the centred control columns (the k of the t-test's n - 2 - k)."""
    if design.k == 0:
        return 0
    ranks = [stats.rankdata(c) for c in design.numeric.T] + list(design.onehot.T)
    z = np.column_stack(ranks)
    return int(np.linalg.matrix_rank(z - z.mean(axis=0)))


# --------------------------------------------------------------------------- #
# Input handling                                                              #
# --------------------------------------------------------------------------- #

def _as_frame(data) -> pd.DataFrame:
    """Accept a DataFrame or a mapping of equal-length columns."""
    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, Mapping):
        lengths = {name: len(np.atleast_1d(np.asarray(col, dtype=object))) for name, col in data.items()}
        if len(set(lengths.values())) > 1:
            detail = ", ".join(f"{k!r} has {v}" for k, v in lengths.items())
            raise MBEInputError(f"columns have different lengths ({detail}); give one value per run in each")
        return pd.DataFrame(dict(data))
    raise MBEInputError(f"expected a pandas DataFrame (one row per run), got {type(data).__name__}")


def _names(value, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    try:
        names = list(value)
    except TypeError:
        raise MBEInputError(f"{what} must be a column name or a list of names, got {value!r}") from None
    for name in names:
        if not isinstance(name, str):
            raise MBEInputError(f"{what} must be column names (strings), got {name!r}")
    return names


def _check_request(df: pd.DataFrame, metrics: list[str], target: str, controls: list[str],
                   groupby: str | None, cluster: str | None) -> None:
    if not metrics:
        raise MBEInputError("no metric given; name at least one column to audit")
    if not isinstance(target, str):
        raise MBEInputError(f"target must be one column name, got {target!r}")
    wanted = [*metrics, target, *controls, *([groupby] if groupby else []),
              *([cluster] if cluster else [])]
    missing = [name for name in dict.fromkeys(wanted) if name not in df.columns]
    if missing:
        available = ", ".join(map(str, df.columns))
        plural = "s" if len(missing) > 1 else ""
        raise MBEInputError(f"unknown column{plural} {', '.join(map(repr, missing))}; "
                            f"available columns: {available}")
    if target in metrics:
        raise MBEInputError(f"the target {target!r} is also listed as a metric; "
                            "a metric cannot be audited against itself")
    for name in [*metrics, target]:
        if not (pd.api.types.is_numeric_dtype(df[name]) and not pd.api.types.is_bool_dtype(df[name])):
            raise MBEInputError(f"column {name!r} must be numeric (it has dtype {df[name].dtype})")


def _is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _complete_rows(df: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Boolean mask of rows where every column is present and finite."""
    mask = np.ones(len(df), dtype=bool)
    for name in columns:
        col = df[name]
        if _is_numeric(col):
            mask &= np.isfinite(col.to_numpy(dtype=float, na_value=np.nan))
        else:
            mask &= col.notna().to_numpy()
    return mask


def _build_design(frame: pd.DataFrame, metric: str, target: str,
                  controls: list[str]) -> _Design:
    numeric = [c for c in controls if _is_numeric(frame[c])]
    categorical = [c for c in controls if not _is_numeric(frame[c])]
    onehot = (pd.get_dummies(frame[categorical].astype(str), drop_first=True).to_numpy(dtype=float)
              if categorical else np.empty((len(frame), 0)))
    return _Design(metric=frame[metric].to_numpy(dtype=float),
                   target=frame[target].to_numpy(dtype=float),
                   numeric=frame[numeric].to_numpy(dtype=float).reshape(len(frame), -1),
                   onehot=onehot)


def _constant_columns(frame: pd.DataFrame, columns: list[str]) -> list[str]:
    return [c for c in columns if frame[c].nunique(dropna=True) <= 1]


# --------------------------------------------------------------------------- #
# Public statistics                                                           #
# --------------------------------------------------------------------------- #

def partial_rank_corr(df, x: str, y: str, controls: Sequence[str] = ()) -> tuple[float, float, int]:
    r"""Partial Spearman correlation of ``x`` and ``y`` given ``controls``.

    Numeric controls are ranked; other dtypes are one-hot encoded (first level
    dropped).  Rows with a missing or infinite value are dropped.  With no
    controls this is Spearman's rho with its usual t-test p-value.

    Returns
    -------
    (r, p, n) : the correlation of the rank residuals, its two-sided p-value
        from Student's t with :math:`n - 2 - k` degrees of freedom, and the
        number of complete rows.
    """
    df = _as_frame(df)
    controls = [c for c in _names(controls, "controls") if c not in (x, y)]
    _check_request(df, [x], y, controls, None, None)
    frame = df.loc[_complete_rows(df, [x, y, *controls])]
    _require_rows(frame, x, y, controls)
    design = _build_design(frame, x, y, controls)
    _, partial = _rank_correlations(design, np.ones((1, design.n)))
    r = float(partial[0])
    return r, _t_pvalue(r, design.n - 2 - _control_rank(design)), design.n


def _require_rows(frame: pd.DataFrame, metric: str, target: str, controls: list[str]) -> None:
    """Refuse, in one sentence, data on which the partial correlation is undefined."""
    needed = len(controls) + 3
    if len(frame) < needed:
        raise MBEInputError(f"only {len(frame)} complete rows for {metric!r}, but {len(controls)} "
                            f"control(s) need at least {needed}")
    constant = _constant_columns(frame, [metric, target, *controls])
    if constant:
        name = constant[0]
        value = frame[name].iloc[0]
        value = value.item() if hasattr(value, "item") else value
        raise MBEInputError(f"column {name!r} is constant (every complete row is {value!r}); "
                            "it carries no rank information, so drop it")


def bh_qvalues(pvalues: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg q-values; NaN p-values stay NaN and do not count as tests."""
    p = np.asarray(pvalues, dtype=float)
    q = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        q[ok] = stats.false_discovery_control(p[ok], method="bh")
    return q


def _resample_weights(n: int, n_boot: int, clusters: np.ndarray | None,
                      rng: np.random.Generator) -> np.ndarray:
    """Row weights (n_boot, n) of bootstrap resamples: multinomial counts of rows or of clusters."""
    units = n if clusters is None else len(pd.unique(clusters))
    draws = rng.integers(0, units, size=(n_boot, units)) + units * np.arange(n_boot)[:, None]
    counts = np.bincount(draws.ravel(), minlength=n_boot * units).reshape(n_boot, units)
    if clusters is not None:
        counts = counts[:, pd.factorize(clusters)[0]]
    return counts.astype(float)


def _bootstrap(design: _Design, n_boot: int, clusters: np.ndarray | None,
               rng: np.random.Generator, ci: float) -> dict[str, float]:
    """Percentile intervals of raw, partial and their difference (partial - raw)."""
    per_resample = design.n * (design.k + 4)
    chunk = max(1, _CHUNK_ELEMENTS // per_resample)
    raws, partials = [], []
    for start in range(0, n_boot, chunk):
        weights = _resample_weights(design.n, min(chunk, n_boot - start), clusters, rng)
        raw, partial = _rank_correlations(design, weights)
        raws.append(raw)
        partials.append(partial)
    raw, partial = np.concatenate(raws), np.concatenate(partials)
    tails = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
    out = {}
    for name, values in (("raw", raw), ("partial", partial), ("diff", partial - raw)):
        values = values[~np.isnan(values)]
        lo, hi = np.percentile(values, tails) if len(values) else (np.nan, np.nan)
        out[f"{name}_lo"], out[f"{name}_hi"] = float(lo), float(hi)
    return out


def _permutation_p(design: _Design, n_perm: int, blocks: np.ndarray | None,
                   rng: np.random.Generator) -> float:
    r"""Permutation p-value of the partial correlation.

    The residualised metric :math:`e_M` is permuted (within blocks when given)
    and correlated with :math:`e_Y`;
    :math:`p = (1 + \#\{|r_\pi| \ge |r|\}) / (1 + n_{perm})`.
    """
    ones = np.ones((1, design.n))
    ranked = np.stack([stats.rankdata(design.metric), stats.rankdata(design.target)], axis=1)[None]
    controls = None
    if design.k:
        controls = np.column_stack([stats.rankdata(c) for c in design.numeric.T]
                                   + list(design.onehot.T)).reshape(1, design.n, -1)
    res = weighted_residuals(ranked, controls, ones)[0]
    e_m, e_y = res[:, 0], res[:, 1]
    denominator = np.linalg.norm(e_m) * np.linalg.norm(e_y)
    if denominator == 0:
        return float("nan")
    observed = abs(e_m @ e_y) / denominator
    group = np.zeros(design.n) if blocks is None else pd.factorize(blocks)[0].astype(float)
    slots = np.argsort(group, kind="stable")
    exceed = 0
    chunk = max(1, _CHUNK_ELEMENTS // design.n)
    for start in range(0, n_perm, chunk):
        size = min(chunk, n_perm - start)
        shuffled = np.argsort(group[slots] + rng.random((size, design.n)), axis=1)
        perms = np.empty((size, design.n), dtype=int)
        perms[:, slots] = slots[shuffled]
        r_perm = np.abs(e_m[perms] @ e_y) / denominator
        exceed += int(np.sum(r_perm >= observed - 1e-12))
    return (1 + exceed) / (1 + n_perm)


# --------------------------------------------------------------------------- #
# The audit                                                                   #
# --------------------------------------------------------------------------- #

@dataclass
class _Settings:
    effect: float
    washout: float
    bootstrap: int
    permutations: int
    cluster: str | None
    blocks: str | None
    seed: int
    ci: float


def _audit_one(frame: pd.DataFrame, metric: str, target: str, controls: list[str],
               group: str, settings: _Settings, strict: bool, index: int) -> dict:
    """One row of the audit table: one metric in one group.

    Resampling for metric number ``index`` draws from ``default_rng(seed + index)``,
    so a metric's intervals do not depend on which other metrics are audited.
    """
    controls = [c for c in controls if c not in (metric, target)]
    extra = [c for c in (settings.cluster, settings.blocks) if c]
    mask = _complete_rows(frame, [metric, target, *controls, *extra])
    clean = frame.loc[mask]
    row = {"group": group, "metric": metric, "n": int(mask.sum()),
           "n_dropped": int((~mask).sum()), "controls": ",".join(controls), "note": ""}
    if strict:
        _require_rows(clean, metric, target, controls)
    else:
        dropped = _constant_columns(clean, controls)
        controls = [c for c in controls if c not in dropped]
        row["controls"] = ",".join(controls)
        problem = _group_problem(clean, metric, target, controls)
        if problem:
            row.update(raw_r=np.nan, raw_p=np.nan, partial_r=np.nan, partial_p=np.nan,
                       diff=np.nan, classification="insufficient-data", note=problem)
            return row
        if dropped:
            row["note"] = f"constant in this group, not controlled: {', '.join(dropped)}"
    design = _build_design(clean, metric, target, controls)
    raw, partial = (float(v[0]) for v in _rank_correlations(design, np.ones((1, design.n))))
    row.update(raw_r=raw, raw_p=_t_pvalue(raw, design.n - 2),
               partial_r=partial, partial_p=_t_pvalue(partial, design.n - 2 - _control_rank(design)),
               diff=partial - raw,
               classification=classify(raw, partial, settings.effect, settings.washout))
    rng = np.random.default_rng(settings.seed + index)
    if settings.bootstrap:
        clusters = clean[settings.cluster].to_numpy() if settings.cluster else None
        row.update(_bootstrap(design, settings.bootstrap, clusters, rng, settings.ci))
    if settings.permutations:
        blocks = clean[settings.blocks].to_numpy() if settings.blocks else None
        row["perm_p"] = _permutation_p(design, settings.permutations, blocks, rng)
    return row


def _group_problem(frame: pd.DataFrame, metric: str, target: str, controls: list[str]) -> str:
    """Why a group cannot be audited ('' when it can)."""
    if len(frame) < len(controls) + 3:
        return f"{len(frame)} complete rows, need {len(controls) + 3}"
    constant = _constant_columns(frame, [metric, target])
    return f"{constant[0]} is constant in this group" if constant else ""


def audit(df, metrics, target: str, controls=(), *, groupby: str | None = None,
          bootstrap: int = 0, permutations: int = 0, cluster: str | None = None,
          blocks: str | None = None, seed: int = 0, effect: float = EFFECT,
          washout: float = WASHOUT, ci: float = 0.95) -> AuditResult:
    r"""Audit metrics against a target after controlling for baselines and design.

    Parameters
    ----------
    df : DataFrame or mapping of equal-length columns
        One row per trained model.
    metrics : str or list of str
        Candidate metric columns.
    target : str
        The outcome, e.g. final test accuracy.
    controls : str or list of str
        Baselines and design variables.  Numeric dtypes are ranked, other
        dtypes one-hot encoded (first level dropped).  A control equal to the
        metric or the target is dropped from that metric's controls.
    groupby : str, optional
        Also audit inside each level of this column (the column is removed
        from the controls there, as are controls constant in the group).
        Group ``"all"`` is the pooled audit.
    bootstrap : int
        Number of bootstrap resamples for percentile intervals of raw,
        partial and ``diff = partial - raw`` (0 = none).
    permutations : int
        Number of permutations of the residualised metric for ``perm_p``.
    cluster : str, optional
        Resample whole groups of rows (e.g. one configuration over seeds).
    blocks : str, optional
        Permute only within the levels of this column.
    seed : int
        Seed of the bootstrap and permutation generator.
    effect, washout : float
        Thresholds of :func:`classify`.
    ci : float
        Coverage of the bootstrap intervals.

    Returns
    -------
    AuditResult
        ``.table`` has one row per (group, metric) with ``n, n_dropped,
        raw_r, raw_p, partial_r, partial_p, diff, classification, q`` (BH
        q-values of ``partial_p`` across the table) and, when requested,
        ``raw_lo, raw_hi, partial_lo, partial_hi, diff_lo, diff_hi, perm_p,
        perm_q``.

    Raises
    ------
    MBEInputError
        One sentence naming the problem: unknown column, target listed as a
        metric, non-numeric metric, a constant column, too few complete rows.
    """
    df = _as_frame(df)
    metrics, controls = _names(metrics, "metrics"), _names(controls, "controls")
    settings = _check_settings(bootstrap, permutations, effect, washout, ci, seed,
                               cluster, blocks)
    _check_request(df, metrics, target, controls, groupby, cluster)
    if blocks and blocks not in df.columns:
        raise MBEInputError(f"unknown column {blocks!r} for blocks; available columns: "
                            f"{', '.join(map(str, df.columns))}")
    if len(set(metrics)) != len(metrics):
        raise MBEInputError("a metric is listed twice; list each metric once")
    rows = [_audit_one(df, m, target, controls, "all", settings, True, i)
            for i, m in enumerate(metrics)]
    if groupby:
        inner = [c for c in controls if c != groupby]
        for level, frame in df.groupby(groupby, sort=True):
            rows += [_audit_one(frame, m, target, inner, f"{groupby}={level}", settings, False, i)
                     for i, m in enumerate(metrics)]
    return AuditResult(table=_finish_table(rows, settings), data=df, metrics=metrics,
                       target=target, controls=controls, groupby=groupby,
                       settings=vars(settings))


def _check_settings(bootstrap, permutations, effect, washout, ci, seed, cluster, blocks) -> _Settings:
    for name, value in (("bootstrap", bootstrap), ("permutations", permutations), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise MBEInputError(f"{name} must be a non-negative integer, got {value!r}")
    if not 0 < washout <= effect < 1:
        raise MBEInputError(f"thresholds must satisfy 0 < washout <= effect < 1, "
                            f"got washout={washout}, effect={effect}")
    if not 0 < ci < 1:
        raise MBEInputError(f"ci must be a coverage between 0 and 1, got {ci}")
    return _Settings(effect, washout, int(bootstrap), int(permutations), cluster, blocks,
                     int(seed), ci)


def _finish_table(rows: list[dict], settings: _Settings) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    table["q"] = bh_qvalues(table["partial_p"])
    if settings.permutations:
        table["perm_q"] = bh_qvalues(table["perm_p"])
    first = ["group", "metric", "n", "n_dropped", "raw_r", "raw_p", "partial_r", "partial_p",
             "diff", "classification"]
    rest = [c for c in table.columns if c not in first and c not in ("controls", "note")]
    return table[first + rest + ["controls", "note"]]


# --------------------------------------------------------------------------- #
# The result object                                                           #
# --------------------------------------------------------------------------- #

_SHOWN = ["group", "metric", "n", "n_dropped", "raw_r", "raw_lo", "raw_hi", "partial_r", "partial_lo",
          "partial_hi", "partial_p", "perm_p", "q", "classification"]


@dataclass
class AuditResult:
    """The audit table plus what is needed to draw and explain it.

    Prints as a table in the terminal (``show()``), renders as HTML in a
    notebook, converts with ``to_frame()`` / ``to_markdown()`` and draws the
    two-panel figure with ``plot()``.
    """

    table: pd.DataFrame
    data: pd.DataFrame = field(repr=False)
    metrics: list[str]
    target: str
    controls: list[str]
    groupby: str | None = None
    settings: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """A copy of the table (one row per group and metric)."""
        return self.table.copy()

    def classification(self, metric: str, group: str = "all") -> str:
        """The outcome class of one metric in one group."""
        hit = self.table[(self.table.metric == metric) & (self.table.group == group)]
        if hit.empty:
            raise MBEInputError(f"no row for metric {metric!r} in group {group!r}; metrics: "
                                f"{', '.join(self.metrics)}")
        return str(hit.classification.iloc[0])

    def _display(self) -> pd.DataFrame:
        shown = self.table[[c for c in _SHOWN if c in self.table.columns]].copy()
        if (shown.group == "all").all():
            shown = shown.drop(columns="group")
        if not shown.n_dropped.any():
            shown = shown.drop(columns="n_dropped")
        return shown

    def _caption(self) -> str:
        controls = ", ".join(self.controls) if self.controls else "nothing"
        return f"MBE audit: target {self.target!r}, controlling for {controls}"

    def _formatted(self) -> pd.DataFrame:
        out = self._display().astype(object)
        for col in out.columns:
            if col.endswith("_p") or col in ("q", "perm_q"):
                out[col] = [f"{v:.2g}" if pd.notna(v) else "–" for v in self.table[col]]
            elif col.endswith(("_r", "_lo", "_hi")):
                out[col] = [f"{v:+.3f}" if pd.notna(v) else "–" for v in self.table[col]]
        return out

    def to_markdown(self) -> str:
        """The table as a GitHub-flavoured markdown block with a caption line."""
        shown = self._formatted()
        lines = [f"**{self._caption()}**", "",
                 "| " + " | ".join(shown.columns) + " |",
                 "|" + "|".join("---" for _ in shown.columns) + "|"]
        lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in shown.itertuples(index=False)]
        notes = self.table.loc[self.table.note != "", ["group", "metric", "note"]]
        lines += [""] + [f"- {r.group} / {r.metric}: {r.note}" for r in notes.itertuples()]
        return "\n".join(lines).rstrip() + "\n"

    def _repr_html_(self) -> str:
        return (self._formatted().style.hide(axis="index")
                .set_caption(self._caption()).to_html())

    def __rich__(self):
        from rich.table import Table

        colours = {"survives": "green", "washout": "red", "sign-inversion": "magenta",
                   "reverse-inversion": "magenta", "hidden-after-control": "yellow",
                   "insufficient-data": "dim"}
        shown = self._formatted()
        table = Table(title=self._caption(), header_style="bold")
        for col in shown.columns:
            table.add_column(col, justify="left" if col in ("group", "metric", "classification")
                             else "right")
        for row in shown.itertuples(index=False):
            cells = [str(v) for v in row]
            style = colours.get(cells[-1], "")
            cells[-1] = f"[{style}]{cells[-1]}[/]" if style else cells[-1]
            table.add_row(*cells)
        return table

    def show(self, console=None) -> None:
        """Print the table in the terminal (rich)."""
        from rich.console import Console

        (console or Console()).print(self)

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=160, record=True, file=io.StringIO())
        console.print(self)
        return console.export_text()

    def plot(self, metric: str | None = None, group: str = "all"):
        """Two-panel figure: metric vs target (ranks, with fit) and the absolute raw vs partial rho.

        See :func:`mbe_helpers.plots.audit_figure`.
        """
        from mbe_helpers.plots import audit_figure

        return audit_figure(self, metric=metric, group=group)

