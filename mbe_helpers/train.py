r"""Training loops with probes at chosen epochs and divergence handling.

Three layers, each usable on its own:

* :func:`train` trains one model (full-batch or minibatch; SGD with momentum,
  Adam, AdamW; weight decay; dropout) and returns one flat record;
* :func:`train_ensemble` trains K same-architecture models at once as one
  vmapped ensemble (``torch.func.stack_module_state`` + ``functional_call``)
  with per-model learning rate, weight decay, momentum, data and seed, giving
  the records sequential training would give, to rounding;
* :data:`train_run` (a :class:`TrainRun`) is the grid's run function: a flat
  config dict in (see :data:`TRAIN_DEFAULTS`), data + model + optimizer built
  from it, one flat record out.

A *metric* is ``metric(model, batch) -> float | dict`` with ``batch = (x, y)``;
a *probe* is a list of metrics evaluated at chosen epochs.  Epoch ``e`` means
"after ``e`` epochs of training" (``0`` is the initialisation).  The record has
``<name>@<epoch>`` for every probe value (a metric returning a dict contributes
its own keys), the built-in ``train_loss``, ``train_acc``, ``val_loss`` and
``val_acc`` at every probe epoch, the final ``train_loss``, ``val_loss``,
``val_acc``, ``test_loss`` and ``test_acc``, and ``status`` (``ok`` or
``diverged``, with ``diverged_epoch``).

Divergence is judged against the run itself.  With :math:`L_0` the training
loss at initialisation (the whole training split) and :math:`C` the number of
classes, a run diverges at the first epoch where a training loss (of any
optimisation step, or of the whole training split at a probe epoch or at the
end) is NaN, infinite or above

.. math:: \text{limit} = 10 \, \max(L_0, \ln C)

(:data:`DIVERGENCE_FACTOR` = 10), or where the validation loss is not
finite.  :math:`\ln C` is the loss of uniform predictions, so a model that
starts near-perfect is not judged by its tiny :math:`L_0`; a loss ten times
above both means the logits have blown up even while they are still finite
(Adam at ``lr=1e3`` climbs from 2.3 to about 2000).  A diverged run stops at
once; its missing values are NaN.  The sequential loop and the ensemble apply
the same rule at the same points, so both engines record the same status.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import math
import numbers
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from mbe_helpers.errors import require_extra

require_extra("torch", "torch", "mbe_helpers.train")

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state

from mbe_helpers.data import DATASETS, Dataset, check_device, load_dataset
from mbe_helpers.errors import MBEInputError
from mbe_helpers.runtime import seeded
from mbe_helpers.models import ACTIVATIONS, make_model

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
Metric = Callable[[nn.Module, Batch], Any]
Probes = Sequence[Metric] | Mapping[str, Metric]

OPTIMIZERS = ("sgd", "adam", "adamw")
MODELS = ("mlp", "resmlp", "cnn", "vit")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_PROBE_EPOCHS = (5, 10, 20, 50)
BUILTIN_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc")
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
DIVERGENCE_FACTOR = 10.0

TRAIN_DEFAULTS: dict[str, Any] = {
    "dataset": "digits", "data_root": None, "n_train": None, "label_noise": 0.0,
    "val_fraction": 0.2, "test_fraction": 0.2, "split_seed": 0,
    "model": "mlp", "width": 64, "depth": 2, "activation": "tanh", "dropout": 0.0,
    "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "momentum": 0.9,
    "epochs": 50, "batch_size": None, "probe_epochs": None, "seed": 0,
    "dtype": "float32", "device": "cpu",
}
"""Keys of a training config and their defaults (``probe_epochs=None`` means
``{5, 10, 20, 50, epochs}`` up to ``epochs``; ``batch_size=None`` is full batch;
``depth`` hidden layers / blocks of width ``width``; ``model`` is one of
``mlp``, ``resmlp``, ``cnn`` (channels ``width // 2, width``), ``vit``)."""

_INT_KEYS = ("width", "depth", "epochs", "seed", "split_seed", "n_train", "batch_size")
_FLOAT_KEYS = ("label_noise", "val_fraction", "test_fraction", "dropout", "lr",
               "weight_decay", "momentum")
_PER_MODEL_KEYS = frozenset({"lr", "weight_decay", "momentum", "seed", "label_noise"})
_SHAPE_KEYS = ("dataset", "n_train", "model", "width", "depth", "activation", "optimizer",
               "batch_size", "dtype", "device")
_CALIBRATION_REPEATS = 3
_EVAL_CHUNK = 8192


# ---------------------------------------------------------------- configs


def resolve_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Fill defaults into a training config, coerce types and validate it.

    Values that are ``None`` or NaN (a missing cell of a heterogeneous grid)
    take their default.  Raises :class:`MBEInputError`, one sentence naming
    the key, for a config that is not a mapping, unknown keys, values of the wrong
    type, unknown choices, values out of range and a device this machine lacks.

    Examples
    --------
    >>> cfg = resolve_config({"width": 16, "lr": 0.01, "n_train": float("nan")})
    >>> cfg["width"], cfg["lr"], cfg["n_train"], cfg["epochs"], cfg["probe_epochs"]
    (16, 0.01, None, 50, (5, 10, 20, 50))
    >>> resolve_config({"widht": 16})
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: unknown config keys ['widht']; known keys are ['activation', ...
    """
    if not isinstance(config, Mapping):
        raise MBEInputError(f"a config must be a mapping of keys to values, got "
                            f"{type(config).__name__}; pass a dict such as {{'lr': 0.1}}")
    unknown = sorted(set(config) - set(TRAIN_DEFAULTS))
    if unknown:
        raise MBEInputError(f"unknown config keys {unknown}; known keys are "
                            f"{sorted(TRAIN_DEFAULTS)}")
    cfg = {**TRAIN_DEFAULTS, **{k: v for k, v in config.items() if not _is_missing(v)}}
    for key in _INT_KEYS:
        cfg[key] = _as_int(key, cfg[key])
    for key in _FLOAT_KEYS:
        cfg[key] = _as_float(key, cfg[key])
    _check_choices(cfg)
    _check_ranges(cfg)
    check_device(cfg["device"])
    cfg["probe_epochs"] = _resolve_probe_epochs(cfg["probe_epochs"], cfg["epochs"])
    return cfg


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _number(value: Any) -> float:
    """``float(value)``, NaN for booleans and anything that is not a number."""
    try:
        return math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return math.nan


def _as_int(key: str, value: Any) -> int | None:
    if value is None:
        return None
    if not _number(value).is_integer():
        raise MBEInputError(f"config key {key!r} must be an integer, got {value!r}")
    return int(_number(value))


def _as_float(key: str, value: Any) -> float:
    if not math.isfinite(_number(value)):
        raise MBEInputError(f"config key {key!r} must be a finite number (e.g. "
                            f"{TRAIN_DEFAULTS[key]!r}), got {value!r}")
    return _number(value)


def _check_choices(cfg: dict[str, Any]) -> None:
    for key, allowed in (("optimizer", OPTIMIZERS), ("model", MODELS), ("dataset", DATASETS),
                         ("activation", tuple(ACTIVATIONS)), ("dtype", tuple(DTYPES))):
        if cfg[key] not in allowed:
            raise MBEInputError(f"unknown {key} {cfg[key]!r}; choose one of {', '.join(allowed)}")


def _check_ranges(cfg: dict[str, Any]) -> None:
    rules = [("lr", cfg["lr"] > 0, "be positive"),
             ("weight_decay", cfg["weight_decay"] >= 0, "be non-negative"),
             ("momentum", 0 <= cfg["momentum"] < 1, "lie in [0, 1)"),
             ("dropout", 0 <= cfg["dropout"] < 1, "lie in [0, 1)"),
             ("width", cfg["width"] >= 1, "be at least 1"),
             ("depth", cfg["depth"] >= 0, "be non-negative"),
             ("epochs", cfg["epochs"] >= 0, "be non-negative"),
             ("batch_size", cfg["batch_size"] is None or cfg["batch_size"] >= 1,
              "be positive or None")]
    for key, ok, what in rules:
        if not ok:
            raise MBEInputError(f"config key {key!r} must {what}, got {cfg[key]!r}")


def _resolve_probe_epochs(value: Any, epochs: int) -> tuple[int, ...]:
    if value is None:
        return tuple(sorted({e for e in (*DEFAULT_PROBE_EPOCHS, epochs) if e <= epochs}))
    if isinstance(value, str):
        value = [v.strip() for v in value.replace(";", ",").split(",") if v.strip()]
    elif isinstance(value, (int, float)):
        value = [value]
    return _check_probe_epochs(value, epochs)


def _check_probe_epochs(value: Sequence[Any], epochs: int) -> tuple[int, ...]:
    out = sorted({_as_int("probe_epochs", v) for v in value})
    if out and not 0 <= out[0] <= out[-1] <= epochs:
        raise MBEInputError(f"probe epochs {out} must lie between 0 and epochs={epochs}")
    return tuple(out)


# ---------------------------------------------------------------- models


def build_model(config: Mapping[str, Any], data: Dataset) -> nn.Module:
    """Build the model a config describes, initialised reproducibly from its ``seed``.

    Initialisation draws from a private copy of torch's RNG state, so the
    caller's global RNG is left as it was and concurrent threads do not
    interfere.

    Examples
    --------
    >>> data = load_dataset("digits", n_train=50)
    >>> cfg = resolve_config({"model": "resmlp", "width": 16, "depth": 2, "seed": 3})
    >>> a, b = build_model(cfg, data), build_model(cfg, data)
    >>> type(a).__name__, a.num_blocks, torch.equal(a.embed.weight, b.embed.weight)
    ('ResidualMLP', 2, True)
    """
    cfg = resolve_config(config)
    with seeded(cfg["seed"]):
        model = _make_model(cfg, data)
    return model.to(device=cfg["device"], dtype=DTYPES[cfg["dtype"]])


def _make_model(cfg: dict[str, Any], data: Dataset) -> nn.Module:
    return make_model(cfg["model"], data, width=cfg["width"], depth=cfg["depth"],
                      activation=cfg["activation"], dropout=cfg["dropout"])


def _dropout_rng(model: nn.Module, seed: int) -> contextlib.AbstractContextManager:
    """Seeded global RNG for a model with active dropout, nothing otherwise."""
    if not any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return contextlib.nullcontext()
    device = next(model.parameters()).device
    return seeded(seed + 2**32, device)


def make_optimizer(name: str, params: Any, *, lr: float, weight_decay: float = 0.0,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    """Return ``torch.optim`` SGD (with momentum), Adam or AdamW by name.

    Examples
    --------
    >>> params = [torch.nn.Parameter(torch.zeros(3))]
    >>> opt = make_optimizer("sgd", params, lr=0.1, weight_decay=1e-4)
    >>> type(opt).__name__, opt.defaults["momentum"], opt.defaults["weight_decay"]
    ('SGD', 0.9, 0.0001)
    >>> type(make_optimizer("adamw", params, lr=1e-3)).__name__
    'AdamW'
    """
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay)
    raise MBEInputError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


# ---------------------------------------------------------------- probes and records


def _named_probes(probes: Probes) -> list[tuple[str, Metric]]:
    items = list(probes.items()) if isinstance(probes, Mapping) else [
        (_metric_name(fn), fn) for fn in probes]
    for name, fn in items:
        if not callable(fn):
            raise MBEInputError(f"probe {name!r} is not callable")
    return items


def _metric_name(fn: Any) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


def _probe_value(value: Any) -> float | str:
    """A metric value for the record: a float, or a string (e.g. why a value is NaN)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().item()
    if value is None:
        return math.nan
    return value if isinstance(value, str) else float(value)


def evaluate_probes(model: nn.Module, batch: Batch, probes: Probes) -> dict[str, float | str]:
    """Evaluate every metric on ``(model, batch)`` in eval mode: one flat dict.

    Values are floats (tensors and numpy scalars converted; ``None`` becomes
    NaN) or strings, which metrics may use to say why a value is missing.

    Examples
    --------
    >>> model = nn.Linear(4, 3)
    >>> batch = (torch.zeros(5, 4), torch.zeros(5, dtype=torch.long))
    >>> probes = {"n_logits": lambda m, b: torch.tensor(m(b[0]).numel()),
    ...           "note": lambda m, b: "not defined", "missing": lambda m, b: None}
    >>> evaluate_probes(model, batch, probes)
    {'n_logits': 15.0, 'note': 'not defined', 'missing': nan}
    """
    was_training = model.training
    model.eval()
    out: dict[str, float | str] = {}
    try:
        for name, fn in _named_probes(probes):
            value = fn(model, batch)
            items = value.items() if isinstance(value, Mapping) else [(name, value)]
            for key, v in items:
                if key in out or key in BUILTIN_METRICS:
                    raise MBEInputError(f"two probes both report {key!r}; give them distinct names")
                out[key] = _probe_value(v)
    finally:
        model.train(was_training)
    return out


class _RunRecord:
    """Collects one run's probe values and outcome, then renders the flat record."""

    def __init__(self, probe_epochs: Sequence[int]):
        self.probe_epochs = tuple(probe_epochs)
        self.values: dict[str, float | str] = {}
        self.diverged_epoch: int | None = None

    @property
    def diverged(self) -> bool:
        return self.diverged_epoch is not None

    def add(self, epoch: int, values: Mapping[str, float | str]) -> None:
        self.values.update({f"{k}@{epoch}": v for k, v in values.items()})

    def diverge(self, epoch: int) -> None:
        if not self.diverged:
            self.diverged_epoch = epoch

    def finish(self, final: Mapping[str, float] | None, seconds: float,
               engine: str) -> dict[str, Any]:
        record: dict[str, Any] = {"status": "diverged" if self.diverged else "ok",
                                  "diverged_epoch": self.diverged_epoch}
        for epoch in self.probe_epochs:
            for key in BUILTIN_METRICS:
                record[f"{key}@{epoch}"] = self.values.get(f"{key}@{epoch}", math.nan)
        record.update(self.values)
        for key in ("train_loss", "val_loss", "val_acc", "test_loss", "test_acc"):
            record[key] = math.nan if final is None else final[key]
        record.update(seconds=seconds, engine=engine)
        return record


def divergence_limit(initial_loss: float, n_classes: int) -> float:
    r"""Training loss above which a run has diverged: :math:`10 \max(L_0, \ln C)`.

    Parameters
    ----------
    initial_loss : float
        :math:`L_0`, the mean training loss at initialisation.
    n_classes : int
        :math:`C`; :math:`\ln C` is the loss of uniform predictions.

    Returns
    -------
    float
        The limit; NaN when :math:`L_0` is not finite, against which every
        loss counts as diverged.

    Examples
    --------
    >>> round(divergence_limit(2.0, n_classes=10), 2), divergence_limit(50.0, n_classes=10)
    (23.03, 500.0)
    >>> divergence_limit(float("inf"), n_classes=10)
    nan
    """
    if not math.isfinite(initial_loss):
        return math.nan
    return DIVERGENCE_FACTOR * max(initial_loss, math.log(max(n_classes, 2)))


def _healthy(loss: float, limit: float = math.inf) -> bool:
    """Whether ``loss`` is finite and at most ``limit`` (see :func:`divergence_limit`)."""
    return math.isfinite(loss) and loss <= limit


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split("\n")[0].split()) or type(exc).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_train_arguments(model: Any, data: Any, lr: Any, epochs: Any, batch_size: Any) -> None:
    """One sentence for a model, data or setting :func:`train` cannot use."""
    if not isinstance(model, nn.Module):
        raise MBEInputError(f"model must be a torch.nn.Module, got {type(model).__name__}; build "
                            "one with build_model(config, data) or mbe_helpers.models")
    if not isinstance(data, Dataset):
        raise MBEInputError(f"data must be a Dataset, got {type(data).__name__}; load one with "
                            "mbe_helpers.data.load_dataset(name)")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not 0 < lr < math.inf:
        raise MBEInputError(f"lr must be a positive number, got {lr!r}; pass e.g. lr=1e-3")
    if not _is_int(epochs) or epochs < 0:
        raise MBEInputError(f"epochs must be a non-negative integer, got {epochs!r}; pass e.g. "
                            "epochs=50 (0 evaluates the untrained model)")
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise MBEInputError(f"batch_size must be a positive integer or None (full batch), got "
                            f"{batch_size!r}; pass e.g. batch_size=128")


def _check_data(model: nn.Module, data: Dataset) -> None:
    """One sentence when ``model`` cannot take the inputs or the labels are not its classes."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            n_out = model(data.x_train[:1]).shape[-1]
    except RuntimeError as exc:  # a user's model; ours say it in their own sentence
        raise MBEInputError(f"{type(model).__name__} cannot take the inputs of {data.name} "
                            f"(shape {tuple(data.x_train.shape)}, {data.x_train.dtype}): "
                            f"{_first_line(exc)}") from None
    finally:
        model.train(was_training)
    for split in ("train", "val", "test"):
        y = getattr(data, f"y_{split}")
        if y.dtype != torch.long:
            raise MBEInputError(f"y_{split} must hold integer class labels (torch.long), got "
                                f"{y.dtype}; convert them with .long()")
        if len(y) and not 0 <= int(y.min()) <= int(y.max()) < n_out:
            raise MBEInputError(f"labels in y_{split} must lie between 0 and {n_out - 1} (the "
                                f"model has {n_out} outputs), got {int(y.min())} to {int(y.max())}")


# ---------------------------------------------------------------- sequential training


@torch.no_grad()
def loss_and_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)`` (eval mode, no grad).

    Examples
    --------
    >>> model = nn.Linear(4, 3)
    >>> for p in model.parameters():
    ...     _ = nn.init.zeros_(p)            # uniform predictions; ties go to class 0
    >>> loss, acc = loss_and_accuracy(model, torch.randn(4, 4), torch.tensor([0, 1, 2, 0]))
    >>> round(loss, 4), acc
    (1.0986, 0.5)
    """
    was_training = model.training
    model.eval()
    total, correct = 0.0, 0.0
    for i in range(0, len(y), _EVAL_CHUNK):
        logits = model(x[i:i + _EVAL_CHUNK])
        target = y[i:i + _EVAL_CHUNK]
        total += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    model.train(was_training)
    return total / len(y), correct / len(y)


def _builtin_metrics(model: nn.Module, data: Dataset) -> dict[str, float]:
    train_loss, train_acc = loss_and_accuracy(model, data.x_train, data.y_train)
    val_loss, val_acc = loss_and_accuracy(model, data.x_val, data.y_val)
    return {"train_loss": train_loss, "train_acc": train_acc,
            "val_loss": val_loss, "val_acc": val_acc}


def _batch_rows(n: int, batch_size: int | None,
                generator: torch.Generator) -> Iterator[torch.Tensor | None]:
    """Row indices of each minibatch of one epoch (``None``: the full batch)."""
    if batch_size is None or batch_size >= n:
        yield None
        return
    order = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]


def _train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, data: Dataset,
                 batch_size: int | None, generator: torch.Generator, limit: float,
                 rule=None) -> bool:
    """One epoch of training; ``False`` as soon as a loss is NaN, inf or above ``limit``.

    Without a ``rule`` the gradients are backprop's; a learning rule of
    :mod:`mbe_helpers.feedback` fills them instead (``rule.grads(model, x, y)``).
    """
    model.train()
    x, y = data.x_train, data.y_train
    for rows in _batch_rows(len(y), batch_size, generator):
        xb, yb = (x, y) if rows is None else (x[rows], y[rows])
        optimizer.zero_grad(set_to_none=True)
        if rule is not None:
            loss = rule.grads(model, xb, yb)
        else:
            loss = F.cross_entropy(model(xb), yb)
            if _healthy(loss.item(), limit):
                loss.backward()
        if not _healthy(loss.item(), limit):
            return False
        optimizer.step()
    return True


