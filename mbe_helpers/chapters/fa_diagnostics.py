"""Chapter 04, "FA diagnostics": can a feedback-alignment result be taken at face value?

* :func:`eval_batches` -- disjoint held-out batches for the protocol;
* :func:`diagnostic_runs` -- every method and seed trained and diagnosed
  (:class:`DiagnosticRuns`), with the frozen-blocks network of the same seed
  as the baseline of (d);
* :func:`alignment_runs`, :func:`survival` -- each method's own credit signal
  measured on its network, and which alignment numbers the protocol lets stand;
* :func:`shallow_baselines` -- networks with no deep blocks at all;
* :func:`dfa_pattern` -- the sentence on vanilla DFA against backprop (tested
  on constructed tables).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from mbe_helpers import protocol, runtime
from mbe_helpers.data import Dataset
from mbe_helpers.errors import MBEInputError
from mbe_helpers.models import ResidualMLP
from mbe_helpers.residual import (INIT, MEASURES, METHODS, OWN_SIGNAL, build_seeded, check_measurement,
                                  check_names, check_seeds, check_train_kw, deep_layer_table, eval_set,
                                  measure_condition, seed_intervals, train_residual)
from mbe_helpers.train import train
def eval_batches(data: Dataset, n_batches: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n_batches`` disjoint evaluation batches from the pooled validation and test splits.

    Examples
    --------
    >>> from mbe_helpers.data import load_dataset
    >>> data = load_dataset("digits", n_train=100)
    >>> batches = eval_batches(data, n_batches=4, batch_size=32)
    >>> len(batches), tuple(batches[0][0].shape)
    (4, (32, 64))
    >>> eval_batches(data, n_batches=20, batch_size=64)
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: 20 batches of 64 need 1280 evaluation samples, but
    validation + test hold 718
    """
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

    Examples
    --------
    >>> from mbe_helpers.protocol import Diagnosis
    >>> def diagnosis(method, acc, growth):
    ...     return Diagnosis(method, [1.0, growth, growth], [1e-3, 1e-3, 1e-3], [0.1, 0.2, 0.1],
    ...                      stability_layer=1, headline_acc=acc, frozen_baseline_acc=0.80)
    >>> runs = DiagnosticRuns({("bp", 0): diagnosis("bp", 0.95, 2.0),
    ...                        ("dfa", 0): diagnosis("dfa", 0.81, 80.0)},
    ...                       models={}, methods=["bp", "dfa"], seeds=[0])
    >>> runs.summary()[["method", "test_acc", "max_growth", "face_value"]]
      method  test_acc  max_growth  face_value
    0     bp      0.95         2.0           1
    1    dfa      0.81        80.0           0
    >>> runs.verdict_table()[["a_residual_growth", "d_frozen_baseline", "face_value"]]
           a_residual_growth d_frozen_baseline face_value
    method
    bp                   0/1               0/1        1/1
    dfa                  1/1               1/1        0/1
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

    Examples
    --------
    >>> from mbe_helpers.data import load_dataset
    >>> data = load_dataset("digits", n_train=100)
    >>> runs = diagnostic_runs(data, methods=("bp", "dfa"), seeds=(0,), n_batches=2,
    ...                        eval_batch_size=16, width=16, n_blocks=2, epochs=1)
    >>> sorted(runs.models), sorted(runs.diagnoses)      # the frozen baseline is always trained
    ([('bp', 0), ('dfa', 0), ('frozen', 0)], [('bp', 0), ('dfa', 0)])
    >>> runs.verdicts().diagnostic.unique().tolist()
    ['a_residual_growth', 'b_bp_gradient_floor', 'c_direction_stability', 'd_frozen_baseline']
    """
    methods = check_names(methods, (*METHODS, INIT), "method")
    seeds = check_seeds(seeds)
    check_train_kw(train_kw)
    batches = eval_batches(data, n_batches, eval_batch_size)
    order = ["frozen", *[m for m in methods if m != "frozen"]]
    models = {}
    for method, seed in runtime.progress([(m, s) for s in seeds for m in order],
                                          desc="FA diagnostics", enabled=progress):
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

    Examples
    --------
    >>> from mbe_helpers.data import load_dataset
    >>> data = load_dataset("digits", n_train=100)
    >>> runs = diagnostic_runs(data, methods=("bp", "dfa"), seeds=(0,), n_batches=2,
    ...                        eval_batch_size=16, width=16, n_blocks=1, epochs=1)
    >>> table = alignment_runs(runs, data, eval_size=16, n_directions=4)
    >>> table[["method", "condition", "seed", "layer"]]
      method condition  seed  layer
    0     bp  positive     0      0
    1     bp  positive     0      1
    2    dfa       dfa     0      0
    3    dfa       dfa     0      1
    """
    check_measurement(eval_size, eps, n_directions)
    x, y = eval_set(data, eval_size)
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

    Examples
    --------
    >>> from mbe_helpers.protocol import Diagnosis
    >>> def diagnosis(method, stability):
    ...     return Diagnosis(method, [1.0, 1.5], [1e-3, 1e-3], [0.1, stability], stability_layer=1,
    ...                      headline_acc=0.9, frozen_baseline_acc=0.8)
    >>> stability = {("bp", 0): 0.1, ("bp", 1): 0.1, ("dfa", 0): 0.9, ("dfa", 1): 0.2}
    >>> runs = DiagnosticRuns({key: diagnosis(key[0], s) for key, s in stability.items()},
    ...                       models={}, methods=["bp", "dfa"], seeds=[0, 1])
    >>> alignment = pd.DataFrame({"method": ["bp"] * 2 + ["dfa"] * 2, "condition": "own",
    ...                           "seed": [0, 1] * 2, "layer": 1, "rho": [0.99, 0.98, 0.4, 0.5],
    ...                           "bp_cosine": [1.0, 1.0, 0.3, 0.4], "nudge": -0.1})
    >>> table = survival(alignment, runs)
    >>> table[["method", "rho", "c_fires", "alignment_readable", "beats_frozen"]]
      method    rho  c_fires  alignment_readable  beats_frozen
    0     bp  0.985        0                True          True
    1    dfa  0.450        1               False          True
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

    Examples
    --------
    >>> from mbe_helpers.data import load_dataset
    >>> data = load_dataset("digits", n_train=200)
    >>> table = shallow_baselines(data, seeds=(0,), width=16, epochs=5, lr=1e-2)
    >>> table.model.tolist(), bool(table.test_acc.between(0.1, 1).all())
    (['linear', 'no_blocks'], True)
    """
    seeds = check_seeds(seeds)
    builders = {"linear": lambda: nn.Linear(data.in_dim, data.n_classes),
                "no_blocks": lambda: ResidualMLP(data.in_dim, width, data.n_classes, 0)}
    rows = []
    for name, build in builders.items():
        for seed in seeds:
            model = build_seeded(build, seed).to(data.x_train)
            record = train(model, data, optimizer="adam", lr=lr, epochs=epochs,
                           batch_size=batch_size, seed=seed)
            rows.append({"model": name, "seed": seed, "test_acc": record["test_acc"]})
    return pd.DataFrame(rows)


def dfa_pattern(per_method: pd.DataFrame, max_growth: float, grad_floor: float) -> str:
    """Does vanilla DFA show a larger stream and smaller BP gradients than backprop?

    ``per_method`` is indexed by method with ``max_growth`` and
    ``min_grad_norm`` columns; the thresholds are diagnostics (a) and (b).

    Examples
    --------
    >>> t = pd.DataFrame({"max_growth": [2.0, 9.0], "min_grad_norm": [1e-3, 1e-5]},
    ...                  index=["bp", "dfa"])
    >>> dfa_pattern(t, max_growth=50.0, grad_floor=1e-7)
    'Vanilla DFA shows the pattern the diagnostics were built for, but without crossing either threshold'
    >>> dfa_pattern(t.loc[["bp"]], 50.0, 1e-7)
    'Without both vanilla DFA and backprop in this run there is nothing to compare'
    """
    if not {"dfa", "bp"} <= set(per_method.index):
        return "Without both vanilla DFA and backprop in this run there is nothing to compare"
    dfa, bp = per_method.loc["dfa"], per_method.loc["bp"]
    if not (dfa.max_growth > bp.max_growth and dfa.min_grad_norm < bp.min_grad_norm):
        return ("Vanilla DFA does not show the pattern the diagnostics were built for (a larger "
                "stream and smaller gradients than backprop)")
    crossed = dfa.max_growth > max_growth or dfa.min_grad_norm < grad_floor
    return "Vanilla DFA shows the pattern the diagnostics were built for, " + (
        "strongly enough to cross a threshold" if crossed else "but without crossing either threshold")


def gradient_budget(runs: DiagnosticRuns, batch: tuple[torch.Tensor, torch.Tensor]) -> pd.DataFrame:
    r"""Why (b) reads a small BP gradient: a loss near zero, or credit lost on the way down?

    On the held-out ``batch`` that (b) reads, per (method, seed):

    * ``loss`` -- held-out cross-entropy;
    * ``output_grad`` -- median over samples of :math:`\lVert \partial L/\partial z_i\rVert`
      (the gradient at the logits, :math:`(\mathrm{softmax}(z_i) - \mathrm{onehot}(y_i))/B`):
      small when the network is confident and right, i.e. when training has converged;
    * ``min_grad_norm`` -- (b)'s smallest median :math:`\lVert \partial L/\partial h_l\rVert`;
    * ``transmission`` -- ``min_grad_norm / output_grad``: how much of the output's
      gradient reaches the weakest stream state. A converged network keeps
      it; a broken credit path (a stream that grew, so the terminal LayerNorm
      divides the gradient down) loses it.

    Returns one row per (method, seed) with those columns.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> from mbe_helpers.models import ResidualMLP
    >>> _ = torch.manual_seed(0)
    >>> model = ResidualMLP(8, 16, 3, 2).eval()
    >>> x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    >>> runs = SimpleNamespace(diagnoses={("bp", 0): SimpleNamespace(bp_grad_norms=[1e-3, 2e-3])},
    ...                        models={("bp", 0): (model, None, {})})
    >>> gradient_budget(runs, (x, y)).columns.tolist()
    ['method', 'seed', 'loss', 'output_grad', 'min_grad_norm', 'transmission']
    """
    x, y = batch
    rows = []
    for (method, seed), diagnosis in runs.diagnoses.items():
        model = runs.models[(method, seed)][0]
        with torch.no_grad():
            logits = model(x)
            loss = float(torch.nn.functional.cross_entropy(logits, y))
            error = (torch.softmax(logits, dim=-1) - torch.nn.functional.one_hot(y, logits.shape[-1]))
            output_grad = float((error / len(y)).reshape(len(y), -1).norm(dim=-1).median())
        smallest = float(min(diagnosis.bp_grad_norms))
        rows.append({"method": method, "seed": seed, "loss": loss, "output_grad": output_grad,
                     "min_grad_norm": smallest,
                     "transmission": smallest / output_grad if output_grad > 0 else np.nan})
    return pd.DataFrame(rows)


def floor_reading(budget: pd.DataFrame, method: str, reference: str = INIT,
                  lost: float = 0.1) -> str:
    """Say whether ``method``'s small BP gradients come from a small loss or from lost credit.

    Credit counts as lost when the method's median ``transmission`` is below
    ``lost`` times that of ``reference`` (the untrained network of the same shape).

    Examples
    --------
    >>> b = pd.DataFrame({"method": ["bp", "init"], "seed": [0, 0], "loss": [0.05, 2.3],
    ...                   "output_grad": [1e-4, 1e-2], "min_grad_norm": [2e-5, 2e-3],
    ...                   "transmission": [0.2, 0.2]})
    >>> floor_reading(b, "bp").endswith("i.e. how small the loss is")
    True
    """
    by = budget.groupby("method")[["loss", "output_grad", "transmission"]].median()
    if method not in by.index or reference not in by.index:
        return f"{method} or the untrained reference was not run"
    share = by.loc[method, "transmission"] / by.loc[reference, "transmission"]
    kept = (f"{method} keeps {share:.0%} of the untrained network's transmission (held-out loss "
            f"{by.loc[method, 'loss']:.3f}, output gradient {by.loc[method, 'output_grad']:.1e})")
    kept = kept.replace("%", " %")
    if share < lost:
        return f"{kept}: credit is lost on the way down the stream, not only the loss that is small"
    return (f"{kept}: the credit path itself is intact, so how small its stream gradients are "
            "follows the output gradient, i.e. how small the loss is")


def depth_gap(accuracy: pd.DataFrame) -> float:
    """Backprop's accuracy minus the frozen-blocks baseline's, in points, mean over seeds.

    ``accuracy`` is :meth:`DiagnosticRuns.accuracy`.

    Examples
    --------
    >>> acc = pd.DataFrame({"method": ["bp", "bp"], "test_acc": [0.80, 0.84], "frozen_acc": [0.70, 0.72]})
    >>> round(depth_gap(acc), 1)
    11.0
    """
    bp = accuracy[accuracy.method == "bp"]
    return float(100 * (bp.test_acc - bp.frozen_acc).mean()) if len(bp) else float("nan")


def shallow_sentence(no_blocks_acc: float, best_rule_acc: float, margin: float) -> str:
    """Does the task need deep blocks? Compares the no-blocks network with the best trained rule.

    Examples
    --------
    >>> shallow_sentence(0.97, 0.975, 0.02)[:40]
    'so the task is nearly solved without any'
    >>> shallow_sentence(0.60, 0.80, 0.02)
    'so deep blocks do add accuracy on this data set, and (d) can separate the rules'
    """
    if no_blocks_acc >= best_rule_acc - margin:
        return ("so the task is nearly solved without any deep block: on this data set accuracy "
                "cannot show that a learning rule trained the deep blocks, whichever rule it is")
    return "so deep blocks do add accuracy on this data set, and (d) can separate the rules"


def d_sentence(verdicts: pd.DataFrame, methods: Sequence[str]) -> str:
    """Whether the frozen-blocks baseline (d) catches every trained method in at least one seed.

    Examples
    --------
    >>> v = pd.DataFrame({"method": ["bp", "fa"], "diagnostic": ["d_frozen_baseline"] * 2,
    ...                   "state": ["fires", "ok"]})
    >>> d_sentence(v, ["bp", "fa", "frozen"])[:44]
    'not every trained method is caught by the fr'
    """
    trained = [m for m in methods if m != "frozen"]
    fired = verdicts[(verdicts.state == protocol.FIRES) & (verdicts.diagnostic == "d_frozen_baseline")]
    if trained and set(trained) <= set(fired.method):
        return "every trained method fails to beat the frozen-blocks baseline in at least one seed"
    return ("not every trained method is caught by the frozen-blocks baseline: some beat it by "
            "the required margin in every seed")


def reference_sentence(survival: pd.DataFrame, methods: Sequence[str]) -> str:
    """Are the BP-gradient references of the trained methods sound ((b) and (c) quiet)?

    Examples
    --------
    >>> s = pd.DataFrame({"method": ["bp", "dfa"], "alignment_readable": [True, False]})
    >>> reference_sentence(s, ["bp", "dfa"])
    'the BP gradients of dfa fail (b) or (c), as on the CIFAR-10 networks for which the protocol was written'
    """
    alive = survival.set_index("method")
    trained = [m for m in methods if m != "frozen" and m in alive.index]
    unsound = [m for m in trained if not alive.loc[m, "alignment_readable"]]
    if not unsound:
        return ("the BP gradients of every trained method stay above the floor and carry "
                "per-sample information, unlike the CIFAR-10 networks for which the protocol "
                "was written")
    return (f"the BP gradients of {', '.join(unsound)} fail (b) or (c), as on the CIFAR-10 "
            "networks for which the protocol was written")


#: Short column names of the diagnostics for tables on the page.
DIAGNOSTIC_LABELS = {"a_residual_growth": "(a) growth", "b_bp_gradient_floor": "(b) floor",
                     "c_direction_stability": "(c) stability", "d_frozen_baseline": "(d) frozen",
                     "face_value": "face value"}


def summary_view(summary: pd.DataFrame) -> pd.DataFrame:
    """:meth:`DiagnosticRuns.summary` for the page: short names, numbers rounded for reading.

    Examples
    --------
    >>> s = pd.DataFrame({"method": ["bp"], "test_acc": [0.97678], "max_growth": [1.379],
    ...                   "min_grad_norm": [9.07e-7], "stability": [0.1308], "stability_max": [0.2146],
    ...                   "margin": [0.0028], "face_value": [0]})
    >>> summary_view(s).iloc[0].tolist()[:7]
    ['bp', '0.977', '1.4×', '9.1e-07', '0.13', '0.21', '+0.3']
    """
    return pd.DataFrame({
        "method": summary.method, "accuracy": summary.test_acc.map("{:.3f}".format),
        "largest growth": summary.max_growth.map("{:.1f}×".format),
        "smallest |dL/dh|": summary.min_grad_norm.map("{:.1e}".format),
        "stability": summary.stability.map("{:.2f}".format),
        "stability (max)": summary.stability_max.map("{:.2f}".format),
        "margin (points)": summary.margin.map(lambda v: "–" if not np.isfinite(v) else f"{100 * v:+.1f}"),
        "face value": summary.face_value})


def verdict_view(table: pd.DataFrame) -> pd.DataFrame:
    """:meth:`DiagnosticRuns.verdict_table` with short diagnostic names.

    Examples
    --------
    >>> t = pd.DataFrame({"a_residual_growth": ["0/3"], "face_value": ["3/3"]}, index=["bp"])
    >>> verdict_view(t).columns.tolist()
    ['(a) growth', 'face value']
    """
    return table.rename(columns=DIAGNOSTIC_LABELS)


def survival_view(survival: pd.DataFrame) -> pd.DataFrame:
    """:func:`survival` for the page: rho with its interval in one cell, the fires as counts.

    Examples
    --------
    >>> s = pd.DataFrame({"method": ["bp"], "rho": [0.99], "rho_lo": [0.98], "rho_hi": [1.0],
    ...                   "bp_cosine": [1.0], "b_fires": [0], "c_fires": [0], "d_fires": [3],
    ...                   "n_seeds": [3], "alignment_readable": [True], "beats_frozen": [False]})
    >>> survival_view(s).iloc[0].tolist()[:6]
    ['bp', '0.990 [0.980, 1.000]', '1.000', '0/3', '0/3', '3/3']
    """
    n = survival.n_seeds.astype(int).astype(str)
    return pd.DataFrame({
        "method": survival.method,
        "ρ [CI]": [f"{r:.3f} [{lo:.3f}, {hi:.3f}]" for r, lo, hi in
                   zip(survival.rho, survival.rho_lo, survival.rho_hi)],
        "Γ": survival.bp_cosine.map("{:.3f}".format),
        "(b)": survival.b_fires.astype(str) + "/" + n, "(c)": survival.c_fires.astype(str) + "/" + n,
        "(d)": survival.d_fires.astype(str) + "/" + n,
        "readable": survival.alignment_readable, "beats frozen": survival.beats_frozen})
