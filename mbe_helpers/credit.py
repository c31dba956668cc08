r"""Credit-assignment metrics: how good is a layer's learning signal?

A learning rule hands layer :math:`l` a credit signal :math:`a_l` (for BP the
true gradient :math:`g_l = \partial L / \partial h_l`; for DFA
:math:`e B_l^\top`).  These metrics ask whether :math:`a_l` predicts how the
loss responds to the layer's state :math:`h_l`:

* :func:`perturbation_correlation` -- :math:`\rho_l`, Pearson correlation of
  predicted and true first-order loss changes under random perturbations;
* :func:`nudging_test` -- the loss change after a step against :math:`a_l`;
* :func:`bp_cosine` -- :math:`\Gamma_l`, per-sample cosine with the BP gradient;
* :func:`feature_drift` -- :math:`M_l`, relative distance a weight travelled;
* :func:`bridge_residual` -- :math:`R_l`, Bellman-style residual of a value
  network against a soft-min over noisy next states.

A degenerate input (a zero signal, a loss that does not move, a zero initial
weight) gives a :class:`Measured` NaN that carries its reason, never a fake
0 or 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from mbe_helpers.errors import require_extra

require_extra("torch", "torch", "mbe_helpers.credit")

import torch
from torch import nn

from mbe_helpers.errors import MBEInputError

_FLOOR = 1e-12  # a norm below this is "zero" for the purpose of a direction


class Measured(float):
    """A float that can say why it is NaN: ``Measured(nan, reason="signal is zero")``.

    Examples
    --------
    >>> Measured(0.25), Measured(float("nan"), reason="the credit signal is zero")
    (0.25, nan (the credit signal is zero))
    >>> Measured(float("nan"), reason="the credit signal is zero").reason
    'the credit signal is zero'
    """

    reason: str

    def __new__(cls, value: float, reason: str = ""):
        obj = super().__new__(cls, value)
        obj.reason = reason
        return obj

    def __repr__(self) -> str:
        return f"nan ({self.reason})" if math.isnan(self) and self.reason else float.__repr__(self)


def _nan(reason: str) -> Measured:
    return Measured(float("nan"), reason)


def _check_pair(h: torch.Tensor, a: torch.Tensor) -> None:
    if h.shape != a.shape:
        raise MBEInputError(f"the credit signal has shape {tuple(a.shape)} but the layer "
                            f"state has shape {tuple(h.shape)}; they must match")
    if not (torch.isfinite(h).all() and torch.isfinite(a).all()):
        raise MBEInputError("the layer state or the credit signal contains NaN or inf")


def random_directions(shape: torch.Size, n_directions: int, seed: int,
                      dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                      ) -> torch.Tensor:
    """``n_directions`` random unit vectors per sample: shape ``(M, N, *state)``.

    Each sample's direction is uniform on the sphere of its flattened state.
    They are drawn on the CPU from ``seed`` (the same numbers on every device)
    and moved to ``device``.

    Examples
    --------
    >>> v = random_directions(torch.Size([5, 8]), n_directions=3, seed=0)
    >>> v.shape, torch.allclose(v.norm(dim=-1), torch.ones(3, 5))
    (torch.Size([3, 5, 8]), True)
    """
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn((n_directions, *shape), generator=generator, dtype=dtype).to(device)
    norms = v.flatten(2).norm(dim=-1).reshape(n_directions, shape[0], *([1] * (len(shape) - 1)))
    return v / norms


def perturbation_correlation(h: torch.Tensor, a: torch.Tensor,
                             forward_fn: Callable[[torch.Tensor], torch.Tensor], *,
                             eps: float = 1e-3, n_directions: int = 32, seed: int = 0,
                             chunk: int = 8) -> Measured:
    r"""Perturbation correlation :math:`\rho_l` of a credit signal.

    For random unit directions :math:`v` (``n_directions`` per sample) the
    predicted loss change :math:`\langle a_i, \epsilon v \rangle` is compared
    with the true change :math:`\ell_i(h_i + \epsilon v) - \ell_i(h_i)`; all
    :math:`M \times N` pairs are pooled into one Pearson correlation.  By
    Taylor's theorem the true gradient gives :math:`\rho \to 1` as
    :math:`\epsilon \to 0`; a signal independent of the loss gives
    :math:`\rho \approx 0`.

    Parameters
    ----------
    h, a : Tensor
        Layer state and credit signal, both of shape ``(N, *state)``.
    forward_fn : callable
        Per-sample loss of a state, accepting leading dimensions:
        ``(..., N, *state) -> (..., N)`` (see :func:`mbe_helpers.stream.tail_loss`).
    eps : float
        Perturbation size.  In float32 the loss differences of very small
        ``eps`` drown in rounding; use a float64 model to study ``eps < 1e-4``.
    n_directions : int
        Directions per sample (M).  They are evaluated ``chunk`` at a time in
        one batched forward pass each.
    seed : int
        Seed of the directions.

    Examples
    --------
    >>> from mbe_helpers import stream
    >>> from mbe_helpers.models import ResidualMLP
    >>> _ = torch.manual_seed(0)
    >>> model = ResidualMLP(4, 8, 3, n_blocks=2).double()
    >>> x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    >>> h, loss_fn = stream.forward_stream(model, x)[0][1], stream.tail_loss(model, 1, y)
    >>> true = bp_signals(model, x, y)[1]
    >>> round(perturbation_correlation(h, true, loss_fn, eps=1e-4), 3)
    1.0
    >>> abs(perturbation_correlation(h, torch.randn_like(h), loss_fn)) < 0.3
    True
    """
    _check_pair(h, a)
    if eps <= 0 or n_directions < 1:
        raise MBEInputError(f"eps must be positive and n_directions at least 1, "
                            f"got eps={eps}, n_directions={n_directions}")
    h, a = h.detach(), a.detach()
    directions = random_directions(h.shape, n_directions, seed, h.dtype, h.device)
    with torch.no_grad():
        base = forward_fn(h)
        true = torch.cat([forward_fn(h + eps * v) - base
                          for v in directions.split(chunk)]).flatten()
    predicted = (eps * directions * a).flatten(2).sum(-1).flatten()
    return pearson(predicted.double(), true.double())


def pearson(x: torch.Tensor, y: torch.Tensor) -> Measured:
    """Pearson correlation of two 1-D tensors, NaN with a reason when one has no spread.

    Examples
    --------
    >>> round(pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 7.0])), 3)
    0.993
    >>> pearson(torch.zeros(3), torch.tensor([1.0, 2.0, 3.0]))
    nan (the predicted changes have no spread (is the credit signal zero?))
    """
    xc, yc = x - x.mean(), y - y.mean()
    sx, sy = xc.norm(), yc.norm()
    if sx <= _FLOOR * max(1.0, x.abs().max().item()) * math.sqrt(len(x)):
        return _nan("the predicted changes have no spread (is the credit signal zero?)")
    if sy <= _FLOOR * max(1.0, y.abs().max().item()) * math.sqrt(len(y)):
        return _nan("the loss does not change under the perturbations (eps below precision?)")
    return Measured(float((xc @ yc) / (sx * sy)))


def nudging_test(h: torch.Tensor, a: torch.Tensor,
                 forward_fn: Callable[[torch.Tensor], torch.Tensor], *, eta: float = 0.01) -> Measured:
    r"""Mean loss change after a step against the normalised credit signal.

    :math:`\Delta = \frac{1}{N}\sum_i \ell_i(h_i - \eta\, a_i / \mathrm{rms}(a_i)) - \ell_i(h_i)`,
    with :math:`\mathrm{rms}(a_i)` the root mean square of sample i's signal.
    Negative means the signal points downhill.  Samples with a zero signal are
    left out; if all are zero the result is NaN.

    Examples
    --------
    >>> from mbe_helpers import stream
    >>> from mbe_helpers.models import ResidualMLP
    >>> _ = torch.manual_seed(0)
    >>> model = ResidualMLP(4, 8, 3, n_blocks=2).double()
    >>> x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    >>> h, loss_fn = stream.forward_stream(model, x)[0][1], stream.tail_loss(model, 1, y)
    >>> g = bp_signals(model, x, y)[1]
    >>> nudging_test(h, g, loss_fn) < 0, nudging_test(h, -g, loss_fn) > 0   # downhill, uphill
    (True, True)
    """
    _check_pair(h, a)
    rms = a.detach().flatten(1).pow(2).mean(dim=1).sqrt()
    keep = rms > _FLOOR
    if not keep.any():
        return _nan("the credit signal is zero for every sample")
    shape = (-1, *([1] * (a.dim() - 1)))
    step = torch.where(keep.reshape(shape), a / rms.clamp_min(_FLOOR).reshape(shape), 0.0)
    with torch.no_grad():
        delta = forward_fn(h - eta * step) - forward_fn(h)
    return Measured(float(delta[keep].mean()))


def bp_cosine(a: torch.Tensor, bp_grad: torch.Tensor) -> Measured:
    r"""Offline BP cosine :math:`\Gamma_l = \frac{1}{N}\sum_i \cos(a_i, g_i)`.

    Samples where either vector is at the numerical floor have no direction
    and are left out; NaN (with the reason) when none is left.

    Examples
    --------
    >>> g = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> bp_cosine(g, g), bp_cosine(-g, g), bp_cosine(g.flip(1), g)
    (1.0, -1.0, 0.0)
    >>> bp_cosine(torch.zeros(2, 2), g)
    nan (the credit signal is at the numerical floor for every sample)
    """
    _check_pair(bp_grad, a)
    a2, g2 = a.detach().flatten(1).double(), bp_grad.detach().flatten(1).double()
    na, ng = a2.norm(dim=1), g2.norm(dim=1)
    keep = (na > _FLOOR) & (ng > _FLOOR)
    if not keep.any():
        which = "credit signal" if not (na > _FLOOR).any() else "BP gradient"
        return _nan(f"the {which} is at the numerical floor for every sample")
    cos = (a2[keep] * g2[keep]).sum(1) / (na[keep] * ng[keep])
    return Measured(float(cos.mean()))


def feature_drift(initial: Mapping[str, torch.Tensor],
                  final: Mapping[str, torch.Tensor]) -> dict[str, Measured]:
    r"""Relative drift of each parameter, :math:`M = \lVert W_T - W_0\rVert_F / \lVert W_0\rVert_F`.

    Takes two state dicts (or ``named_parameters`` mappings); parameters
    present in both are compared.  A zero initial tensor (e.g. a bias
    initialised at 0) gives NaN with a reason: relative drift is undefined.

    Examples
    --------
    >>> initial = {"w": torch.tensor([3.0, 4.0]), "b": torch.zeros(2)}
    >>> final = {"w": torch.tensor([3.0, 4.5]), "b": torch.ones(2)}
    >>> feature_drift(initial, final)
    {'w': 0.1, 'b': nan (the initial tensor is zero)}
    """
    out = {}
    for name, w0 in initial.items():
        if name not in final:
            continue
        w0, w1 = w0.detach().double(), final[name].detach().double()
        if w0.shape != w1.shape:
            raise MBEInputError(f"parameter {name!r} changed shape from {tuple(w0.shape)} "
                                f"to {tuple(w1.shape)}")
        norm0 = w0.norm()
        out[name] = (_nan("the initial tensor is zero") if norm0 <= _FLOOR
                     else Measured(float((w1 - w0).norm() / norm0)))
    return out


# --------------------------------------------------------------------------- #
# Bridge residual                                                             #
# --------------------------------------------------------------------------- #

class ValueNet(nn.Module):
    """A small value network :math:`V(h, t, s)` of a state, a time and a context.

    Examples
    --------
    >>> net = ValueNet(state_dim=4, context_dim=2, hidden=8)
    >>> net(torch.zeros(5, 4), torch.zeros(5), torch.zeros(5, 2)).shape
    torch.Size([5])
    """

    def __init__(self, state_dim: int, context_dim: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim + 1 + context_dim, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, h: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([h, t.reshape(-1, 1).to(h.dtype), s], dim=-1)).squeeze(-1)


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, decay: float = 0.99) -> None:
    r"""Move the target network towards the online one: :math:`\bar\phi \leftarrow d\bar\phi + (1-d)\phi`.

    Examples
    --------
    >>> target, online = nn.Linear(2, 1), nn.Linear(2, 1)
    >>> for p, q in zip(target.parameters(), online.parameters()):
    ...     _ = p.data.fill_(0.0), q.data.fill_(1.0)
    >>> ema_update(target, online, decay=0.9)
    >>> target.weight
    Parameter containing:
    tensor([[0.1000, 0.1000]], requires_grad=True)
    """
    for p_target, p_online in zip(target.parameters(), online.parameters()):
        p_target.mul_(decay).add_(p_online, alpha=1 - decay)


def soft_min_target(target_net: nn.Module, next_states: torch.Tensor, t_next: torch.Tensor,
                    s: torch.Tensor, temperature: float) -> torch.Tensor:
    r"""Soft minimum of the target values over K noisy next states.

    :math:`\hat V = -\lambda \log \frac{1}{K} \sum_k \exp(-\bar V(h^{(k)}, t', s) / \lambda)`,
    which tends to the mean as :math:`\lambda \to \infty` and to the minimum
    as :math:`\lambda \to 0`.  ``next_states`` has shape (K, N, d).

    Examples
    --------
    >>> _ = torch.manual_seed(0)
    >>> net = ValueNet(state_dim=3, context_dim=1, hidden=8)
    >>> states, t, s = torch.randn(4, 5, 3), torch.ones(5), torch.zeros(5, 1)   # K = 4 next states
    >>> values = torch.stack([net(h, t, s) for h in states])
    >>> cold = soft_min_target(net, states, t, s, temperature=1e-4)
    >>> warm = soft_min_target(net, states, t, s, temperature=1e2)
    >>> bool((cold - values.min(0).values).abs().max() < 1e-3)     # lambda -> 0: the minimum
    True
    >>> bool((warm - values.mean(0)).abs().max() < 1e-2)           # lambda -> inf: the mean
    True
    """
    k = next_states.shape[0]
    values = torch.stack([target_net(h, t_next, s) for h in next_states])
    return -temperature * (torch.logsumexp(-values / temperature, dim=0) - math.log(k))


def bridge_residual(value_net: nn.Module, target_net: nn.Module, h: torch.Tensor,
                    t: torch.Tensor, s: torch.Tensor, next_states: torch.Tensor,
                    t_next: torch.Tensor, *, temperature: float = 0.1) -> Measured:
    r"""Bridge residual :math:`R_l = \frac{1}{N}\sum_i |V(h_i, t_i, s_i) - \hat V_i|`.

    :math:`\hat V` is :func:`soft_min_target` of the EMA target network over
    the K noisy next states.

    Examples
    --------
    >>> _ = torch.manual_seed(0)
    >>> net = ValueNet(state_dim=3, context_dim=1, hidden=8)
    >>> h, t, s = torch.randn(5, 3), torch.ones(5), torch.zeros(5, 1)
    >>> bridge_residual(net, net, h, t, s, h.expand(4, 5, 3), t) < 1e-6   # next states = h
    True
    >>> bridge_residual(net, net, h, t, s, h.expand(4, 5, 3) + 1, t) > 0
    True
    """
    if temperature <= 0:
        raise MBEInputError(f"temperature must be positive, got {temperature}")
    if next_states.dim() != h.dim() + 1 or next_states.shape[1:] != h.shape:
        raise MBEInputError(f"next_states must have shape (K, {', '.join(map(str, h.shape))}), "
                            f"got {tuple(next_states.shape)}")
    with torch.no_grad():
        residual = value_net(h, t, s) - soft_min_target(target_net, next_states, t_next, s,
                                                        temperature)
    return Measured(float(residual.abs().mean()))


# --------------------------------------------------------------------------- #
# Per-layer tables and the calibrated scale                                   #
# --------------------------------------------------------------------------- #

def measure_layers(model, x: torch.Tensor, y: torch.Tensor, signals, *, eps: float = 1e-3,
                   n_directions: int = 32, eta: float = 0.01, seed: int = 0):
    r"""Credit metrics of per-sample signals at every stream state of a residual model.

    Parameters
    ----------
    model
        A residual model (:mod:`mbe_helpers.stream` contract), evaluated as is.
    x, y : Tensor
        Evaluation batch.
    signals : sequence of Tensor or None
        ``signals[l]`` is the per-sample credit signal for state :math:`h_l`
        (shape of :math:`h_l`), or None to skip that state.  The true
        per-sample gradient is ``N * dL/dh_l`` of the batch-mean loss (see
        :func:`bp_signals`).

    Returns
    -------
    DataFrame
        One row per measured state: ``layer, rho, bp_cosine, nudge, reason``.

    Examples
    --------
    >>> from mbe_helpers.models import ResidualMLP
    >>> _ = torch.manual_seed(0)
    >>> model = ResidualMLP(4, 8, 3, n_blocks=2).double()
    >>> x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    >>> table = measure_layers(model, x, y, bp_signals(model, x, y), eps=1e-4, n_directions=8)
    >>> table.columns.tolist()
    ['layer', 'rho', 'bp_cosine', 'nudge', 'reason']
    >>> bool((table.rho > 0.99).all() and (table.bp_cosine > 0.999).all())   # the true gradient
    True
    """
    import pandas as pd

    from mbe_helpers import stream

    hidden, grads, _ = stream.stream_gradients(model, x, y)
    if len(signals) != len(hidden):
        raise MBEInputError(f"got {len(signals)} signals for {len(hidden)} stream states "
                            f"(h_0..h_{len(hidden) - 1}); give one per state, None to skip")
    rows = []
    for layer, a in enumerate(signals):
        if a is None:
            continue
        loss_fn = stream.tail_loss(model, layer, y)
        values = {"rho": perturbation_correlation(hidden[layer], a, loss_fn, eps=eps,
                                                  n_directions=n_directions, seed=seed + layer),
                  "bp_cosine": bp_cosine(a, grads[layer]),
                  "nudge": nudging_test(hidden[layer], a, loss_fn, eta=eta)}
        reasons = "; ".join(sorted({v.reason for v in values.values() if v.reason}))
        rows.append({"layer": layer, **{k: float(v) for k, v in values.items()}, "reason": reasons})
    return pd.DataFrame(rows)


def bp_signals(model, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    r"""Per-sample true gradients :math:`\partial \ell_i / \partial h_{l,i}` at every state (the positive control).

    Examples
    --------
    >>> from mbe_helpers.models import ResidualMLP
    >>> model = ResidualMLP(4, 8, 3, n_blocks=2)
    >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    >>> [tuple(g.shape) for g in bp_signals(model, x, y)]
    [(5, 8), (5, 8), (5, 8)]
    """
    from mbe_helpers import stream

    _, grads, _ = stream.stream_gradients(model, x, y)
    return [g * len(x) for g in grads]


def random_signals(model, x: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    """Independent standard-normal signals shaped like every state (the negative control).

    Examples
    --------
    >>> from mbe_helpers.models import ViTMini
    >>> model = ViTMini((1, 8, 8), 10, patch=4, width=8, n_blocks=2)
    >>> signals = random_signals(model, torch.zeros(3, 64), seed=0)
    >>> [tuple(a.shape) for a in signals]
    [(3, 5, 8), (3, 5, 8), (3, 5, 8)]
    >>> torch.equal(signals[0], random_signals(model, torch.zeros(3, 64), seed=0)[0])
    True
    """
    from mbe_helpers import stream

    with torch.no_grad():
        hidden, _ = stream.forward_stream(model, x)
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(h.shape, generator=generator, dtype=h.dtype).to(h.device) for h in hidden]


def calibrated_scale(table, *, value: str = "rho", condition: str = "condition",
                     positive: str = "positive", negative: str = "negative",
                     by: tuple[str, ...] = ("layer",), min_ceiling: float = 0.1):
    r"""Place each condition on the scale anchored by the positive and negative controls.

    For every group in ``by`` (e.g. layer), with :math:`\bar v_c` the mean of
    ``value`` over the rows (seeds) of condition c, :math:`\bar v_+`,
    :math:`\bar v_-` those of the controls and :math:`s_-` the standard
    deviation of the negative control over its rows:

    * ``fraction_of_ceiling`` :math:`= \bar v_c / \bar v_+`, NaN (with a
      reason) when the ceiling :math:`\bar v_+ < ` ``min_ceiling``: a
      positive control that failed cannot anchor anything, and the ratio
      never divides by a value that can be zero or negative;
    * ``noise_units`` :math:`= (\bar v_c - \bar v_-) / s_-`, NaN when the
      negative control has fewer than two rows or no spread.

    Returns one row per (group, condition) with ``mean, sd, n`` as well.

    Examples
    --------
    >>> import pandas as pd
    >>> table = pd.DataFrame({"condition": ["positive"] * 3 + ["negative"] * 3 + ["dfa"] * 3,
    ...                       "layer": 1, "rho": [0.9, 0.95, 1.0, 0.0, 0.1, -0.1, 0.4, 0.5, 0.6]})
    >>> scale = calibrated_scale(table)
    >>> scale[["condition", "mean", "fraction_of_ceiling", "noise_units"]].round(2)
      condition  mean  fraction_of_ceiling  noise_units
    0       dfa  0.50                 0.53          5.0
    1  negative  0.00                 0.00          0.0
    2  positive  0.95                 1.00          9.5
    """
    import numpy as np
    import pandas as pd

    missing = [c for c in (value, condition, *by) if c not in table.columns]
    if missing:
        raise MBEInputError(f"unknown column(s) {', '.join(missing)}; available: "
                            f"{', '.join(map(str, table.columns))}")
    present = set(table[condition])
    for control in (positive, negative):
        if control not in present:
            raise MBEInputError(f"control {control!r} is not among the conditions "
                                f"({', '.join(map(str, sorted(present)))})")
    stats = (table.groupby([*by, condition])[value].agg(["mean", "std", "count"])
             .rename(columns={"std": "sd", "count": "n"}).reset_index())
    rows = []
    for key, group in stats.groupby(list(by)):
        pos = group.loc[group[condition] == positive].iloc[0] if positive in set(group[condition]) else None
        neg = group.loc[group[condition] == negative].iloc[0] if negative in set(group[condition]) else None
        for _, row in group.iterrows():
            out, reasons = row.to_dict(), []
            if pos is None or not pos["mean"] >= min_ceiling:
                out["fraction_of_ceiling"] = np.nan
                reasons.append(f"positive-control ceiling below {min_ceiling}")
            else:
                out["fraction_of_ceiling"] = row["mean"] / pos["mean"]
            if neg is None or not (neg["n"] >= 2 and neg["sd"] > 0):
                out["noise_units"] = np.nan
                reasons.append("negative control has no spread to measure against")
            else:
                out["noise_units"] = (row["mean"] - neg["mean"]) / neg["sd"]
            out["reason"] = "; ".join(reasons)
            rows.append(out)
    return pd.DataFrame(rows)
