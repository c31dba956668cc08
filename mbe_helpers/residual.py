r"""Residual networks trained under a learning rule, and the credit signal each condition assigns.

The shared layer beneath the credit-assignment chapters (03 and 04), as
:mod:`mbe_helpers.probes` is beneath chapters 01 and 02:

* :func:`train_residual` -- a pre-LN ``ResidualMLP`` (or ``ViTMini``) trained
  with a learning rule of :mod:`mbe_helpers.feedback`;
* :func:`credit_signals` -- the credit signal a condition assigns to each
  stream state (true gradient, random vector, DFA's :math:`e B_l^\top`, FA's
  propagated error);
* :func:`measure_condition` -- per-layer :math:`\rho`, BP cosine and nudging
  of one condition's signal;
* :func:`seed_intervals`, :func:`deep_layer_table`, :func:`mean_ci` -- means
  with t-intervals over seeds, and the deep-layer mean.

Measurements of :math:`\rho`, :math:`\Gamma` and nudging run on the CPU in
float64 (a copy of the network and of the feedback matrices): in float32 the
loss differences of small perturbations drown in rounding.

Examples
--------
>>> rule_of("positive"), rule_of("dfa")
('bp', 'dfa')
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence

from mbe_helpers.errors import require_extra

require_extra("torch", "torch", "mbe_helpers.residual")

import numpy as np  # noqa: E402
import pandas as pd
import torch
from scipy import stats
from torch import nn

from mbe_helpers import credit, feedback, runtime, stream
from mbe_helpers.data import Dataset
from mbe_helpers.errors import MBEInputError
from mbe_helpers.models import make_model
from mbe_helpers.train import train

CONTROLS = ("positive", "negative")


TEST_CONDITIONS = ("fa", "dfa", "dfa_penalized", "dfa_shuffled")


CONDITIONS = (*CONTROLS, *TEST_CONDITIONS)


METHODS = ("bp", "fa", "dfa", "dfa_penalized", "dfa_shuffled", "frozen")


INIT = "init"
"""Pseudo-method of :func:`diagnostic_runs`: the untrained network (0 epochs)."""


OWN_SIGNAL = {"bp": "positive", "fa": "fa", "dfa": "dfa", "dfa_penalized": "dfa_penalized",
              "dfa_shuffled": "dfa_shuffled"}
"""The credit condition a method trains with (BP's own signal is the true gradient)."""


TRAIN_KEYS = ("model", "width", "n_blocks", "epochs", "lr", "batch_size", "penalty")


MODELS = ("resmlp", "vit")


MEASURES = ("rho", "bp_cosine", "nudge")


def check_names(given: Iterable[str], known: Sequence[str], what: str) -> list[str]:
    """Refuse an empty list or unknown names in one sentence; return the names, each once.

    Examples
    --------
    >>> check_names(["dfa", "fa", "dfa"], CONDITIONS, "condition")
    ['dfa', 'fa']
    >>> check_names(["bp"], CONDITIONS, "condition")
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: unknown condition(s) bp; choose from positive, negative, fa, ...
    """
    given = list(given)
    if not given:
        raise MBEInputError(f"give at least one {what}; choose from {', '.join(known)}")
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise MBEInputError(f"unknown {what}(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return list(dict.fromkeys(given))


def check_seeds(seeds: Iterable[int]) -> list[int]:
    """The seeds as a list of ints; one sentence unless they are distinct non-negative integers.

    Examples
    --------
    >>> check_seeds((0, 1, 2))
    [0, 1, 2]
    >>> check_seeds([0, 0])
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: seeds must be a non-empty list of distinct ... got [0, 0]
    """
    seeds = list(seeds)
    ok = all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0 for s in seeds)
    if not seeds or not ok or len(set(seeds)) != len(seeds):
        raise MBEInputError(f"seeds must be a non-empty list of distinct non-negative integers, got {seeds}")
    return [int(s) for s in seeds]


def check_train_kw(train_kw: dict) -> None:
    """Refuse, in one sentence, a training option :func:`train_residual` does not take.

    Examples
    --------
    >>> check_train_kw({"width": 16, "epochs": 2})
    >>> check_train_kw({"widht": 16})
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: unknown training option(s) widht; choose from model, width, ...
    """
    unknown = sorted(set(train_kw) - set(TRAIN_KEYS))
    if unknown:
        raise MBEInputError(f"unknown training option(s) {', '.join(unknown)}; "
                            f"choose from {', '.join(TRAIN_KEYS)}")


def check_measurement(eval_size: int, eps: float, n_directions: int) -> None:
    """Refuse an ``eval_size`` below 2, an ``eps`` that is not positive or a non-positive ``n_directions``.

    Examples
    --------
    >>> check_measurement(512, 1e-3, 32)
    >>> check_measurement(512, 0.0, 32)
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: eps must be positive and n_directions a positive integer, ...
    """
    if not (isinstance(eval_size, int) and eval_size >= 2):
        raise MBEInputError(f"eval_size must be an integer of at least 2, got {eval_size!r}")
    if not (eps > 0 and isinstance(n_directions, int) and n_directions >= 1):
        raise MBEInputError(f"eps must be positive and n_directions a positive integer, "
                            f"got eps={eps!r}, n_directions={n_directions!r}")


def build_seeded(build, seed: int) -> nn.Module:
    """Build a module from torch's global RNG seeded with ``seed``, leaving that RNG as it was.

    Examples
    --------
    >>> state = torch.get_rng_state()
    >>> a, b = (build_seeded(lambda: nn.Linear(2, 2), seed=0) for _ in range(2))
    >>> torch.equal(a.weight, b.weight), torch.equal(state, torch.get_rng_state())
    (True, True)
    """
    with runtime.seeded(seed):
        return build()


def residual_model(kind: str, data: Dataset, width: int, n_blocks: int) -> nn.Module:
    """``ResidualMLP(in, width, classes, n_blocks)`` or a ``ViTMini`` of the same width and depth
    (:func:`mbe_helpers.models.make_model`).

    Examples
    --------
    >>> from mbe_helpers.data import load_dataset
    >>> data = load_dataset("digits", n_train=50)
    >>> [type(residual_model(kind, data, width=16, n_blocks=2)).__name__ for kind in MODELS]
    ['ResidualMLP', 'ViTMini']
    """
    if kind not in MODELS:
        raise MBEInputError(f"unknown model {kind!r}; choose one of {', '.join(MODELS)}")
    return make_model(kind, data, width=width, depth=n_blocks)


def train_residual(rule_name: str, data: Dataset, *, model: str = "resmlp", width: int = 256,
                   n_blocks: int = 4, epochs: int = 30, lr: float = 1e-3,
                   batch_size: int | None = 128, penalty: float = 1e-2, seed: int = 0):
    """Train a residual model (:func:`residual_model`) with one learning rule (Adam).

    The model initialisation, the minibatch order and the feedback matrices
    all derive from ``seed`` (torch's global RNG is left untouched);
    ``epochs=0`` returns the untrained network.  The model lives on the
    device and in the dtype of ``data``.

    Returns
    -------
    (model, rule, record)
        The trained model in eval mode, the rule (with its feedback
        matrices) and :func:`mbe_helpers.train.train`'s flat record.

    Examples
    --------
    >>> from mbe_helpers.data import load_dataset
    >>> data = load_dataset("digits", n_train=100)
    >>> model, rule, record = train_residual("dfa", data, width=16, n_blocks=2, epochs=2, seed=0)
    >>> type(model).__name__, rule.name, len(rule.matrices), record["status"], model.training
    ('ResidualMLP', 'dfa', 3, 'ok', False)
    """
    rule = feedback.make_rule(rule_name, seed=seed, penalty=penalty)
    kind = model
    model = build_seeded(lambda: residual_model(kind, data, width, n_blocks), seed).to(data.x_train)
    if isinstance(rule, feedback.FrozenBlocks):
        rule.freeze(model)
    record = train(model, data, optimizer="adam", lr=lr, epochs=epochs, batch_size=batch_size,
                   seed=seed, rule=rule)
    return model.eval(), rule, record


def credit_signals(condition: str, model, rule, x: torch.Tensor, y: torch.Tensor,
                   seed: int = 0) -> list[torch.Tensor]:
    r"""Per-sample credit signal :math:`a_l` of ``condition`` at every stream state h_0..h_L.

    * ``positive``: the true gradient :math:`\partial \ell_i / \partial h_{l,i}`;
    * ``negative``: an independent standard-normal vector (from ``seed``);
    * ``dfa``, ``dfa_penalized``, ``dfa_shuffled``: :math:`a_l = e B_l^\top`
      with :math:`e = \mathrm{softmax}(z) - \mathrm{onehot}(y)` and the rule's
      own training matrices (for the shuffled rule: the last ones drawn);
    * ``fa``: the error propagated backwards through the rule's feedback
      matrices, :math:`\delta_{h_L} = J_{\mathrm{LN}}^\top B_{\mathrm{head}}^\top e`,
      :math:`\delta_{h_l} = \delta_{h_{l+1}} + J^{\mathrm{FA}\top}_{f_l} \delta_{h_{l+1}}`
      (every linear map's :math:`W^\top` replaced by its :math:`B`).

    Examples
    --------
    >>> from mbe_helpers.data import load_dataset
    >>> data = load_dataset("digits", n_train=100)
    >>> model, rule, _ = train_residual("dfa", data, width=16, n_blocks=2, epochs=1, seed=0)
    >>> model64, rule64 = measurement_copy(model, rule)
    >>> x, y = eval_set(data, 8)
    >>> [tuple(a.shape) for a in credit_signals("dfa", model64, rule64, x, y)]
    [(8, 16), (8, 16), (8, 16)]
    >>> credit_signals("fa", model64, rule64, x, y)
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: condition 'fa' needs the FeedbackAlignment rule ...
    """
    if condition == "positive":
        return credit.bp_signals(model, x, y)
    if condition == "negative":
        return credit.random_signals(model, x, seed=seed)
    if condition.startswith("dfa"):
        if not isinstance(rule, feedback.DirectFeedbackAlignment):
            raise MBEInputError(f"condition {condition!r} needs the DFA rule the network trained "
                                f"with, got {type(rule).__name__}")
        hidden, logits = stream.forward_stream(model, x)
        return [a[:, None, :].expand_as(h) if h.dim() == 3 else a   # token models: every token
                for a, h in zip(rule.signals(logits, y), hidden)]
    if condition == "fa":
        if not isinstance(rule, feedback.FeedbackAlignment):
            raise MBEInputError(f"condition 'fa' needs the FeedbackAlignment rule the network "
                                f"trained with, got {type(rule).__name__}")
        with rule.installed(model):
            return credit.bp_signals(model, x, y)
    raise MBEInputError(f"unknown condition {condition!r}; choose one of {', '.join(CONDITIONS)}")


def measurement_copy(model, rule, dtype: torch.dtype = torch.float64):
    """CPU copies of the model and of the rule's feedback matrices in ``dtype``.

    Examples
    --------
    >>> from mbe_helpers.data import load_dataset
    >>> data = load_dataset("digits", n_train=100)
    >>> model, rule, _ = train_residual("dfa", data, width=16, n_blocks=2, epochs=1, seed=0)
    >>> model64, rule64 = measurement_copy(model, rule)
    >>> model64.embed.weight.dtype, rule64.matrices[0].dtype, rule.matrices[0].dtype
    (torch.float64, torch.float64, torch.float32)
    """
    twin_model = copy.deepcopy(model).to("cpu", dtype).eval()
    twin_rule = copy.copy(rule)
    matrices = getattr(rule, "matrices", None)
    if isinstance(matrices, dict):
        twin_rule.matrices = {k: v.to("cpu", dtype) for k, v in matrices.items()}
    elif isinstance(matrices, list):
        twin_rule.matrices = [m.to("cpu", dtype) for m in matrices]
    return twin_model, twin_rule


def eval_set(data: Dataset, eval_size: int, dtype: torch.dtype = torch.float64):
    """The first ``eval_size`` test samples on the CPU.

    Examples
    --------
    >>> from mbe_helpers.data import load_dataset
    >>> x, y = eval_set(load_dataset("digits", n_train=100), 8)
    >>> tuple(x.shape), x.dtype, y.tolist()
    ((8, 64), torch.float64, [0, 1, 6, 0, 1, 5, 0, 5])
    """
    return data.x_test[:eval_size].to("cpu", dtype), data.y_test[:eval_size].cpu()


def measure_condition(condition: str, model, rule, x: torch.Tensor, y: torch.Tensor, *,
                      eps: float = 1e-3, n_directions: int = 32, seed: int = 0) -> pd.DataFrame:
    """Rho, BP cosine and nudging of one condition's signal at every stream state.

    Runs :func:`mbe_helpers.credit.measure_layers` on a float64 CPU copy.
    The random directions use ``seed`` (+ layer), the negative control's
    vector ``10_000 + seed``.

    Examples
    --------
    >>> from mbe_helpers.data import load_dataset
    >>> data = load_dataset("digits", n_train=100)
    >>> model, rule, _ = train_residual("bp", data, width=16, n_blocks=2, epochs=1, seed=0)
    >>> x, y = eval_set(data, 8)
    >>> table = measure_condition("positive", model, rule, x, y, n_directions=8)
    >>> table.layer.tolist(), bool((table.rho > 0.99).all()), bool((table.bp_cosine > 0.999).all())
    ([0, 1, 2], True, True)
    """
    model64, rule64 = measurement_copy(model, rule)
    x64, y = x.to("cpu", torch.float64), y.cpu()
    signals = credit_signals(condition, model64, rule64, x64, y, seed=10_000 + seed)
    return credit.measure_layers(model64, x64, y, signals, eps=eps, n_directions=n_directions,
                                 seed=seed)


def rule_of(condition: str) -> str:
    """The learning rule whose network a condition is read on: both controls use the BP network.

    Examples
    --------
    >>> rule_of("positive"), rule_of("negative"), rule_of("dfa_penalized")
    ('bp', 'bp', 'dfa_penalized')
    """
    return "bp" if condition in CONTROLS else condition


def seed_intervals(table: pd.DataFrame, value: str = "rho",
                   by: Sequence[str] = ("condition", "layer"), level: float = 0.95) -> pd.DataFrame:
    r"""Mean over seeds with a t-interval, per group.

    :math:`\bar v \pm t_{(1+\text{level})/2,\,n-1}\, s / \sqrt n` with
    :math:`s` the standard deviation over the n rows of a group; the interval
    is NaN when a group has a single row.  Groups keep their order of appearance.

    Returns ``*by, mean, sd, n, ci_lo, ci_hi``.

    Examples
    --------
    >>> table = pd.DataFrame({"condition": ["dfa"] * 3 + ["fa"], "layer": 1,
    ...                       "rho": [0.1, 0.2, 0.3, 0.5]})
    >>> seed_intervals(table).round(3)
      condition  layer  mean   sd  n  ci_lo  ci_hi
    0       dfa      1   0.2  0.1  3 -0.048  0.448
    1        fa      1   0.5  NaN  1    NaN    NaN
    """
    missing = [c for c in (value, *by) if c not in table.columns]
    if missing:
        raise MBEInputError(f"unknown column(s) {', '.join(missing)}; available: "
                            f"{', '.join(map(str, table.columns))}")
    if not 0 < level < 1:
        raise MBEInputError(f"level must lie strictly between 0 and 1, got {level}")
    out = (table.groupby(list(by), sort=False)[value].agg(["mean", "std", "count"])
           .rename(columns={"std": "sd", "count": "n"}).reset_index())
    half = t_half_width(out["sd"].to_numpy(), out["n"].to_numpy(dtype=float), level)
    return out.assign(ci_lo=out["mean"] - half, ci_hi=out["mean"] + half)


def deep_layer_table(table: pd.DataFrame, min_layer: int = 1) -> pd.DataFrame:
    r"""Per (condition, seed): the mean of each measure over the states :math:`l \geq` ``min_layer``.

    A NaN at one layer makes that seed's mean NaN (it is not silently
    dropped).  The column ``layers`` names the range, e.g. ``"1-4"``.

    Examples
    --------
    >>> table = pd.DataFrame({"condition": "dfa", "seed": [0, 0, 0, 1, 1, 1],
    ...                       "layer": [0, 1, 2] * 2, "rho": [0.9, 0.2, 0.4, 0.8, 0.1, float("nan")]})
    >>> deep_layer_table(table)
      condition  seed  rho layers
    0       dfa     0  0.3    1-2
    1       dfa     1  NaN    1-2
    """
    deep = table[table["layer"] >= min_layer]
    if deep.empty:
        raise MBEInputError(f"no layer at or above min_layer={min_layer}; the table has layers "
                            f"{sorted(set(table['layer']))}")
    measures = [m for m in MEASURES if m in deep.columns]
    means = deep.groupby(["condition", "seed"], sort=False)[measures].agg(
        lambda v: v.mean(skipna=False)).reset_index()
    return means.assign(layers=f"{min_layer}-{int(deep['layer'].max())}")


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, lo, hi)`` of a t-interval over values (NaN bounds for a single value).

    Examples
    --------
    >>> [round(v, 3) for v in mean_ci([1.0, 2.0, 3.0])]
    [2.0, -0.484, 4.484]
    >>> mean_ci([5.0])
    (5.0, nan, nan)
    """
    v = np.asarray(list(values), dtype=float)
    if len(v) < 2:
        return (float(v.mean()) if len(v) else math.nan, math.nan, math.nan)
    half = float(t_half_width(v.std(ddof=1), len(v), level))
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)


def t_half_width(sd, n, level: float = 0.95):
    r"""Half-width :math:`t_{(1+\text{level})/2,\,n-1}\, s / \sqrt n` of a t-interval (NaN for n < 2).

    Examples
    --------
    >>> round(float(t_half_width(1.0, 4)), 4)
    1.5912
    """
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        half = stats.t.ppf((1 + level) / 2, n - 1) * np.asarray(sd, dtype=float) / np.sqrt(n)
    return np.where(n >= 2, half, np.nan)