def _probe_one(model: nn.Module, data: Dataset, probes: Probes, probe_split: str,
               epoch: int, run: _RunRecord, limit: float) -> bool:
    """Record built-in and custom probes at ``epoch``; ``False`` if the model diverged."""
    builtin = _builtin_metrics(model, data)
    run.add(epoch, builtin)
    if not (_healthy(builtin["train_loss"], limit) and _healthy(builtin["val_loss"])):
        run.diverge(epoch)
        return False
    run.add(epoch, evaluate_probes(model, data.batch(probe_split), probes))
    return True


def _final_metrics(model: nn.Module, data: Dataset) -> dict[str, float]:
    train_loss, _ = loss_and_accuracy(model, data.x_train, data.y_train)
    val_loss, val_acc = loss_and_accuracy(model, data.x_val, data.y_val)
    test_loss, test_acc = loss_and_accuracy(model, data.x_test, data.y_test)
    return {"train_loss": train_loss, "val_loss": val_loss, "val_acc": val_acc,
            "test_loss": test_loss, "test_acc": test_acc}


def train(model: nn.Module, data: Dataset, *, optimizer: str = "adam", lr: float = 1e-3,
          weight_decay: float = 0.0, momentum: float = 0.9, epochs: int = 50,
          batch_size: int | None = None, probe_epochs: Sequence[int] = (),
          probes: Probes = (), probe_split: str = "val", seed: int = 0,
          rule=None) -> dict[str, Any]:
    """Train ``model`` in place with cross-entropy and return one flat record.

    Parameters
    ----------
    model : nn.Module
        Maps ``data.x_*`` to class logits.
    data : Dataset
    optimizer : {"sgd", "adam", "adamw"}
        SGD uses ``momentum``; Adam adds ``weight_decay * w`` to the gradient,
        AdamW decays the weights directly.
    lr, weight_decay, momentum : float
    epochs : int
    batch_size : int, optional
        Minibatch size (reshuffled every epoch from ``seed``); ``None`` is full batch.
    probe_epochs : sequence of int
        Epochs (0 = initialisation) at which probes are evaluated.
    probes : list of metrics or dict name -> metric
        ``metric(model, batch) -> float | dict``, evaluated in eval mode on
        ``data.batch(probe_split)``.
    probe_split : {"val", "train", "test"}
    seed : int
        Minibatch order and dropout masks.  A model with dropout trains under
        a process-wide lock on torch's global RNG, so that threads cannot
        interleave their draws; run such grids on process workers for speed.
    rule : learning rule, optional
        An object of :mod:`mbe_helpers.feedback` (FA, DFA, ...) whose
        ``grads(model, x, y)`` replaces backprop; ``None`` is backprop.

    Returns
    -------
    dict
        The flat record described in the module docstring, with
        ``engine="sequential"``; ``status`` is ``diverged`` when a loss left
        :func:`divergence_limit` (see the module docstring).

    Examples
    --------
    >>> from mbe_helpers.models import MLP
    >>> data = load_dataset("digits", n_train=200)
    >>> model = MLP(data.in_dim, [16], data.n_classes)
    >>> record = train(model, data, lr=1e-2, epochs=10, probe_epochs=[0, 10], seed=0)
    >>> record["status"], record["engine"], [k for k in record if k.startswith("val_acc@")]
    ('ok', 'sequential', ['val_acc@0', 'val_acc@10'])
    >>> record["val_acc@0"] < record["test_acc"]
    True
    """
    _check_train_arguments(model, data, lr, epochs, batch_size)
    probe_epochs = _check_probe_epochs(probe_epochs, epochs)
    data.batch(probe_split)  # fail on a bad split name before training
    _check_data(model, data)
    opt = make_optimizer(optimizer, model.parameters(), lr=lr, weight_decay=weight_decay,
                         momentum=momentum)
    generator = torch.Generator().manual_seed(seed)
    run = _RunRecord(probe_epochs)
    start = time.perf_counter()
    limit = divergence_limit(loss_and_accuracy(model, data.x_train, data.y_train)[0],
                             data.n_classes)
    with _dropout_rng(model, seed):
        for epoch in range(epochs + 1):
            if epoch > 0 and not _train_epoch(model, opt, data, batch_size, generator, limit,
                                              rule):
                run.diverge(epoch)
                break
            if epoch in probe_epochs and not _probe_one(model, data, probes, probe_split,
                                                        epoch, run, limit):
                break
    final = None if run.diverged else _final_metrics(model, data)
    if final is not None and not _healthy(final["train_loss"], limit):
        run.diverge(epochs)
        final = None
    return run.finish(final, time.perf_counter() - start, "sequential")


