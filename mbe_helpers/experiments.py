r"""The experiments of the credit-assignment chapters, as importable functions.

Chapters call these; each returns tidy DataFrames (one row per condition,
seed and layer) so that a chapter cell is one call and one figure.

Chapter 3 (calibration controls):

* :func:`train_residual` -- a pre-LN ``ResidualMLP`` trained with a learning
  rule of :mod:`mbe_helpers.feedback`;
* :func:`credit_signals` -- the credit signal a condition assigns to each
  stream state (true gradient, random vector, DFA's :math:`e B_l^\top`, FA's
  propagated error);
* :func:`calibration_runs` -- per-layer :math:`\rho`, BP cosine and nudging
  for the controls and the test conditions over seeds;
* :func:`seed_intervals`, :func:`deep_layer_table`, :func:`place_on_scale` --
  means with t-intervals over seeds, the deep-layer mean, the calibrated scale;
* :func:`sensitivity` -- :math:`\rho` as a function of eps and of the number of directions.

Chapter 4 (FA diagnostics):

* :func:`eval_batches` -- disjoint held-out batches for the protocol;
* :func:`diagnostic_runs` -- every method and seed trained and diagnosed
  (:class:`DiagnosticRuns`), with the frozen-blocks network of the same seed
  as the baseline of (d);
* :func:`alignment_runs`, :func:`survival` -- each method's own credit signal
  measured on its network, and which alignment numbers the protocol lets stand;
* :func:`shallow_baselines` -- networks with no deep blocks at all.

Measurements of :math:`\rho`, :math:`\Gamma` and nudging run on the CPU in
float64 (a copy of the network and of the feedback matrices): in float32 the
loss differences of small perturbations drown in rounding.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mbe_helpers.errors import require_extra

require_extra("torch", "torch", "mbe_helpers.experiments")

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn

from mbe_helpers import credit, feedback, protocol, stream
from mbe_helpers.data import Dataset
from mbe_helpers.errors import MBEInputError
from mbe_helpers.models import ResidualMLP, ViTMini
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


# --------------------------------------------------------------------------- #
# Checks                                                                      #
# --------------------------------------------------------------------------- #

def _check_names(given: Iterable[str], known: Sequence[str], what: str) -> list[str]:
    given = list(given)
    if not given:
        raise MBEInputError(f"give at least one {what}; choose from {', '.join(known)}")
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise MBEInputError(f"unknown {what}(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return list(dict.fromkeys(given))


def _check_seeds(seeds: Iterable[int]) -> list[int]:
    seeds = list(seeds)
    ok = all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0 for s in seeds)
    if not seeds or not ok or len(set(seeds)) != len(seeds):
        raise MBEInputError(f"seeds must be a non-empty list of distinct non-negative integers, got {seeds}")
    return [int(s) for s in seeds]


def _check_train_kw(train_kw: dict) -> None:
    unknown = sorted(set(train_kw) - set(TRAIN_KEYS))
    if unknown:
        raise MBEInputError(f"unknown training option(s) {', '.join(unknown)}; "
                            f"choose from {', '.join(TRAIN_KEYS)}")


def _check_measurement(eval_size: int, eps: float, n_directions: int) -> None:
    if not (isinstance(eval_size, int) and eval_size >= 2):
        raise MBEInputError(f"eval_size must be an integer of at least 2, got {eval_size!r}")
    if not (eps > 0 and isinstance(n_directions, int) and n_directions >= 1):
        raise MBEInputError(f"eps must be positive and n_directions a positive integer, "
                            f"got eps={eps!r}, n_directions={n_directions!r}")


# --------------------------------------------------------------------------- #
# Training and credit signals                                                 #
# --------------------------------------------------------------------------- #

def _progress(jobs: list, desc: str, show: bool):
    """``jobs`` wrapped in a tqdm bar when ``show`` (tqdm is only imported then)."""
    if not show:
        return jobs
    from tqdm.auto import tqdm

    return tqdm(jobs, desc=desc)


def _seeded(build, seed: int) -> nn.Module:
    """Build a module from torch's global RNG seeded with ``seed``, leaving that RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def residual_model(kind: str, data: Dataset, width: int, n_blocks: int) -> nn.Module:
    """``ResidualMLP(in, width, classes, n_blocks)`` or a ``ViTMini`` of the same width and depth.

    The ViT-mini cuts images into 4 x 4 patches (2 x 2 when a side is not a
    multiple of 4) and uses 4 attention heads when ``width`` allows, else 1.
    """
    if kind == "resmlp":
        return ResidualMLP(data.in_dim, width, data.n_classes, n_blocks)
    if kind != "vit":
        raise MBEInputError(f"unknown model {kind!r}; choose one of {', '.join(MODELS)}")
    if data.image_shape is None:
        raise MBEInputError(f"model 'vit' needs an image dataset, and {data.name} has none")
    side = min(data.image_shape[1:])
    patch = 4 if side % 4 == 0 else 2
    return ViTMini(data.image_shape, data.n_classes, patch=patch, width=width, n_blocks=n_blocks,
                   n_heads=4 if width % 4 == 0 else 1)


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
    """
    rule = feedback.make_rule(rule_name, seed=seed, penalty=penalty)
    kind = model
    model = _seeded(lambda: residual_model(kind, data, width, n_blocks), seed).to(data.x_train)
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


def _measurement_copy(model, rule, dtype: torch.dtype = torch.float64):
    """CPU copies of the model and of the rule's feedback matrices in ``dtype``."""
    twin_model = copy.deepcopy(model).to("cpu", dtype).eval()
    twin_rule = copy.copy(rule)
    matrices = getattr(rule, "matrices", None)
    if isinstance(matrices, dict):
        twin_rule.matrices = {k: v.to("cpu", dtype) for k, v in matrices.items()}
    elif isinstance(matrices, list):
        twin_rule.matrices = [m.to("cpu", dtype) for m in matrices]
    return twin_model, twin_rule


