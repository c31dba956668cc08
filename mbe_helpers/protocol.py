r"""Four diagnostics that decide whether a feedback-alignment result can be read at face value.

On a trained residual network and a fixed evaluation set:

(a) **residual-stream norms** -- the median over the batch of
    :math:`\lVert h_l \rVert_2` per stream state (token models: the CLS
    token) and the largest growth :math:`\max_l \lVert h_{l+1}\rVert /
    \lVert h_l\rVert` between consecutive states.  Fires above
    ``max_growth``: the stream is dominated by a few blocks.
(b) **BP-gradient norms** -- the median :math:`\lVert \partial L /
    \partial h_l \rVert_2` (L the batch-mean cross-entropy) through the
    explicit residual path.  Fires when any state's gradient is below
    ``grad_floor``: the reference vector of every alignment number is then
    numerical noise.
(c) **cross-batch direction stability** -- the mean pairwise cosine of the
    normalised batch-mean BP gradient :math:`\bar g_l / \lVert \bar g_l\rVert`
    over disjoint batches (calibrated for about 8 batches of about 128).
    Fires above ``stability_ceiling``: the "credit" is a sample-invariant
    drift, not per-sample information.
(d) **frozen-blocks baseline** -- the method's headline accuracy minus that
    of the same architecture whose blocks stay at initialisation.  Fires
    below ``frozen_margin``: the deep blocks added nothing.

All norms are taken along the feature dimension (``norm(dim=-1)``).

A diagnostic whose value is NaN or infinite (activations or gradients that
overflowed, weights that are not finite, a batch with a zero mean gradient)
gets the state ``nan`` with the reason, never ``ok``, and the report is then
not at face value.  :func:`diagnose` refuses, in one sentence, inputs that are
not finite, labels the model has no output for, and models it cannot run.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from mbe_helpers.errors import require_extra

require_extra("torch", "torch", "mbe_helpers.protocol")

import numpy as np
import pandas as pd
import torch

from mbe_helpers.errors import MBEInputError
from mbe_helpers.stream import check_contract, forward_stream, stream_gradients

FIRES, OK, SKIPPED, NAN = "fires", "ok", "skipped", "nan"


@dataclass(frozen=True)
class Thresholds:
    """Where each diagnostic fires.

    Attributes
    ----------
    grad_floor : float
        (b) a median BP-gradient norm below this is at the numerical floor (1e-7).
    max_growth : float
        (a) largest allowed growth of the stream norm across one block (50x).
    stability_ceiling : float
        (c) mean cross-batch cosine above this is a sample-invariant drift (0.30).
    frozen_margin : float
        (d) the method must beat the frozen-blocks baseline by this many
        accuracy points, as a fraction (0.02 = 2 percentage points).

    Examples
    --------
    >>> Thresholds()
    Thresholds(grad_floor=1e-07, max_growth=50.0, stability_ceiling=0.3, frozen_margin=0.02)
    >>> Thresholds(grad_floor=1e-6).grad_floor
    1e-06
    """

    grad_floor: float = 1e-7
    max_growth: float = 50.0
    stability_ceiling: float = 0.30
    frozen_margin: float = 0.02


def _per_sample(t: torch.Tensor) -> torch.Tensor:
    """One vector per sample: the CLS token of token states, the state itself otherwise."""
    return t[:, 0, :] if t.dim() == 3 else t


def residual_norms(model, x: torch.Tensor) -> list[float]:
    r"""(a) Median over the batch of :math:`\lVert h_l\rVert_2`, for l = 0..L.

    Examples
    --------
    >>> from mbe_helpers.models import ResidualMLP
    >>> _ = torch.manual_seed(0)
    >>> norms = residual_norms(ResidualMLP(4, 8, 3, n_blocks=2), torch.randn(16, 4))
    >>> len(norms), all(n > 0 for n in norms)
    (3, True)
    """
    with torch.no_grad():
        hidden, _ = forward_stream(model, x)
    return [float(_per_sample(h).norm(dim=-1).median()) for h in hidden]


def bp_grad_norms(model, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    r"""(b) Median over the batch of :math:`\lVert \partial L/\partial h_l\rVert_2`, for l = 0..L.

    Examples
    --------
    >>> from mbe_helpers.models import ResidualMLP
    >>> _ = torch.manual_seed(0)
    >>> model = ResidualMLP(4, 8, 3, n_blocks=2)
    >>> norms = bp_grad_norms(model, torch.randn(16, 4), torch.randint(0, 3, (16,)))
    >>> len(norms), all(0 < n < 1 for n in norms)
    (3, True)
    """
    _, grads, _ = stream_gradients(model, x, y)
    return [float(_per_sample(g).norm(dim=-1).median()) for g in grads]


def direction_stability(model, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    r"""(c) Mean pairwise cosine of the batch-mean BP-gradient direction, per state l = 0..L.

    For each batch b the direction is :math:`u_b = \bar g_b / \lVert \bar g_b\rVert`
    with :math:`\bar g_b` the mean over the batch of :math:`\partial L/\partial h_l`;
    the value is :math:`\frac{2}{B(B-1)}\sum_{b<c} u_b^\top u_c`.  A batch whose
    mean gradient is exactly zero has no direction and makes the value NaN.

    Examples
    --------
    >>> from mbe_helpers.models import ResidualMLP
    >>> _ = torch.manual_seed(0)
    >>> model = ResidualMLP(4, 8, 3, n_blocks=2)
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> stability = direction_stability(model, [(x[:16], y[:16]), (x[16:], y[16:])])
    >>> len(stability), all(-1 <= s <= 1 for s in stability)
    (3, True)
    >>> round(direction_stability(model, [(x, y), (x, y)])[1], 6)   # identical batches
    1.0
    """
    if len(batches) < 2:
        raise MBEInputError(f"direction stability needs at least 2 disjoint batches, got {len(batches)}")
    per_batch = []
    for x, y in batches:
        _, grads, _ = stream_gradients(model, x, y)
        per_batch.append(torch.stack([_per_sample(g).double().mean(dim=0).flatten() for g in grads]))
    means = torch.stack(per_batch)                        # (batches, states, d)
    norms = means.norm(dim=-1, keepdim=True)
    units = torch.where(norms > 0, means / norms.clamp_min(1e-300), torch.nan)
    cos = torch.einsum("bld,cld->lbc", units, units)
    upper = torch.triu_indices(len(batches), len(batches), offset=1)
    return [float(c[upper[0], upper[1]].mean()) for c in cos]


@dataclass
class Diagnosis:
    """Every value of the protocol, a verdict per diagnostic and an overall verdict.

    Examples
    --------
    >>> d = Diagnosis("dfa", residual_norms=[1.0, 2.0, 200.0], bp_grad_norms=[1e-3, 1e-4, 1e-5],
    ...               stability=[0.1, 0.5, 0.2], stability_layer=1, headline_acc=0.90,
    ...               frozen_baseline_acc=0.89)
    >>> d.max_growth
    100.0
    >>> d.verdict
    'not at face value: a_residual_growth, c_direction_stability, d_frozen_baseline'
    >>> d.to_frame()[["diagnostic", "state"]]
                  diagnostic  state
    0      a_residual_growth  fires
    1    b_bp_gradient_floor     ok
    2  c_direction_stability  fires
    3      d_frozen_baseline  fires
    """

    method: str
    residual_norms: list[float]
    bp_grad_norms: list[float]
    stability: list[float]
    stability_layer: int
    headline_acc: float
    frozen_baseline_acc: float | None
    thresholds: Thresholds = field(default_factory=Thresholds)

    # ---------------------------------------------------------------- verdicts
    @property
    def max_growth(self) -> float:
        """Largest ratio of consecutive stream norms (NaN when a norm is not finite)."""
        r = np.asarray(self.residual_norms, dtype=float)
        if len(r) < 2 or not np.isfinite(r).all():
            return float("nan")
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.fmax.reduce(r[1:] / r[:-1]))  # 0/0 ignored, x/0 is inf

    def _residual_growth(self) -> tuple[str, str]:
        t, growth = self.thresholds, self.max_growth
        if not np.isfinite(self.residual_norms).all():
            return NAN, (f"stream norm of h_{_first_bad(self.residual_norms)} is not finite: the "
                         "activations overflowed or the weights are not finite")
        if math.isnan(growth):
            return NAN, "no growth to measure: the model has no block, or its stream is zero"
        return (FIRES if growth > t.max_growth else OK,
                f"largest growth across a block {growth:.3g}x (limit {t.max_growth:g}x)")

    def _gradient_floor(self) -> tuple[str, str]:
        t, grads = self.thresholds, np.asarray(self.bp_grad_norms, dtype=float)
        if not np.isfinite(grads).all():
            return NAN, (f"BP-gradient norm of h_{_first_bad(grads)} is not finite: the "
                         "gradients overflowed or the weights are not finite")
        return (FIRES if grads.min() < t.grad_floor else OK,
                f"smallest median |dL/dh| {grads.min():.2e} (floor {t.grad_floor:.0e})")

    def _direction_stability(self) -> tuple[str, str]:
        t, layer = self.thresholds, self.stability_layer
        stab = self.stability[layer]
        if not math.isfinite(stab):
            return NAN, (f"cross-batch cosine at h_{layer} is NaN: a batch's mean gradient is "
                         "zero or not finite, so it has no direction")
        return (FIRES if stab > t.stability_ceiling else OK,
                f"cross-batch cosine at h_{layer} {stab:.3f} (ceiling {t.stability_ceiling:.2f})")

    @property
    def verdicts(self) -> dict[str, tuple[str, str]]:
        """``{diagnostic: (fires | ok | skipped | nan, one-line reason)}``."""
        t = self.thresholds
        out = {"a_residual_growth": self._residual_growth(),
               "b_bp_gradient_floor": self._gradient_floor(),
               "c_direction_stability": self._direction_stability()}
        if self.frozen_baseline_acc is None:
            out["d_frozen_baseline"] = (SKIPPED, "no frozen-blocks accuracy given")
        else:
            margin = self.headline_acc - self.frozen_baseline_acc
            out["d_frozen_baseline"] = (
                FIRES if margin < t.frozen_margin else OK,
                f"headline {self.headline_acc:.3f} vs frozen {self.frozen_baseline_acc:.3f}: "
                f"margin {100 * margin:+.1f} pp (needs {100 * t.frozen_margin:.0f} pp)")
        return out

    @property
    def verdict(self) -> str:
        """``face value`` when no diagnostic fires or is NaN, else which ones do (NaN marked)."""
        fired = [name if state == FIRES else f"{name} (nan)"
                 for name, (state, _) in self.verdicts.items() if state in (FIRES, NAN)]
        return "face value" if not fired else "not at face value: " + ", ".join(fired)

    # ---------------------------------------------------------------- views
    def layers(self) -> pd.DataFrame:
        """One row per stream state: norm, BP-gradient norm, stability."""
        return pd.DataFrame({"method": self.method, "layer": range(len(self.residual_norms)),
                             "residual_norm": self.residual_norms,
                             "bp_grad_norm": self.bp_grad_norms, "stability": self.stability})

    def to_frame(self) -> pd.DataFrame:
        """One row per diagnostic: state and reason."""
        return pd.DataFrame([{"method": self.method, "diagnostic": name, "state": state, "detail": why}
                             for name, (state, why) in self.verdicts.items()])

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(verdicts={k: v[0] for k, v in self.verdicts.items()}, verdict=self.verdict)
        return out

    def to_markdown(self) -> str:
        lines = [f"**FA diagnostics: {self.method}** -- {self.verdict}", "",
                 "| diagnostic | state | detail |", "|---|---|---|"]
        lines += [f"| {n} | {s} | {d} |" for n, (s, d) in self.verdicts.items()]
        return "\n".join(lines) + "\n"

    def _repr_html_(self) -> str:
        return self.to_frame().style.hide(axis="index").set_caption(
            f"FA diagnostics: {self.method} -- {self.verdict}").to_html()

    def __rich__(self):
        from rich.table import Table

        table = Table(title=f"FA diagnostics: {self.method} — {self.verdict}")
        for col in ("diagnostic", "state", "detail"):
            table.add_column(col)
        colour = {FIRES: "red", OK: "green", SKIPPED: "dim", NAN: "yellow"}
        for name, (state, why) in self.verdicts.items():
            table.add_row(name, f"[{colour[state]}]{state}[/]", why)
        return table

    def show(self, console=None) -> None:
        """Print the verdict table in the terminal."""
        from rich.console import Console

        (console or Console()).print(self)


def _first_bad(values) -> int:
    """Index of the first value that is not finite."""
    return int(np.flatnonzero(~np.isfinite(np.asarray(values, dtype=float)))[0])


def _check_inputs(model, batches: list) -> None:
    """One sentence for blocks that are not a list, or batches the model cannot be diagnosed on."""
    blocks = model.blocks
    if not (hasattr(blocks, "__len__") and hasattr(blocks, "__iter__")
            and all(callable(b) for b in blocks)):
        raise MBEInputError(f"{type(model).__name__}.blocks must be a list of residual branches "
                            f"(e.g. an nn.ModuleList), got {type(blocks).__name__}")
    for i, batch in enumerate(batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2
                and all(isinstance(t, torch.Tensor) for t in batch)):
            raise MBEInputError(f"eval_batches[{i}] must be a pair (x, y) of tensors, got "
                                f"{type(batch).__name__}")
        x, y = batch
        if not torch.isfinite(x).all():
            raise MBEInputError(f"eval_batches[{i}] holds {int((~torch.isfinite(x)).sum())} NaN or "
                                "infinite inputs; drop or impute them before diagnosing")
        if y.dtype != torch.long or y.dim() != 1 or len(y) != len(x):
            raise MBEInputError(f"eval_batches[{i}] needs y as one class label (torch.long) per "
                                f"sample of x, got {y.dtype} of shape {tuple(y.shape)} for "
                                f"{len(x)} samples")
    x0 = batches[0][0]
    try:
        with torch.no_grad():
            n_out = forward_stream(model, x0)[1].shape[-1]
    except RuntimeError as exc:  # e.g. a width or dtype the first layer does not take
        raise MBEInputError(f"{type(model).__name__} cannot take eval_batches[0] (shape "
                            f"{tuple(x0.shape)}, {x0.dtype}): "
                            f"{' '.join(str(exc).splitlines()[0].split())}") from None
    for i, (_, y) in enumerate(batches):
        if len(y) and not 0 <= int(y.min()) <= int(y.max()) < n_out:
            raise MBEInputError(f"labels in eval_batches[{i}] must lie between 0 and {n_out - 1} "
                                f"(the model has {n_out} outputs), got {int(y.min())} to "
                                f"{int(y.max())}")


def _check_accuracy(name: str, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MBEInputError(f"{name} must be a number (a fraction between 0 and 1), got "
                            f"{value!r}; pass e.g. {name}=0.9")
    value = float(value)
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise MBEInputError(f"{name} must be a fraction between 0 and 1, got {value}")
    return value


def diagnose(model, eval_batches: Sequence[tuple[torch.Tensor, torch.Tensor]], headline_acc: float,
             frozen_baseline_acc: float | None = None, *, method: str = "method",
             stability_layer: int | None = None, thresholds: Thresholds | None = None) -> Diagnosis:
    """Run the four diagnostics on a trained residual model.

    Parameters
    ----------
    model
        A residual model (see :mod:`mbe_helpers.stream` for the contract); it
        is put in eval mode.
    eval_batches : sequence of (x, y)
        At least two disjoint batches (about 8 of about 128 is the calibrated
        setting); (a) and (b) use the first one.
    headline_acc, frozen_baseline_acc : float
        Accuracies as fractions; without a frozen baseline (d) is skipped.
    method : str
        Label of the report.
    stability_layer : int, optional
        Stream state judged by (c); default the middle one, ``(L + 1) // 2`` (at least 1).
    thresholds : Thresholds, optional

    Raises
    ------
    MBEInputError
        One sentence for a model without the stream contract or whose
        ``blocks`` is not a list, batches that are not ``(x, y)`` tensor pairs,
        non-finite inputs, labels outside the model's outputs, inputs the model
        cannot take, and accuracies or a ``stability_layer`` out of range.

    Examples
    --------
    >>> from mbe_helpers.models import ResidualMLP
    >>> _ = torch.manual_seed(0)
    >>> model = ResidualMLP(4, 8, 3, n_blocks=2)
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    >>> report = diagnose(model, batches, headline_acc=0.40, method="bp")
    >>> report.stability_layer, list(report.verdicts)
    (1, ['a_residual_growth', 'b_bp_gradient_floor', 'c_direction_stability', 'd_frozen_baseline'])
    >>> report.verdicts["d_frozen_baseline"]
    ('skipped', 'no frozen-blocks accuracy given')
    """
    check_contract(model)
    headline_acc = _check_accuracy("headline_acc", headline_acc)
    frozen_baseline_acc = _check_accuracy("frozen_baseline_acc", frozen_baseline_acc)
    batches = list(eval_batches)
    if not batches:
        raise MBEInputError("eval_batches is empty; give at least 2 disjoint (x, y) batches")
    _check_inputs(model, batches)
    if callable(getattr(model, "eval", None)):
        model.eval()
    x0, y0 = batches[0]
    n_states = len(model.blocks) + 1
    layer = max(1, n_states // 2) if stability_layer is None else stability_layer
    if not 0 <= layer < n_states:
        raise MBEInputError(f"stability_layer must be between 0 and {n_states - 1}, got {layer}")
    return Diagnosis(method=method, residual_norms=residual_norms(model, x0),
                     bp_grad_norms=bp_grad_norms(model, x0, y0),
                     stability=direction_stability(model, batches), stability_layer=layer,
                     headline_acc=headline_acc, frozen_baseline_acc=frozen_baseline_acc,
                     thresholds=thresholds or Thresholds())
