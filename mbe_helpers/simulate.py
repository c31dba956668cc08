"""Simulated ledgers of training runs whose truth is known, and the audit's calibration.

:data:`SCENARIOS` are data-generating processes with a known conditional
truth (nulls: the target is independent of the metric given the controls;
signals: it is not); :func:`run_calibration` measures the size and power of
every method of the audit on them. The method chapter (``book/00_method.ipynb``) shows what the MBE audit
catches on data where we know the answer. One row is one simulated trained
network; four candidate metrics are built so that each one should land in a
different outcome class of :func:`mbe_helpers.audit.classify` when audited
against ``final_acc`` with the controls ``early_loss`` and ``arch``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mbe_helpers.errors import MBEInputError

#: Architecture offsets on the latent accuracy score (between-group effect).
ARCH_OFFSETS = {"mlp": -1.5, "cnn": 0.0, "vit": 1.5}

#: The outcome class each simulated metric is built to receive.
EXPECTED_CLASSES = {
    "loss_proxy": "washout",
    "independent_signal": "survives",
    "random_metric": "weak-or-mixed",
    "simpson_metric": "sign-inversion",
}

CONTROLS = ("early_loss", "arch")
TARGET = "final_acc"


def simulate_method_cases(n: int = 400, metric_noise: float = 0.5, target_noise: float = 0.3,
                          baseline_noise: float = 0.3, seed: int = 0) -> pd.DataFrame:
    r"""Simulate ``n`` training runs carrying four candidate metrics with known truth.

    Each run has three independent standard-normal latents, a capability
    :math:`c` (what early loss sees), a trait :math:`s` and a quirk :math:`u`
    (both invisible to early loss), and an architecture ``arch`` drawn
    uniformly from :data:`ARCH_OFFSETS` with offset :math:`a`. Then

    .. math::

        \ell &= -c + \sigma_b \varepsilon_b, \qquad
        \mathrm{early\_loss} = e^{\ell / 2},\\
        \mathrm{final\_acc} &= \operatorname{expit}\big((c + s + u + a + \sigma_y \varepsilon_y)/2\big),

    (monotone maps leave every rank statistic unchanged) and the metrics,
    each with its own measurement noise :math:`\sigma_m \varepsilon`:

    ``loss_proxy`` = :math:`\ell + \sigma_m\varepsilon`
        A disguised loss proxy: it predicts accuracy only through
        capability, which early loss already measures. Raw rho is strongly
        negative, partial rho given early loss is about 0: **washout**.
    ``independent_signal`` = :math:`s + \sigma_m\varepsilon`
        Genuine information beyond the baseline: raw and partial rho are
        both clearly positive: **survives**.
    ``random_metric`` = :math:`\sigma_m\varepsilon`
        Pure noise: both correlations near 0: **weak-or-mixed**.
    ``simpson_metric`` = :math:`u - 2a + \sigma_m\varepsilon`
        A Simpson-type metric: across architectures it is high where
        accuracy is low (raw rho negative), but within every architecture it
        tracks the quirk and so accuracy positively. Controlling for ``arch``
        (a categorical control) flips the sign: **sign-inversion**.

    Parameters
    ----------
    n : int
        Number of runs (rows).
    metric_noise, target_noise, baseline_noise : float
        Standard deviations :math:`\sigma_m`, :math:`\sigma_y`, :math:`\sigma_b`.
    seed : int
        Seed of the random generator; the same seed gives the same table.

    Returns
    -------
    pandas.DataFrame
        Columns ``run, arch, early_loss, final_acc`` and the four metrics of
        :data:`EXPECTED_CLASSES`.

    Examples
    --------
    >>> runs = simulate_method_cases(n=60, seed=0)
    >>> runs.shape
    (60, 8)
    >>> list(runs.columns[4:])
    ['loss_proxy', 'independent_signal', 'random_metric', 'simpson_metric']
    """
    rng = np.random.default_rng(seed)
    arch = rng.choice(list(ARCH_OFFSETS), size=n)
    offset = np.array([ARCH_OFFSETS[a] for a in arch])
    capability, trait, quirk = rng.standard_normal((3, n))
    loss_latent = -capability + baseline_noise * rng.standard_normal(n)
    score = capability + trait + quirk + offset + target_noise * rng.standard_normal(n)
    noise = metric_noise * rng.standard_normal((4, n))
    return pd.DataFrame({
        "run": np.arange(n),
        "arch": arch,
        "early_loss": np.exp(loss_latent / 2),
        "final_acc": 1.0 / (1.0 + np.exp(-score / 2)),
        "loss_proxy": loss_latent + noise[0],
        "independent_signal": trait + noise[1],
        "random_metric": noise[2],
        "simpson_metric": quirk - 2.0 * offset + noise[3],
    })


def compare_with_truth(classes: Mapping[str, str],
                       expected: Mapping[str, str] = EXPECTED_CLASSES) -> pd.DataFrame:
    """Put observed classes next to the expected ones.

    Parameters
    ----------
    classes : mapping of metric to observed class
    expected : mapping of metric to expected class

    Returns
    -------
    pandas.DataFrame
        Index ``metric``; columns ``expected``, ``observed`` and ``as_expected``.

    Examples
    --------
    >>> compare_with_truth({"loss_proxy": "washout", "independent_signal": "survives",
    ...                     "random_metric": "survives"})
                              expected  observed  as_expected
    metric
    loss_proxy                 washout   washout         True
    independent_signal        survives  survives         True
    random_metric        weak-or-mixed  survives        False
    simpson_metric      sign-inversion   missing        False
    """
    frame = pd.DataFrame({"expected": pd.Series(dict(expected), dtype=object)})
    frame["observed"] = [classes.get(m, "missing") for m in frame.index]
    frame["as_expected"] = frame["expected"] == frame["observed"]
    frame.index.name = "metric"
    return frame


# --------------------------------------------------------------------------- #
# Scenarios with a known truth, and the Monte Carlo calibration of the audit   #
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class Scenario:
    """A data-generating process whose conditional truth is known.

    ``kind`` is ``"null"`` when the target is conditionally independent of
    the metric given ``controls`` (any rejection is a false one) and
    ``"signal"`` when it is not. ``cluster`` names the column of repeated
    configurations, when there is one.

    Examples
    --------
    >>> import numpy as np
    >>> s = SCENARIOS["u_proxy"]
    >>> s.kind, s.controls, s.cluster
    ('null', ('b',), None)
    >>> s.generate(np.random.default_rng(0), 5).shape
    (5, 3)
    """

    name: str
    kind: str
    controls: tuple[str, ...]
    generate: Callable[[np.random.Generator, int], pd.DataFrame]
    truth: str
    cluster: str | None = None


def _independent_null(rng, n):
    b = rng.normal(size=(n, 2))
    return pd.DataFrame({"b1": b[:, 0], "b2": b[:, 1], "metric": rng.normal(size=n),
                         "target": b[:, 0] + 0.5 * b[:, 1] + rng.normal(0, 0.6, n)})


def _linear_proxy(rng, n):
    b = rng.normal(size=n)
    return pd.DataFrame({"b": b, "metric": b + rng.normal(0, 0.3, n),
                         "target": b + rng.normal(0, 0.5, n)})


def _u_proxy(rng, n):
    b = rng.uniform(-2.5, 2.5, n)
    return pd.DataFrame({"b": b, "metric": b**2 + rng.normal(0, 0.2, n),
                         "target": b**2 + rng.normal(0, 0.4, n)})


def _interaction_proxy(rng, n):
    lr = rng.uniform(-1, 1, n)
    optimizer = rng.choice(["adam", "sgd"], n)
    best = np.where(optimizer == "adam", -0.4, 0.4)
    fit = -3 * (lr - best) ** 2
    return pd.DataFrame({"lr": lr, "optimizer": optimizer, "metric": fit + rng.normal(0, 0.4, n),
                         "target": fit + rng.normal(0, 0.5, n)})


def _product_proxy(rng, n):
    b = rng.uniform(-1, 1, (n, 2))
    f = 2 * b[:, 0] * b[:, 1]
    return pd.DataFrame({"b1": b[:, 0], "b2": b[:, 1], "metric": f + rng.normal(0, 0.5, n),
                         "target": f + rng.normal(0, 0.5, n)})


def _step_proxy(rng, n):
    b = rng.uniform(0, 1, n)
    f = (b > 0.6) + 0.5 * b
    return pd.DataFrame({"b": b, "metric": f + rng.normal(0, 0.3, n),
                         "target": f + rng.normal(0, 0.3, n)})


def _heteroskedastic_null(rng, n):
    b = rng.normal(size=n)
    spread = 0.2 + np.abs(b)
    return pd.DataFrame({"b": b, "metric": b + spread * rng.normal(size=n),
                         "target": b + spread * rng.normal(size=n)})


def _clustered_null(rng, n):
    configs = max(n // 5, 2)
    lr, wd = rng.uniform(0, 1, (2, configs))
    shared_m, shared_y = rng.normal(0, 0.5, (2, configs))
    c = np.arange(n) % configs
    return pd.DataFrame({"config": c, "lr": lr[c], "wd": wd[c],
                         "metric": np.sin(3 * lr[c]) + shared_m[c] + rng.normal(0, 0.3, n),
                         "target": np.sin(3 * lr[c]) + wd[c] + shared_y[c] + rng.normal(0, 0.3, n)})


def _mediator_null(rng, n):
    metric = rng.normal(size=n)
    mediator = metric + rng.normal(0, 0.5, n)
    return pd.DataFrame({"mediator": mediator, "metric": metric,
                         "target": mediator + rng.normal(0, 0.5, n)})


def _pure_noise_8(rng, n):
    frame = pd.DataFrame(rng.normal(size=(n, 6)), columns=[f"c{i}" for i in range(6)])
    frame["optimizer"] = rng.choice(["adam", "sgd"], n)
    frame["arch"] = rng.choice(["mlp", "cnn", "vit"], n)
    frame["metric"] = rng.normal(size=n)
    frame["target"] = (frame.c0 - 0.5 * frame.c1**2 + (frame.optimizer == "adam")
                       + rng.normal(0, 0.7, n))
    return frame


def _additive_proxy_5(rng, n):
    b = rng.uniform(-1, 1, (n, 5))
    f = (np.sin(2 * b[:, 0]) + b[:, 1] ** 2 + np.exp(b[:, 2]) + np.abs(b[:, 3])
         - 0.5 * b[:, 4])
    frame = pd.DataFrame(b, columns=[f"b{i}" for i in range(1, 6)])
    frame["metric"], frame["target"] = f + rng.normal(0, 0.4, (2, n))
    return frame


def _grid_proxy_5(rng, n):
    lr, wd = rng.uniform(-4, -1, n), rng.uniform(-6, -2, n)
    width, depth = rng.uniform(5, 8, n), rng.uniform(1, 4, n)
    optimizer = rng.choice(["adam", "sgd"], n)
    best = np.where(optimizer == "adam", -3.2, -1.8)
    skill = -((lr - best) ** 2) - 0.3 * np.abs(wd + 4) + 0.25 * (width - 6.5) * (depth - 2.5)
    return pd.DataFrame({"lr": lr, "wd": wd, "width": width, "depth": depth,
                         "optimizer": optimizer,
                         "metric": np.tanh(skill / 2) + rng.normal(0, 0.25, n),
                         "target": np.exp(skill / 3) + rng.normal(0, 0.2, n)})


def _genuine_increment(rng, n):
    b, trait = rng.normal(size=(2, n))
    return pd.DataFrame({"b": b, "metric": b + trait + rng.normal(0, 0.5, n),
                         "target": b + 0.6 * trait + rng.normal(0, 0.6, n)})


def _nonlinear_increment(rng, n):
    b = rng.uniform(-2.5, 2.5, n)
    trait = rng.normal(size=n)
    return pd.DataFrame({"b": b, "metric": b**2 + trait + rng.normal(0, 0.5, n),
                         "target": b**2 + trait + rng.normal(0, 1.0, n)})


def _simpson_increment(rng, n):
    arch = rng.choice(list(ARCH_OFFSETS), n)
    offset = np.array([ARCH_OFFSETS[a] for a in arch])
    quirk = rng.normal(size=n)
    return pd.DataFrame({"arch": arch, "metric": quirk - 2 * offset + rng.normal(0, 0.5, n),
                         "target": quirk + offset + rng.normal(0, 0.5, n)})


#: The controls of :func:`seeded_grid`: five numeric, then two categorical.
SEEDED_GRID_CONTROLS = ("lr", "wd", "width", "depth", "noise", "optimizer", "arch")


def seeded_grid(kind: str, configs: int = 136, seeds: int = 5,
                seed: int | Sequence[int] = 0) -> pd.DataFrame:
    r"""A training grid of ``configs`` random configurations, each run with ``seeds`` seeds.

    Seven controls (:data:`SEEDED_GRID_CONTROLS`) are drawn per
    configuration; a latent skill is U-shaped in :math:`\log_{10}` lr with an
    optimum that moves with the optimizer, has a kink in weight decay, a
    width x depth product and an arch x noise term. The metric is
    :math:`\tanh(s/2)` and the target :math:`e^{s/3}`, each with a shock per
    configuration (shared by its seeds) and noise per run: with ``kind =
    "proxy"`` a conditional null (the metric is a nonlinear reading of the
    design, nothing more), with ``"increment"`` both also follow a per-run
    trait (a genuine increment). ``config`` names each configuration.

    Examples
    --------
    >>> df = seeded_grid("proxy", configs=4, seeds=3)
    >>> df.shape, df.config.nunique(), int(df.groupby("config").lr.nunique().max())
    ((12, 11), 4, 1)
    """
    if kind not in ("proxy", "increment"):
        raise MBEInputError(f"kind must be 'proxy' or 'increment', got {kind!r}")
    rng = np.random.default_rng(seed)
    grid = pd.DataFrame({
        "config": [f"c{i:03d}" for i in range(configs)],
        "lr": 10 ** rng.uniform(-4, -1, configs), "wd": 10 ** rng.uniform(-6, -2, configs),
        "width": rng.choice([32, 64, 128, 256], configs), "depth": rng.integers(1, 5, configs),
        "noise": rng.uniform(0, 0.4, configs),
        "optimizer": rng.choice(["adam", "sgd"], configs),
        "arch": rng.choice(["mlp", "cnn", "res"], configs),
    })
    df = grid.loc[grid.index.repeat(seeds)].reset_index(drop=True)
    df.insert(1, "run_seed", np.tile(np.arange(seeds), configs))
    n = len(df)
    best = np.where(df.optimizer == "adam", -3.2, -1.8)       # the optimum lr moves with it
    u = (np.log10(df.lr) - best) ** 2
    wd_term = np.abs(np.log10(df.wd) + 4.0)
    size = (np.log2(df.width) - 6.5) * (df.depth - 2.5)
    arch = df.arch.map({"mlp": 0.0, "cnn": 0.4, "res": 0.8}).to_numpy()
    skill = (-u - 0.3 * wd_term + 0.25 * size + arch * (1 - 2 * df.noise) - 2 * df.noise)
    skill = skill.to_numpy(dtype=float)
    config_codes = pd.factorize(df.config)[0]

    def config_noise(scale: float) -> np.ndarray:            # one shock per configuration
        return rng.normal(0, scale, configs)[config_codes]

    trait = rng.normal(0, 1, n) if kind == "increment" else np.zeros(n)
    df["metric"] = np.tanh(skill / 2) + 0.5 * trait + config_noise(0.15) + rng.normal(0, 0.25, n)
    df["target"] = np.exp(skill / 3) + 0.3 * trait + config_noise(0.10) + rng.normal(0, 0.20, n)
    return df


#: The calibration scenarios, by name.
SCENARIOS = {s.name: s for s in (
    Scenario("independent_null", "null", ("b1", "b2"), _independent_null,
             "the metric is noise; the target follows the controls"),
    Scenario("linear_proxy", "null", ("b",), _linear_proxy,
             "metric and target both follow the control linearly"),
    Scenario("u_proxy", "null", ("b",), _u_proxy,
             "metric and target both follow b squared (U-shaped in the control)"),
    Scenario("interaction_proxy", "null", ("lr", "optimizer"), _interaction_proxy,
             "both follow an inverted U in lr whose peak moves with the optimizer"),
    Scenario("product_proxy", "null", ("b1", "b2"), _product_proxy,
             "both follow the product of two controls"),
    Scenario("step_proxy", "null", ("b",), _step_proxy,
             "both follow a step in the control"),
    Scenario("heteroskedastic_null", "null", ("b",), _heteroskedastic_null,
             "linear proxy whose noise grows with |b|"),
    Scenario("clustered_null", "null", ("lr", "wd"), _clustered_null,
             "configurations repeated over 5 seeds, each with its own random effect in metric "
             "and target", cluster="config"),
    Scenario("mediator_null", "null", ("mediator",), _mediator_null,
             "the metric acts only through a post-treatment control, which is conditioned on"),
    Scenario("pure_noise_8", "null", ("c0", "c1", "c2", "c3", "c4", "c5", "optimizer", "arch"),
             _pure_noise_8, "a noise metric audited with eight controls, as in chapter 2"),
    Scenario("additive_proxy_5", "null", ("b1", "b2", "b3", "b4", "b5"), _additive_proxy_5,
             "held out when the learner was chosen: both follow one smooth additive function "
             "of five controls"),
    Scenario("grid_proxy_5", "null", ("lr", "wd", "width", "depth", "optimizer"), _grid_proxy_5,
             "held out when the learner was chosen: a training grid's shape, an optimum "
             "learning rate that moves with the optimizer, a kink in the weight decay and a "
             "width x depth product"),
    Scenario("genuine_increment", "signal", ("b",), _genuine_increment,
             "the metric measures a trait that moves the target beyond the control"),
    Scenario("nonlinear_increment", "signal", ("b",), _nonlinear_increment,
             "a trait beyond a U-shaped dependence on the control"),
    Scenario("simpson_increment", "signal", ("arch",), _simpson_increment,
             "negative across architectures, positive within each"),
)}

METHODS = ("raw", "rank-t", "rank-perm", "crossfit")


def method_pvalues(frame: pd.DataFrame, scenario: Scenario, rng: np.random.Generator,
                   methods: Sequence[str] = METHODS, permutations: int = 199,
                   draws: int = 199, folds: int = 5) -> dict[str, float]:
    """p-value of each method on one simulated ledger (the audit's own code paths).

    Examples
    --------
    >>> s = SCENARIOS["u_proxy"]
    >>> p = method_pvalues(s.generate(np.random.default_rng(0), 300), s, np.random.default_rng(1))
    >>> p["rank-t"] < 1e-10, p["crossfit"] > 0.01
    (True, True)
    """
    import sys

    mbe = sys.modules["mbe_helpers.audit"]       # the module (the package exports the function)

    controls = list(scenario.controls)
    design = mbe._build_design(frame, "metric", "target", controls)
    out = {}
    if "raw" in methods or "rank-t" in methods:
        raw, partial = (float(v[0]) for v in mbe._rank_correlations(design, np.ones((1, design.n))))
        out["raw"] = mbe._t_pvalue(raw, design.n - 2)          # Spearman's t test (scipy's)
        out["rank-t"] = mbe._t_pvalue(partial, design.n - 2 - mbe._control_rank(design))
        out = {method: out[method] for method in ("raw", "rank-t") if method in methods}
    if "rank-perm" in methods:
        out["rank-perm"] = mbe._permutation_p(design, permutations, None, rng)
    if "crossfit" in methods:
        out["crossfit"] = crossfit_test(frame, scenario, rng, folds, draws=draws).p
    return out


def crossfit_test(frame: pd.DataFrame, scenario: Scenario, rng: np.random.Generator,
                  folds: int = 5, fits: bool = True, draws: int = 199):
    """The audit's cross-fitted test of one simulated ledger (a :class:`~mbe_helpers.crossfit.GCMTest`).

    ``p`` comes from ``draws`` wild refits; ``fits=False`` skips the calibration (only ``r`` is
    then meaningful), for very large ledgers.

    Examples
    --------
    >>> s = SCENARIOS["genuine_increment"]
    >>> test = crossfit_test(s.generate(np.random.default_rng(0), 300), s, np.random.default_rng(1))
    >>> bool(test.lo < test.r < test.hi), test.p  # the smallest p that 199 draws can give
    (True, 0.005)
    """
    import sys

    from mbe_helpers import crossfit

    mbe = sys.modules["mbe_helpers.audit"]       # the module (the package exports the function)
    clusters = frame[scenario.cluster].to_numpy() if scenario.cluster else None
    numeric, categorical = mbe._control_arrays(frame, list(scenario.controls))
    basis = crossfit.control_basis(numeric, categorical, n=len(frame))
    fold = crossfit.fold_ids(len(frame), folds, int(rng.integers(2**31)), clusters)
    if not fits:
        res = crossfit.crossfit_residuals(basis, frame[["target", "metric"]].to_numpy(float), fold)
        return crossfit.gcm_test(res[:, 1], res[:, 0], clusters)
    return crossfit.adjusted_test(basis, frame.target.to_numpy(float), frame.metric.to_numpy(float),
                                  fold, clusters, draws=draws, rng=rng)


@functools.lru_cache(maxsize=None)
def adjusted_truth(name: str, n: int = 20_000) -> float:
    """The population value of the cross-fitted ``adj_r`` of a scenario: 0 on a null, else its
    estimate on one ledger of ``n`` rows.

    Examples
    --------
    >>> adjusted_truth("u_proxy"), round(adjusted_truth("genuine_increment", 4000), 1)
    (0.0, 0.6)
    """
    scenario = SCENARIOS[name]
    if scenario.kind == "null":
        return 0.0
    rng = np.random.default_rng([12345, sum(map(ord, name))])
    return float(crossfit_test(truth_ledger(name, n, rng), scenario, rng, fits=False).r)


def truth_ledger(name: str, n: int = 20_000, rng: np.random.Generator | None = None) -> pd.DataFrame:
    """One large ledger of a scenario, on which an estimate stands in for its population value.

    Drawn from ``default_rng([12345, ...])`` unless ``rng`` is given, so every
    check of an interval against the truth uses the same ledger.

    Examples
    --------
    >>> truth_ledger("u_proxy", 1000).shape
    (1000, 3)
    """
    rng = np.random.default_rng([12345, sum(map(ord, name))]) if rng is None else rng
    return SCENARIOS[name].generate(rng, n)


#: glibc's ``mallopt`` parameters (``malloc.h``) and the values the Monte Carlo workers use.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_WORKER_HEAP = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 64 << 20}


def worker_setup() -> None:
    """Initializer of a Monte Carlo worker process: one BLAS thread, and a heap that keeps freed
    blocks of up to 32 MB.

    The matrices are small, so BLAS threads would only contend with the
    other worker. A cross-fit at n = 1000 allocates bases and Gram matrices
    of a few megabytes many times over; above glibc's default mmap threshold
    each one is mapped, faulted in page by page and unmapped again. Raising
    the threshold (``mallopt``) keeps them in the worker's heap. Measured on
    2 cores: 6-8 % less time per repetition in ``pure_noise_8``,
    ``additive_proxy_5`` and ``product_proxy`` at n = 1000 (4 % in
    ``grid_proxy_5`` at 300), 55-75 % fewer page faults, and 5 % less time
    for the whole Monte Carlo (two runs side by side), with the same numbers.
    Without glibc (macOS, musl) only the BLAS threads are set. It changes the
    process it runs in, so it is only a pool's initializer, never called in
    the user's own process.

    Examples
    --------
    >>> from concurrent.futures import ProcessPoolExecutor
    >>> with ProcessPoolExecutor(1, initializer=worker_setup) as pool:
    ...     pool.submit(sum, [1, 2]).result()
    3
    """
    import ctypes

    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    try:
        libc = ctypes.CDLL("libc.so.6")
        for option, value in _WORKER_HEAP.items():
            libc.mallopt(option, value)
    except (OSError, AttributeError):               # not glibc
        pass


def _calibration_cell(args) -> list[dict]:
    from threadpoolctl import threadpool_limits

    name, n, first, last, seed, methods = args
    scenario = SCENARIOS[name]
    start = time.perf_counter()
    with threadpool_limits(1):                    # small matrices: threads only contend
        rows = _simulate_cell(name, scenario, n, range(first, last), seed, methods)
    seconds = time.perf_counter() - start
    return [{**row, "seconds": seconds} for row in rows]


def _simulate_cell(name, scenario, n, reps, seed, methods) -> list[dict]:
    rejections = {m: [] for m in methods}
    covered = []
    truth = adjusted_truth(name) if "crossfit" in methods else np.nan
    for rep in reps:
        rng = np.random.default_rng([seed, n, rep, sum(map(ord, name))])
        frame = scenario.generate(rng, n)
        for method, p in method_pvalues(frame, scenario, rng,
                                        [m for m in methods if m != "crossfit"]).items():
            rejections[method].append(p)
        if "crossfit" in methods:
            test = crossfit_test(frame, scenario, rng)
            rejections["crossfit"].append(test.p)
            covered.append(test.lo <= truth <= test.hi)
    return [{"scenario": name, "kind": scenario.kind, "n": n, "method": m, "p": np.array(ps),
             "covered": np.array(covered if m == "crossfit" else [], dtype=bool)}
            for m, ps in rejections.items()]


def _listed(value, what: str, kind) -> list:
    """``value`` as a non-empty list of ``kind`` (one bare item is a list of one), or one sentence.

    Examples
    --------
    >>> _listed(300, "n", int), _listed("raw", "methods", str)
    ([300], ['raw'])
    """
    items = [value] if isinstance(value, (str, int, np.integer)) else value
    try:
        items = list(items)
    except TypeError:
        raise MBEInputError(f"{what} must be a list, got {value!r}") from None
    if not items:
        raise MBEInputError(f"{what} is empty; give at least one")
    wrong = next((v for v in items if not isinstance(v, kind)), None)
    if wrong is not None:
        raise MBEInputError(f"{what} must hold {'names (strings)' if kind is str else 'integers'}, "
                            f"got {wrong!r}")
    return items


def run_calibration(scenarios: Sequence[str] | None = None, n: Sequence[int] = (60, 150, 300, 1000),
                    reps: int = 200, methods: Sequence[str] = METHODS, alpha: float = 0.05,
                    seed: int = 0, workers: int = 2, progress: bool = True) -> pd.DataFrame:
    r"""Rejection rates of every method on every scenario and sample size (size and power).

    Each (scenario, n) cell simulates ``reps`` ledgers from
    ``default_rng([seed, n, rep, ...])`` and tests the metric with each
    method; the rate of :math:`p < \alpha` is the size on a null and the
    power on a signal, with a Wilson 95 % interval.

    Returns
    -------
    DataFrame
        ``scenario, kind, n, method, reps, rejections, rate, lo, hi``;
        ``coverage, coverage_lo, coverage_hi``, the share of crossfit 95 %
        intervals that contain :func:`adjusted_truth` with its Wilson interval
        (NaN for the other methods); and ``seconds``, the time of the whole
        (scenario, n) cell (all methods).

    Examples
    --------
    >>> table = run_calibration(["independent_null"], n=[60], reps=20, progress=False, workers=1)
    >>> table[["method", "reps"]].values.tolist()[0]
    ['raw', 20]
    """
    from concurrent.futures import ProcessPoolExecutor

    from mbe_helpers.audit import wilson_interval
    from tqdm.auto import tqdm

    names = list(SCENARIOS) if scenarios is None else _listed(scenarios, "scenarios", str)
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        raise MBEInputError(f"unknown scenario {unknown[0]!r}; scenarios: {', '.join(SCENARIOS)}")
    methods = _listed(methods, "methods", str)
    bad_methods = [m for m in methods if m not in METHODS]
    if bad_methods:
        raise MBEInputError(f"unknown method {bad_methods[0]!r}; methods: {', '.join(METHODS)}")
    for name, value, least in (("reps", reps, 1), ("workers", workers, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise MBEInputError(f"{name} must be an integer of at least {least}, got {value!r}")
    n = _listed(n, "n", (int, np.integer))
    if not all(not isinstance(v, bool) and v >= 20 for v in n):
        raise MBEInputError(f"every sample size must be an integer of at least 20, got {list(n)}")
    if (isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating))
            or not 0 < alpha < 0.5):
        raise MBEInputError(f"alpha must be a level between 0 and 0.5, got {alpha!r}")
    chunk = max(1, -(-reps // 4))                       # a cell in 4 chunks: workers share big cells
    cells = [(name, int(size), first, min(first + chunk, reps), seed, tuple(methods))
             for name in names for size in n for first in range(0, reps, chunk)]
    cells.sort(key=lambda c: -c[1])                      # big cells first balance the workers
    rows = []
    bar = tqdm(total=len(cells), desc="calibration", disable=not progress)
    if workers > 1:
        with ProcessPoolExecutor(workers, initializer=worker_setup) as pool:
            for result in pool.map(_calibration_cell, cells):
                rows += result
                bar.update()
    else:
        for cell in cells:
            rows += _calibration_cell(cell)
            bar.update()
    bar.close()
    table = (pd.DataFrame(rows).groupby(["scenario", "kind", "n", "method"], sort=False)
             .agg(p=("p", lambda parts: np.concatenate(list(parts))),
                  covered=("covered", lambda parts: np.concatenate(list(parts))),
                  seconds=("seconds", "sum"))
             .reset_index())
    table["reps"] = table.p.map(len)
    table["rejections"] = table.p.map(lambda p: int(np.sum(p < alpha)))
    table["rate"] = table.rejections / table.reps
    bounds = [wilson_interval(k, r) for k, r in zip(table.rejections, table.reps)]
    table["lo"], table["hi"] = [b[0] for b in bounds], [b[1] for b in bounds]
    hits = [(int(c.sum()), len(c)) for c in table.covered]
    table["coverage"] = [k / m if m else np.nan for k, m in hits]
    cover_bounds = [wilson_interval(k, m) if m else (np.nan, np.nan) for k, m in hits]
    table["coverage_lo"] = [b[0] for b in cover_bounds]
    table["coverage_hi"] = [b[1] for b in cover_bounds]
    order = {name: i for i, name in enumerate(SCENARIOS)}
    table = table.sort_values(["scenario", "n", "method"], key=lambda c: c.map(order) if c.name == "scenario"
                              else c.map({m: i for i, m in enumerate(METHODS)}) if c.name == "method" else c)
    table = table.drop(columns=["p", "covered"]).reset_index(drop=True)
    return table[[c for c in table.columns if c != "seconds"] + ["seconds"]]