def _eval_set(data: Dataset, eval_size: int, dtype: torch.dtype = torch.float64):
    """The first ``eval_size`` test samples on the CPU."""
    return data.x_test[:eval_size].to("cpu", dtype), data.y_test[:eval_size].cpu()


def measure_condition(condition: str, model, rule, x: torch.Tensor, y: torch.Tensor, *,
                      eps: float = 1e-3, n_directions: int = 32, seed: int = 0) -> pd.DataFrame:
    """Rho, BP cosine and nudging of one condition's signal at every stream state.

    Runs :func:`mbe_helpers.credit.measure_layers` on a float64 CPU copy.
    The random directions use ``seed`` (+ layer), the negative control's
    vector ``10_000 + seed``.
    """
    model64, rule64 = _measurement_copy(model, rule)
    x64, y = x.to("cpu", torch.float64), y.cpu()
    signals = credit_signals(condition, model64, rule64, x64, y, seed=10_000 + seed)
    return credit.measure_layers(model64, x64, y, signals, eps=eps, n_directions=n_directions,
                                 seed=seed)


def _rule_of(condition: str) -> str:
    return "bp" if condition in CONTROLS else condition


# --------------------------------------------------------------------------- #
# Chapter 3: calibration                                                      #
# --------------------------------------------------------------------------- #

