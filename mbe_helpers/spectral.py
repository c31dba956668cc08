r"""Weight-matrix spectra: effective rank (SCI), stable rank, norms, ESD and its power-law tail.

numpy in, floats / DataFrames out.  torch is imported only by the function
that walks a model; a mapping ``{name: array}`` of weights needs no torch.

Which matrices
--------------
Every ``Linear`` weight (n_out x n_in) and every ``Conv2d`` weight
(C_out, C_in/groups, k_h, k_w), the latter read one of two ways:

* ``conv="flatten"`` -- one (C_out, C_in k_h k_w) matrix, as in the seeds;
* ``conv="slices"`` -- the k_h k_w slices W[:, :, i, j] (C_out x C_in), as
  WeightWatcher does.  Every quantity below is then that of the
  block-diagonal matrix diag(W_11, ..., W_kk), whose singular values are the
  pooled singular values of the slices (so ``rank_max`` = k_h k_w min(C_out, C_in)).

(``nn.MultiheadAttention`` keeps its input projection as a bare parameter, so
only its ``out_proj`` Linear is read.)

Quantities (per layer, singular values :math:`\sigma_k`)
--------------------------------------------------------
* effective rank :math:`e^{H(p)}`, :math:`p_k = \sigma_k / \sum_j \sigma_j`
  (Roy & Vetterli), and SCI = erank / rank_max with rank_max = min(n_out, n_in);
* stable rank :math:`\lVert W\rVert_F^2 / \lVert W\rVert_2^2`, nuclear,
  spectral and Frobenius norms;
* the ESD: eigenvalues :math:`\lambda_k = \sigma_k^2 / N` of :math:`W^\top W / N`
  with N = max(n_out, n_in), M = min(n_out, n_in), aspect ratio Q = N / M
  (Martin & Mahoney);
* the ESD's power-law tail (:func:`fit_power_law`), :math:`\mu = 2(\alpha-1)`
  with the seed's phenomenology bins (:func:`phenomenology`), and the
  weighted alpha :math:`\alpha \log \lambda_\max` whose layer mean is
  alpha-hat (:func:`alpha_hat`).

Singular values at or below :math:`\max(n_{out}, n_{in})\, \epsilon\,
\sigma_\max` (numpy's ``matrix_rank`` tolerance, :math:`\epsilon` the machine
epsilon of the weights' dtype) are numerical zeros: they are left out of the
entropy and of the ESD.  Degenerate layers give NaN and say why in ``reason``
(all-zero or non-finite weights; too few eigenvalues for a tail).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mbe_helpers.errors import MBEInputError

CONV_MODES = ("flatten", "slices")
MIN_TAIL = 10
LOG_BASES = {"e": "ln", "10": "log10"}
PHENOMENOLOGY = {
    "heavy-tailed": "mu <= 4 (alpha <= 3): predicted well regularised, good test performance",
    "moderately heavy-tailed": "4 < mu < 7 (3 < alpha < 4.5): predicted somewhat regularised",
    "random-like": "mu >= 7 (alpha >= 4.5): predicted not trained or not regularised",
    "unfitted": "no power-law fit (see reason)",
}
"""The seed's bins of :math:`\\mu = 2(\\alpha - 1)` and what each predicts."""

_KS_BLOCK = 2 ** 22  # numbers held at once by the vectorised KS search


