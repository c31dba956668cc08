"""One parameter schema per chapter, checked before a kernel starts and again inside it.

Each chapter's parameters are declared once, as a pydantic model below
(strict types: ``True`` is not an integer, ``"5"`` is not a number, NaN and
infinities are refused). ``mbe-book run`` and ``mbe-book list`` check a
chapter's parameters with :func:`check` before papermill starts a kernel, and
the notebook's validation cell calls the same function, so plain papermill
gets the same one-sentence messages. :data:`SCHEMAS` maps a chapter's file
stem to its model.

Examples
--------
>>> values = dict(n=500, metric_noise=0.5, target_noise=0.3, seed=0, n_bootstrap=1000,
...               results_dir=None)
>>> check("00_method", values).n
500
>>> check("00_method", {**values, "n": 10})
Traceback (most recent call last):
...
mbe_helpers.errors.MBEInputError: bad parameter: n must be greater than or equal to 50, got 10.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError,
                      model_validator)

from mbe_helpers.audit import MAX_PLACEBOS
from mbe_helpers.errors import MBEInputError

# ------------------------------------------------------------------ field types
Count = Annotated[int, Field(ge=1)]                  # a positive integer
Seed = Annotated[int, Field(ge=0)]                   # a non-negative integer
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]       # a share, 0 to 1 inclusive
Level = Annotated[float, Field(gt=0, lt=1)]          # a significance level


def _path(text: str) -> str:
    if not text.strip():
        raise ValueError("must be a non-empty path")
    return text


def _device(text: str) -> str:
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "auto", "cuda") or (index and not (kind == "cuda" and index.isdigit())):
        raise ValueError("must be cpu, auto, cuda or cuda:<index>")
    return text


PathText = Annotated[str, AfterValidator(_path)]
Pair = Annotated[list[Positive], Field(min_length=2, max_length=2)]

DATASET = Literal["digits", "mnist1d", "mnist", "fashion-mnist", "cifar10"]
DEVICE = Annotated[str, AfterValidator(_device)]
MLP_MODELS = Literal["mlp", "resmlp", "cnn"]
CONDITION = Literal["positive", "negative", "fa", "dfa", "dfa_penalized", "dfa_shuffled"]
TEST_CONDITION = Literal["fa", "dfa", "dfa_penalized", "dfa_shuffled"]
METHOD = Literal["bp", "fa", "dfa", "dfa_penalized", "dfa_shuffled", "frozen"]
SCENARIO = str     # checked against mbe_helpers.simulate.SCENARIOS in the model


class _Schema(BaseModel):
    """Common settings: strict types, unknown names refused, no NaN, read-only."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)
    chapter: ClassVar[str] = ""
    _digest: str = PrivateAttr("")

    results_dir: Optional[PathText]

    def artifact_dir(self) -> Path:
        """The run's artifact folder, created: ``results_dir``, else ``results/custom/<chapter>-<digest>``.

        Relative paths are taken from the repository root. ``mbe-book run``
        always passes ``results_dir``; a plain papermill run that leaves it
        ``None`` writes beside the book's profile folders, never into them.
        """
        from mbe_helpers.runtime import resolve_results_dir

        return resolve_results_dir(self.results_dir or f"results/custom/{self.chapter}-{self._digest}")


def _distinct(name: str, values: list) -> None:
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must not repeat a value, got {values!r}")


def _ordered(name: str, pair: list) -> None:
    if pair[0] > pair[1]:
        raise ValueError(f"{name} must be [low, high] with low <= high, got {pair!r}")


# --------------------------------------------------------------------- chapters
class MethodParams(_Schema):
    """``00_method``: the simulated ledger of the method chapter.

    Examples
    --------
    >>> p = MethodParams(n=500, metric_noise=0.5, target_noise=0.3, seed=0, n_bootstrap=1000,
    ...                  results_dir=None)
    >>> p.n, p.chapter
    (500, '00_method')
    >>> check("00_method", {**p.model_dump(), "metric_noise": -1.0})
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: bad parameter: metric_noise must be greater than or
    equal to 0, got -1.0.
    """

    n: Annotated[int, Field(ge=50)]
    metric_noise: NonNegative
    target_noise: NonNegative
    seed: Seed
    n_bootstrap: Annotated[int, Field(ge=100)]


class _Training(_Schema):
    """Parameters shared by the chapters that train networks."""

    dataset: DATASET
    data_root: Optional[PathText]
    device: DEVICE
    threads: Count

    @model_validator(mode="after")
    def _cuda_present(self):
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"device is {self.device!r} but torch sees no GPU here; "
                                 "use device='cpu' or 'auto'")
        return self