def calibration_runs(data: Dataset, conditions: Sequence[str] = CONDITIONS,
                     seeds: Sequence[int] = (0, 1, 2), *, eval_size: int = 512,
                     eps: float = 1e-3, n_directions: int = 32, progress: bool = False,
                     **train_kw) -> tuple[pd.DataFrame, dict]:
    r"""Chapter 3: credit metrics of every condition, seed and stream state.

    Each (rule, seed) network is trained once with :func:`train_residual`
    (``train_kw``: ``width, n_blocks, epochs, lr, batch_size, penalty``);
    both controls are read on the BP network of the same seed, every test
    condition on its own network with its own signal.  Measurements
    (:func:`measure_condition`) use the first ``eval_size`` test samples.

    Returns
    -------
    (table, models)
        ``table`` has one row per (condition, seed, layer) with ``rho,
        bp_cosine, nudge, reason, test_acc``; ``models[(rule, seed)]`` is
        ``(model, rule, record)``.
    """
    conditions = _check_names(conditions, CONDITIONS, "condition")
    seeds = _check_seeds(seeds)
    _check_measurement(eval_size, eps, n_directions)
    _check_train_kw(train_kw)
    x, y = _eval_set(data, eval_size)
    models, rows = {}, []
    jobs = [(c, s) for s in seeds for c in conditions]
    for condition, seed in _progress(jobs, "calibration", progress):
        key = (_rule_of(condition), seed)
        if key not in models:
            models[key] = train_residual(key[0], data, seed=seed, **train_kw)
        model, rule, record = models[key]
        table = measure_condition(condition, model, rule, x, y, eps=eps,
                                  n_directions=n_directions, seed=seed)
        rows.append(table.assign(condition=condition, seed=seed, test_acc=record["test_acc"]))
    columns = ["condition", "seed", "layer", *MEASURES, "reason", "test_acc"]
    return pd.concat(rows, ignore_index=True)[columns], models


