r"""Learning rules that replace backpropagation's transport of the error.

A learning rule is an object with ``grads(model, x, y) -> loss``: it fills
``p.grad`` of the trainable parameters (accumulating, like ``backward``) and
returns the batch-mean cross-entropy.  An optimiser step then applies them.

* :class:`Backprop` -- ordinary gradients.
* :class:`FeedbackAlignment` (Lillicrap et al., 2016) -- every ``nn.Linear``
  passes the error backwards through a fixed random matrix :math:`B` (shape of
  :math:`W`) instead of :math:`W^\top`; everything else (activations,
  LayerNorm, residual sums) keeps its true derivative.
* :class:`DirectFeedbackAlignment` (Nøkland, 2016) -- the network is cut into
  segments at detached inputs; the output error
  :math:`e = \mathrm{softmax}(z) - \mathrm{onehot}(y)` is sent to the output
  of every segment :math:`l` through a fixed :math:`B_l \in \mathbb{R}^{d_l
  \times C}` (entries :math:`\mathcal N(0, 1/C)`), i.e. the segment receives
  :math:`\delta_l = e B_l^\top / N` as the gradient of its output; the head
  is trained with its true (local) gradient.  Options: ``penalty`` adds
  :math:`\lambda \lVert f_l(h)\rVert^2` on every residual branch (penalised
  DFA); ``shuffle=True`` redraws every :math:`B_l` at every step (a control
  whose feedback has no consistent direction).
* :class:`FrozenBlocks` -- backprop, but the residual blocks stay at their
  initialisation: the architecture-matched floor.

For a ``ViTMini`` the segments are the token embedding and each block's
update; the signal :math:`e B_l^\top` is given to every token (the same
vector at every position), the head reads the detached CLS token.  FA on a
``ViTMini`` replaces :math:`W^\top` in its ``nn.Linear`` layers (MLPs, head);
the attention projections, which ``nn.MultiheadAttention`` applies without
calling a Linear's ``forward``, keep their true backward.

For a ``ResidualMLP`` the DFA segments are the embedding (output
:math:`h_0`) and each block's residual branch (output :math:`f_l(h_l)`, whose
gradient is that of :math:`h_{l+1}`); the credit signal a rule assigns to
stream state :math:`h_l` is :meth:`DirectFeedbackAlignment.signals`.  For an
``MLP`` the segments end after each hidden activation.

Feedback matrices come from an explicit seed and are part of
:meth:`state_dict`, so a checkpoint carries them (see :func:`save_checkpoint`).
"""

from __future__ import annotations

import math
import pickle
import re
from contextlib import contextmanager
from pathlib import Path

from mbe_helpers.errors import require_extra

require_extra("torch", "torch", "mbe_helpers.feedback")

import torch
import torch.nn.functional as F
from torch import nn

from mbe_helpers.errors import MBEInputError
from mbe_helpers.models import MLP, ResidualMLP, ViTMini
from mbe_helpers import stream
from mbe_helpers.stream import output_error

RULES = ("bp", "fa", "dfa", "dfa_penalized", "dfa_shuffled", "frozen")