class AcidTestParams(_Training):
    """``01_acid_test``: capacity and label-noise probes of one architecture.

    Examples
    --------
    >>> from mbe_helpers.book import get_chapter
    >>> values = get_chapter(AcidTestParams.chapter).defaults()      # the notebook's defaults
    >>> type(check("01_acid_test", values)).__name__
    'AcidTestParams'
    >>> check("01_acid_test", {**values, "early_epoch": values["epochs"]})
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: bad parameter: early_epoch must be below epochs (150),
    got 150.
    """

    model: MLP_MODELS
    width: Count
    depth: Count
    lr: Positive
    epochs: Annotated[int, Field(ge=2)]
    batch_size: Optional[Count]
    early_epoch: Count
    sizes: Annotated[list[Annotated[int, Field(ge=10)]], Field(min_length=3)]
    noises: Annotated[list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=3)]
    n_seeds: Annotated[int, Field(ge=2)]
    fim_samples: Annotated[int, Field(ge=2)]
    n_bootstrap: Annotated[int, Field(ge=100)]
    alpha: Level
    seed: Seed
    executor: Optional[str]

    @model_validator(mode="after")
    def _consistent(self):
        if self.early_epoch >= self.epochs:
            raise ValueError(f"early_epoch must be below epochs ({self.epochs}), got {self.early_epoch}")
        _distinct("sizes", self.sizes)
        _distinct("noises", self.noises)
        return self


class GridParams(_Training):
    """``02_heterogeneous_grid``: the sampled heterogeneous grid and its audits.

    Examples
    --------
    >>> from mbe_helpers.book import get_chapter
    >>> values = get_chapter(GridParams.chapter).defaults()
    >>> check("02_heterogeneous_grid", values).optimizers
    ['adam', 'sgd']
    >>> check("02_heterogeneous_grid", {**values, "lr_range": [0.1, 0.001]})
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: bad parameter: lr_range must be [low, high] with low
    <= high, got [0.1, 0.001].
    """

    model: MLP_MODELS
    n_runs: Annotated[int, Field(ge=15)]
    grid_seed: Seed
    lr_range: Pair
    wd_range: Pair
    widths: Annotated[list[Count], Field(min_length=1)]
    depths: Annotated[list[Count], Field(min_length=1)]
    optimizers: Annotated[list[Literal["adam", "sgd", "adamw"]], Field(min_length=1)]
    noise_range: Annotated[list[Annotated[float, Field(ge=0, lt=1)]],
                           Field(min_length=2, max_length=2)]
    n_train_range: Annotated[list[Annotated[int, Field(ge=10)]],
                             Field(min_length=2, max_length=2)]
    epochs: Annotated[int, Field(ge=2)]
    batch_size: Optional[Count]
    probe_epochs: Annotated[list[Count], Field(min_length=2)]
    audit_epoch: Count
    fim_samples: Annotated[int, Field(ge=2)]
    positive_noise: NonNegative
    n_bootstrap: Annotated[int, Field(ge=100)]
    n_permutations: Annotated[int, Field(ge=100)]
    alpha: Level
    seed: Seed
    executor: Optional[str]
    replication_runs: Annotated[int, Field(ge=10)]
    replication_epochs: Annotated[int, Field(ge=2)]
    replication_lr_range: Pair
    replication_wd_range: Pair
    replication_fim_samples: Annotated[int, Field(ge=2)]
    replication_epoch: Count
    placebos: Annotated[int, Field(ge=20, le=MAX_PLACEBOS)]

    @model_validator(mode="after")
    def _consistent(self):
        if self.replication_epoch > self.replication_epochs:
            raise ValueError(f"replication_epoch must not pass replication_epochs "
                             f"({self.replication_epochs}), got {self.replication_epoch}")
        for name in ("lr_range", "wd_range", "noise_range", "n_train_range", "replication_lr_range",
                     "replication_wd_range"):
            _ordered(name, getattr(self, name))
        _distinct("probe_epochs", self.probe_epochs)
        if max(self.probe_epochs) > self.epochs:
            raise ValueError(f"probe_epochs must not pass epochs ({self.epochs}), "
                             f"got {self.probe_epochs!r}")
        if self.audit_epoch not in self.probe_epochs:
            raise ValueError(f"audit_epoch must be one of probe_epochs {self.probe_epochs!r}, "
                             f"got {self.audit_epoch}")
        return self