# ---------------------------------------------------------------- vmapped ensemble


class _Ensemble:
    """K same-architecture models as stacked parameters with a functional optimizer.

    The updates mirror ``torch.optim`` SGD / Adam / AdamW (single-tensor
    implementations) with per-model learning rate, weight decay and momentum.
    """

    def __init__(self, models: Sequence[nn.Module], optimizer: str, lr: Sequence[float],
                 weight_decay: Sequence[float], momentum: Sequence[float]):
        if optimizer not in OPTIMIZERS:
            raise MBEInputError(f"unknown optimizer {optimizer!r}; choose one of "
                                f"{', '.join(OPTIMIZERS)}")
        self.template = copy.deepcopy(models[0])
        self.base = copy.deepcopy(models[0]).to("meta")
        params, self.buffers = stack_module_state(list(models))
        self.params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        ref = next(iter(self.params.values()))
        as_tensor = functools.partial(torch.tensor, dtype=ref.dtype, device=ref.device)
        self.lr, self.wd, self.mom = as_tensor(lr), as_tensor(weight_decay), as_tensor(momentum)
        self.optimizer, self.steps, self.state = optimizer, 0, {}

    def _logits(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.base, (params, buffers), (x,))

    def _loss(self, params: dict, buffers: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self._logits(params, buffers, x), y)

    def losses(self, x: torch.Tensor, y: torch.Tensor, shared: bool) -> torch.Tensor:
        """Per-model mean training loss ``(K,)`` on per-model (or shared) inputs."""
        loss = torch.vmap(self._loss, in_dims=(0, 0, None if shared else 0, 0))
        return loss(self.params, self.buffers, x, y)

    def step(self, x: torch.Tensor, y: torch.Tensor, shared: bool) -> torch.Tensor:
        """One optimisation step of every model; returns the losses before the step."""
        losses = self.losses(x, y, shared)
        grads = torch.autograd.grad(losses.sum(), list(self.params.values()))
        with torch.no_grad():
            self.steps += 1
            for (name, p), g in zip(self.params.items(), grads):
                self._update(name, p, g)
        return losses.detach()

    def _per_model(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.view(-1, *([1] * (like.dim() - 1)))

    def _update(self, name: str, p: torch.Tensor, g: torch.Tensor) -> None:
        lr, wd = self._per_model(self.lr, p), self._per_model(self.wd, p)
        if self.optimizer == "sgd":
            g = g + wd * p
            buf = self.state.get(name)
            buf = g.clone() if buf is None else buf.mul_(self._per_model(self.mom, p)).add_(g)
            self.state[name] = buf
            p.sub_(lr * buf)
            return
        if self.optimizer == "adamw":
            p.mul_(1 - lr * wd)
        else:
            g = g + wd * p
        beta1, beta2 = ADAM_BETAS
        m, v = self.state.setdefault(name, (torch.zeros_like(p), torch.zeros_like(p)))
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = lr / (1 - beta1 ** self.steps)
        denom = (v.sqrt() / (1 - beta2 ** self.steps) ** 0.5).add_(ADAM_EPS)
        p.sub_(step_size * m / denom)

    @torch.no_grad()
    def loss_and_accuracy(self, x: torch.Tensor, y: torch.Tensor,
                          shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-model mean loss and accuracy ``(K,)`` each."""
        logits = torch.vmap(self._logits, in_dims=(0, 0, None if shared else 0))(
            self.params, self.buffers, x)
        y = y.expand(logits.shape[0], -1)
        total = torch.vmap(functools.partial(F.cross_entropy, reduction="sum"))(logits, y)
        correct = (logits.argmax(-1) == y).sum(-1)
        return total / y.shape[1], correct.double() / y.shape[1]

    def module(self, k: int) -> nn.Module:
        """A real module holding model ``k``'s current parameters (reused between calls)."""
        with torch.no_grad():
            for name, p in self.template.named_parameters():
                p.copy_(self.params[name][k])
                p.grad = None
            for name, b in self.template.named_buffers():
                b.copy_(self.buffers[name][k])
        return self.template


def _stack_training_data(datas: Sequence[Dataset]) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Inputs (shared ``(n, d)`` when every model uses the same rows, else ``(K, n, d)``)."""
    first = datas[0]
    if len({d.n_train for d in datas}) != 1:
        raise MBEInputError("every model of an ensemble needs the same number of training samples")
    shared = all(torch.equal(d.train_index, first.train_index) for d in datas)
    x = first.x_train if shared else torch.stack([d.x_train for d in datas])
    return x, torch.stack([d.y_train for d in datas]), shared


def _ensemble_batches(x: torch.Tensor, y: torch.Tensor, shared: bool, batch_size: int | None,
                      generators: Sequence[torch.Generator]) -> Iterator[tuple]:
    """Per-model minibatches ``(xb, yb, shared)``, each model shuffled by its own seed."""
    n = y.shape[1]
    if batch_size is None or batch_size >= n:
        yield x, y, shared
        return
    order = torch.stack([torch.randperm(n, generator=g) for g in generators]).to(y.device)
    models = torch.arange(len(generators), device=y.device)[:, None]
    for i in range(0, n, batch_size):
        rows = order[:, i:i + batch_size]
        yield (x[rows] if shared else x[models, rows]), y.gather(1, rows), False


def _probe_ensemble(ens: _Ensemble, x: torch.Tensor, y: torch.Tensor, shared: bool,
                    data: Dataset, probes: Probes, probe_split: str, epoch: int,
                    runs: Sequence[_RunRecord], limits: Sequence[float]) -> None:
    train_loss, train_acc = ens.loss_and_accuracy(x, y, shared)
    val_loss, val_acc = ens.loss_and_accuracy(data.x_val, data.y_val, True)
    for k, run in enumerate(runs):
        if run.diverged:
            continue
        values = {"train_loss": train_loss[k].item(), "train_acc": train_acc[k].item(),
                  "val_loss": val_loss[k].item(), "val_acc": val_acc[k].item()}
        run.add(epoch, values)
        if not (_healthy(values["train_loss"], limits[k]) and _healthy(values["val_loss"])):
            run.diverge(epoch)
        elif probes:
            run.add(epoch, evaluate_probes(ens.module(k), data.batch(probe_split), probes))


def _ensemble_final(ens: _Ensemble, x: torch.Tensor, y: torch.Tensor, shared: bool,
                    data: Dataset, runs: Sequence[_RunRecord], epochs: int,
                    limits: Sequence[float]) -> list[dict | None]:
    train_loss, _ = ens.loss_and_accuracy(x, y, shared)
    val_loss, val_acc = ens.loss_and_accuracy(data.x_val, data.y_val, True)
    test_loss, test_acc = ens.loss_and_accuracy(data.x_test, data.y_test, True)
    finals: list[dict | None] = []
    for k, run in enumerate(runs):
        if not run.diverged and not _healthy(train_loss[k].item(), limits[k]):
            run.diverge(epochs)
        finals.append(None if run.diverged else {
            "train_loss": train_loss[k].item(), "val_loss": val_loss[k].item(),
            "val_acc": val_acc[k].item(), "test_loss": test_loss[k].item(),
            "test_acc": test_acc[k].item()})
    return finals


def train_ensemble(models: Sequence[nn.Module], datas: Sequence[Dataset], *,
                   optimizer: str = "adam", lr: Sequence[float],
                   weight_decay: Sequence[float], momentum: Sequence[float] | float = 0.9,
                   seeds: Sequence[int], epochs: int = 50, batch_size: int | None = None,
                   probe_epochs: Sequence[int] = (), probes: Probes = (),
                   probe_split: str = "val") -> list[dict[str, Any]]:
    """Train K same-architecture models at once as one vmapped ensemble.

    Model ``k`` is trained on ``datas[k]`` (same size and validation / test
    splits; training rows and labels may differ) with ``lr[k]``,
    ``weight_decay[k]``, ``momentum[k]`` and minibatch order from ``seeds[k]``.
    The records equal those of ``train(models[k], datas[k], ...)`` to rounding
    (exactly so in float64 up to a few ulps per step).  Models must have no
    dropout and no buffers that change during training; the models passed in
    are left untouched.

    Returns
    -------
    list of dict
        One record per model, with ``engine="ensemble:K"`` and ``seconds`` the
        wall time divided by K.

    Examples
    --------
    >>> import copy
    >>> from mbe_helpers.models import MLP
    >>> data = load_dataset("digits", n_train=100)
    >>> _ = torch.manual_seed(0)
    >>> models = [MLP(data.in_dim, [8], data.n_classes) for _ in range(2)]
    >>> twin = copy.deepcopy(models[1])
    >>> records = train_ensemble(models, [data, data], lr=[1e-3, 1e-2], weight_decay=[0.0, 0.0],
    ...                          seeds=[0, 1], epochs=3)
    >>> [r["engine"] for r in records]
    ['ensemble:2', 'ensemble:2']
    >>> alone = train(twin, data, lr=1e-2, epochs=3, seed=1)
    >>> abs(records[1]["test_loss"] - alone["test_loss"]) < 1e-4
    True
    """
    n_models = len(models)
    momentum = [momentum] * n_models if isinstance(momentum, (int, float)) else momentum
    if not n_models or any(len(v) != n_models for v in (datas, lr, weight_decay, momentum, seeds)):
        raise MBEInputError("train_ensemble needs one dataset, lr, weight_decay, momentum and "
                            "seed per model")
    probe_epochs = _check_probe_epochs(probe_epochs, epochs)
    for data in datas:
        _check_data(models[0], data)
    start = time.perf_counter()
    x, y, shared = _stack_training_data(datas)
    ens = _Ensemble(models, optimizer, lr, weight_decay, momentum)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    runs = [_RunRecord(probe_epochs) for _ in range(n_models)]
    limits = [divergence_limit(v, datas[0].n_classes)
              for v in ens.loss_and_accuracy(x, y, shared)[0].tolist()]
    for epoch in range(epochs + 1):
        for xb, yb, xb_shared in (_ensemble_batches(x, y, shared, batch_size, generators)
                                  if epoch > 0 else ()):
            losses = ens.step(xb, yb, xb_shared)
            for k, loss in enumerate(losses.tolist()):
                if not _healthy(loss, limits[k]):
                    runs[k].diverge(epoch)
        if epoch in probe_epochs:
            _probe_ensemble(ens, x, y, shared, datas[0], probes, probe_split, epoch, runs,
                            limits)
        if all(run.diverged for run in runs):
            break
    finals = _ensemble_final(ens, x, y, shared, datas[0], runs, epochs, limits)
    seconds = (time.perf_counter() - start) / n_models
    return [run.finish(final, seconds, f"ensemble:{n_models}") for run, final in zip(runs, finals)]


# ---------------------------------------------------------------- choosing the engine


def _median_seconds(step: Callable[[], Any], repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _calibration_batch(data: Dataset, batch_size: int | None) -> Batch:
    rows = data.n_train if batch_size is None else min(batch_size, data.n_train)
    return data.x_train[:rows], data.y_train[:rows]


def _sequential_step_seconds(model: nn.Module, batch: Batch, optimizer: str,
                             repeats: int) -> float:
    model = copy.deepcopy(model)
    opt = make_optimizer(optimizer, model.parameters(), lr=1e-12)
    x, y = batch

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return _median_seconds(step, repeats)


def _ensemble_step_seconds(model: nn.Module, batch: Batch, optimizer: str, size: int,
                           shared: bool, repeats: int) -> float:
    ens = _Ensemble([model] * size, optimizer, [1e-12] * size, [0.0] * size, [0.0] * size)
    x, y = batch
    xs = x if shared else x.expand(size, *x.shape).contiguous()
    ys = y.expand(size, -1).contiguous()
    return _median_seconds(lambda: ens.step(xs, ys, shared), repeats)


def _candidate_sizes(max_group: int) -> list[int]:
    return sorted({*(2**i for i in range(1, max_group.bit_length())), max_group} - {0, 1})


def _calibration_steps(max_group: int, repeats: int = _CALIBRATION_REPEATS) -> int:
    """Model-steps spent by :func:`choose_group_size` when it measures every size."""
    return (repeats + 1) * (1 + sum(_candidate_sizes(max_group)))


def _steps_per_epoch(n: int, batch_size: int | None) -> int:
    return 1 if batch_size is None else -(-n // batch_size)


def choose_group_size(model: nn.Module, data: Dataset, *, optimizer: str = "adam",
                      batch_size: int | None = None, max_group: int = 128,
                      shared_inputs: bool = True, repeats: int = _CALIBRATION_REPEATS,
                      margin: float = 0.8) -> tuple[int, dict[int, float]]:
    """Choose how many models to train per vmapped ensemble, by timing a few steps.

    The cost of one training step per model is measured (median of
    ``repeats`` steps after a warm-up step) for the sequential loop, ``c_1``,
    and for ensembles of ``G = 2, 4, 8, ...`` and ``max_group`` models,
    ``c_G = t_G / G``, stopping once ``c_G`` climbs 25% above the best seen
    (the stacked weights have left the cache).  The group size is
    ``G* = argmin_G c_G`` if ``c_G* < margin * c_1``, else 1 (sequential).

    Returns
    -------
    group_size : int
        1 means "train sequentially".
    costs : dict
        Seconds per model-step for every size measured (1 = sequential).

    Examples
    --------
    >>> from mbe_helpers.models import MLP
    >>> data = load_dataset("digits", n_train=100)
    >>> size, costs = choose_group_size(MLP(data.in_dim, [8], data.n_classes), data, max_group=4,
    ...                                 repeats=1)
    >>> 1 in costs, size in (1, 2, 4)
    (True, True)
    """
    batch = _calibration_batch(data, batch_size)
    costs = {1: _sequential_step_seconds(model, batch, optimizer, repeats)}
    for size in _candidate_sizes(max_group):
        costs[size] = _ensemble_step_seconds(model, batch, optimizer, size, shared_inputs,
                                             repeats) / size
        if costs[size] > 1.25 * min(costs[s] for s in costs if s > 1):
            break
    best = min((s for s in costs if s > 1), key=costs.get, default=1)
    group = best if best > 1 and costs[best] < margin * costs[1] else 1
    log.info("ensemble group size %d from per-model step costs %s", group, costs)
    return group, costs


# ---------------------------------------------------------------- the grid's run function


class TrainRun:
    """Picklable run function: flat training config in, flat record out.

    ``TrainRun(probes)(config)`` loads the data, builds and seeds the model,
    trains it with :func:`train` and returns its record.  The config keys and
    defaults are :data:`TRAIN_DEFAULTS`.

    For grids, :func:`mbe_helpers.grid.run_grid` also uses :meth:`group_key`
    and :meth:`run_many`: configs that differ only in ``lr``,
    ``weight_decay``, ``momentum``, ``seed`` and ``label_noise`` of a
    dropout-free MLP are trained together with :func:`train_ensemble`, in
    groups whose size :func:`choose_group_size` measures (once per process
    and model shape), falling back to sequential training when stacking does
    not pay.  Groups whose whole training is under four times the cost of
    that measurement are trained sequentially without measuring.

    Parameters
    ----------
    probes : list of metrics or dict name -> metric
        Extra metrics evaluated at every probe epoch; they must be importable
        (module-level) for process and Dask executors.
    probe_split : {"val", "train", "test"}
        The batch the extra metrics see.
    ensemble : {"auto", True, False}
        ``"auto"`` measures, ``True`` always stacks (up to ``max_group``),
        ``False`` never does.
    max_group : int
        Largest ensemble trained at once.

    Examples
    --------
    >>> run = TrainRun(ensemble=False)
    >>> run
    TrainRun(probes=[], probe_split='val', ensemble=False, max_group=128)
    >>> record = run({"n_train": 100, "width": 8, "depth": 1, "epochs": 2})
    >>> record["status"], record["engine"]
    ('ok', 'sequential')
    >>> TrainRun().group_key({"model": "mlp"}) is None      # MLPs may share an ensemble
    False
    >>> TrainRun().group_key({"model": "cnn"}) is None
    True
    """

    def __init__(self, probes: Probes = (), *, probe_split: str = "val",
                 ensemble: bool | str = "auto", max_group: int = 128):
        if ensemble not in ("auto", True, False):
            raise MBEInputError(f"ensemble must be 'auto', True or False, got {ensemble!r}")
        if probe_split not in ("train", "val", "test"):
            raise MBEInputError(f"unknown probe_split {probe_split!r}; choose 'train', 'val' "
                                "or 'test'")
        self.probes = dict(_named_probes(probes))
        self.probe_split = probe_split
        self.ensemble = ensemble
        self.max_group = int(max_group)
        self._group_sizes: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_group_sizes": {}}

    def __repr__(self) -> str:
        return (f"TrainRun(probes={list(self.probes)}, probe_split={self.probe_split!r}, "
                f"ensemble={self.ensemble!r}, max_group={self.max_group})")

    def __call__(self, config: Mapping[str, Any]) -> dict[str, Any]:
        cfg = resolve_config(config)
        data = _load(cfg)
        return self._train(cfg, build_model(cfg, data), data)

    def _train(self, cfg: dict[str, Any], model: nn.Module, data: Dataset) -> dict[str, Any]:
        return train(model, data, **_optim_kwargs(cfg), seed=cfg["seed"], probes=self.probes,
                     probe_split=self.probe_split, **_schedule_kwargs(cfg))

    def group_key(self, config: Mapping[str, Any]) -> str | None:
        """Configs with equal keys can share one ensemble; ``None``: train alone."""
        if self.ensemble is False:
            return None
        try:
            cfg = resolve_config(config)
        except MBEInputError:
            return None
        if cfg["model"] != "mlp" or cfg["dropout"] > 0:
            return None
        shared = {k: v for k, v in cfg.items() if k not in _PER_MODEL_KEYS}
        return json.dumps(shared, sort_keys=True, default=str)

    def run_many(self, configs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Records of several configs, stacked into ensembles where they can be."""
        keys = {self.group_key(c) for c in configs}
        if len(configs) < 2 or len(keys) != 1 or None in keys:
            return [self(c) for c in configs]
        cfgs = [resolve_config(c) for c in configs]
        datas = _share_inputs([_load(c) for c in cfgs])
        models = [build_model(c, d) for c, d in zip(cfgs, datas)]
        size = self._group_size(cfgs, models[0], datas)
        if size <= 1:
            return [self._train(*args) for args in zip(cfgs, models, datas)]
        records: list[dict[str, Any]] = []
        for i in range(0, len(cfgs), size):
            records += self._train_group(cfgs[i:i + size], models[i:i + size], datas[i:i + size])
        return records

    def _group_size(self, cfgs: list[dict], model: nn.Module, datas: list[Dataset]) -> int:
        """Models per ensemble: measured once per shape, or 1 when too small to measure."""
        limit = min(len(cfgs), self.max_group)
        if self.ensemble is True:
            return limit
        cfg = cfgs[0]
        steps = len(cfgs) * cfg["epochs"] * _steps_per_epoch(datas[0].n_train, cfg["batch_size"])
        if steps < 4 * _calibration_steps(limit):
            return 1
        shared = all(torch.equal(d.train_index, datas[0].train_index) for d in datas)
        key = json.dumps([cfg[k] for k in _SHAPE_KEYS] + [limit, shared], default=str)
        if key not in self._group_sizes:
            self._group_sizes[key] = choose_group_size(
                model, datas[0], optimizer=cfg["optimizer"], batch_size=cfg["batch_size"],
                max_group=limit, shared_inputs=shared)[0]
        return self._group_sizes[key]

    def _train_group(self, cfgs: list[dict], models: list[nn.Module],
                     datas: list[Dataset]) -> list[dict[str, Any]]:
        per_model = {k: [c[k] for c in cfgs] for k in ("lr", "weight_decay", "momentum", "seed")}
        return train_ensemble(models, datas, optimizer=cfgs[0]["optimizer"],
                              lr=per_model["lr"], weight_decay=per_model["weight_decay"],
                              momentum=per_model["momentum"], seeds=per_model["seed"],
                              probes=self.probes, probe_split=self.probe_split,
                              **_schedule_kwargs(cfgs[0]))


def _load(cfg: dict[str, Any]) -> Dataset:
    return load_dataset(cfg["dataset"], data_root=cfg["data_root"], seed=cfg["seed"],
                        n_train=cfg["n_train"], label_noise=cfg["label_noise"],
                        val_fraction=cfg["val_fraction"], test_fraction=cfg["test_fraction"],
                        split_seed=cfg["split_seed"], device=cfg["device"],
                        dtype=DTYPES[cfg["dtype"]])


def _share_inputs(datas: list[Dataset]) -> list[Dataset]:
    """Let datasets with the same training rows share one copy of the input tensors."""
    first = datas[0]
    common = {"x_val": first.x_val, "x_test": first.x_test}
    return [dataclasses.replace(
        d, **common, **({"x_train": first.x_train}
                        if torch.equal(d.train_index, first.train_index) else {}))
        for d in datas]


def _optim_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: cfg[k] for k in ("optimizer", "lr", "weight_decay", "momentum")}


def _schedule_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: cfg[k] for k in ("epochs", "batch_size", "probe_epochs")}


train_run = TrainRun()
"""The default run function: ``train_run(config) -> record`` with no extra probes."""
