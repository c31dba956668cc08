r"""Per-sample-gradient geometry: the dual Gram matrix and the FIM family.

For a batch :math:`(x_i, y_i)_{i=1}^N`, a model with trainable parameters
:math:`\theta \in \mathbb{R}^P` (evaluated in eval mode) and a per-sample loss
:math:`\ell_i`, let :math:`g_i = \nabla_\theta \ell_i` and :math:`G \in
\mathbb{R}^{N \times P}` the matrix with rows :math:`g_i`.  The empirical
Fisher :math:`F = G^\top G / N` (P x P) and the *dual Gram*

.. math:: D = G G^\top / N \qquad (N \times N)

share their non-zero eigenvalues :math:`\lambda_k`.  :func:`fim_metrics` turns
one such spectrum into the whole family (``fim_norm``, ``fisher_trace``, ...;
see :data:`FIM_KEYS` and :func:`gram_metrics`).

The engine
----------
:func:`per_sample_gram` never forms :math:`G` for the layers it knows.  One
batched forward pass records, for every ``Linear``, ``Conv2d`` and
``LayerNorm`` call, the layer input :math:`A` (per sample and position) and one
backward pass of :math:`\sum_i \ell_i` returns :math:`B = \partial \sum_i
\ell_i / \partial z` for the layer output :math:`z` (``torch.autograd.grad`` on
the outputs: no weight gradient is ever formed).  Because samples do not
interact in eval mode, row :math:`i` of :math:`B` is the gradient of
:math:`\ell_i` alone, and a weight's per-sample gradient is
:math:`g_i = \sum_t B_{it}^\top [A_{it}, 1]` (the 1 for the bias).  Its Gram
contribution is computed one of two ways:

* **pairs** -- :math:`\langle g_i, g_j\rangle = \sum_{t,s} ([A_{it},1] \cdot
  [A_{js},1])(B_{it} \cdot B_{js})`, about :math:`N^2 T^2 (a + b)`
  multiply-adds for T positions, input width a and output width b.  With one
  position (plain MLPs, residual MLPs) this is the Hadamard product
  :math:`(A A^\top + 1) \circ (B B^\top)`, and :math:`G` is never formed;
* **materialise** -- form this layer's per-sample gradients and add their
  Gram, about :math:`N T a b + N^2 a b` multiply-adds, chunked over output
  features so that at most ``2**26`` numbers are held at once.  Linear layers
  use one batched matrix product; Conv2d layers one ``convolution_backward``
  call with the batch folded into the groups (the trick ``torch.func`` uses),
  which is faster than ``unfold`` + ``bmm``.

``method="auto"`` picks, per layer, the rule with the smaller count above: the
pair sum for one position (always) and for a handful of positions with wide
layers; materialisation for convolutions with many positions (for a 32 x 32
image the pair sum is over 100x slower).  Parameters of any other module
(attention, embeddings, bare ``nn.Parameter`` such as a CLS token, BatchNorm
in eval mode, tied weights) get their per-sample gradients from
``torch.func`` (``functional_call`` + ``vmap(grad)``, ``chunk_size`` samples at
a time), which costs an extra per-sample forward and backward and
:math:`N \times P_\text{rest}` memory.

Limitations: a recorded layer's parameters must be used only through that
layer's ``forward`` and its input must be batch-first (a layer that sees a
tensor whose first dimension is not N is handed to ``torch.func``).

Eigenvalue floor
----------------
Eigenvalues are counted in the entropy only above a floor.  The default is
relative, :math:`\lambda > N \epsilon \lambda_\max` with :math:`\epsilon` the
machine epsilon of the dtype the Gram was computed in, the rule numpy's
``matrix_rank`` uses: an eigen-solver's error on a symmetric N x N matrix is
of order :math:`N \epsilon \lVert D\rVert_2`, so eigenvalues below it are
indistinguishable from zero.  The seed's absolute cut (1e-12) fails in float32:
when P < N, the N - P eigenvalues that are exactly zero come out as
:math:`\pm 10^{-7} \lambda_\max` noise and about half pass the cut (76 of 120
kept for P = 35 in the tests): the entropy moves little (~1e-6 relative), but
the kept count exceeds P and ``fisher_condition`` becomes
:math:`\lambda_\max` over noise (~1e9 instead of ~3e3).  An absolute floor
can still be passed.  When nothing is left above the floor (all gradients
zero), the entropy-based metrics are NaN and ``fim_reason`` says why.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from mbe_helpers.errors import require_extra

require_extra("torch", "torch", "mbe_helpers.fisher")

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from mbe_helpers.errors import MBEInputError

LossSpec = str | Callable[[Tensor, Tensor], Tensor]

METHODS = ("auto", "pairs", "materialise", "func")
LOSSES = ("cross_entropy", "mse")
FIM_KEYS = (
    "fim_norm", "fim_erank", "fisher_entropy", "fisher_trace", "fisher_spectral",
    "fisher_stable_rank", "fisher_condition", "grad_noise_scale", "grad_norm_mean",
    "grad_norm_std", "fim_norm_unit",
)
"""The float keys :func:`fim_metrics` returns (it adds the string ``fim_reason``)."""

_MAX_ELEMENTS = 2 ** 26  # numbers held at once by one chunk of a Gram computation
_HOOKED = (nn.Linear, nn.Conv2d, nn.LayerNorm)


# --------------------------------------------------------------------------- #
# Public API                                                                  #
# --------------------------------------------------------------------------- #

def per_sample_gram(model: nn.Module, x: Tensor, y: Tensor, *, loss: LossSpec = "cross_entropy",
                    dtype: torch.dtype = torch.float32, method: str = "auto",
                    chunk_size: int = 256) -> Tensor:
    r"""Dual Gram matrix :math:`D_{ij} = \langle g_i, g_j \rangle / N` of per-sample gradients.

    Parameters
    ----------
    model : nn.Module
        Evaluated as given; BatchNorm or Dropout in training mode is refused
        (they couple samples or randomise gradients: call ``model.eval()``).
        Gradients are taken over all parameters with ``requires_grad``.
    x, y : Tensor
        A batch of N >= 2 inputs and targets (class indices for
        ``cross_entropy``; moved to the model's device).
    loss : {"cross_entropy", "mse"} or callable
        Per-sample loss :math:`\ell_i`: cross-entropy of the logits, or the
        squared error averaged over output elements.  A callable gets
        ``(output, y)`` and must return the N per-sample losses.
    dtype : torch.dtype
        Precision of the computation (``torch.float32`` or ``torch.float64``);
        parameters and floating inputs are cast, the model is not modified.
        TF32 is switched off while the engine runs on CUDA; cuDNN's float32
        convolution algorithms still carry ~1e-4 relative error (float64 is
        exact).
    method : {"auto", "pairs", "materialise", "func"}
        Rule for recorded layers (see the module docstring); ``"func"`` sends
        every parameter through ``torch.func``.
    chunk_size : int
        Samples per ``vmap`` call for parameters handled by ``torch.func``.

    Returns
    -------
    Tensor
        D, shape (N, N), in ``dtype`` on the model's device.

    Examples
    --------
    >>> from mbe_helpers.models import MLP
    >>> _ = torch.manual_seed(0)
    >>> model, x, y = MLP(4, [8], 3).eval(), torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    >>> gram = per_sample_gram(model, x, y)
    >>> gram.shape, torch.allclose(gram, gram.T)
    (torch.Size([6, 6]), True)
    >>> torch.allclose(gram, per_sample_gram(model, x, y, method="func"), atol=1e-6)
    True
    """
    _check_request(model, x, y, loss, dtype, method, chunk_size)
    with _full_float32(model):
        return _assemble_gram(_collect(model, x, y, loss, dtype, method, chunk_size))


def fim_metrics(model: nn.Module, x: Tensor, y: Tensor, *, loss: LossSpec = "cross_entropy",
                dtype: torch.dtype = torch.float32, eig_floor: float | None = None,
                method: str = "auto", chunk_size: int = 256) -> dict[str, float | str]:
    r"""The FIM family of one batch, from one per-sample-gradient computation.

    When the model has fewer trainable parameters than samples (P < N) the
    spectrum is taken from the P-side (singular values of G), which has the
    same non-zero eigenvalues and is far cheaper; otherwise from
    :func:`per_sample_gram`.  Arguments are those of :func:`per_sample_gram`,
    plus ``eig_floor`` (see :func:`gram_metrics`).

    Returns
    -------
    dict
        The keys of :data:`FIM_KEYS` (floats, defined in :func:`gram_metrics`)
        and ``fim_reason``: empty, or why some values are NaN.

    Examples
    --------
    >>> from mbe_helpers.models import MLP
    >>> _ = torch.manual_seed(0)
    >>> model, x, y = MLP(4, [8], 3).eval(), torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    >>> values = fim_metrics(model, x, y)
    >>> set(FIM_KEYS) < set(values), values["fim_reason"]
    (True, '')
    >>> abs(values["fim_erank"] - 6 * values["fim_norm"]) < 1e-9   # fim_norm = erank / N
    True
    """
    _check_floor(eig_floor)
    _check_request(model, x, y, loss, dtype, method, chunk_size)
    n_params = sum(p.numel() for p in _trainable(model).values())
    with _full_float32(model):
        pieces = _collect(model, x, y, loss, dtype, method, chunk_size)
        if n_params < len(x):
            return _metrics_from_grads(_assemble_grads(pieces), eig_floor)
        return _gram_summary(_assemble_gram(pieces), eig_floor)


def gram_metrics(gram: Tensor, *, eig_floor: float | None = None) -> dict[str, float | str]:
    r"""The FIM family from a dual Gram matrix :math:`D = G G^\top / N`.

    With :math:`\lambda_k` the eigenvalues of D above the floor,
    :math:`p_k = \lambda_k / \sum_j \lambda_j` and :math:`n_i = \lVert g_i
    \rVert = \sqrt{N D_{ii}}`:

    * ``fisher_trace`` :math:`= \operatorname{tr} D = \frac1N \sum_i n_i^2`;
    * ``fisher_spectral`` :math:`= \lambda_\max`;
    * ``fisher_stable_rank`` :math:`= \operatorname{tr} D / \lambda_\max`;
    * ``fisher_entropy`` :math:`H = -\sum_k p_k \log p_k` (nats);
    * ``fim_erank`` :math:`= e^H`, and ``fim_norm`` :math:`= e^H / N`;
    * ``fisher_condition`` :math:`= \lambda_\max / \lambda_\min` over the
      eigenvalues above the floor (the Fisher restricted to its numerical
      range);
    * ``grad_noise_scale`` :math:`= \frac1N \sum_i \lVert g_i - \bar g
      \rVert^2 / \lVert \bar g \rVert^2` with :math:`\lVert\bar g\rVert^2 =
      \sum_{ij} D_{ij} / N` (McCandlish et al.'s simple noise scale);
    * ``grad_norm_mean``, ``grad_norm_std``: mean and population standard
      deviation (ddof = 0) of :math:`n_i`;
    * ``fim_norm_unit``: ``fim_norm`` of the Gram of the unit vectors
      :math:`g_i / n_i` (:math:`D_{ij} / \sqrt{D_{ii} D_{jj}}`), which keeps
      the directions and drops the magnitudes; samples with
      :math:`g_i = 0` contribute a zero row.

    Parameters
    ----------
    gram : Tensor
        Symmetric (N, N) matrix, N >= 2.
    eig_floor : float or None
        None (default): keep :math:`\lambda > N \epsilon \lambda_\max`, with
        :math:`\epsilon` the machine epsilon of ``gram.dtype``; a float: keep
        :math:`\lambda >` ``eig_floor``.  See the module docstring.

    Returns
    -------
    dict
        :data:`FIM_KEYS` as floats and ``fim_reason`` (empty, or why values
        are NaN: zero gradients, nothing above the floor).

    Raises
    ------
    MBEInputError
        For a gram that is not a tensor, not square with N >= 2, or holds NaN
        or infinite entries (:func:`fim_metrics` reports a diverged model's
        metrics as NaN with the reason instead).

    Examples
    --------
    >>> values = gram_metrics(torch.eye(4, dtype=torch.float64))   # four orthogonal unit gradients
    >>> values["fim_erank"], values["fim_norm"], values["fisher_trace"], values["fisher_condition"]
    (4.0, 1.0, 4.0, 1.0)
    >>> gram_metrics(torch.zeros(3, 3))["fim_reason"]
    'all per-sample gradients are zero'
    """
    _check_floor(eig_floor)
    if not isinstance(gram, Tensor):
        raise MBEInputError(f"gram must be a torch tensor (the (N, N) output of per_sample_gram), "
                            f"got {type(gram).__name__}; convert an array with torch.as_tensor.")
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] < 2:
        raise MBEInputError(f"gram must be a square matrix with at least 2 rows, got shape {tuple(gram.shape)}.")
    if not bool(torch.isfinite(gram).all()):
        raise MBEInputError(f"gram holds {int((~torch.isfinite(gram)).sum())} NaN or infinite entries "
                            "(non-finite per-sample gradients, e.g. of a diverged model); use "
                            "fim_metrics(model, x, y), which reports them as NaN with the reason.")
    return _gram_summary(gram, eig_floor)


def _gram_summary(gram: Tensor, eig_floor: float | None) -> dict[str, float | str]:
    """:func:`gram_metrics` of a checked square Gram; NaN with the reason when it is not finite."""
    eps = torch.finfo(gram.dtype).eps
    d = gram.detach().to(torch.float64)
    n = d.shape[0]
    if not bool(torch.isfinite(d).all()):
        return _nan_metrics("non-finite per-sample gradients")
    sq_norms = (n * torch.diagonal(d)).clamp_min(0)
    mean_grad_sq = float(d.sum()) / n
    eigs = torch.linalg.eigvalsh(d).cpu().numpy()
    norms = sq_norms.sqrt()
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    unit = n * d / safe[:, None] / safe[None, :]
    unit = torch.where((norms[:, None] > 0) & (norms[None, :] > 0), unit, torch.zeros_like(unit))
    eigs_unit = torch.linalg.eigvalsh(unit / n).cpu().numpy()
    return _summarise(eigs, eigs_unit, sq_norms.cpu().numpy(), mean_grad_sq, n, eps, eig_floor)


# --------------------------------------------------------------------------- #
# Metrics from a spectrum                                                     #
# --------------------------------------------------------------------------- #

def _metrics_from_grads(g: Tensor, eig_floor: float | None) -> dict[str, float | str]:
    """The FIM family from the per-sample gradients G (N, P) themselves (the P-side)."""
    eps = torch.finfo(g.dtype).eps
    g64 = g.detach().to(torch.float64)
    n = g64.shape[0]
    if not bool(torch.isfinite(g64).all()):
        return _nan_metrics("non-finite per-sample gradients")
    sq_norms = (g64 * g64).sum(1)
    mean_grad_sq = float((g64.mean(0) ** 2).sum())
    eigs = (torch.linalg.svdvals(g64) ** 2 / n).cpu().numpy()
    norms = sq_norms.sqrt()
    unit = g64 / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]
    eigs_unit = (torch.linalg.svdvals(unit) ** 2 / n).cpu().numpy()
    return _summarise(eigs, eigs_unit, sq_norms.cpu().numpy(), mean_grad_sq, n, eps, eig_floor)


def _entropy_rank(eigs: np.ndarray, n: int, eps: float, eig_floor: float | None) -> tuple[float, float, float]:
    """(entropy, erank, lambda_max / lambda_min) over eigenvalues above the floor; NaN if none."""
    lam_max = float(eigs.max()) if eigs.size else 0.0
    cut = n * eps * lam_max if eig_floor is None else eig_floor
    kept = eigs[eigs > cut]
    if lam_max <= 0 or kept.size == 0:
        return math.nan, math.nan, math.nan
    p = kept / kept.sum()
    entropy = float(-(p * np.log(p)).sum())
    return entropy, math.exp(entropy), float(kept.max() / kept.min())


def _summarise(eigs: np.ndarray, eigs_unit: np.ndarray, sq_norms: np.ndarray, mean_grad_sq: float,
               n: int, eps: float, eig_floor: float | None) -> dict[str, float | str]:
    """Assemble :data:`FIM_KEYS` from the spectra and per-sample norms (all float64)."""
    trace = float(sq_norms.mean())
    lam_max = float(max(eigs.max(), 0.0))
    entropy, erank, condition = _entropy_rank(eigs, n, eps, eig_floor)
    _, erank_unit, _ = _entropy_rank(eigs_unit, n, eps, eig_floor)
    norms = np.sqrt(sq_norms)
    reasons = []
    if trace == 0:
        reasons.append("all per-sample gradients are zero")
    elif math.isnan(erank):
        reasons.append("no eigenvalue above the floor")
    if mean_grad_sq == 0 and trace > 0:
        reasons.append("the mean gradient is zero, so the noise scale is undefined")
    return {
        "fim_norm": erank / n,
        "fim_erank": erank,
        "fisher_entropy": entropy,
        "fisher_trace": trace,
        "fisher_spectral": lam_max,
        "fisher_stable_rank": trace / lam_max if lam_max > 0 else math.nan,
        "fisher_condition": condition,
        "grad_noise_scale": (trace - mean_grad_sq) / mean_grad_sq if mean_grad_sq > 0 else math.nan,
        "grad_norm_mean": float(norms.mean()),
        "grad_norm_std": float(norms.std()),
        "fim_norm_unit": erank_unit / n,
        "fim_reason": "; ".join(reasons),
    }


def _nan_metrics(reason: str) -> dict[str, float | str]:
    return {**{key: math.nan for key in FIM_KEYS}, "fim_reason": reason}


def _check_floor(eig_floor: float | None) -> None:
    if eig_floor is not None and not (isinstance(eig_floor, (int, float)) and eig_floor >= 0):
        raise MBEInputError(f"eig_floor must be None (relative floor) or a non-negative number, got {eig_floor!r}.")


# --------------------------------------------------------------------------- #
# Validation and small helpers                                                #
# --------------------------------------------------------------------------- #

@contextlib.contextmanager
def _full_float32(model: nn.Module):
    """Switch TF32 off on CUDA while the engine runs (restored afterwards).

    TF32 products carry ~1e-3 relative error, far above the float32 noise the
    eigenvalue floor is set for.  Left alone if the user set precision through
    torch's newer ``fp32_precision`` API, which refuses the legacy flags.
    """
    params = list(model.parameters())
    saved = None
    if params and params[0].is_cuda:
        try:
            saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        except RuntimeError:
            saved = None
    try:
        yield
    finally:
        if saved is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _check_request(model: nn.Module, x: Tensor, y: Tensor, loss: LossSpec, dtype: torch.dtype,
                   method: str, chunk_size: int) -> None:
    """Refuse, in one sentence, inputs for which per-sample gradients are ill-defined."""
    if not isinstance(model, nn.Module):
        raise MBEInputError(f"model must be a torch.nn.Module, got {type(model).__name__}; pass the "
                            "network itself.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise MBEInputError(f"chunk_size must be a positive integer (samples per vmap call), got "
                            f"{chunk_size!r}; the default is 256.")
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise MBEInputError("x and y must be torch tensors.")
    if x.dim() == 0 or x.shape[0] < 2:
        raise MBEInputError(f"need a batch of at least N = 2 samples, got {x.shape[0] if x.dim() else 0}.")
    if y.dim() == 0 or y.shape[0] != x.shape[0]:
        raise MBEInputError(f"x has {x.shape[0]} samples but y has {y.shape[0] if y.dim() else 0}.")
    if dtype not in (torch.float32, torch.float64):
        raise MBEInputError(f"dtype must be torch.float32 or torch.float64, got {dtype}.")
    if method not in METHODS:
        raise MBEInputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if isinstance(loss, str) and loss not in LOSSES:
        raise MBEInputError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)} or pass a callable.")
    if loss == "cross_entropy" and (y.dtype.is_floating_point or y.dim() != 1):
        raise MBEInputError("cross_entropy needs y as a 1-d tensor of integer class indices.")
    if not _trainable(model):
        raise MBEInputError("the model has no trainable parameters (none with requires_grad=True).")
    for name, module in model.named_modules():
        if module.training and isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise MBEInputError(f"BatchNorm {name!r} is in training mode, which couples the samples of a "
                                "batch; call model.eval() first.")
        if module.training and isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            raise MBEInputError(f"Dropout {name!r} is in training mode, which makes per-sample gradients "
                                "random; call model.eval() first.")


def _per_sample_loss(out: Tensor, y: Tensor, loss: LossSpec) -> Tensor:
    """Vector of the N per-sample losses."""
    if callable(loss):
        values = loss(out, y)
        if values.shape != (out.shape[0],):
            raise MBEInputError(f"a loss callable must return one loss per sample, shape ({out.shape[0]},), "
                                f"got {tuple(values.shape)}.")
        return values
    if loss == "cross_entropy":
        return F.cross_entropy(out, y, reduction="none")
    return (out - y.to(out.dtype)).pow(2).reshape(out.shape[0], -1).mean(1)


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    """Ids of parameters registered under more than one name (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}


def _hookable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Recorded layers: known types with trainable, untied parameters."""
    shared = _shared_parameter_ids(model)
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, _HOOKED):
            continue
        params = list(module.parameters(recurse=False))
        if isinstance(module, nn.Conv2d) and not hasattr(module, "_reversed_padding_repeated_twice"):
            continue
        if any(p.requires_grad for p in params) and not any(id(p) in shared for p in params):
            found[name] = module
    return found


# --------------------------------------------------------------------------- #
# The engine                                                                  #
# --------------------------------------------------------------------------- #

@dataclass
class _Kernel:
    """One weight's per-sample gradients g_i = sum_t b_it^T [a_it, 1] in factored form."""

    a: Tensor | None  # (N, T, da) layer input per position; None when the weight is frozen
    b: Tensor         # (N, T, db) loss gradient with respect to the layer output
    bias: bool        # whether a trainable bias adds the ones column

    def gram(self, method: str) -> Tensor:
        if self.a is None:
            g = self.b.sum(1)
            return g @ g.T
        if method == "auto":
            method = "pairs" if self._pair_cost() <= self._materialise_cost() else "materialise"
        return self._gram_pairs() if method == "pairs" else self._gram_materialised()

    def grads(self) -> Tensor:
        """Per-sample gradients (N, db * da [+ db])."""
        parts = [] if self.a is None else [torch.bmm(self.b.transpose(1, 2), self.a).flatten(1)]
        if self.bias:
            parts.append(self.b.sum(1))
        return torch.cat(parts, 1)

    def _pair_cost(self) -> float:
        n, t, da = self.a.shape
        return n * n * t * t * (da + self.b.shape[2] + 2)

    def _materialise_cost(self) -> float:
        n, t, da = self.a.shape
        return n * t * da * self.b.shape[2] + n * n * da * self.b.shape[2]

    def _gram_pairs(self) -> Tensor:
        a, b = self.a, self.b
        n, t, da = a.shape
        if t == 1:
            ka = a[:, 0] @ a[:, 0].T
            return (ka.add_(1) if self.bias else ka).mul_(b[:, 0] @ b[:, 0].T)
        a_flat, b_flat = a.reshape(n * t, da), b.reshape(n * t, -1)
        rows = max(1, _MAX_ELEMENTS // (n * t * t))
        out = []
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            ka = a_flat[start * t:stop * t] @ a_flat.T
            if self.bias:
                ka.add_(1)
            ka.mul_(b_flat[start * t:stop * t] @ b_flat.T)
            out.append(ka.reshape(stop - start, t, n, t).sum((1, 3)))
        return torch.cat(out, 0)

    def _gram_materialised(self) -> Tensor:
        a, b = self.a, self.b
        n, _, da = a.shape
        db = b.shape[2]
        cols = max(1, _MAX_ELEMENTS // (n * da))
        gram = torch.zeros(n, n, dtype=b.dtype, device=b.device)
        for start in range(0, db, cols):
            g = torch.bmm(b[:, :, start:start + cols].transpose(1, 2), a).reshape(n, -1)
            gram.addmm_(g, g.T)
        if self.bias:
            g = b.sum(1)
            gram.addmm_(g, g.T)
        return gram


@dataclass
class _ConvKernel:
    """A Conv2d weight over all its calls; per-sample gradients from the batched weight-gradient kernel.

    ``materialise`` runs ``convolution_backward`` once with the batch folded into
    the groups (N * groups), as ``torch.func`` does for convolutions: faster
    than ``unfold`` + ``bmm``.  ``pairs`` unfolds and uses :class:`_Kernel`.
    """

    module: nn.Conv2d
    calls: list[tuple[Tensor, tuple[int, int], Tensor]]  # (input, padding to apply, output gradient)
    weight: bool
    bias: bool

    def gram(self, method: str) -> Tensor:
        if not self.weight:
            g = self._bias_grads()
            return g @ g.T
        if method == "auto":
            method = "pairs" if self._pair_cost() <= self._materialise_cost() else "materialise"
        if method == "pairs":
            return sum(kernel._gram_pairs() for kernel in self._unfolded())
        n, c_in = self.calls[0][0].shape[:2]
        per_group = self.module.out_channels // self.module.groups
        step = max(1, _MAX_ELEMENTS // (n * c_in * math.prod(self.module.kernel_size)))
        gram = torch.zeros(n, n, dtype=self.calls[0][2].dtype, device=self.calls[0][2].device)
        for start in range(0, per_group, step):
            g = self._weight_grads(start, start + step)
            gram.addmm_(g, g.T)
        if self.bias:
            g = self._bias_grads()
            gram.addmm_(g, g.T)
        return gram

    def grads(self) -> Tensor:
        """Per-sample gradients (N, |W| [+ |b|])."""
        parts = [self._weight_grads(0, self.module.out_channels)] if self.weight else []
        return torch.cat(parts + ([self._bias_grads()] if self.bias else []), 1)

    def _bias_grads(self) -> Tensor:
        return sum(gout.sum((2, 3)) for _, _, gout in self.calls)

    def _weight_grads(self, start: int, stop: int) -> Tensor:
        """Per-sample gradients of output channels start:stop of every group, (N, groups * c * C_in/g * k*k)."""
        m = self.module
        total = 0
        for inp, padding, gout in self.calls:
            n, c_in = inp.shape[:2]
            go = gout.reshape(n, m.groups, -1, *gout.shape[2:])[:, :, start:stop]
            c = go.shape[2]
            weight = inp.new_empty((n * m.groups * c, c_in // m.groups, *m.kernel_size))
            gw = torch.ops.aten.convolution_backward(
                go.reshape(1, -1, *gout.shape[2:]), inp.reshape(1, -1, *inp.shape[2:]), weight, None,
                m.stride, padding, m.dilation, False, [0, 0], n * m.groups, [False, True, False])[1]
            total = total + gw.reshape(n, -1)
        return total

    def _unfolded(self) -> list[_Kernel]:
        per_call = [_conv_rows(self.module, inp, padding, gout) for inp, padding, gout in self.calls]
        return [_Kernel(_cat_positions([rows[g][0] for rows in per_call]),
                        _cat_positions([rows[g][1] for rows in per_call]), self.bias)
                for g in range(self.module.groups)]

    def _sizes(self) -> tuple[int, int, int, int]:
        """(N, positions over all calls, input width per group, output width per group)."""
        m = self.module
        positions = sum(gout.shape[2] * gout.shape[3] for _, _, gout in self.calls)
        n = self.calls[0][0].shape[0]
        return n, positions, m.in_channels // m.groups * math.prod(m.kernel_size), m.out_channels // m.groups

    def _pair_cost(self) -> float:
        n, t, da, db = self._sizes()
        return self.module.groups * n * n * t * t * (da + db + 2)

    def _materialise_cost(self) -> float:
        n, t, da, db = self._sizes()
        return self.module.groups * (n * t * da * db + n * n * da * db)


@dataclass
class _Pieces:
    """Everything needed to assemble D or G: factored kernels and dense per-sample gradients."""

    n: int
    method: str
    kernels: list[_Kernel | _ConvKernel] = field(default_factory=list)
    dense: list[Tensor] = field(default_factory=list)  # each (N, p)


@torch.no_grad()
def _assemble_gram(pieces: _Pieces) -> Tensor:
    gram = None
    for kernel in pieces.kernels:
        part = kernel.gram(pieces.method)
        gram = part if gram is None else gram.add_(part)
    if pieces.dense:
        g = torch.cat(pieces.dense, 1)
        gram = g @ g.T if gram is None else gram.addmm_(g, g.T)
    return gram.div_(pieces.n)


@torch.no_grad()
def _assemble_grads(pieces: _Pieces) -> Tensor:
    return torch.cat([k.grads() for k in pieces.kernels] + pieces.dense, 1)


def _collect(model: nn.Module, x: Tensor, y: Tensor, loss: LossSpec, dtype: torch.dtype,
             method: str, chunk_size: int) -> _Pieces:
    """Run the recorded forward/backward and torch.func for the rest; return the pieces."""
    device = next(iter(_trainable(model).values())).device
    x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
    y = y.to(device=device, dtype=dtype if y.is_floating_point() else y.dtype)
    state = _cast_state(model, dtype)
    if loss == "cross_entropy":
        _check_labels(model, state, x, y)
    pieces = _Pieces(n=x.shape[0], method=method)
    covered: set[str] = set()
    if method != "func":
        modules = _hookable_modules(model)
        with torch.enable_grad():
            covered = _record(model, modules, state, x, y, loss, pieces)
    rest = [name for name in _trainable(model) if name not in covered]
    if rest:
        pieces.dense.append(_func_grads(model, state, rest, x, y, loss, chunk_size))
    return pieces


@torch.no_grad()
def _check_labels(model: nn.Module, state: dict[str, Tensor], x: Tensor, y: Tensor) -> None:
    """Refuse class indices outside the model's outputs (read from a one-sample forward)."""
    n_out = functional_call(model, state, (x[:1],)).shape[-1]
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= n_out:
        raise MBEInputError(f"labels in y must lie between 0 and {n_out - 1} (the model has {n_out} "
                            f"outputs), got {low} to {high}.")


def _cast_state(model: nn.Module, dtype: torch.dtype) -> dict[str, Tensor]:
    """Detached copies (views where possible) of parameters and buffers in ``dtype``."""
    state = {name: p.detach().to(dtype).requires_grad_(p.requires_grad)
             for name, p in model.named_parameters()}
    for name, buf in model.named_buffers():
        state[name] = buf.to(dtype) if buf.is_floating_point() else buf
    return state


class _Recorder:
    """Forward hooks that keep (input, output) of every call of the recorded layers."""

    def __init__(self, modules: dict[str, nn.Module], n: int, clone: bool):
        self.n, self.clone = n, clone
        self.calls: dict[str, list[tuple[Tensor, Tensor, int, int]]] = {name: [] for name in modules}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            inp = args[0] if args else None
            if not isinstance(inp, Tensor) or not isinstance(output, Tensor) or inp.shape[0] != self.n \
                    or output.shape[0] != self.n or not output.requires_grad:
                self.calls[name].append(None)  # unusable call: the module goes to torch.func
                return None
            kept = inp.detach().clone() if self.clone else inp.detach()
            self.calls[name].append((kept, output, inp._version, output._version))
            return output.clone() if self.clone else None
        return hook

    def usable(self) -> dict[str, list]:
        return {name: calls for name, calls in self.calls.items() if calls and None not in calls}

    def modified_in_place(self) -> bool:
        return any(inp._version != vi or out._version != vo
                   for calls in self.usable().values() for inp, out, vi, vo in calls)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _record(model: nn.Module, modules: dict[str, nn.Module], state: dict[str, Tensor], x: Tensor,
            y: Tensor, loss: LossSpec, pieces: _Pieces) -> set[str]:
    """Batched forward/backward through hooks; fills ``pieces``, returns the covered parameter names."""
    for clone in (False, True):
        recorder = _Recorder(modules, x.shape[0], clone)
        try:
            losses = _per_sample_loss(functional_call(model, state, (x,)), y, loss)
        finally:
            recorder.remove()
        calls = recorder.usable()
        if not recorder.modified_in_place():
            break  # on an in-place edit of a recorded tensor, record again with copies
    outputs = [out for name in calls for _, out, _, _ in calls[name]]
    if not outputs:
        return set()
    grads = iter(torch.autograd.grad(losses.sum(), outputs, allow_unused=True))
    covered = set()
    for name, module_calls in calls.items():
        pairs = [(inp, _zeros_if_none(next(grads), out)) for inp, out, _, _ in module_calls]
        _add_module_pieces(modules[name], pairs, pieces)
        covered.update(f"{name}.{p}" if name else p for p, param in modules[name].named_parameters(recurse=False)
                       if param.requires_grad)
    return covered


def _zeros_if_none(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


def _add_module_pieces(module: nn.Module, pairs: list[tuple[Tensor, Tensor]], pieces: _Pieces) -> None:
    """Per-sample-gradient pieces of one recorded layer over all its calls (calls add positions)."""
    w_train = module.weight is not None and module.weight.requires_grad
    b_train = module.bias is not None and module.bias.requires_grad
    if isinstance(module, nn.LayerNorm):
        pieces.dense.append(_layer_norm_grads(module, pairs, w_train, b_train))
        return
    if isinstance(module, nn.Conv2d):
        calls = [(*_conv_input(module, inp), gout) for inp, gout in pairs]
        pieces.kernels.append(_ConvKernel(module, calls, w_train, b_train))
        return
    n = pairs[0][0].shape[0]
    a = _cat_positions([inp.reshape(n, -1, inp.shape[-1]) for inp, _ in pairs])
    b = _cat_positions([gout.reshape(n, -1, gout.shape[-1]) for _, gout in pairs])
    pieces.kernels.append(_Kernel(a if w_train else None, b, b_train))


def _cat_positions(parts: list[Tensor]) -> Tensor:
    """Join the positions of several calls of one layer (a copy only when there are several)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _conv_input(module: nn.Conv2d, inp: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """The input and the zero padding still to apply (string or non-zero padding is applied here)."""
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return inp, tuple(module.padding)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(inp, module._reversed_padding_repeated_twice, mode=mode), (0, 0)


def _conv_rows(module: nn.Conv2d, inp: Tensor, padding: tuple[int, int], gout: Tensor) -> list[tuple[Tensor, Tensor]]:
    """(A, B) per group: unfolded input patches (N, L, C_in/g*k*k) and output gradients (N, L, C_out/g)."""
    cols = F.unfold(inp, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    n, groups = inp.shape[0], module.groups
    a = cols.transpose(1, 2)
    b = gout.reshape(n, gout.shape[1], -1).transpose(1, 2)
    da, db = a.shape[2] // groups, b.shape[2] // groups
    return [(a[:, :, g * da:(g + 1) * da], b[:, :, g * db:(g + 1) * db]) for g in range(groups)]


def _layer_norm_grads(module: nn.LayerNorm, pairs: list[tuple[Tensor, Tensor]], w_train: bool,
                      b_train: bool) -> Tensor:
    """Per-sample gradients of the LayerNorm affine parameters, (N, |gamma| + |beta|)."""
    dims = math.prod(module.normalized_shape)
    total_w, total_b = 0, 0
    for inp, gout in pairs:
        n = inp.shape[0]
        xhat = F.layer_norm(inp, module.normalized_shape, eps=module.eps).reshape(n, -1, dims)
        gout = gout.reshape(n, -1, dims)
        total_w = total_w + (gout * xhat).sum(1)
        total_b = total_b + gout.sum(1)
    return torch.cat(([total_w] if w_train else []) + ([total_b] if b_train else []), 1)


def _func_grads(model: nn.Module, state: dict[str, Tensor], names: list[str], x: Tensor, y: Tensor,
                loss: LossSpec, chunk_size: int) -> Tensor:
    """Per-sample gradients (N, P_rest) of the named parameters through ``vmap(grad)``."""
    chosen = {name: state[name].detach() for name in names}
    fixed = {name: t.detach() for name, t in state.items() if name not in chosen}

    def sample_loss(params: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, (fixed, params), (xi.unsqueeze(0),))
        return _per_sample_loss(out, yi.unsqueeze(0), loss).sum()

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0), chunk_size=chunk_size)
    with warnings.catch_warnings():  # torch's notice that some batching rules run as loops
        warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
        grads = per_sample(chosen, x, y)
    return torch.cat([grads[name].reshape(x.shape[0], -1) for name in names], 1)
