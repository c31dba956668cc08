"""Small, plain ``nn.Module`` models used throughout the book.

All models map a batch of inputs to class logits.  Inputs may be flat
feature vectors; the convolutional and patch models reshape them to
``image_shape`` when they arrive flat, so one dataset tensor feeds every
model.

The residual models share one duck-typed contract that the credit-assignment
metrics and the FA diagnostics rely on:

* ``ResidualMLP``: ``embed`` -> ``blocks`` (``h <- h + f_l(h)``) ->
  ``out_ln`` -> ``out_head``;
* ``ViTMini``: ``patch_embed`` (+ CLS token and positions) -> ``blocks`` ->
  ``norm`` -> ``head`` (read on the CLS token).

Every model checks its inputs (dtype and device of its weights, width or
image shape) and says in one sentence (:class:`MBEInputError`) what does not
fit, rather than failing deep inside a matrix product.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from mbe_helpers.errors import require_extra

require_extra("torch", "torch", "mbe_helpers.models")

import torch
from torch import nn

from mbe_helpers.errors import MBEInputError

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


def make_activation(name: str) -> nn.Module:
    """Return a fresh activation module from its name (``tanh``, ``relu``, ``gelu``).

    Examples
    --------
    >>> make_activation("gelu")
    GELU(approximate='none')
    >>> make_activation("tanh")(torch.zeros(2)).tolist()
    [0.0, 0.0]
    """
    if name not in ACTIVATIONS:
        raise MBEInputError(f"unknown activation {name!r}; choose one of "
                            f"{', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _check_inputs(model: nn.Module, x: torch.Tensor, weight: torch.Tensor, fits: bool,
                  wanted: str) -> None:
    """One sentence when ``x`` does not match the weights' dtype and device, or its shape."""
    name = type(model).__name__
    if x.dtype != weight.dtype:
        raise MBEInputError(f"{name} has {weight.dtype} weights but got {x.dtype} inputs; "
                            f"convert them with x.to({weight.dtype})")
    if x.device != weight.device:
        raise MBEInputError(f"{name} is on {weight.device} but got inputs on {x.device}; move "
                            f"them with x.to('{weight.device}')")
    if not fits:
        got = (f"samples of shape {tuple(x.shape[1:])}" if x.dim() >= 2
               else f"a tensor of shape {tuple(x.shape)}, which has no batch dimension")
        raise MBEInputError(f"{name} takes {wanted}, got {got}")


def _check_flat(model: nn.Module, x: torch.Tensor, first: nn.Linear) -> None:
    features = first.in_features
    _check_inputs(model, x, first.weight, x.dim() >= 2 and math.prod(x.shape[1:]) == features,
                  f"{features} features per sample")


def _check_images(model: nn.Module, x: torch.Tensor, weight: torch.Tensor,
                  any_size: bool = False) -> None:
    """Flat inputs of ``prod(image_shape)`` features, or images of ``image_shape``
    (any height and width when ``any_size``)."""
    shape = model.image_shape
    per_sample = tuple(x.shape[1:])
    fits = (x.dim() == 2 and per_sample[0] == math.prod(shape)) or (
        x.dim() == 4 and (per_sample[0] == shape[0] if any_size else per_sample == shape))
    _check_inputs(model, x, weight, fits, f"images of shape {shape} or {math.prod(shape)} flat "
                  "features per sample")