# --------------------------------------------------------------------------- #
# Power-law fit                                                               #
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class PowerLawFit:
    r"""Continuous power law :math:`p(x) = \frac{\alpha-1}{x_{min}} (x / x_{min})^{-\alpha}`, x >= x_min.

    Attributes
    ----------
    alpha, x_min, ks_distance : float
        Exponent, lower cut-off and Kolmogorov-Smirnov distance of the tail;
        NaN when no fit was possible.
    n_tail : int
        Eigenvalues at or above ``x_min`` (0 without a fit).
    n : int
        Positive eigenvalues the fit saw.
    reason : str
        Empty, or why the fit is NaN.

    Examples
    --------
    >>> fit = fit_power_law([1.0, 2.0, 3.0])
    >>> fit.ok, fit.n, fit.reason
    (False, 3, 'only 3 positive eigenvalue(s), fewer than min_tail=10')
    """

    alpha: float
    x_min: float
    ks_distance: float
    n_tail: int
    n: int
    reason: str = ""

    @property
    def ok(self) -> bool:
        """Whether a fit was made."""
        return not self.reason

    @property
    def alpha_stderr(self) -> float:
        r"""Asymptotic standard error :math:`(\alpha - 1) / \sqrt{n_{tail}}` of the MLE."""
        return (self.alpha - 1) / math.sqrt(self.n_tail) if self.ok else math.nan

    def pdf(self, x: np.ndarray) -> np.ndarray:
        """Density of the fitted tail model at ``x`` (0 below ``x_min``)."""
        x = np.asarray(x, dtype=float)
        dens = (self.alpha - 1) / self.x_min * (np.maximum(x, self.x_min) / self.x_min) ** (-self.alpha)
        return np.where(x >= self.x_min, dens, 0.0)


def fit_power_law(eigenvalues, *, min_tail: int = MIN_TAIL) -> PowerLawFit:
    r"""Fit a power law to the tail of a spectrum (Clauset, Shalizi & Newman 2009).

    For each candidate :math:`x_{min}` (a distinct value leaving at least
    ``min_tail`` points :math:`x_i \ge x_{min}` in the tail, :math:`n` of them)
    the continuous maximum-likelihood exponent is

    .. math:: \hat\alpha = 1 + n \Big/ \sum_{x_i \ge x_{min}} \log(x_i / x_{min}),

    and the Kolmogorov-Smirnov distance is :math:`D = \max_j |P(x_{(j)}) -
    j/n|` over the sorted tail, with :math:`P(x) = 1 - (x/x_{min})^{1-\alpha}`
    (the empirical CDF below each point, as in Clauset's ``plfit`` and the
    ``powerlaw`` package).  The :math:`x_{min}` with the smallest D wins; all
    candidates are evaluated at once with numpy.  With ``min_tail`` small this
    reproduces ``powerlaw.Fit``; the floor keeps the search from choosing a
    tail too short to estimate :math:`\alpha`.

    Parameters
    ----------
    eigenvalues : array_like
        1-d, finite, with a positive value when any is negative; values
        <= 0 are dropped (they carry no tail).
    min_tail : int
        Smallest tail the search may choose (>= 2).

    Returns
    -------
    PowerLawFit
        NaN fields and a ``reason`` when fewer than ``min_tail`` positive
        values exist or all candidate tails are constant.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).pareto(2.0, 500) + 1.0   # density ~ x^-3 from x = 1
    >>> fit = fit_power_law(x)
    >>> round(fit.alpha, 1), fit.ok, fit.n
    (2.9, True, 500)
    """
    values = _eigenvalue_array(eigenvalues)
    if not isinstance(min_tail, (int, np.integer)) or min_tail < 2:
        raise MBEInputError(f"min_tail must be an integer >= 2, got {min_tail!r}.")
    x = np.sort(values[values > 0])
    n = x.size
    if n < min_tail:
        return _no_fit(n, f"only {n} positive eigenvalue(s), fewer than min_tail={min_tail}")
    logx = np.log(x)
    first = np.flatnonzero(np.r_[True, x[1:] != x[:-1]])  # first index of each distinct value
    ks = first[n - first >= min_tail]
    tail_sizes = n - ks
    suffix = np.cumsum(logx[::-1])[::-1]
    spread = suffix[ks] - tail_sizes * logx[ks]
    keep = spread > 0
    if not keep.any():
        return _no_fit(n, "every candidate tail holds a single repeated value")
    ks, tail_sizes = ks[keep], tail_sizes[keep]
    alphas = 1 + tail_sizes / spread[keep]
    distances = _ks_distances(logx, np.searchsorted(x, x, side="left"), ks, alphas)
    best = int(np.argmin(distances))
    return PowerLawFit(float(alphas[best]), float(x[ks[best]]), float(distances[best]),
                       int(tail_sizes[best]), n)