class Backprop:
    """Ordinary backpropagation.

    Examples
    --------
    >>> from mbe_helpers.models import ResidualMLP
    >>> model = ResidualMLP(4, 8, 3, n_blocks=2)
    >>> loss = Backprop().grads(model, torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
    >>> loss.shape, model.blocks[0].fc1.weight.grad is not None
    (torch.Size([]), True)
    >>> Backprop().state_dict()
    {'name': 'bp'}
    """

    name = "bp"

    def grads(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach()

    def state_dict(self) -> dict:
        return {"name": self.name}


class FrozenBlocks(Backprop):
    """Backprop with the residual blocks frozen at initialisation (only embed / LN / head learn).

    Examples
    --------
    >>> from mbe_helpers.models import ResidualMLP
    >>> model = FrozenBlocks().freeze(ResidualMLP(4, 8, 3, n_blocks=2))
    >>> any(p.requires_grad for p in model.blocks.parameters()), model.out_head.weight.requires_grad
    (False, True)
    """

    name = "frozen"

    def freeze(self, model: nn.Module) -> nn.Module:
        """Set ``requires_grad=False`` on every block parameter; returns the model."""
        if not hasattr(model, "blocks"):
            raise MBEInputError(f"{type(model).__name__} has no `blocks` to freeze")
        for p in model.blocks.parameters():
            p.requires_grad_(False)
        return model

    def grads(self, model, x, y):
        self.freeze(model)
        return super().grads(model, x, y)


# --------------------------------------------------------------------------- #
# Feedback alignment                                                          #
# --------------------------------------------------------------------------- #

class _FALinear(torch.autograd.Function):
    """``y = x W^T + b`` whose backward sends ``grad_y @ B`` to ``x`` (B in place of W)."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback):
        ctx.save_for_backward(x, feedback)
        ctx.has_bias = bias is not None
        out = x @ weight.T
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx, grad_out):
        x, feedback = ctx.saved_tensors
        grad_x = grad_out @ feedback
        grad_w = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


def _draw(shape: tuple[int, ...], scale: float, generator: torch.Generator,
          like: torch.Tensor) -> torch.Tensor:
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(like)


class FeedbackAlignment:
    r"""Feedback alignment: each ``nn.Linear`` propagates the error through a fixed :math:`B`.

    :math:`B` has the shape of :math:`W` and entries
    :math:`\mathcal N(0, 1/\text{fan\_in})`, drawn from ``seed`` the first time
    the model is seen.

    Examples
    --------
    >>> from mbe_helpers.models import MLP
    >>> model, rule = MLP(4, [8], 3), FeedbackAlignment(seed=0)
    >>> loss = rule.grads(model, torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
    >>> {name: tuple(b.shape) for name, b in rule.matrices.items()}
    {'net.0': (8, 4), 'net.2': (3, 8)}
    >>> model.net[0].weight.grad.shape
    torch.Size([8, 4])
    """

    name = "fa"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.matrices: dict[str, torch.Tensor] = {}

    def _ensure(self, model: nn.Module) -> None:
        if self.matrices:
            return
        generator = torch.Generator().manual_seed(self.seed)
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                w = module.weight
                self.matrices[name] = _draw(tuple(w.shape), 1 / math.sqrt(w.shape[1]), generator, w)

    @contextmanager
    def installed(self, model: nn.Module):
        """Within the block, the model's linear layers use the feedback matrices backwards."""
        self._ensure(model)
        patched = []
        for name, module in model.named_modules():
            if name in self.matrices:
                feedback = self.matrices[name]
                module.forward = (lambda m, b: lambda x: _FALinear.apply(x, m.weight, m.bias, b))(
                    module, feedback)
                patched.append(module)
        try:
            yield model
        finally:
            for module in patched:
                del module.forward            # back to the class's forward

    def grads(self, model, x, y):
        with self.installed(model):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        return loss.detach()

    def state_dict(self) -> dict:
        return {"name": self.name, "seed": self.seed, "matrices": dict(self.matrices)}


# --------------------------------------------------------------------------- #
# Direct feedback alignment                                                   #
# --------------------------------------------------------------------------- #

def _dfa_forward(model: nn.Module, x: torch.Tensor):
    """Forward pass cut into segments: ``(segment outputs, residual branch outputs, logits)``.

    Each segment sees a detached input, so a gradient injected at its output
    trains that segment alone.  The head sees a detached last state and is
    trained by its own (true, local) gradient.
    """
    if isinstance(model, (ResidualMLP, ViTMini)):
        h = stream.embed(model, x)
        outputs, branches = [h], []
        state = h.detach()
        for block in model.blocks:
            branch = block(state)
            outputs.append(branch)
            branches.append(branch)
            state = state + branch.detach()
        return outputs, branches, stream.readout(model, state)
    if isinstance(model, MLP):
        layers, outputs, state = list(model.net), [], x.flatten(1)
        for layer in layers[:-1]:
            state = layer(state.detach() if isinstance(layer, nn.Linear) else state)
            if not isinstance(layer, (nn.Linear, nn.Dropout)):
                outputs.append(state)
        return outputs, [], layers[-1](state.detach())
    raise MBEInputError(f"direct feedback alignment is defined here for ResidualMLP, ViTMini and MLP, "
                        f"not {type(model).__name__}")


def _per_position(signal: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """A per-sample signal (N, d), repeated at every token of a token output (N, T, d)."""
    return signal[:, None, :].expand_as(output) if output.dim() == 3 else signal


class DirectFeedbackAlignment:
    r"""Direct feedback alignment, optionally penalised or with shuffled feedback.

    Parameters
    ----------
    seed : int
        Seed of the feedback matrices :math:`B_l`, entries :math:`\mathcal N(0, 1/C)`.
    penalty : float
        :math:`\lambda` of the activity penalty :math:`\lambda \frac{1}{N}\sum_i
        \lVert f_l(h_i)\rVert^2` on every residual branch (0 = vanilla DFA).
    shuffle : bool
        Redraw every :math:`B_l` at every step (no consistent feedback direction).

    Examples
    --------
    >>> from mbe_helpers.models import ResidualMLP
    >>> model, rule = ResidualMLP(4, 8, 3, n_blocks=2), DirectFeedbackAlignment(seed=0)
    >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    >>> loss = rule.grads(model, x, y)
    >>> rule.name, [tuple(b.shape) for b in rule.matrices]
    ('dfa', [(8, 3), (8, 3), (8, 3)])
    >>> [tuple(a.shape) for a in rule.signals(model(x), y)]
    [(5, 8), (5, 8), (5, 8)]
    >>> DirectFeedbackAlignment(penalty=0.01).name, DirectFeedbackAlignment(shuffle=True).name
    ('dfa_penalized', 'dfa_shuffled')
    """

    def __init__(self, seed: int = 0, penalty: float = 0.0, shuffle: bool = False):
        if penalty < 0:
            raise MBEInputError(f"penalty must be non-negative, got {penalty}")
        self.seed, self.penalty, self.shuffle = seed, penalty, shuffle
        self.name = "dfa_shuffled" if shuffle else ("dfa_penalized" if penalty else "dfa")
        self.matrices: list[torch.Tensor] = []
        self._generator = torch.Generator().manual_seed(seed)

    def _draw_all(self, widths: list[int], n_classes: int, like: torch.Tensor) -> None:
        scale = 1 / math.sqrt(n_classes)
        self.matrices = [_draw((w, n_classes), scale, self._generator, like) for w in widths]

    def grads(self, model, x, y):
        outputs, branches, logits = _dfa_forward(model, x)
        if self.shuffle or not self.matrices:
            self._draw_all([o.shape[-1] for o in outputs], logits.shape[-1], logits)
        loss = F.cross_entropy(logits, y)
        error = output_error(logits.detach(), y) / len(y)
        local = loss + self.penalty * sum(b.pow(2).sum(-1).mean() for b in branches)
        injected = [_per_position(error @ b.T, out) for b, out in zip(self.matrices, outputs)]
        torch.autograd.backward([local, *outputs], [torch.ones_like(local), *injected])
        return loss.detach()

    def signals(self, logits: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        r"""Per-sample credit signals :math:`a_l = e B_l^\top`, one per segment output.

        For a ResidualMLP entry l belongs to stream state :math:`h_l`
        (l = 0..L): entry 0 to the embedding, entry l >= 1 to the branch of
        block l-1, whose output gradient is that of :math:`h_l`.
        """
        if not self.matrices:
            raise MBEInputError("this rule has no feedback matrices yet: train with it or load them")
        error = output_error(logits.detach(), y)
        return [error @ b.T.to(error) for b in self.matrices]

    def state_dict(self) -> dict:
        return {"name": self.name, "seed": self.seed, "penalty": self.penalty,
                "shuffle": self.shuffle, "matrices": list(self.matrices)}


def make_rule(name: str, *, seed: int = 0, penalty: float = 1e-2):
    """A learning rule from its name: one of ``RULES``.

    Examples
    --------
    >>> {name: type(make_rule(name)).__name__ for name in ("bp", "fa", "dfa", "frozen")}
    {'bp': 'Backprop', 'fa': 'FeedbackAlignment', 'dfa': 'DirectFeedbackAlignment',
     'frozen': 'FrozenBlocks'}
    >>> make_rule("dfa_penalized", penalty=0.1).penalty, make_rule("dfa_shuffled").shuffle
    (0.1, True)
    """
    if name == "bp":
        return Backprop()
    if name == "frozen":
        return FrozenBlocks()
    if name == "fa":
        return FeedbackAlignment(seed)
    if name == "dfa":
        return DirectFeedbackAlignment(seed)
    if name == "dfa_penalized":
        return DirectFeedbackAlignment(seed, penalty=penalty)
    if name == "dfa_shuffled":
        return DirectFeedbackAlignment(seed, shuffle=True)
    raise MBEInputError(f"unknown learning rule {name!r}; choose one of {', '.join(RULES)}")


# --------------------------------------------------------------------------- #
# Checkpoints                                                                 #
# --------------------------------------------------------------------------- #

def save_checkpoint(path: str | Path, model: nn.Module, rule, **meta) -> None:
    """Save model weights, the rule (with its feedback matrices) and plain metadata.

    Examples
    --------
    >>> import tempfile
    >>> from mbe_helpers.models import ResidualMLP
    >>> path = Path(tempfile.mkdtemp()) / "dfa.pt"
    >>> model, rule = ResidualMLP(4, 8, 3, n_blocks=2), make_rule("dfa", seed=1)
    >>> _ = rule.grads(model, torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
    >>> save_checkpoint(path, model, rule, epoch=3)
    >>> sorted(torch.load(path, weights_only=True))
    ['meta', 'model', 'rule']
    """
    torch.save({"model": model.state_dict(), "rule": rule.state_dict(), "meta": meta}, path)


def _misfit(want: dict, got: dict) -> str:
    """How saved weights ``got`` differ from a model's ``want``, in a few words."""
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    shapes = [k for k in want if k in got and tuple(want[k].shape) != tuple(got[k].shape)]
    parts = [f"{len(missing)} missing, e.g. {missing[0]!r}"] if missing else []
    parts += [f"{len(extra)} unexpected, e.g. {extra[0]!r}"] if extra else []
    parts += [f"{len(shapes)} of another shape, e.g. {shapes[0]!r} is "
              f"{tuple(got[shapes[0]].shape)} there and {tuple(want[shapes[0]].shape)} here"
              ] if shapes else []
    return "; ".join(parts) or "incompatible tensors"


def load_checkpoint(path: str | Path, model: nn.Module):
    """Load a checkpoint with ``weights_only=True``; returns ``(model, rule, meta)``.

    The rule comes back with the exact feedback matrices it trained with.

    Raises
    ------
    MBEInputError
        One sentence when the file is missing or unreadable, is refused
        because it holds objects other than tensors (nothing in it is
        executed), is not a checkpoint of :func:`save_checkpoint` (e.g. a
        plain state dict, or one whose rule has no name), or holds weights of
        another architecture.

    Examples
    --------
    >>> import tempfile
    >>> from mbe_helpers.models import ResidualMLP
    >>> path = Path(tempfile.mkdtemp()) / "dfa.pt"
    >>> model, rule = ResidualMLP(4, 8, 3, n_blocks=2), make_rule("dfa", seed=1)
    >>> _ = rule.grads(model, torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
    >>> save_checkpoint(path, model, rule, epoch=3)
    >>> loaded, loaded_rule, meta = load_checkpoint(path, ResidualMLP(4, 8, 3, n_blocks=2))
    >>> meta, loaded_rule.name, torch.equal(loaded_rule.matrices[1], rule.matrices[1])
    ({'epoch': 3}, 'dfa', True)
    >>> load_checkpoint(path, ResidualMLP(4, 16, 3, n_blocks=2))
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: the weights in ... do not fit this ResidualMLP (...
    """
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise MBEInputError(f"the checkpoint {path} does not exist") from None
    except pickle.UnpicklingError as exc:  # its text would suggest the unsafe load: never shown
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise MBEInputError(f"the checkpoint {path} was refused because it holds objects other "
                                f"than tensors ({found.group(1)}), and load_checkpoint never "
                                "unpickles those") from None
        raise MBEInputError(f"the checkpoint {path} could not be read as a torch file of tensors "
                            "(a weights-only load refuses its contents)") from None
    except Exception as exc:  # noqa: BLE001 - torch raises KeyError, RuntimeError, EOFError...
        raise MBEInputError(f"the checkpoint {path} could not be read as a torch file "
                            f"({type(exc).__name__})") from None
    if not isinstance(state, dict) or not {"model", "rule", "meta"} <= set(state):
        raise MBEInputError(f"{path} is not a checkpoint of save_checkpoint (it lacks 'model', "
                            "'rule' and 'meta'); load a plain state dict with "
                            "model.load_state_dict(torch.load(path, weights_only=True))")
    saved = state["rule"]
    if not isinstance(saved, dict) or not isinstance(saved.get("name"), str):
        raise MBEInputError(f"the checkpoint {path} does not name its learning rule (its 'rule' "
                            "entry lacks 'name'); save it with save_checkpoint(path, model, rule)")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise MBEInputError(f"the weights in {path} do not fit this {type(model).__name__} "
                            f"({_misfit(model.state_dict(), state['model'])}); build the model "
                            "with the architecture they were saved from") from None
    rule = make_rule(saved["name"], seed=saved.get("seed", 0), penalty=saved.get("penalty", 0.0))
    if "matrices" in saved:
        rule.matrices = saved["matrices"]
    return model, rule, state["meta"]