def seed_intervals(table: pd.DataFrame, value: str = "rho",
                   by: Sequence[str] = ("condition", "layer"), level: float = 0.95) -> pd.DataFrame:
    r"""Mean over seeds with a t-interval, per group.

    :math:`\bar v \pm t_{(1+\text{level})/2,\,n-1}\, s / \sqrt n` with
    :math:`s` the standard deviation over the n rows of a group; the interval
    is NaN when a group has a single row.  Groups keep their order of appearance.

    Returns ``*by, mean, sd, n, ci_lo, ci_hi``.
    """
    missing = [c for c in (value, *by) if c not in table.columns]
    if missing:
        raise MBEInputError(f"unknown column(s) {', '.join(missing)}; available: "
                            f"{', '.join(map(str, table.columns))}")
    if not 0 < level < 1:
        raise MBEInputError(f"level must lie strictly between 0 and 1, got {level}")
    out = (table.groupby(list(by), sort=False)[value].agg(["mean", "std", "count"])
           .rename(columns={"std": "sd", "count": "n"}).reset_index())
    n = out["n"].to_numpy(dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        half = stats.t.ppf((1 + level) / 2, n - 1) * out["sd"].to_numpy() / np.sqrt(n)
    half = np.where(n >= 2, half, np.nan)
    return out.assign(ci_lo=out["mean"] - half, ci_hi=out["mean"] + half)


def deep_layer_table(table: pd.DataFrame, min_layer: int = 1) -> pd.DataFrame:
    r"""Per (condition, seed): the mean of each measure over the states :math:`l \geq` ``min_layer``.

    A NaN at one layer makes that seed's mean NaN (it is not silently
    dropped).  The column ``layers`` names the range, e.g. ``"1-4"``.
    """
    deep = table[table["layer"] >= min_layer]
    if deep.empty:
        raise MBEInputError(f"no layer at or above min_layer={min_layer}; the table has layers "
                            f"{sorted(set(table['layer']))}")
    measures = [m for m in MEASURES if m in deep.columns]
    means = deep.groupby(["condition", "seed"], sort=False)[measures].agg(
        lambda v: v.mean(skipna=False)).reset_index()
    return means.assign(layers=f"{min_layer}-{int(deep['layer'].max())}")


def place_on_scale(deep: pd.DataFrame, value: str = "rho", *, floor_units: float = 3.0,
                   near_ceiling: float = 0.9, level: float = 0.95) -> pd.DataFrame:
    r"""Each condition's deep-layer value on the scale anchored by the two controls.

    Combines :func:`seed_intervals` (mean and t-interval over seeds) with
    :func:`mbe_helpers.credit.calibrated_scale`: ``fraction_of_ceiling``
    :math:`= \bar v_c / \bar v_+` and ``noise_units`` :math:`= (\bar v_c -
    \bar v_-)/s_-` (:math:`s_-` the negative control's spread over seeds).
    ``reading`` is, in this order of precedence:

    * *not placeable* (with the reason) when the noise units are NaN;
    * *within the noise floor* when ``noise_units < floor_units``;
    * *not separable from the negative control* when the condition's own
      t-interval still contains the negative control's mean -- its seeds
      scatter more than the control's, so distance in noise units alone
      would overstate it;
    * *near the ceiling* when the fraction of the ceiling is at least ``near_ceiling``;
    * *above the noise floor* otherwise.
    """
    intervals = seed_intervals(deep, value, by=("condition",), level=level)
    scale = credit.calibrated_scale(deep, value=value, by=("layers",))
    merged = intervals.merge(scale[["condition", "fraction_of_ceiling", "noise_units", "reason"]],
                             on="condition", how="left")
    negative = float(merged.loc[merged.condition == "negative", "mean"].iloc[0])
    merged["reading"] = [_reading(r, negative, floor_units, near_ceiling) for r in merged.itertuples()]
    return merged


FLOOR_READINGS = ("within the noise floor", "not separable from the negative control")
"""Readings of :func:`place_on_scale` that do not put a condition above the noise floor."""


def _reading(row, negative: float, floor_units: float, near_ceiling: float) -> str:
    if not np.isfinite(row.noise_units):
        return f"not placeable ({row.reason})"
    if row.noise_units < floor_units:
        return FLOOR_READINGS[0]
    if row.condition != "negative" and np.isfinite(row.ci_lo) and row.ci_lo <= negative <= row.ci_hi:
        return FLOOR_READINGS[1]
    if np.isfinite(row.fraction_of_ceiling) and row.fraction_of_ceiling >= near_ceiling:
        return "near the ceiling"
    return "above the noise floor"


def sensitivity(model, rule, condition: str, data: Dataset, layer: int, *,
                eps_values: Sequence[float] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0),
                m_values: Sequence[int] = (1, 4, 16, 64), repeats: int = 5,
                eval_size: int = 512, eps: float = 1e-3, n_directions: int = 32,
                dtype: torch.dtype = torch.float64) -> pd.DataFrame:
    r"""Rho at one stream state as a function of eps (at ``n_directions``) and of M (at ``eps``).

    Each point is repeated with ``repeats`` direction seeds, so the spread
    that M controls is visible.  ``dtype`` is the precision of the
    measurement copy (float32 shows the rounding floor at small eps).

    Returns
    -------
    DataFrame
        ``condition, dtype, sweep ("eps" | "M"), value, repeat, rho``.
    """
    _check_measurement(eval_size, eps, n_directions)
    if not (isinstance(repeats, int) and repeats >= 1):
        raise MBEInputError(f"repeats must be a positive integer, got {repeats!r}")
    n_states = len(model.blocks) + 1
    if not (isinstance(layer, int) and 0 <= layer < n_states):
        raise MBEInputError(f"layer must be a stream state between 0 and {n_states - 1}, got {layer!r}")
    model_c, rule_c = _measurement_copy(model, rule, dtype)
    x, y = _eval_set(data, eval_size, dtype)
    signal = credit_signals(condition, model_c, rule_c, x, y, seed=10_000)[layer]
    hidden, _ = stream.forward_stream(model_c, x)
    h, loss_fn = hidden[layer].detach(), stream.tail_loss(model_c, layer, y)

    def rho(e: float, m: int, r: int) -> float:
        return float(credit.perturbation_correlation(h, signal, loss_fn, eps=e, n_directions=m,
                                                     seed=r))

    rows = [{"sweep": "eps", "value": e, "repeat": r, "rho": rho(e, n_directions, r)}
            for r in range(repeats) for e in eps_values]
    rows += [{"sweep": "M", "value": m, "repeat": r, "rho": rho(eps, m, r)}
             for r in range(repeats) for m in m_values]
    return pd.DataFrame(rows).assign(condition=condition, dtype=str(dtype).removeprefix("torch."))[
        ["condition", "dtype", "sweep", "value", "repeat", "rho"]]


