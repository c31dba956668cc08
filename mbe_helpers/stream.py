r"""The residual stream of a residual network, read through a duck-typed contract.

A residual model exposes

* an embedding: ``tokens(x)`` (token models that add a CLS token and
  positions), else ``embed(x)``, else ``patch_embed(x)``;
* ``blocks``: residual branches, :math:`h_{l+1} = h_l + f_l(h_l)`;
* a terminal stack: ``out_ln`` + ``out_head`` (read on the whole last state),
  or ``norm`` + ``head`` (read on the CLS token, position 0, of a
  ``(N, T, d)`` token state, and on the whole state of a flat ``(N, d)`` one).

``ResidualMLP`` and ``ViTMini`` of :mod:`mbe_helpers.models` meet it; so does
any user model with the same attribute names.  The credit-assignment metrics
and the FA diagnostics are written against these functions only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from mbe_helpers.errors import require_extra

require_extra("torch", "torch", "mbe_helpers.stream")

import torch
import torch.nn.functional as F

from mbe_helpers.errors import MBEInputError


def check_contract(model) -> None:
    """Raise one sentence naming what a model lacks to be read as a residual stream.

    Examples
    --------
    >>> from mbe_helpers.models import MLP, ResidualMLP
    >>> check_contract(ResidualMLP(4, 8, 3, n_blocks=2))
    >>> check_contract(MLP(4, [8], 3))
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: MLP is not a residual model: it lacks an embedding ...
    """
    missing = []
    if not any(hasattr(model, name) for name in ("tokens", "embed", "patch_embed")):
        missing.append("an embedding (`embed` or `patch_embed`)")
    if not hasattr(model, "blocks"):
        missing.append("`blocks` (a list of residual branches)")
    if not ((hasattr(model, "out_ln") and hasattr(model, "out_head"))
            or (hasattr(model, "norm") and hasattr(model, "head"))):
        missing.append("a terminal stack (`out_ln` + `out_head`, or `norm` + `head`)")
    if missing:
        raise MBEInputError(f"{type(model).__name__} is not a residual model: it lacks "
                            f"{'; '.join(missing)}")


def embed(model, x: torch.Tensor) -> torch.Tensor:
    """The stream's first state :math:`h_0`.

    Examples
    --------
    >>> from mbe_helpers.models import ResidualMLP, ViTMini
    >>> embed(ResidualMLP(4, 8, 3, n_blocks=2), torch.zeros(5, 4)).shape
    torch.Size([5, 8])
    >>> embed(ViTMini((1, 8, 8), 10, patch=4, width=8), torch.zeros(5, 64)).shape
    torch.Size([5, 5, 8])
    """
    if hasattr(model, "tokens"):
        return model.tokens(x)
    if hasattr(model, "embed"):
        return model.embed(x.flatten(1) if x.dim() > 2 else x)
    return model.patch_embed(x)


def readout(model, h: torch.Tensor) -> torch.Tensor:
    """Logits from the last state: ``out_head(out_ln(h))``, else ``head(norm(h))`` (of the CLS token
    when the stream holds tokens, ``(N, T, d)``; of each sample's state when it is flat, ``(N, d)``).

    Examples
    --------
    >>> from mbe_helpers.models import ResidualMLP, ViTMini
    >>> readout(ResidualMLP(4, 8, 3, n_blocks=2), torch.zeros(5, 8)).shape
    torch.Size([5, 3])
    >>> readout(ViTMini((1, 8, 8), 10, patch=4, width=8), torch.zeros(5, 5, 8)).shape
    torch.Size([5, 10])
    """
    if hasattr(model, "out_ln") and hasattr(model, "out_head"):
        return model.out_head(model.out_ln(h))
    normed = model.norm(h)
    return model.head(normed[:, 0, :] if h.dim() == 3 else normed)


def forward_stream(model, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run the model along its explicit residual path: ``([h_0, ..., h_L], logits)``.

    Examples
    --------
    >>> from mbe_helpers.models import ResidualMLP
    >>> model = ResidualMLP(4, 8, 3, n_blocks=2)
    >>> x = torch.randn(5, 4)
    >>> hidden, logits = forward_stream(model, x)
    >>> len(hidden), torch.allclose(logits, model(x))
    (3, True)
    """
    check_contract(model)
    h = embed(model, x)
    hidden = [h]
    for block in model.blocks:
        h = h + block(h)
        hidden.append(h)
    return hidden, readout(model, h)


def stream_gradients(model, x: torch.Tensor, y: torch.Tensor
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    r"""Stream states, their BP gradients and the logits.

    The gradients are :math:`\partial L / \partial h_l` of the batch-mean
    cross-entropy :math:`L`, taken through the explicit residual path; no
    parameter gradient is formed.  All returned tensors are detached.

    Examples
    --------
    >>> from mbe_helpers.models import ResidualMLP
    >>> _ = torch.manual_seed(0)
    >>> model = ResidualMLP(4, 8, 3, n_blocks=2)
    >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    >>> hidden, grads, logits = stream_gradients(model, x, y)
    >>> [tuple(g.shape) for g in grads], grads[0].requires_grad
    ([(5, 8), (5, 8), (5, 8)], False)
    """
    with torch.enable_grad():
        hidden, logits = forward_stream(model, x)
        loss = F.cross_entropy(logits, y)
        grads = torch.autograd.grad(loss, hidden)
    return [h.detach() for h in hidden], [g.detach() for g in grads], logits.detach()


def output_error(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""The output error :math:`e = \mathrm{softmax}(z) - \mathrm{onehot}(y)` (per sample).

    Examples
    --------
    >>> output_error(torch.zeros(1, 2), torch.tensor([1]))
    tensor([[ 0.5000, -0.5000]])
    >>> e = output_error(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    >>> e.shape, bool(e.sum(dim=1).abs().max() < 1e-6)
    (torch.Size([4, 3]), True)
    """
    return torch.softmax(logits, dim=-1) - F.one_hot(y, logits.shape[-1]).to(logits.dtype)


def tail_loss(model, layer: int, y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""The per-sample loss as a function of the stream state :math:`h_l`.

    Returns ``fn(h)`` with ``h`` of shape ``(..., N, *state)`` (any leading
    dimensions, e.g. a batch of perturbation directions) giving the
    cross-entropy of each sample, shape ``(..., N)``: the blocks
    ``layer, ..., L-1`` and the readout are applied to every leading slice.

    Examples
    --------
    >>> import torch.nn.functional as F
    >>> from mbe_helpers.models import ResidualMLP
    >>> model = ResidualMLP(4, 8, 3, n_blocks=2)
    >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    >>> hidden, logits = forward_stream(model, x)
    >>> loss_from_h1 = tail_loss(model, 1, y)
    >>> torch.allclose(loss_from_h1(hidden[1]), F.cross_entropy(logits, y, reduction="none"))
    True
    >>> loss_from_h1(hidden[1].expand(7, 5, 8)).shape
    torch.Size([7, 5])
    """
    check_contract(model)
    n_blocks = len(model.blocks)
    state_dims = 2 if hasattr(model, "tokens") or hasattr(model, "head") else 1
    if not 0 <= layer <= n_blocks:
        raise MBEInputError(f"layer must be between 0 and {n_blocks}, got {layer}")

    def loss_from(h: torch.Tensor) -> torch.Tensor:
        lead = h.shape[: h.dim() - 1 - state_dims]
        flat = h.reshape(-1, *h.shape[len(lead) + 1:])
        for block in list(model.blocks)[layer:]:
            flat = flat + block(flat)
        logits = readout(model, flat)
        labels = y.repeat(math.prod(lead))
        return F.cross_entropy(logits, labels, reduction="none").reshape(*lead, -1)

    return loss_from