def _eigenvalue_array(eigenvalues) -> np.ndarray:
    """``eigenvalues`` as a 1-d finite float array, or one sentence why it cannot be fitted."""
    try:
        values = np.asarray(eigenvalues, dtype=float)
    except (TypeError, ValueError):
        raise MBEInputError(f"eigenvalues must be numbers, got {type(eigenvalues).__name__}; pass "
                            "a 1-d array of the spectrum's values.") from None
    if values.ndim != 1:
        raise MBEInputError(f"eigenvalues must be a 1-d array, got shape {values.shape}.")
    if not np.isfinite(values).all():
        raise MBEInputError("eigenvalues contain NaN or infinite values.")
    if values.size and values.max() <= 0 and values.min() < 0:
        raise MBEInputError(f"eigenvalues has no positive value (the largest is "
                            f"{values.max():.3g}), so there is no tail to fit; pass the "
                            "eigenvalues themselves (e.g. of W.T @ W / n), not their negatives "
                            "or logarithms.")
    return values


def _ks_distances(logx: np.ndarray, below: np.ndarray, ks: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """KS distance of the fitted tail for every candidate start index in ``ks`` (vectorised)."""
    n = logx.size
    out = np.empty(ks.size)
    step = max(1, _KS_BLOCK // n)
    for s in range(0, ks.size, step):
        k, a = ks[s:s + step], alphas[s:s + step]
        idx = np.arange(k[0], n)
        log_ratio = np.maximum(logx[None, k[0]:] - logx[k, None], 0.0)
        model_cdf = -np.expm1((1 - a[:, None]) * log_ratio)
        data_cdf = (below[None, k[0]:] - k[:, None]) / (n - k)[:, None]
        gap = np.where(idx[None, :] >= k[:, None], np.abs(model_cdf - data_cdf), 0.0)
        out[s:s + step] = gap.max(1)
    return out


def _no_fit(n: int, reason: str) -> PowerLawFit:
    return PowerLawFit(math.nan, math.nan, math.nan, 0, n, reason)


def phenomenology(alpha: float) -> str:
    r"""The seed's label for a layer's tail exponent, binned on :math:`\mu = 2(\alpha - 1)`.

    See :data:`PHENOMENOLOGY` for the bins and what each predicts.

    Examples
    --------
    >>> phenomenology(2.5), phenomenology(4.0), phenomenology(6.0)
    ('heavy-tailed', 'moderately heavy-tailed', 'random-like')
    >>> phenomenology(float("nan"))
    'unfitted'
    """
    if alpha is None or not np.isfinite(alpha):
        return "unfitted"
    mu = 2 * (alpha - 1)
    if mu <= 4:
        return "heavy-tailed"
    return "moderately heavy-tailed" if mu < 7 else "random-like"


# --------------------------------------------------------------------------- #
# One matrix                                                                  #
# --------------------------------------------------------------------------- #

def matrix_spectrum(blocks: np.ndarray, *, log_base: str = "e", min_tail: int = MIN_TAIL,
                    eps: float | None = None) -> dict[str, float | int | str]:
    r"""Spectral quantities of one matrix, or of a block-diagonal stack of equal blocks.

    Parameters
    ----------
    blocks : ndarray
        (n_out, n_in), or (B, n_out, n_in) for diag(blocks[0], ..., blocks[B-1]).
    log_base : {"e", "10"}
        Logarithm of :math:`\lambda_\max` in the weighted alpha.
    min_tail : int
        Passed to :func:`fit_power_law`.
    eps : float, optional
        Machine epsilon for the rank tolerance (default: that of ``blocks.dtype``,
        float64 for integer input).

    Returns
    -------
    dict
        The columns of :func:`weight_spectra` except ``layer``, ``kind`` and ``conv``.

    Examples
    --------
    >>> import numpy as np
    >>> s = matrix_spectrum(np.diag([3.0, 1.0, 1.0]))
    >>> s["rank_max"], round(s["stable_rank"], 3), round(s["sci"], 3), s["reason"]
    (3, 1.222, 0.862, 'only 3 positive eigenvalue(s), fewer than min_tail=10')
    """
    suffix = _log_suffix(log_base)
    arr = np.asarray(blocks)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or min(arr.shape) == 0:
        raise MBEInputError("blocks must be a non-empty (n_out, n_in) or (B, n_out, n_in) array, "
                            f"got shape {arr.shape}.")
    n_blocks, n_out, n_in = arr.shape
    big, small = max(n_out, n_in), min(n_out, n_in)
    row = {"n_out": n_out, "n_in": n_in, "n_blocks": n_blocks, "rank_max": n_blocks * small,
           "q": big / small}
    if not np.isfinite(arr).all():
        return {**row, **_nan_spectrum(suffix, "non-finite weights")}
    sv, kept = _singular_values(arr, eps)
    if kept.size == 0:
        zero = {"nuclear_norm": 0.0, "spectral_norm": 0.0, "frobenius_norm": 0.0, "lambda_max": 0.0}
        return {**row, **_nan_spectrum(suffix, "all-zero matrix"), **zero}
    eigs = kept ** 2 / big
    fit = fit_power_law(eigs, min_tail=min_tail)
    lam_max = float(eigs[0])
    return {
        **row, **_rank_quantities(sv, kept, row["rank_max"]), "lambda_max": lam_max, "n_eigs": int(eigs.size),
        "alpha": fit.alpha, "x_min": fit.x_min, "ks_distance": fit.ks_distance, "n_tail": fit.n_tail,
        f"alpha_weighted_{suffix}": fit.alpha * _log(lam_max, log_base),
        "mu": 2 * (fit.alpha - 1), "phenomenology": phenomenology(fit.alpha), "reason": fit.reason,
    }


def _singular_values(arr: np.ndarray, eps: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All singular values of the blocks, and those above the rank tolerance (descending)."""
    if eps is None:
        floating = np.issubdtype(arr.dtype, np.floating)
        eps = float(np.finfo(arr.dtype if floating else np.float64).eps)
    sv = np.linalg.svd(arr.astype(np.float64), compute_uv=False).ravel()
    s_max = float(sv.max())
    kept = np.sort(sv[sv > max(arr.shape[1:]) * eps * s_max])[::-1] if s_max > 0 else sv[:0]
    return sv, kept


def _rank_quantities(sv: np.ndarray, kept: np.ndarray, rank_max: int) -> dict[str, float]:
    """Effective rank, SCI, stable rank and norms from the singular values."""
    p = kept / kept.sum()
    erank = math.exp(float(-(p * np.log(p)).sum()))
    s_max, sq = float(kept[0]), float((sv ** 2).sum())
    return {"erank": erank, "sci": erank / rank_max, "stable_rank": sq / s_max ** 2,
            "nuclear_norm": float(sv.sum()), "spectral_norm": s_max, "frobenius_norm": math.sqrt(sq)}


def _nan_spectrum(suffix: str, reason: str) -> dict[str, float | int | str]:
    nan = math.nan
    return {"erank": nan, "sci": nan, "stable_rank": nan, "nuclear_norm": nan, "spectral_norm": nan,
            "frobenius_norm": nan, "lambda_max": nan, "n_eigs": 0, "alpha": nan, "x_min": nan,
            "ks_distance": nan, "n_tail": 0, f"alpha_weighted_{suffix}": nan, "mu": nan,
            "phenomenology": "unfitted", "reason": reason}


def _log_suffix(log_base) -> str:
    key = str(log_base)
    if key not in LOG_BASES:
        raise MBEInputError(f"unknown log base {log_base!r}; choose 'e' (natural, as in seed 003) or '10' "
                            "(as WeightWatcher).")
    return LOG_BASES[key]


def _log(value: float, log_base) -> float:
    return math.log(value) if str(log_base) == "e" else math.log10(value)


# --------------------------------------------------------------------------- #
# Models                                                                      #
# --------------------------------------------------------------------------- #

def layer_weights(model, conv: str = "flatten") -> dict[str, tuple[str, np.ndarray]]:
    """The matrices read from a model or a mapping of weights: ``{layer: (kind, blocks)}``.

    ``blocks`` has shape (B, n_out, n_in): B = 1 except for ``conv="slices"``
    (B = k_h k_w).  A mapping ``{name: array}`` holds 2-d (dense) or 4-d
    (convolution, (C_out, C_in, k_h, k_w)) arrays; anything else with
    ``named_modules`` is walked as a torch model for ``Linear`` and ``Conv2d``.

    Examples
    --------
    >>> import numpy as np
    >>> w = layer_weights({"fc": np.ones((3, 4)), "conv": np.ones((8, 2, 3, 3))})
    >>> {name: (kind, blocks.shape) for name, (kind, blocks) in w.items()}
    {'fc': ('dense', (1, 3, 4)), 'conv': ('conv', (1, 8, 18))}
    >>> layer_weights({"conv": np.ones((8, 2, 3, 3))}, conv="slices")["conv"][1].shape
    (9, 8, 2)
    """
    if conv not in CONV_MODES:
        raise MBEInputError(f"unknown conv mode {conv!r}; choose 'flatten' or 'slices'.")
    if isinstance(model, Mapping):
        arrays = {name: np.asarray(w) for name, w in model.items()}
    elif hasattr(model, "named_modules"):
        arrays = _torch_weights(model)
    else:
        raise MBEInputError("model must be a torch nn.Module or a mapping {name: weight array}.")
    out = {}
    for name, w in arrays.items():
        if w.ndim == 2:
            out[name] = ("dense", w[None])
        elif w.ndim == 4:
            out[name] = ("conv", _conv_blocks(w, conv))
        else:
            raise MBEInputError(f"weight {name!r} has {w.ndim} dimensions; expected 2 (dense) or 4 (convolution).")
    if not out:
        raise MBEInputError("the model has no Linear or Conv2d weight to analyse.")
    return out


def _torch_weights(model) -> dict[str, np.ndarray]:
    """Linear and Conv2d weights of a torch model as numpy arrays in their own dtype."""
    import torch
    from torch import nn

    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            w = module.weight.detach().cpu()
            weights[name or type(module).__name__] = (w if w.dtype in (torch.float32, torch.float64)
                                                     else w.to(torch.float32)).numpy()
    return weights


def _conv_blocks(w: np.ndarray, conv: str) -> np.ndarray:
    c_out, c_in, kh, kw = w.shape
    if conv == "flatten":
        return w.reshape(1, c_out, c_in * kh * kw)
    return np.ascontiguousarray(w.transpose(2, 3, 0, 1)).reshape(kh * kw, c_out, c_in)


def layer_esds(model, conv: str = "flatten") -> dict[str, np.ndarray]:
    r"""Eigenvalues :math:`\sigma_k^2 / N` (above the rank tolerance) of every layer, descending.

    Examples
    --------
    >>> import numpy as np
    >>> layer_esds({"w": np.diag([3.0, 1.0, 0.0])})["w"]
    array([3.        , 0.33333333])
    """
    out = {}
    for name, (_, blocks) in layer_weights(model, conv).items():
        kept = _singular_values(blocks)[1] if np.isfinite(blocks).all() else np.array([])
        out[name] = kept ** 2 / max(blocks.shape[1:])
    return out


def weight_spectra(model, conv: str = "flatten", *, log_base: str = "e",
                   min_tail: int = MIN_TAIL) -> pd.DataFrame:
    """One row per Linear / Conv2d weight with every spectral quantity of the module docstring.

    Parameters
    ----------
    model : nn.Module or Mapping[str, ndarray]
    conv : {"flatten", "slices"}
        How convolution kernels become matrices.
    log_base : {"e", "10"}
        Base of :math:`\\log \\lambda_\\max` in ``alpha_weighted_ln`` /
        ``alpha_weighted_log10`` (the column is named after it).
    min_tail : int
        Smallest power-law tail (see :func:`fit_power_law`).

    Returns
    -------
    DataFrame
        Columns ``layer, kind, conv, n_out, n_in, n_blocks, rank_max, q, erank,
        sci, stable_rank, nuclear_norm, spectral_norm, frobenius_norm,
        lambda_max, n_eigs, alpha, x_min, ks_distance, n_tail,
        alpha_weighted_<base>, mu, phenomenology, reason``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> table = weight_spectra({"fc1": rng.normal(size=(64, 32)), "fc2": rng.normal(size=(3, 64))})
    >>> table[["layer", "n_out", "n_in", "rank_max", "n_eigs"]]
      layer  n_out  n_in  rank_max  n_eigs
    0   fc1     64    32        32      32
    1   fc2      3    64         3       3
    >>> table.alpha.notna().tolist()   # fc2 has too few eigenvalues for a power-law tail
    [True, False]
    """
    rows = []
    for name, (kind, blocks) in layer_weights(model, conv).items():
        spectrum = matrix_spectrum(blocks, log_base=log_base, min_tail=min_tail)
        rows.append({"layer": name, "kind": kind, "conv": conv if kind == "conv" else "", **spectrum})
    return pd.DataFrame(rows)


def alpha_hat(model, log_base: str = "e", *, conv: str = "flatten", min_tail: int = MIN_TAIL) -> float:
    r"""Martin, Peng & Mahoney's :math:`\hat\alpha = \frac1L \sum_l \alpha_l \log \lambda_{\max,l}`.

    The mean runs over the L layers with a power-law fit (layers without one
    are listed with their reason by :func:`weight_spectra`); NaN when no layer
    has a fit.  ``log_base`` is ``"e"`` (seed 003) or ``"10"`` (WeightWatcher).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> round(alpha_hat({"fc1": rng.normal(size=(128, 64))}), 2)
    5.46
    >>> alpha_hat({"tiny": rng.normal(size=(3, 4))})   # too few eigenvalues for a tail
    nan
    """
    table = weight_spectra(model, conv, log_base=log_base, min_tail=min_tail)
    values = table[f"alpha_weighted_{_log_suffix(log_base)}"].dropna()
    return float(values.mean()) if len(values) else math.nan


def spectral_metrics(model, batch=None, *, conv: str = "flatten", log_base: str = "e",
                     min_tail: int = MIN_TAIL) -> dict[str, float]:
    """Network-level summaries as a probe (``batch`` is ignored: weights need no data).

    Returns ``sci`` (mean SCI over layers), ``stable_rank_mean``,
    ``alpha_mean`` (over fitted layers), ``alpha_hat_<base>``, ``n_layers`` and
    ``n_layers_fitted``.

    Examples
    --------
    >>> import torch
    >>> from mbe_helpers.models import MLP
    >>> _ = torch.manual_seed(0)
    >>> values = spectral_metrics(MLP(64, [32], 10))
    >>> sorted(values)
    ['alpha_hat_ln', 'alpha_mean', 'n_layers', 'n_layers_fitted', 'sci', 'stable_rank_mean']
    >>> values["n_layers"], round(values["sci"], 2)
    (2.0, 0.94)
    """
    table = weight_spectra(model, conv, log_base=log_base, min_tail=min_tail)
    suffix = _log_suffix(log_base)
    fitted = table[table.alpha.notna()]
    return {
        "sci": float(table.sci.mean()),
        "stable_rank_mean": float(table.stable_rank.mean()),
        "alpha_mean": float(fitted.alpha.mean()) if len(fitted) else math.nan,
        f"alpha_hat_{suffix}": float(fitted[f"alpha_weighted_{suffix}"].mean()) if len(fitted) else math.nan,
        "n_layers": float(len(table)),
        "n_layers_fitted": float(len(fitted)),
    }