class _Residual(_Training):
    """Residual networks trained with several learning rules (chapters 03 and 04)."""

    width: Count
    n_blocks: Count
    epochs: Count
    lr: Positive
    batch_size: Count
    seeds: Annotated[list[Seed], Field(min_length=2)]
    penalty: NonNegative
    eps: Positive
    n_directions: Count
    eval_size: Count

    @model_validator(mode="after")
    def _distinct_seeds(self):
        _distinct("seeds", self.seeds)
        return self


class CreditParams(_Residual):
    """``03_calibration_controls``: rho, BP cosine and nudge between the two controls.

    Examples
    --------
    >>> from mbe_helpers.book import get_chapter
    >>> values = get_chapter(CreditParams.chapter).defaults()
    >>> check("03_calibration_controls", values).conditions[:2]
    ['positive', 'negative']
    >>> check("03_calibration_controls", {**values, "seeds": [0]})
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: bad parameter: seeds must have at least 2 items, got [0].
    """

    conditions: Annotated[list[CONDITION], Field(min_length=2)]
    floor_units: Positive
    sensitivity_layer: Seed
    sensitivity_conditions: list[TEST_CONDITION]
    eps_values: Annotated[list[Positive], Field(min_length=1)]
    m_values: Annotated[list[Count], Field(min_length=1)]
    sensitivity_repeats: Count

    @model_validator(mode="after")
    def _consistent(self):
        _distinct("conditions", self.conditions)
        if not {"positive", "negative"} <= set(self.conditions):
            raise ValueError(f"conditions must contain positive and negative, got {self.conditions!r}")
        missing = [c for c in self.sensitivity_conditions if c not in self.conditions]
        if missing:
            raise ValueError(f"sensitivity_conditions must be listed in conditions too, "
                             f"got {missing[0]!r}")
        if self.sensitivity_layer > self.n_blocks:
            raise ValueError(f"sensitivity_layer must be a stream state from 0 to n_blocks "
                             f"({self.n_blocks}), got {self.sensitivity_layer}")
        return self


class DiagnosticsParams(_Residual):
    """``04_fa_diagnostics``: the four diagnostics of a feedback-alignment result.

    Examples
    --------
    >>> from mbe_helpers.book import get_chapter
    >>> values = get_chapter(DiagnosticsParams.chapter).defaults()
    >>> check("04_fa_diagnostics", values).model
    'resmlp'
    >>> check("04_fa_diagnostics", {**values, "methods": ["frozen"]})
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: bad parameter: methods must include a trained rule
    besides frozen, got ['frozen'].
    """

    model: Literal["resmlp", "vit"]
    methods: Annotated[list[METHOD], Field(min_length=1)]
    n_batches: Annotated[int, Field(ge=2)]
    eval_batch_size: Count
    grad_floor: Positive
    max_growth: Positive
    stability_ceiling: Positive
    frozen_margin: NonNegative

    @model_validator(mode="after")
    def _consistent(self):
        _distinct("methods", self.methods)
        if self.methods == ["frozen"]:
            raise ValueError("methods must include a trained rule besides frozen, got ['frozen']")
        return self


class AuditCalibrationParams(_Schema):
    """``05_audit_calibration``: size, power and placebos of the audit on known truths.

    Examples
    --------
    >>> from mbe_helpers.book import get_chapter
    >>> values = get_chapter(AuditCalibrationParams.chapter).defaults()
    >>> check("05_audit_calibration", values).focus_n in values["n_values"]
    True
    >>> check("05_audit_calibration", {**values, "scenarios": ["genuine_increment"]})
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: bad parameter: scenarios must include a null scenario
    (independent_null, ...), got ['genuine_increment'].
    """

    n_values: Annotated[list[Annotated[int, Field(ge=50)]], Field(min_length=1)]
    reps: Annotated[int, Field(ge=10)]
    scenarios: Optional[Annotated[list[SCENARIO], Field(min_length=1)]]
    alpha: Annotated[float, Field(gt=0, lt=0.5)]
    focus_n: int
    claim_reps: Annotated[int, Field(ge=10)]
    twin_reps: Annotated[int, Field(ge=5)]
    seeded_reps: Annotated[int, Field(ge=2)]
    placebos: Annotated[int, Field(ge=20, le=MAX_PLACEBOS)]
    seed: Seed
    workers: Count

    @model_validator(mode="after")
    def _consistent(self):
        from mbe_helpers.simulate import SCENARIOS

        _distinct("n_values", self.n_values)
        if self.focus_n not in self.n_values:
            raise ValueError(f"focus_n must be one of n_values {sorted(self.n_values)!r}, "
                             f"got {self.focus_n}")
        names = self.scenarios or list(SCENARIOS)
        unknown = [s for s in names if s not in SCENARIOS]
        if unknown:
            raise ValueError(f"scenarios must come from {', '.join(SCENARIOS)}, got {unknown[0]!r}")
        if not any(SCENARIOS[s].kind == "null" for s in names):
            nulls = ", ".join(s for s, v in SCENARIOS.items() if v.kind == "null")
            raise ValueError(f"scenarios must include a null scenario ({nulls}), got {names!r}")
        return self