class MLP(nn.Module):
    """Fully connected network ``in_dim -> widths... -> out_dim``.

    Parameters
    ----------
    in_dim, out_dim : int
        Input features and number of classes.
    widths : sequence of int
        Hidden layer widths (empty for a linear-softmax model).
    activation : {"tanh", "relu", "gelu"}
    dropout : float
        Dropout probability after every hidden activation (0 disables it).

    Examples
    --------
    >>> _ = torch.manual_seed(0)
    >>> model = MLP(in_dim=4, widths=[8, 8], out_dim=3)
    >>> model(torch.randn(5, 4)).shape
    torch.Size([5, 3])
    >>> len(model.net)
    5
    """

    def __init__(self, in_dim: int, widths: Sequence[int], out_dim: int,
                 activation: str = "tanh", dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_dim
        for width in widths:
            layers += [nn.Linear(previous, width), make_activation(activation)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            previous = width
        layers.append(nn.Linear(previous, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_flat(self, x, self.net[0])
        return self.net(x.flatten(1))


class SmallCNN(nn.Module):
    """Two conv-ReLU-pool stages and a linear head.

    ``image_shape`` is ``(C, H, W)``; flat inputs are reshaped to it.  Global
    average pooling before the head makes the model size independent of H, W.

    Examples
    --------
    >>> model = SmallCNN(image_shape=(1, 8, 8), n_classes=10, channels=(4, 8))
    >>> model(torch.zeros(2, 64)).shape, model(torch.zeros(2, 1, 16, 16)).shape
    (torch.Size([2, 10]), torch.Size([2, 10]))
    """

    def __init__(self, image_shape: Sequence[int] = (1, 8, 8), n_classes: int = 10,
                 channels: Sequence[int] = (16, 32)):
        super().__init__()
        self.image_shape = tuple(image_shape)
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(self.image_shape[0], c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(c2, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(self, x, self.features[0].weight, any_size=True)
        if x.dim() == 2:
            x = x.view(-1, *self.image_shape)
        return self.head(self.features(x).flatten(1))


class ResidualBlock(nn.Module):
    """Pre-LN residual branch ``f(h) = W2 act(W1 LN(h))``; the caller adds ``h``.

    Examples
    --------
    >>> block = ResidualBlock(width=6, hidden=12)
    >>> block(torch.zeros(3, 6)).shape
    torch.Size([3, 6])
    """

    def __init__(self, width: int, hidden: int, activation: str = "gelu"):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.ln(h))))


class ResidualMLP(nn.Module):
    """Pre-LayerNorm residual MLP: ``h_0 = embed(x)``, ``h_{l+1} = h_l + f_l(h_l)``.

    Logits are ``out_head(out_ln(h_L))``.  ``forward(x, return_hidden=True)``
    also returns the residual stream ``[h_0, ..., h_L]``.

    Parameters
    ----------
    in_dim : int
    width : int
        Residual-stream width d.
    n_classes : int
    n_blocks : int
        Number of residual blocks L.
    hidden : int, optional
        Hidden width of each block (default ``width``).
    activation : {"tanh", "relu", "gelu"}

    Examples
    --------
    >>> model = ResidualMLP(in_dim=4, width=8, n_classes=3, n_blocks=2)
    >>> logits, hidden = model(torch.randn(5, 4), return_hidden=True)
    >>> logits.shape, len(hidden), hidden[-1].shape
    (torch.Size([5, 3]), 3, torch.Size([5, 8]))
    """

    def __init__(self, in_dim: int, width: int, n_classes: int, n_blocks: int,
                 hidden: int | None = None, activation: str = "gelu"):
        super().__init__()
        self.embed = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(
            ResidualBlock(width, hidden or width, activation) for _ in range(n_blocks))
        self.out_ln = nn.LayerNorm(width)
        self.out_head = nn.Linear(width, n_classes)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor, return_hidden: bool = False):
        _check_flat(self, x, self.embed)
        h = self.embed(x.flatten(1))
        hidden = [h]
        for block in self.blocks:
            h = h + block(h)
            hidden.append(h)
        logits = self.out_head(self.out_ln(h))
        return (logits, hidden) if return_hidden else logits


class TransformerBlock(nn.Module):
    """Pre-LN transformer block: attention and MLP branches, each residual.

    Examples
    --------
    >>> block = TransformerBlock(width=8, n_heads=2)
    >>> block(torch.zeros(2, 5, 8)).shape
    torch.Size([2, 5, 8])
    """

    def __init__(self, width: int, n_heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, n_heads, batch_first=True)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(),
                                 nn.Linear(mlp_ratio * width, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Return the block's residual update ``f(h)`` (the caller adds ``h``)."""
        a = self.ln1(h)
        h_mid = h + self.attn(a, a, a, need_weights=False)[0]
        return h_mid - h + self.mlp(self.ln2(h_mid))


class ViTMini(nn.Module):
    """A tiny vision transformer with a CLS token.

    ``patch_embed`` maps each non-overlapping ``patch x patch`` patch to
    ``width`` features; a learned CLS token and positions are added; each
    block returns its residual update ``f_l(h)`` and ``forward`` adds it, as in
    ``ResidualMLP``; the head reads ``norm(h_L)[:, 0]``.

    Examples
    --------
    >>> model = ViTMini(image_shape=(1, 8, 8), n_classes=10, patch=4, width=8, n_blocks=1)
    >>> model.tokens(torch.zeros(2, 64)).shape
    torch.Size([2, 5, 8])
    >>> model(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self, image_shape: Sequence[int] = (1, 8, 8), n_classes: int = 10,
                 patch: int = 4, width: int = 32, n_blocks: int = 2, n_heads: int = 2):
        super().__init__()
        self.image_shape = tuple(image_shape)
        c, h, w = self.image_shape
        if h % patch or w % patch:
            raise MBEInputError(f"image size {h}x{w} is not divisible by patch size {patch}; "
                                "choose a patch size that divides both")
        n_patches = (h // patch) * (w // patch)
        self.patch_embed = nn.Conv2d(c, width, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, n_patches + 1, width) / math.sqrt(width))
        self.blocks = nn.ModuleList(TransformerBlock(width, n_heads) for _ in range(n_blocks))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, n_classes)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Embed images (or flat inputs) as ``[CLS, patches] + positions``."""
        _check_images(self, x, self.patch_embed.weight)
        if x.dim() == 2:
            x = x.view(-1, *self.image_shape)
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.pos

    def forward(self, x: torch.Tensor, return_hidden: bool = False):
        h = self.tokens(x)
        hidden = [h]
        for block in self.blocks:
            h = h + block(h)
            hidden.append(h)
        logits = self.head(self.norm(h)[:, 0])
        return (logits, hidden) if return_hidden else logits


#: Architectures :func:`make_model` builds.
MODELS = ("mlp", "resmlp", "cnn", "vit")


def make_model(kind: str, data, *, width: int, depth: int, activation: str | None = None,
               dropout: float = 0.0) -> nn.Module:
    """The one model factory: an architecture for ``data`` (anything with ``in_dim``,
    ``n_classes``, ``image_shape`` and ``name``, e.g. a :class:`mbe_helpers.data.Dataset`).

    * ``mlp``: ``MLP(in, [width] * depth, classes)``;
    * ``resmlp``: ``ResidualMLP(in, width, classes, depth)`` (``depth`` residual blocks);
    * ``cnn``: ``SmallCNN`` with channels ``(width // 2, width)``;
    * ``vit``: ``ViTMini`` of ``width`` and ``depth`` blocks on 4 x 4 patches (2 x 2
      when an image side is not a multiple of 4), 4 heads when ``width`` allows, else 1.

    ``activation`` (default: each class's own) applies to ``mlp`` and ``resmlp``.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> digits = SimpleNamespace(in_dim=64, n_classes=10, image_shape=(1, 8, 8), name="digits")
    >>> type(make_model("vit", digits, width=32, depth=2)).__name__
    'ViTMini'
    >>> make_model("mlp", digits, width=16, depth=2)(torch.zeros(3, 64)).shape
    torch.Size([3, 10])
    """
    style = {} if activation is None else {"activation": activation}
    if kind == "mlp":
        return MLP(data.in_dim, [width] * depth, data.n_classes, dropout=dropout, **style)
    if kind == "resmlp":
        return ResidualMLP(data.in_dim, width, data.n_classes, depth, **style)
    if kind not in MODELS:
        raise MBEInputError(f"unknown model {kind!r}; choose one of {', '.join(MODELS)}")
    if data.image_shape is None:
        raise MBEInputError(f"model {kind!r} needs an image dataset, and {data.name} has none")
    if kind == "cnn":
        return SmallCNN(data.image_shape, data.n_classes, channels=(max(1, width // 2), width))
    patch = 4 if min(data.image_shape[1:]) % 4 == 0 else 2
    return ViTMini(data.image_shape, data.n_classes, patch=patch, width=width, n_blocks=depth,
                   n_heads=4 if width % 4 == 0 else 1)