# --------------------------------------------------------------------------- #
# Chapter 4: the FA diagnostics                                               #
# --------------------------------------------------------------------------- #

def eval_batches(data: Dataset, n_batches: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n_batches`` disjoint evaluation batches from the pooled validation and test splits."""
    if not (isinstance(n_batches, int) and isinstance(batch_size, int) and n_batches >= 2
            and batch_size >= 1):
        raise MBEInputError(f"need at least 2 batches of at least 1 sample, got n_batches="
                            f"{n_batches!r}, batch_size={batch_size!r}")
    x = torch.cat([data.x_val, data.x_test])
    y = torch.cat([data.y_val, data.y_test])
    if n_batches * batch_size > len(y):
        raise MBEInputError(f"{n_batches} batches of {batch_size} need {n_batches * batch_size} "
                            f"evaluation samples, but validation + test hold {len(y)}")
    return [(x[i * batch_size:(i + 1) * batch_size], y[i * batch_size:(i + 1) * batch_size])
            for i in range(n_batches)]


@dataclass
class DiagnosticRuns:
    """Every (method, seed) network of :func:`diagnostic_runs` and its diagnosis.

    Attributes
    ----------
    diagnoses : dict
        ``(method, seed) -> Diagnosis``.
    models : dict
        ``(method, seed) -> (model, rule, record)``, the frozen baseline included.
    methods, seeds : list
        In the order requested.
    """

    diagnoses: dict
    models: dict
    methods: list
    seeds: list

    def layers(self) -> pd.DataFrame:
        """One row per (method, seed, layer): ``residual_norm, bp_grad_norm, stability``."""
        return pd.concat([d.layers().assign(seed=s) for (_, s), d in self.diagnoses.items()],
                         ignore_index=True)

    def verdicts(self) -> pd.DataFrame:
        """One row per (method, seed, diagnostic): ``state, detail``."""
        return pd.concat([d.to_frame().assign(seed=s) for (_, s), d in self.diagnoses.items()],
                         ignore_index=True)

    def accuracy(self) -> pd.DataFrame:
        """One row per (method, seed): ``test_acc``, the stability value that (c) judges, and
        the same seed's ``frozen_acc`` and ``margin`` (NaN where (d) is skipped)."""
        rows = [{"method": m, "seed": s, "test_acc": d.headline_acc,
                 "frozen_acc": np.nan if d.frozen_baseline_acc is None else d.frozen_baseline_acc,
                 "stability": d.stability[d.stability_layer], "stability_layer": d.stability_layer}
                for (m, s), d in self.diagnoses.items()]
        table = pd.DataFrame(rows)
        return table.assign(margin=table["test_acc"] - table["frozen_acc"])

    def summary(self) -> pd.DataFrame:
        """One row per method, over its seeds: mean ``test_acc``, largest ``max_growth``,
        smallest ``min_grad_norm``, mean and largest ``stability``, mean ``margin`` over the
        frozen baseline (NaN where (d) is skipped) and ``face_value`` (seeds with no diagnostic firing)."""
        rows = []
        for m in self.methods:
            ds = [self.diagnoses[(m, s)] for s in self.seeds]
            stab = [d.stability[d.stability_layer] for d in ds]
            margins = [d.headline_acc - d.frozen_baseline_acc for d in ds if d.frozen_baseline_acc is not None]
            rows.append({"method": m, "test_acc": np.mean([d.headline_acc for d in ds]),
                         "max_growth": max(d.max_growth for d in ds),
                         "min_grad_norm": min(min(d.bp_grad_norms) for d in ds),
                         "stability": np.mean(stab), "stability_max": max(stab),
                         "margin": np.mean(margins) if margins else np.nan,
                         "face_value": sum(d.verdict == "face value" for d in ds)})
        return pd.DataFrame(rows)

    def verdict_table(self) -> pd.DataFrame:
        """Method x diagnostic: in how many seeds each diagnostic fires (``"2/3"``), or ``skipped``."""
        v = self.verdicts()
        cells = v.groupby(["method", "diagnostic"], sort=False)["state"].agg(_count_fires)
        table = cells.unstack("diagnostic").reindex(self.methods)
        overall = {m: f"{sum(self.diagnoses[(m, s)].verdict == 'face value' for s in self.seeds)}"
                      f"/{len(self.seeds)}" for m in self.methods}
        return table.assign(face_value=pd.Series(overall)).rename_axis(columns=None)


def _count_fires(states: pd.Series) -> str:
    if (states == protocol.SKIPPED).all():
        return protocol.SKIPPED
    return f"{int((states == protocol.FIRES).sum())}/{len(states)}"


def diagnostic_runs(data: Dataset, methods: Sequence[str] = METHODS, seeds: Sequence[int] = (0, 1, 2),
                    *, n_batches: int = 8, eval_batch_size: int = 88, progress: bool = False,
                    thresholds: protocol.Thresholds | None = None,
                    stability_layer: int | None = None, **train_kw) -> DiagnosticRuns:
    """Chapter 4: train every method and seed, run the protocol on each.

    ``methods`` are rules of :mod:`mbe_helpers.feedback` plus ``"init"``
    (the untrained network, a reference for (c)).  The frozen-blocks network
    of the same seed is always trained: its test accuracy is the baseline of
    (d) for every method (for ``frozen`` itself and ``init`` (d) is skipped).
    The protocol reads :func:`eval_batches` (``n_batches`` of
    ``eval_batch_size``, held out); ``train_kw`` (``width, n_blocks, epochs,
    lr, batch_size, penalty``) go to :func:`train_residual`.
    """
    methods = _check_names(methods, (*METHODS, INIT), "method")
    seeds = _check_seeds(seeds)
    _check_train_kw(train_kw)
    batches = eval_batches(data, n_batches, eval_batch_size)
    order = ["frozen", *[m for m in methods if m != "frozen"]]
    models = {}
    for method, seed in _progress([(m, s) for s in seeds for m in order], "FA diagnostics", progress):
        kw = {**train_kw, "epochs": 0} if method == INIT else train_kw
        models[(method, seed)] = train_residual("bp" if method == INIT else method, data,
                                                seed=seed, **kw)
    diagnoses = {}
    for method in methods:
        for seed in seeds:
            model, _, record = models[(method, seed)]
            frozen = None if method in ("frozen", INIT) else models[("frozen", seed)][2]["test_acc"]
            diagnoses[(method, seed)] = protocol.diagnose(
                model, batches, record["test_acc"], frozen, method=method,
                stability_layer=stability_layer, thresholds=thresholds)
    return DiagnosticRuns(diagnoses, models, methods, seeds)


def alignment_runs(runs: DiagnosticRuns, data: Dataset, *, eval_size: int = 512,
                   eps: float = 1e-3, n_directions: int = 32) -> pd.DataFrame:
    """Each method's own credit signal measured on its own network (see :data:`OWN_SIGNAL`).

    Returns one row per (method, seed, layer) with ``condition, rho,
    bp_cosine, nudge, reason``; methods without a credit signal of their own
    (``frozen``, ``init``) are left out.
    """
    _check_measurement(eval_size, eps, n_directions)
    x, y = _eval_set(data, eval_size)
    rows = []
    for (method, seed), (model, rule, _) in runs.models.items():
        if method not in OWN_SIGNAL or method not in runs.methods:
            continue
        table = measure_condition(OWN_SIGNAL[method], model, rule, x, y, eps=eps,
                                  n_directions=n_directions, seed=seed)
        rows.append(table.assign(method=method, condition=OWN_SIGNAL[method], seed=seed))
    if not rows:
        raise MBEInputError(f"none of the methods {', '.join(runs.methods)} has a credit signal "
                            f"of its own; include one of {', '.join(OWN_SIGNAL)}")
    return pd.concat(rows, ignore_index=True)[["method", "condition", "seed", "layer", *MEASURES,
                                               "reason"]]


def survival(alignment: pd.DataFrame, runs: DiagnosticRuns, min_layer: int = 1) -> pd.DataFrame:
    """Which alignment numbers survive the protocol, per method.

    An alignment number (rho, Gamma against the BP gradient) can be read
    when its reference is sound: (b) and (c) fire in no seed.  A claim that
    the deep blocks learned something needs (d) to stay quiet as well.

    Returns one row per method: deep-layer ``rho`` and ``bp_cosine`` (mean
    and t-interval over seeds), how often (b), (c), (d) fire, and the two
    booleans ``alignment_readable`` and ``beats_frozen``.
    """
    deep = deep_layer_table(alignment.drop(columns="condition").rename(
        columns={"method": "condition"}), min_layer=min_layer)
    rho = seed_intervals(deep, "rho", by=("condition",)).set_index("condition")
    gamma = seed_intervals(deep, "bp_cosine", by=("condition",)).set_index("condition")
    v = runs.verdicts()
    fires = (v.assign(fired=v["state"] == protocol.FIRES)
             .pivot_table(index="method", columns="diagnostic", values="fired", aggfunc="sum"))
    rows = []
    for method in rho.index:
        b, c, d = (int(fires.loc[method, k]) for k in
                   ("b_bp_gradient_floor", "c_direction_stability", "d_frozen_baseline"))
        rows.append({"method": method, "rho": rho.loc[method, "mean"],
                     "rho_lo": rho.loc[method, "ci_lo"], "rho_hi": rho.loc[method, "ci_hi"],
                     "bp_cosine": gamma.loc[method, "mean"], "b_fires": b, "c_fires": c,
                     "d_fires": d, "n_seeds": len(runs.seeds),
                     "alignment_readable": b == 0 and c == 0, "beats_frozen": d == 0})
    return pd.DataFrame(rows)


def shallow_baselines(data: Dataset, seeds: Sequence[int] = (0,), *, width: int = 256,
                      epochs: int = 30, lr: float = 1e-3, batch_size: int | None = 128) -> pd.DataFrame:
    r"""Test accuracy of networks without deep blocks, trained by backprop like the others.

    * ``linear``: softmax regression on the raw inputs, :math:`z = W x + b`;
    * ``no_blocks``: the ``ResidualMLP`` with zero blocks, :math:`z =
      \mathrm{head}(\mathrm{LN}(\mathrm{embed}(x)))` -- a trained embedding
      and a linear read-out.

    Returns ``model, seed, test_acc``.
    """
    seeds = _check_seeds(seeds)
    builders = {"linear": lambda: nn.Linear(data.in_dim, data.n_classes),
                "no_blocks": lambda: ResidualMLP(data.in_dim, width, data.n_classes, 0)}
    rows = []
    for name, build in builders.items():
        for seed in seeds:
            model = _seeded(build, seed).to(data.x_train)
            record = train(model, data, optimizer="adam", lr=lr, epochs=epochs,
                           batch_size=batch_size, seed=seed)
            rows.append({"model": name, "seed": seed, "test_acc": record["test_acc"]})
    return pd.DataFrame(rows)


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, lo, hi)`` of a t-interval over values (NaN bounds for a single value)."""
    v = np.asarray(list(values), dtype=float)
    if len(v) < 2:
        return (float(v.mean()) if len(v) else math.nan, math.nan, math.nan)
    half = stats.t.ppf((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)