MethodParams.chapter = "00_method"
AcidTestParams.chapter = "01_acid_test"
GridParams.chapter = "02_heterogeneous_grid"
CreditParams.chapter = "03_calibration_controls"
DiagnosticsParams.chapter = "04_fa_diagnostics"
AuditCalibrationParams.chapter = "05_audit_calibration"

#: The schema of each chapter, by file stem.
SCHEMAS: dict[str, type[_Schema]] = {
    "00_method": MethodParams,
    "01_acid_test": AcidTestParams,
    "02_heterogeneous_grid": GridParams,
    "03_calibration_controls": CreditParams,
    "04_fa_diagnostics": DiagnosticsParams,
    "05_audit_calibration": AuditCalibrationParams,
}


def _sentence(error: ValidationError) -> str:
    """The first problem of a pydantic error as ``bad parameter: <name> <rule>, got <value>.``"""
    first = error.errors(include_url=False)[0]
    name = ".".join(str(part) for part in first["loc"])
    message = first["msg"]
    if message.startswith("Value error, "):                 # a validator's own sentence
        rule = message.removeprefix("Value error, ")
        if not name:                                         # a model validator names its fields
            return f"bad parameter: {rule}."
        return f"bad parameter: {name} {rule}, got {first['input']!r}."
    rule = message.replace("Input should be", "must be").replace("Input ", "")
    rule = rule.replace("String should", "must").replace("List should", "must")
    rule = re.sub(r" after validation, not \d+", "", rule)
    rule = rule[0].lower() + rule[1:]
    if first["type"] == "extra_forbidden":
        return f"bad parameter: {name} is not a parameter of this chapter."
    where = name.split(".")[0]
    index = f" (item {name.split('.', 1)[1]})" if "." in name else ""
    return f"bad parameter: {where}{index} {rule}, got {first['input']!r}."


def check(chapter: str, values: Mapping[str, Any]):
    """Check a chapter's parameters against its schema; refuse the first bad one in one sentence.

    Parameters
    ----------
    chapter : str
        File stem of the chapter, e.g. ``"01_acid_test"`` (a key of :data:`SCHEMAS`).
    values : mapping
        Parameter values; names the schema does not declare are ignored, so a
        notebook can pass ``globals()``.

    Returns
    -------
    The validated model (attribute access, read-only).

    Raises
    ------
    MBEInputError
        ``"bad parameter: <name> <rule>, got <value>."``

    Examples
    --------
    >>> values = dict(n_values=[60, 300], reps=20, scenarios=None, alpha=0.05, focus_n=60,
    ...               claim_reps=20, twin_reps=5, seeded_reps=4, placebos=50, seed=0, workers=1,
    ...               results_dir=None)
    >>> check("05_audit_calibration", values).focus_n
    60
    >>> check("05_audit_calibration", {**values, "reps": True})
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: bad parameter: reps must be a valid integer, got True.
    """
    if chapter not in SCHEMAS:
        raise MBEInputError(f"no parameter schema for chapter {chapter!r}; known: {', '.join(SCHEMAS)}")
    schema = SCHEMAS[chapter]
    given = {name: values[name] for name in schema.model_fields if name in values}
    try:
        checked = schema.model_validate(given)
    except ValidationError as exc:
        raise MBEInputError(_sentence(exc)) from None
    checked._digest = digest(given)
    return checked


def digest(values: Mapping[str, Any]) -> str:
    """Eight hex digits naming a full set of parameter values (``results_dir`` left out).

    Examples
    --------
    >>> digest({"n": 2}) == digest({"n": 2, "results_dir": "x"}) != digest({"n": 3})
    True
    """
    kept = {k: v for k, v in values.items() if k != "results_dir"}
    text = json.dumps(kept, sort_keys=True, default=repr)
    return hashlib.sha1(text.encode()).hexdigest()[:8]
