r"""The probe battery: the metrics recorded at every probe epoch of a run.

A *metric* is ``metric(model, batch) -> dict`` (see :mod:`mbe_helpers.train`);
every metric here is a module-level function or a small picklable class, so a
run function built from them travels to process and Dask workers.

* :class:`FimProbe` -- the FIM family of :func:`mbe_helpers.fisher.fim_metrics`
  (``fim_norm`` = erank(D) / N of the dual Gram of per-sample gradients, its
  unit-normalised twin ``fim_norm_unit``, trace, spectral norm, stable rank,
  noise scale, ...) on a fixed subset of ``n_samples`` rows of the probe batch;
* :func:`weight_spectrum` -- SCI (mean erank(W) / min(n_out, n_in) over
  layers), the mean stable rank of the weights and alpha-hat
  (:func:`mbe_helpers.spectral.spectral_metrics`);
* :func:`weight_norm` -- :math:`\lVert\theta\rVert_2` over all trainable parameters;
* :class:`RandomMetric` -- a negative control: a uniform number in [0, 1)
  drawn from a hash of the model's parameters and a seed.  It is reproducible
  (same weights, same value) yet carries no information about them.

:func:`probe_battery` gathers them; :data:`grid_run` (a :class:`BatteryRun`)
trains one config and probes it, and :func:`run_with_ledger` runs a grid of
them, also saying how many runs a rerun reused. :func:`columns_at` names the
ledger columns of a metric at an epoch.

Examples
--------
>>> columns_at(["fim_norm", "sci"], 20)
['fim_norm@20', 'sci@20']
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from mbe_helpers.errors import MBEInputError

FIM_SAMPLES = 256
"""Default number of probe-batch rows the FIM family is computed on."""


FIM_METRICS = ("fim_norm", "fim_norm_unit", "fisher_trace", "fisher_spectral",
               "fisher_stable_rank", "grad_noise_scale")
"""FIM-family metrics audited by the chapters.  ``fim_erank`` and
``fisher_entropy`` are left out: with N fixed they are monotone functions of
``fim_norm`` (``fim_erank = N fim_norm = exp(fisher_entropy)``), so every rank
statistic of theirs equals that of ``fim_norm``."""


WEIGHT_METRICS = ("sci", "weight_stable_rank", "alpha_hat", "weight_norm")
"""Weight-spectrum metrics audited by the chapters."""


NEGATIVE_CONTROL = "random_metric"


BATTERY = (*FIM_METRICS, *WEIGHT_METRICS, NEGATIVE_CONTROL)
"""Every audited metric the battery records, in display order."""


class FimProbe:
    """The FIM family on a fixed subset of the probe batch.

    The subset is the same ``n_samples`` rows (drawn once from ``seed``,
    without replacement) at every epoch and for every run that sees the same
    batch, so values differ only through the model.  A batch with at most
    ``n_samples`` rows is used whole.

    Parameters
    ----------
    n_samples : int
        N, the number of per-sample gradients (at least 2).  The cost grows
        like N^2 (the Gram matrix) plus one batched backward pass.
    seed : int
        Seed of the subset.
    dtype : {"float32", "float64"}
        Precision of the computation.

    Returns (when called)
    ---------------------
    dict
        :data:`mbe_helpers.fisher.FIM_KEYS` and ``fim_reason``.

    Examples
    --------
    >>> import torch
    >>> from mbe_helpers.models import MLP
    >>> _ = torch.manual_seed(0)
    >>> probe = FimProbe(n_samples=8)
    >>> probe.rows(20)
    array([ 0,  1,  4,  5,  7,  8, 11, 19])
    >>> values = probe(MLP(4, [8], 3).eval(), (torch.randn(20, 4), torch.randint(0, 3, (20,))))
    >>> 0 < values["fim_norm"] <= 1, values["fim_reason"]
    (True, '')
    """

    def __init__(self, n_samples: int = FIM_SAMPLES, seed: int = 0, dtype: str = "float32"):
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2:
            raise MBEInputError(f"n_samples must be an integer of at least 2, got {n_samples!r}")
        if dtype not in ("float32", "float64"):
            raise MBEInputError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        self.n_samples, self.seed, self.dtype = n_samples, int(seed), dtype

    def __repr__(self) -> str:
        return f"FimProbe(n_samples={self.n_samples}, seed={self.seed}, dtype={self.dtype!r})"

    def rows(self, n: int) -> np.ndarray:
        """Sorted row indices of the subset of a batch of ``n`` rows."""
        if n <= self.n_samples:
            return np.arange(n)
        return np.sort(np.random.default_rng(self.seed).choice(n, self.n_samples, replace=False))

    def __call__(self, model, batch) -> dict[str, float | str]:
        import torch

        from mbe_helpers.fisher import fim_metrics

        x, y = batch
        rows = torch.as_tensor(self.rows(len(y)), device=y.device)
        return fim_metrics(model, x[rows], y[rows], dtype=getattr(torch, self.dtype))


def weight_spectrum(model, batch=None) -> dict[str, float]:
    """SCI, mean stable rank and alpha-hat of the model's Linear / Conv2d weights.

    ``sci`` is the mean over layers of erank(W) / min(n_out, n_in);
    ``weight_stable_rank`` the mean of :math:`\\lVert W\\rVert_F^2 / \\lVert
    W\\rVert_2^2`; ``alpha_hat`` the mean over layers with a power-law fit of
    :math:`\\alpha_l \\ln \\lambda_{\\max,l}` (NaN when no layer has a tail of
    at least 10 eigenvalues), ``alpha_mean`` the mean fitted exponent.  The
    batch is ignored: weights need no data.

    Examples
    --------
    >>> import torch
    >>> from mbe_helpers.models import MLP
    >>> _ = torch.manual_seed(0)
    >>> values = weight_spectrum(MLP(64, [32], 10))
    >>> sorted(values), round(values["sci"], 2)
    (['alpha_hat', 'alpha_mean', 'sci', 'weight_stable_rank'], 0.94)
    """
    from mbe_helpers.spectral import spectral_metrics

    values = spectral_metrics(model, log_base="e")
    return {"sci": values["sci"], "weight_stable_rank": values["stable_rank_mean"],
            "alpha_hat": values["alpha_hat_ln"], "alpha_mean": values["alpha_mean"]}


def weight_norm(model, batch=None) -> dict[str, float]:
    r"""``weight_norm`` :math:`= \lVert\theta\rVert_2 = (\sum_p \lVert p \rVert_F^2)^{1/2}`
    over all trainable parameters (weights and biases); the batch is ignored.

    Examples
    --------
    >>> import torch
    >>> layer = torch.nn.Linear(3, 1)
    >>> for p in layer.parameters():
    ...     _ = torch.nn.init.ones_(p)
    >>> weight_norm(layer)   # sqrt(3 weights + 1 bias)
    {'weight_norm': 2.0}
    """
    total = sum(float(p.detach().double().pow(2).sum()) for p in model.parameters()
                if p.requires_grad)
    return {"weight_norm": math.sqrt(total)}


class RandomMetric:
    """Negative control: a uniform number in [0, 1) that depends on nothing measurable.

    The value is read off the SHA-256 digest of ``seed`` and the bytes of
    every parameter, so it is reproducible (the same weights give the same
    value) but, like any good hash, independent of every property of the
    weights.  Two different ``seed`` values give independent controls.

    Examples
    --------
    >>> import torch
    >>> layer = torch.nn.Linear(3, 1)
    >>> control = RandomMetric(seed=0)
    >>> value = control(layer)["random_metric"]
    >>> 0 <= value < 1, control(layer)["random_metric"] == value
    (True, True)
    >>> RandomMetric(seed=1)(layer)["random_metric"] == value
    False
    """

    def __init__(self, seed: int = 0, name: str = NEGATIVE_CONTROL):
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise MBEInputError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed, self.name = seed, name

    def __repr__(self) -> str:
        return f"RandomMetric(seed={self.seed}, name={self.name!r})"

    def __call__(self, model, batch=None) -> dict[str, float]:
        digest = hashlib.sha256(str(self.seed).encode())
        for p in model.parameters():
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
        return {self.name: int.from_bytes(digest.digest()[:8], "big") / 2.0 ** 64}


random_metric = RandomMetric(0)
"""The default negative control (seed 0)."""


def probe_battery(fim_samples: int = FIM_SAMPLES, seed: int = 0) -> dict[str, Any]:
    """The metrics evaluated at every probe epoch, as ``name -> metric``.

    ``fim`` (:class:`FimProbe` on ``fim_samples`` rows), ``spectrum``
    (:func:`weight_spectrum`), ``norm`` (:func:`weight_norm`) and ``random``
    (:class:`RandomMetric` with ``seed``).  Together they report the columns
    of :data:`BATTERY` (plus the other FIM keys, ``alpha_mean`` and ``fim_reason``).

    Examples
    --------
    >>> battery = probe_battery(fim_samples=64, seed=0)
    >>> sorted(battery), battery["fim"]
    (['fim', 'norm', 'random', 'spectrum'], FimProbe(n_samples=64, seed=0, dtype='float32'))
    """
    return {"fim": FimProbe(fim_samples, seed=seed), "spectrum": weight_spectrum,
            "norm": weight_norm, "random": RandomMetric(seed)}


BATTERY_DEFAULTS: dict[str, Any] = {"fim_samples": FIM_SAMPLES, "probe_seed": 0}
"""Config keys of :class:`BatteryRun` on top of :data:`mbe_helpers.train.TRAIN_DEFAULTS`."""


class BatteryRun:
    """The grid run function of both chapters: train one config, probe it with the battery.

    ``BatteryRun()(config)`` reads ``fim_samples`` and ``probe_seed`` (see
    :data:`BATTERY_DEFAULTS`) off the config, passes the rest to
    :class:`mbe_helpers.train.TrainRun` with :func:`probe_battery` evaluated
    on the validation split at every probe epoch, and returns its flat
    record.  Because the battery settings are part of the config, they are
    part of its ledger key: a rerun with another ``fim_samples`` trains
    afresh instead of reusing runs probed differently.  Picklable, so it runs
    in process, on any ``concurrent.futures`` executor or on Dask.  Models
    are trained one at a time: the battery costs more than training these
    small models, so stacking them into an ensemble does not pay.

    Examples
    --------
    >>> config = {"n_train": 100, "width": 8, "depth": 1, "epochs": 2, "probe_epochs": [2],
    ...           "fim_samples": 16}
    >>> record = BatteryRun()(config)
    >>> record["status"], [c for c in BATTERY if f"{c}@2" not in record]
    ('ok', [])
    """

    def __init__(self, probe_split: str = "val"):
        if probe_split not in ("train", "val", "test"):
            raise MBEInputError(f"unknown probe_split {probe_split!r}; choose 'train', 'val' "
                                "or 'test'")
        self.probe_split = probe_split

    def __repr__(self) -> str:
        return f"BatteryRun(probe_split={self.probe_split!r})"

    def __call__(self, config: Mapping[str, Any]) -> dict[str, Any]:
        from mbe_helpers.train import TrainRun

        cfg = dict(config)
        settings = {k: cfg.pop(k, v) for k, v in BATTERY_DEFAULTS.items()}
        battery = probe_battery(int(settings["fim_samples"]), int(settings["probe_seed"]))
        return TrainRun(battery, probe_split=self.probe_split, ensemble=False)(cfg)


grid_run = BatteryRun()
"""``grid_run(config) -> record``: the run function of Chapters 1 and 2."""


def run_with_ledger(configs: pd.DataFrame, run_fn, ledger_path, *, executor: Any = None,
                    progress: bool = False) -> tuple[pd.DataFrame, int]:
    """:func:`mbe_helpers.grid.run_grid`, also counting the runs reused from the ledger.

    Returns ``(runs, n_reused)``: one row per config and how many of them
    had already finished (``ok`` or ``diverged``) in the ledger before the call.
    When the environment variable ``MBE_TRACK`` is ``mlflow://EXPERIMENT`` (as
    ``mbe-book run CHAPTER --track mlflow://EXPERIMENT`` sets it), the grid's
    runs are also logged there, at ``MLFLOW_TRACKING_URI``.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> ledger = Path(tempfile.mkdtemp()) / "ledger.jsonl"
    >>> def square(config):
    ...     return {"y": config["x"] ** 2}
    >>> configs = pd.DataFrame({"x": [1, 2, 3]})
    >>> runs, reused = run_with_ledger(configs, square, ledger)
    >>> runs.y.tolist(), reused
    ([1, 4, 9], 0)
    >>> run_with_ledger(configs, square, ledger)[1]
    3
    """
    import os
    from pathlib import Path

    from mbe_helpers.grid import FINISHED, read_ledger, run_grid

    ledger = Path(ledger_path)
    before = read_ledger(ledger) if ledger.exists() else pd.DataFrame(columns=["config_hash",
                                                                                "status"])
    finished = set(before.config_hash[before.status.isin(FINISHED)])
    runs = run_grid(configs, run_fn, ledger, executor=executor, progress=progress,
                    tracker=os.environ.get("MBE_TRACK") or None)
    return runs, int(runs.config_hash.isin(finished).sum())


def columns_at(metrics: Sequence[str], epoch: int | str) -> list[str]:
    """Ledger column names ``<metric>@<epoch>``.

    Examples
    --------
    >>> columns_at(["fim_norm", "sci"], 20)
    ['fim_norm@20', 'sci@20']
    >>> columns_at(["val_loss"], 0)
    ['val_loss@0']
    """
    return [f"{m}@{epoch}" for m in metrics]
