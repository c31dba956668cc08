r"""Chapter 05, "Can the audit be trusted?": the audit's own size and power.

The notebook ``book/05_audit_calibration.ipynb`` calls, in order,

- :func:`validate` (the parameters cell, checked in one sentence),
- :func:`scenario_table` (the scenarios of :data:`mbe_helpers.simulate.SCENARIOS`),
- :func:`run_size_power` (:func:`mbe_helpers.simulate.run_calibration`),
  :func:`plot_rates` and :func:`rates_at` (the figure and the compact table),
  :func:`size_power_values` (the sentences on where each method fails),
- :func:`claim_rates` and :func:`claim_values` (how often the outcome classes
  claim information on ledgers where there is none),
- :func:`placebo_check` and :func:`placebo_values` (the audit's placebo
  self-calibration on one null ledger),
- :func:`verdict` (the closing sentences).

Every value the prose shows comes from one of the ``*_values`` functions or
:func:`verdict`, which return ``{glue key: value}``. A method *holds* a null
when the Wilson 95 % interval of its rejection rate contains alpha; it
*over-rejects* when the interval lies above alpha (the rule by which the
audit's placebo check flags an adjustment) and is *conservative* when it lies
below (:func:`null_status`). A calibrated test misses alpha by chance in about
one cell in twenty.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mbe_helpers.audit import CLAIMS, audit, wilson_interval
from mbe_helpers.chapters.params import AuditCalibrationParams, check
from mbe_helpers.crossfit import control_basis, within_configuration_test
from mbe_helpers.simulate import (METHODS, SCENARIOS, SEEDED_GRID_CONTROLS, run_calibration,
                                  seeded_grid, truth_ledger, worker_setup)

STEM = "05_audit_calibration"
#: How the prose names each method of :func:`mbe_helpers.simulate.method_pvalues`.
METHOD_LABELS = {
    "raw": "the unadjusted Spearman test",
    "rank-t": "the rank-linear adjustment with its t test",
    "rank-perm": "the rank-linear adjustment with Freedman–Lane permutations",
    "crossfit": "the cross-fitted adjustment with its GCM test",
}
#: Null scenarios whose ledgers are audited for the false-claim rate (those that were run).
CLAIM_SCENARIOS = ("linear_proxy", "u_proxy", "interaction_proxy", "clustered_null",
                   "additive_proxy_5", "grid_proxy_5")
#: The null and the signal of the twin-withholding study (else the first of each kind run).
TWIN_SCENARIOS = ("grid_proxy_5", "genuine_increment")
#: The null scenario of the placebo self-calibration (else the first null run).
PLACEBO_SCENARIO = "u_proxy"
#: Power a method must reach on every signal for :func:`power_sentence`'s smallest n.
POWER_GOAL = 0.8


# ---------------------------------------------------------------- parameters
@dataclass(frozen=True)
class Params:
    """The checked parameters of the chapter (``scenarios`` resolved, ``n_values`` sorted).

    Examples
    --------
    >>> p = validate(n_values=[300, 60], reps=20, scenarios=["u_proxy", "genuine_increment"],
    ...              alpha=0.05, focus_n=60, claim_reps=20, twin_reps=5, seeded_reps=4,
    ...              placebos=50, seed=0, workers=1, results_dir="out")
    >>> p.n_values, p.claim_scenarios, p.placebo_scenario, p.twin_scenarios
    ((60, 300), ('u_proxy',), 'u_proxy', ('u_proxy', 'genuine_increment'))
    """

    n_values: tuple[int, ...]
    reps: int
    scenarios: tuple[str, ...]
    alpha: float
    focus_n: int
    claim_reps: int
    twin_reps: int
    seeded_reps: int
    placebos: int
    seed: int
    workers: int
    checked: AuditCalibrationParams      # the schema's validated values (``artifact_dir()``)

    @property
    def claim_scenarios(self) -> tuple[str, ...]:
        """The scenarios of :data:`CLAIM_SCENARIOS` that were run, else the first four nulls run."""
        chosen = tuple(s for s in CLAIM_SCENARIOS if s in self.scenarios)
        return chosen or tuple(s for s in self.scenarios if SCENARIOS[s].kind == "null")[:4]

    @property
    def twin_scenarios(self) -> tuple[str, ...]:
        """The null and the signal of :data:`TWIN_SCENARIOS` that were run, else the first run."""
        picked = []
        for kind, preferred in zip(("null", "signal"), TWIN_SCENARIOS):
            run = [s for s in self.scenarios if SCENARIOS[s].kind == kind]
            if run:
                picked.append(preferred if preferred in run else run[0])
        return tuple(picked)

    @property
    def placebo_scenario(self) -> str:
        """:data:`PLACEBO_SCENARIO` when it was run, else the first null run."""
        if PLACEBO_SCENARIO in self.scenarios:
            return PLACEBO_SCENARIO
        return next(s for s in self.scenarios if SCENARIOS[s].kind == "null")


def validate(**values) -> Params:
    """Check every parameter of the chapter (:class:`~mbe_helpers.chapters.params.AuditCalibrationParams`).

    Raises
    ------
    MBEInputError
        ``"bad parameter: <name> <rule>, got <value>."``

    Examples
    --------
    >>> p = validate(n_values=[300, 60], reps=20, scenarios=None, alpha=0.05, focus_n=300,
    ...              claim_reps=20, twin_reps=5, seeded_reps=4, placebos=50, seed=0, workers=1,
    ...              results_dir="out")
    >>> p.n_values, len(p.scenarios) == len(SCENARIOS)
    ((60, 300), True)
    """
    checked = check(STEM, values)
    return Params(tuple(sorted(checked.n_values)), checked.reps,
                  tuple(checked.scenarios or SCENARIOS), checked.alpha, checked.focus_n,
                  checked.claim_reps, checked.twin_reps, checked.seeded_reps, checked.placebos,
                  checked.seed, checked.workers, checked)


# ------------------------------------------------------------------ formats
def pct(rate: float) -> str:
    """A rate as a percentage: ``0.05 -> '5 %'``, ``0.035 -> '3.5 %'``, NaN -> ``'–'``.

    Examples
    --------
    >>> pct(1.0), pct(0.035), pct(0.0123)
    ('100 %', '3.5 %', '1.2 %')
    """
    if rate is None or not np.isfinite(rate):
        return "–"
    value = 100 * float(rate)
    return f"{value:.0f} %" if abs(value - round(value)) < 1e-9 or value >= 10 else f"{value:.1f} %"


def and_join(items: Sequence[str]) -> str:
    """``['a', 'b', 'c'] -> 'a, b and c'``.

    Examples
    --------
    >>> and_join(["a"]), and_join(["a", "b"]), and_join(["a", "b", "c"])
    ('a', 'a and b', 'a, b and c')
    """
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def null_status(lo: float, hi: float, alpha: float) -> str:
    """``"over"`` when a rate's interval lies above alpha, ``"under"`` below it, else ``"held"``.

    Examples
    --------
    >>> null_status(0.06, 0.12, 0.05), null_status(0.0, 0.04, 0.05), null_status(0.03, 0.09, 0.05)
    ('over', 'under', 'held')
    """
    return "over" if lo > alpha else "under" if hi < alpha else "held"


def _statuses(cells: pd.DataFrame, alpha: float) -> pd.Series:
    return pd.Series([null_status(lo, hi, alpha) for lo, hi in zip(cells.lo, cells.hi)],
                     index=cells.index, dtype=object)


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


# ---------------------------------------------------------------- scenarios
def scenario_table(scenarios: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per scenario: ``scenario, kind, controls, cluster, truth``.

    Examples
    --------
    >>> scenario_table(["u_proxy", "clustered_null", "genuine_increment"])[["scenario", "kind",
    ...                                                                     "controls", "cluster"]]
                scenario    kind controls cluster
    0            u_proxy    null        b
    1     clustered_null    null   lr, wd  config
    2  genuine_increment  signal        b
    """
    names = list(scenarios or SCENARIOS)
    return pd.DataFrame([{"scenario": s, "kind": SCENARIOS[s].kind,
                          "controls": ", ".join(SCENARIOS[s].controls),
                          "cluster": SCENARIOS[s].cluster or "", "truth": SCENARIOS[s].truth}
                         for s in names])


def scenario_values(scenarios: Sequence[str]) -> dict:
    """Counts of the scenarios run: ``n_scenarios, n_nulls, n_signals``.

    Examples
    --------
    >>> scenario_values(["u_proxy", "linear_proxy", "genuine_increment"])
    {'n_scenarios': 3, 'n_nulls': 2, 'n_signals': 1}
    """
    kinds = [SCENARIOS[s].kind for s in scenarios]
    return {"n_scenarios": len(kinds), "n_nulls": kinds.count("null"),
            "n_signals": kinds.count("signal")}


# ---------------------------------------------------------- size and power
def run_size_power(scenarios: Sequence[str], n_values: Sequence[int], reps: int, alpha: float,
                   seed: int, workers: int) -> pd.DataFrame:
    """Rejection rates of every method per scenario and n.

    A thin call of :func:`mbe_helpers.simulate.run_calibration` without a
    progress bar; the table also has ``seconds``, the time of each cell.

    Examples
    --------
    >>> table = run_size_power(["independent_null"], [60], reps=10, alpha=0.05, seed=0, workers=1)
    >>> table[["scenario", "n", "method", "reps"]]
               scenario   n     method  reps
    0  independent_null  60        raw    10
    1  independent_null  60     rank-t    10
    2  independent_null  60  rank-perm    10
    3  independent_null  60   crossfit    10
    """
    return run_calibration(list(scenarios), n=list(n_values), reps=reps, alpha=alpha, seed=seed,
                           workers=workers, progress=False)


def _cells(table: pd.DataFrame, n: int, method: str, kind: str) -> pd.DataFrame:
    return table[(table.n == n) & (table.method == method) & (table.kind == kind)]


def _with_interval(rates, lows, highs) -> list[str]:
    """Each rate as text with its interval: ``'5 % (2.7–9.0 %)'``."""
    return [f"{pct(r)} ({100 * lo:.1f}–{100 * hi:.1f} %)" for r, lo, hi in zip(rates, lows, highs)]


def rates_at(table: pd.DataFrame, n: int) -> pd.DataFrame:
    """The cells at one ``n`` as text ``rate (lo–hi)``: rows (kind, scenario), columns methods.

    Examples
    --------
    >>> t = pd.DataFrame({"scenario": ["a"], "kind": ["null"], "n": [300], "method": ["raw"],
    ...                   "reps": [200], "rejections": [10], "rate": [0.05], "lo": [0.027],
    ...                   "hi": [0.09]})
    >>> rates_at(t, 300).loc[("null", "a"), "raw"]
    '5 % (2.7–9.0 %)'
    """
    cells = table[table.n == n].copy()
    cells["text"] = _with_interval(cells.rate, cells.lo, cells.hi)
    wide = cells.pivot_table(index=["kind", "scenario"], columns="method", values="text",
                             aggfunc="first", sort=False)
    wide = wide[[m for m in METHODS if m in wide.columns]]
    wide.columns.name = f"n = {n}"
    return wide


def size_sentence(table: pd.DataFrame, method: str, n: int, alpha: float) -> str:
    """Whether ``method`` holds every null at ``n`` (:func:`null_status`), and which it does not.

    Examples
    --------
    >>> t = pd.DataFrame({"scenario": ["a", "b"], "kind": "null", "n": 300, "method": "rank-t",
    ...                   "reps": 100, "rate": [0.05, 1.0], "lo": [0.02, 0.96], "hi": [0.11, 1.0]})
    >>> size_sentence(t, "rank-t", 300, 0.05)
    'The rank-linear adjustment with its t test holds 1 of 2 nulls at n = 300; it over-rejects b (100 %)'
    """
    nulls = _cells(table, n, method, "null")
    label = _capital(METHOD_LABELS.get(method, method))
    if nulls.empty:
        return f"{label} was not run on a null at n = {n}"
    status = _statuses(nulls, alpha)
    over = nulls[status == "over"].sort_values("rate", ascending=False)
    under = nulls[status == "under"].sort_values("rate")
    if over.empty and under.empty:
        return (f"{label} holds every null at n = {n}: each Wilson interval contains "
                f"{pct(alpha)}")
    parts = []
    if len(over):
        parts.append("over-rejects " + _listing(over))
    if len(under):
        parts.append("is conservative on " + _listing(under))
    held = int((status == "held").sum())
    return f"{label} holds {held} of {len(nulls)} nulls at n = {n}; it " + " and ".join(parts)


def _listing(rows: pd.DataFrame) -> str:
    return and_join([f"{r.scenario} ({pct(r.rate)})" for r in rows.itertuples()])


def worst_sentence(table: pd.DataFrame, method: str, n: int) -> str:
    """The null ``method`` rejects most often at ``n``, with its Wilson interval.

    Examples
    --------
    >>> t = pd.DataFrame({"scenario": ["a", "u_proxy"], "kind": "null", "n": 300, "method": "rank-t",
    ...                   "reps": 200, "rate": [0.05, 1.0], "lo": [0.02, 0.98], "hi": [0.09, 1.0]})
    >>> worst_sentence(t, "rank-t", 300)
    'Its worst null is u_proxy, rejected in 100 % of 200 runs at n = 300 (Wilson 95 % interval 98 % to 100 %)'
    """
    nulls = _cells(table, n, method, "null")
    if nulls.empty:
        return f"It was not run on a null at n = {n}"
    worst = nulls.loc[nulls.rate.idxmax()]
    return (f"Its worst null is {worst.scenario}, rejected in {pct(worst.rate)} of "
            f"{int(worst.reps)} runs at n = {n} (Wilson 95 % interval {pct(worst.lo)} to "
            f"{pct(worst.hi)})")


def trend_sentence(table: pd.DataFrame, method: str) -> str:
    """The highest null rejection rate of ``method`` at each n that was run, and on which null.

    Examples
    --------
    >>> t = pd.DataFrame({"scenario": ["a", "b", "a", "b"], "kind": "null", "n": [60, 60, 300, 300],
    ...                   "method": "crossfit", "rate": [0.04, 0.14, 0.06, 0.05]})
    >>> trend_sentence(t, "crossfit")
    'Its highest null rejection rate is 14 % at n = 60 (b) and 6 % at n = 300 (a)'
    """
    nulls = table[(table.method == method) & (table.kind == "null")]
    if nulls.empty:
        return "It was not run on a null"
    worst = nulls.loc[nulls.groupby("n").rate.idxmax()].sort_values("n")
    return ("Its highest null rejection rate is "
            + and_join([f"{pct(r.rate)} at n = {r.n} ({r.scenario})" for r in worst.itertuples()]))


def failures_sentence(table: pd.DataFrame, method: str, alpha: float) -> str:
    """Every null that ``method`` over-rejects at some n (:func:`null_status`), with where.

    Examples
    --------
    >>> t = pd.DataFrame({"scenario": ["a", "a", "b", "b"], "kind": "null", "n": [60, 300, 60, 300],
    ...                   "method": "crossfit", "rate": [0.5, 0.9, 0.05, 0.22],
    ...                   "lo": [0.4, 0.8, 0.02, 0.15], "hi": [0.6, 0.95, 0.1, 0.31]})
    >>> failures_sentence(t, "crossfit", 0.05)
    'Over all sizes run it over-rejects a (at every n) and b (22 % at n = 300)'
    """
    nulls = table[(table.method == method) & (table.kind == "null")]
    over = nulls[_statuses(nulls, alpha) == "over"] if len(nulls) else nulls
    if over.empty:
        return "Over all sizes run it over-rejects no null"
    sizes = set(nulls.n)
    parts = []
    for name, cells in over.groupby("scenario", sort=False):
        where = ("at every n" if set(cells.n) == sizes else
                 and_join([f"{pct(r.rate)} at n = {r.n}" for r in cells.sort_values("n").itertuples()]))
        parts.append(f"{name} ({where})")
    return "Over all sizes run it over-rejects " + and_join(parts)


def power_sentence(table: pd.DataFrame, method: str, n: int, goal: float = POWER_GOAL) -> str:
    """Power of ``method`` on each signal at ``n`` and the smallest n with ``goal`` on all of them.

    Examples
    --------
    >>> t = pd.DataFrame({"scenario": ["s", "s"], "kind": "signal", "n": [60, 300],
    ...                   "method": "crossfit", "reps": 100, "rate": [0.5, 0.9]})
    >>> power_sentence(t, "crossfit", 300)
    'It detects s in 90 % of runs at n = 300; the smallest n run at which it has at least 80 % power on every signal is 300'
    """
    signals = _cells(table, n, method, "signal")
    if signals.empty:
        return f"No signal scenario was run at n = {n}"
    detects = and_join([f"{r.scenario} in {pct(r.rate)}" for r in signals.itertuples()])
    lowest = table[(table.method == method) & (table.kind == "signal")].groupby("n").rate.min()
    enough = lowest[lowest >= goal].index
    reach = (f"the smallest n run at which it has at least {pct(goal)} power on every signal is "
             f"{int(min(enough))}" if len(enough)
             else f"it has at least {pct(goal)} power on every signal at no n that was run")
    return f"It detects {detects} of runs at n = {n}; {reach}"


def method_key(method: str) -> str:
    """Glue-key form of a method name: ``'rank-t' -> 'rank_t'``.

    Examples
    --------
    >>> [method_key(m) for m in METHODS]
    ['raw', 'rank_t', 'rank_perm', 'crossfit']
    """
    return method.replace("-", "_")


def size_power_values(table: pd.DataFrame, n: int, alpha: float) -> dict:
    """Every value and sentence of the size-and-power sections.

    Keys: ``reps, alpha_pct, focus_n, n_values_text, timing``, and per
    method ``m`` (glue form, see :func:`method_key`) ``size_m, worst_m, trend_m,
    fails_m, power_m`` and ``held_m`` (how many nulls it holds at ``n``).

    Examples
    --------
    >>> t = pd.DataFrame({"scenario": ["a", "b", "s"], "kind": ["null", "null", "signal"], "n": 300,
    ...                   "method": "crossfit", "reps": 200, "rate": [0.05, 0.06, 0.9],
    ...                   "lo": [0.03, 0.03, 0.85], "hi": [0.09, 0.1, 0.94]})
    >>> values = size_power_values(t, 300, 0.05)
    >>> values["held_crossfit"], values["n_values_text"]
    (2, '300')
    >>> print(values["size_crossfit"])
    The cross-fitted adjustment with its GCM test holds every null at n = 300: each Wilson
    interval contains 5 %
    """
    values = {"reps": int(table.reps.max()), "alpha_pct": pct(alpha), "focus_n": int(n),
              "n_values_text": and_join([str(v) for v in sorted(table.n.unique())]),
              "timing": timing_sentence(table)}
    for method in [m for m in METHODS if m in set(table.method)]:
        key = method_key(method)
        nulls = _cells(table, n, method, "null")
        values[f"held_{key}"] = int((_statuses(nulls, alpha) == "held").sum())
        values[f"size_{key}"] = size_sentence(table, method, n, alpha)
        values[f"worst_{key}"] = worst_sentence(table, method, n)
        values[f"trend_{key}"] = trend_sentence(table, method)
        values[f"fails_{key}"] = failures_sentence(table, method, alpha)
        values[f"power_{key}"] = power_sentence(table, method, n)
    return values


def timing_sentence(table: pd.DataFrame) -> str:
    """How long the simulation took: worker seconds, and per ledger for all its methods.

    Examples
    --------
    >>> t = pd.DataFrame({"scenario": ["a", "a", "b"], "n": [60, 60, 300], "method": ["raw", "crossfit", "raw"],
    ...                   "reps": 200, "seconds": [4.0, 4.0, 6.0]})
    >>> timing_sentence(t)
    'its 400 simulated ledgers took 10 s of worker time, 25.0 ms per ledger for all 2 methods'
    """
    if "seconds" not in table:
        return "its table has no timing (no seconds column)"
    cells = table.drop_duplicates(["scenario", "n"])
    ledgers, seconds = int(cells.reps.sum()), float(cells.seconds.sum())
    return (f"its {ledgers:,} simulated ledgers took {seconds:,.0f} s of worker time, "
            f"{1e3 * seconds / ledgers:.1f} ms per ledger for all {table.method.nunique()} methods")


def plot_rates(table: pd.DataFrame, alpha: float, ncols: int = 4):
    """One panel per scenario: rejection rate against n per method, Wilson 95 % bars, a line at alpha.

    The rate axis has a square-root scale, so that rates near alpha and near
    one are both readable; every text is at least 8 pt.

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import matplotlib.pyplot as plt
    >>> t = pd.DataFrame({"scenario": ["a", "a", "s", "s"],
    ...                   "kind": ["null", "null", "signal", "signal"], "n": [60, 300] * 2,
    ...                   "method": "crossfit", "rate": [0.06, 0.05, 0.4, 0.9],
    ...                   "lo": [0.03, 0.03, 0.3, 0.85], "hi": [0.1, 0.09, 0.5, 0.94]})
    >>> fig = plot_rates(t, alpha=0.05, ncols=2)
    >>> type(fig).__name__, [ax.get_title() for ax in fig.axes]
    ('Figure', ['a\\n(null)', 's\\n(signal)'])
    >>> plt.close(fig)
    """
    import matplotlib.pyplot as plt

    from mbe_helpers.plots import page_size

    scenarios = list(dict.fromkeys(table.scenario))
    methods = [m for m in METHODS if m in set(table.method)]
    nrows = math.ceil(len(scenarios) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=page_size(2.6 * ncols, 2.2 * nrows + 0.6),
                             sharex=True, sharey=True, squeeze=False)
    colours = dict(zip(METHODS, ("#7f7f7f", "#d62728", "#ff7f0e", "#1f77b4")))
    sizes = sorted(table.n.unique())
    for ax, name in zip(axes.flat, scenarios):
        cells = table[table.scenario == name]
        for i, method in enumerate(methods):
            rows = cells[cells.method == method].sort_values("n")
            shift = 1 + 0.05 * (i - (len(methods) - 1) / 2)
            ax.errorbar(rows.n * shift, rows.rate, yerr=[rows.rate - rows.lo, rows.hi - rows.rate],
                        marker="o", ms=3.5, lw=1.2, capsize=2, color=colours.get(method), label=method)
        ax.axhline(alpha, color="black", ls="--", lw=0.8)
        ax.set_title(f"{name}\n({cells.kind.iloc[0]})", fontsize=9)      # two lines: long names
        ax.tick_params(labelsize=8)
    for ax in axes.flat[len(scenarios):]:
        ax.set_visible(False)
    axes[0, 0].set_xscale("log")
    axes[0, 0].set_yscale("function", functions=(np.sqrt, np.square))
    axes[0, 0].set_xticks(sizes, [str(s) for s in sizes])
    axes[0, 0].minorticks_off()
    axes[0, 0].set_ylim(0, 1.02)
    axes[0, 0].set_yticks([0, alpha, 0.2, 0.5, 1], ["0", pct(alpha), "20 %", "50 %", "100 %"])
    for ax in axes[:, 0]:
        ax.set_ylabel("rejection rate", fontsize=8)
    for ax in axes[-1, :]:
        ax.set_xlabel("n (rows per ledger)", fontsize=8)
    for j, ax in enumerate(axes.flat):
        if not ax.get_visible() or j + ncols >= len(scenarios):
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel("n (rows per ledger)", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    handles.append(axes[0, 0].get_lines()[-1])
    labels.append("alpha")
    spare = list(axes.flat[len(scenarios):])
    fig.tight_layout(rect=(0, 0 if spare else 0.05, 1, 1))
    if spare:                                   # the legend fills the empty panels
        first, last = spare[0].get_position(), spare[-1].get_position()
        fig.legend(handles, labels, loc="center", ncol=min(len(labels), 2 * len(spare)),
                   fontsize=9, frameon=False,
                   bbox_to_anchor=((first.x0 + last.x1) / 2, (first.y0 + first.y1) / 2))
    else:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9,
                   frameon=False, bbox_to_anchor=(0.5, 0.0))
    return fig


# ------------------------------------------------------- false-claim rate
def _cluster_for(scenario, adjust: str) -> str | None:
    """The scenario's cluster column where ``adjust`` uses it (the rank-linear audit without a
    bootstrap does not, and audit() refuses a cluster it would ignore)."""
    return scenario.cluster if adjust != "rank" else None


def _claim_task(args: tuple) -> dict:
    name, n, rep, seed, alpha = args
    scenario = SCENARIOS[name]
    rng = np.random.default_rng([seed, n, rep, 11, sum(map(ord, name))])
    frame = scenario.generate(rng, n)
    row = {"scenario": name, "rep": rep}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for adjust in ("auto", "rank"):
            result = audit(frame, ["metric"], "target", list(scenario.controls), adjust=adjust,
                           cluster=_cluster_for(scenario, adjust), seed=seed + rep, alpha=alpha)
            row[adjust] = str(result.table.classification.iloc[0])
    return row


def _map_tasks(task, tasks: list, workers: int) -> list:
    """``[task(t) for t in tasks]`` on ``workers`` processes (set up by
    :func:`mbe_helpers.simulate.worker_setup`: one BLAS thread each)."""
    from threadpoolctl import threadpool_limits

    if workers > 1:
        with ProcessPoolExecutor(workers, initializer=worker_setup) as pool:
            return list(pool.map(task, tasks, chunksize=max(1, len(tasks) // (4 * workers))))
    with threadpool_limits(1):                 # small matrices: BLAS threads only contend
        return [task(t) for t in tasks]


def claim_rates(scenarios: Sequence[str], n: int, reps: int, alpha: float, seed: int,
                workers: int) -> pd.DataFrame:
    """How often the audit's class claims information on null ledgers, under ``auto`` and ``rank``.

    Each of ``reps`` ledgers per scenario (``n`` rows) is audited twice, with
    ``adjust="auto"`` and ``adjust="rank"``; a *claim* is a class in
    :data:`mbe_helpers.audit.CLAIMS`. On a null every claim is false.

    Returns
    -------
    DataFrame
        ``scenario, adjust, n, reps, claims, rate, lo, hi, top_class`` (Wilson 95 %
        interval; ``top_class`` the most frequent class).

    Examples
    --------
    >>> claims = claim_rates(["independent_null"], n=60, reps=4, alpha=0.05, seed=0, workers=1)
    >>> claims[["scenario", "adjust", "n", "reps", "claims"]]
               scenario adjust   n  reps  claims
    0  independent_null   auto  60     4       0
    1  independent_null   rank  60     4       0
    """
    tasks = [(name, int(n), rep, seed, alpha) for name in scenarios for rep in range(reps)]
    return summarise_claims(pd.DataFrame(_map_tasks(_claim_task, tasks, workers)), n)


def summarise_claims(classes: pd.DataFrame, n: int) -> pd.DataFrame:
    """Claim rates from one row per audited ledger (``scenario``, ``auto``, ``rank`` classes).

    Examples
    --------
    >>> c = pd.DataFrame({"scenario": "u", "auto": ["inconclusive", "survives"],
    ...                   "rank": ["survives", "survives"]})
    >>> summarise_claims(c, 300)[["adjust", "claims", "rate"]].values.tolist()
    [['auto', 1, 0.5], ['rank', 2, 1.0]]
    """
    records = []
    for name, group in classes.groupby("scenario", sort=False):
        for adjust in ("auto", "rank"):
            claims = int(group[adjust].isin(CLAIMS).sum())
            lo, hi = wilson_interval(claims, len(group))
            records.append({"scenario": name, "adjust": adjust, "n": int(n), "reps": len(group),
                            "claims": claims, "rate": claims / len(group), "lo": lo, "hi": hi,
                            "top_class": group[adjust].value_counts().index[0]})
    return pd.DataFrame(records)


def claim_values(claims: pd.DataFrame) -> dict:
    """Values and sentences of the false-claim section.

    Keys: ``claim_n, claim_reps, claim_ledgers, claim_scenarios, claim_rate_auto,
    claim_rate_rank, claim_worst_auto, claim_worst_rank, claim_sentence``.

    Examples
    --------
    >>> c = pd.DataFrame({"scenario": ["u", "u"], "adjust": ["auto", "rank"], "n": 300,
    ...                   "reps": 100, "claims": [2, 100], "rate": [0.02, 1.0]})
    >>> claim_values(c)["claim_worst_rank"]
    'u (100 %)'
    """
    values = {"claim_n": int(claims.n.iloc[0]), "claim_reps": int(claims.reps.max()),
              "claim_scenarios": and_join(list(dict.fromkeys(claims.scenario)))}
    rates = {}
    for adjust in ("auto", "rank"):
        part = claims[claims.adjust == adjust]
        rates[adjust] = part.claims.sum() / part.reps.sum()
        worst = part.loc[part.rate.idxmax()]
        values[f"claim_rate_{adjust}"] = pct(rates[adjust])
        values[f"claim_worst_{adjust}"] = f"{worst.scenario} ({pct(worst.rate)})"
    values["claim_ledgers"] = int(claims[claims.adjust == "auto"].reps.sum())
    if rates["auto"] < rates["rank"]:
        values["claim_sentence"] = (f"requiring evidence from the cross-fitted test cuts the false "
                                    f"claims from {pct(rates['rank'])} to {pct(rates['auto'])}")
    elif rates["auto"] > rates["rank"]:
        values["claim_sentence"] = (f"against expectation, adjust=\"auto\" claims more often than "
                                    f"adjust=\"rank\" ({pct(rates['auto'])} against "
                                    f"{pct(rates['rank'])})")
    else:
        values["claim_sentence"] = (f"both adjustments claim information equally often "
                                    f"({pct(rates['auto'])})")
    return values


# ------------------------------------------------------------- placebos
def placebo_check(scenario: str, n: int, placebos: int, alpha: float, seed: int) -> pd.DataFrame:
    """The placebo self-calibration of one simulated null ledger, under ``auto`` and ``rank``.

    Returns
    -------
    DataFrame
        ``requested, classification`` (the metric's class) followed by the
        columns of :attr:`mbe_helpers.audit.AuditResult.calibration`, one row
        per (requested adjustment, placebo kind).

    Examples
    --------
    >>> table = placebo_check("u_proxy", 100, placebos=20, alpha=0.05, seed=0)
    >>> table[["requested", "kind", "adjust", "K"]]
      requested   kind    adjust   K
    0      auto  noise  crossfit  20
    1      auto  proxy  crossfit  20
    2      auto   twin  crossfit  20
    3      rank  noise      rank  20
    4      rank  proxy      rank  20
    """
    spec = SCENARIOS[scenario]
    frame = spec.generate(np.random.default_rng([seed, n, 13, sum(map(ord, scenario))]), n)
    tables = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for adjust in ("auto", "rank"):
            result = audit(frame, ["metric"], "target", list(spec.controls), adjust=adjust,
                           cluster=_cluster_for(spec, adjust), placebos=placebos, alpha=alpha,
                           seed=seed)
            table = result.calibration.copy()
            table.insert(0, "classification", result.classification("metric"))
            table.insert(0, "requested", adjust)
            tables.append(table)
    out = pd.concat(tables, ignore_index=True)
    out.attrs["scenario"], out.attrs["n"] = scenario, int(n)
    return out


def placebo_values(placebo: pd.DataFrame, scenario: str, n: int) -> dict:
    """Values and sentences of the placebo section.

    Keys: ``placebo_scenario, placebo_n, placebo_k``, and per requested
    adjustment ``a`` in (auto, rank): ``placebo_class_a, placebo_used_a,
    placebo_noise_a, placebo_proxy_a, placebo_flag_a``; ``placebo_sentence``.

    Examples
    --------
    >>> table = pd.DataFrame({"requested": ["auto", "auto", "rank", "rank"],
    ...                       "classification": ["inconclusive"] * 2 + ["survives"] * 2,
    ...                       "kind": ["noise", "proxy"] * 2,
    ...                       "adjust": ["crossfit"] * 2 + ["rank"] * 2, "K": 200,
    ...                       "rate": [0.05, 0.06, 0.05, 0.6], "lo": [0.03, 0.03, 0.03, 0.53],
    ...                       "alpha": 0.05})
    >>> values = placebo_values(table, "u_proxy", 300)
    >>> values["placebo_proxy_rank"], values["placebo_flag_rank"], values["placebo_flag_auto"]
    ('60 %', 'flags the adjustment as untrustworthy', 'raises no flag')
    >>> print(values["placebo_sentence"])
    the placebos catch the rank-linear adjustment on this ledger and clear the one
    adjust="auto" used
    """
    values = {"placebo_scenario": scenario, "placebo_n": int(n), "placebo_k": int(placebo.K.max())}
    flagged = {}
    for adjust in ("auto", "rank"):
        part = placebo[placebo.requested == adjust].set_index("kind")
        checks = part.drop(index="twin", errors="ignore")      # twins gate claims, not trust
        flagged[adjust] = bool((checks.lo > checks.alpha).any())
        values[f"placebo_class_{adjust}"] = str(part.classification.iloc[0])
        values[f"placebo_used_{adjust}"] = str(part.adjust.iloc[0])
        for kind in ("noise", "proxy", "twin"):
            values[f"placebo_{kind}_{adjust}"] = pct(part.rate.get(kind, np.nan))
        values[f"placebo_flag_{adjust}"] = ("flags the adjustment as untrustworthy" if flagged[adjust]
                                            else "raises no flag")
    if flagged["rank"] and not flagged["auto"]:
        values["placebo_sentence"] = ("the placebos catch the rank-linear adjustment on this ledger "
                                      "and clear the one adjust=\"auto\" used")
    elif flagged["rank"] and flagged["auto"]:
        values["placebo_sentence"] = "the placebos flag both adjustments on this ledger"
    elif flagged["auto"]:
        values["placebo_sentence"] = ("against expectation, the placebos flag the adjustment of "
                                      "adjust=\"auto\" and clear the rank-linear one")
    else:
        values["placebo_sentence"] = ("the placebos flag neither adjustment on this ledger, so here "
                                      "they do not warn of the rank-linear failure")
    return values


# ------------------------------------------------------- twin withholding
def _twin_task(args: tuple) -> dict:
    name, n, rep, seed, alpha, placebos = args
    scenario = SCENARIOS[name]
    frame = scenario.generate(np.random.default_rng([seed, n, rep, 17, sum(map(ord, name))]), n)
    controls, cluster = list(scenario.controls), scenario.cluster
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = audit(frame, ["metric"], "target", controls, cluster=cluster, seed=seed + rep,
                      alpha=alpha)
        checked = audit(frame, ["metric"], "target", controls, cluster=cluster, seed=seed + rep,
                        alpha=alpha, placebos=placebos)
    twin = checked.calibration.set_index("kind").loc["twin"]
    return {"scenario": name, "kind": scenario.kind, "rep": rep,
            "plain": str(plain.table.classification.iloc[0]),
            "checked": str(checked.table.classification.iloc[0]),
            "twin_rate": float(twin.rate), "flagged": bool(twin.lo > twin.alpha)}


def twin_withholding(scenarios: Sequence[str], n: int, reps: int, placebos: int, alpha: float,
                     seed: int, workers: int) -> pd.DataFrame:
    """Claims of ``adjust="auto"`` without placebos and with ``placebos`` (whose twins gate them).

    Each of ``reps`` ledgers per scenario is audited twice with ``adjust="auto"``:
    with ``placebos=0`` and with ``placebos``. Under crossfit, when a group's
    twin placebos (copies of the target's own dependence on the controls)
    reject with a Wilson lower bound above alpha, a claim that does not beat
    the twins is withheld (class ``inconclusive``). On a null every claim is
    false; on a signal the claim rate is the hit rate.

    Returns
    -------
    DataFrame
        ``scenario, kind, n, reps, placebos, claims_plain, claims_checked,
        flagged, twin_rate`` (rates over the ledgers; ``twin_rate`` the mean
        share of twins called associated).

    Examples
    --------
    >>> t = twin_withholding(["independent_null"], n=100, reps=2, placebos=20, alpha=0.05,
    ...                      seed=0, workers=1)
    >>> t[["scenario", "kind", "n", "reps", "placebos"]]
               scenario  kind    n  reps  placebos
    0  independent_null  null  100     2        20
    """
    tasks = [(name, int(n), rep, seed, alpha, placebos) for name in scenarios for rep in range(reps)]
    ledgers = pd.DataFrame(_map_tasks(_twin_task, tasks, workers))
    ledgers["claims_plain"] = ledgers.plain.isin(CLAIMS)
    ledgers["claims_checked"] = ledgers.checked.isin(CLAIMS)
    table = ledgers.groupby(["scenario", "kind"], sort=False).agg(
        reps=("rep", "size"), claims_plain=("claims_plain", "mean"),
        claims_checked=("claims_checked", "mean"), flagged=("flagged", "mean"),
        twin_rate=("twin_rate", "mean")).reset_index()
    table.insert(2, "n", int(n))
    table.insert(4, "placebos", int(placebos))
    return table


def _moved(before: float, after: float) -> str:
    """``'falls from 10 % to 0 %'``, ``'rises from ...'`` or ``'stays at 5 %'``."""
    if pct(before) == pct(after):
        return f"stays at {pct(after)}"
    return f"{'falls' if after < before else 'rises'} from {pct(before)} to {pct(after)}"


def twin_values(twins: pd.DataFrame, calibration: pd.DataFrame | None = None,
                alpha: float = 0.05) -> dict:
    """Values and the sentence of the twin-withholding section.

    Keys: ``twin_n, twin_reps, twin_placebos``; per row kind ``k`` in (null,
    signal): ``twin_scenario_k, twin_plain_k, twin_checked_k, twin_flag_k``
    ('–' where no such scenario was run); ``twin_sentence``; and
    ``twin_size_sentence``, the crossfit size of the null at ``twin_n`` in
    ``calibration`` (the size table) and whether it lies above alpha (its
    Wilson interval above ``alpha``: the learner misses this shape).

    Examples
    --------
    >>> t = pd.DataFrame({"scenario": ["grid_proxy_5", "genuine_increment"],
    ...                   "kind": ["null", "signal"], "n": 300, "reps": 40, "placebos": 200,
    ...                   "claims_plain": [0.1, 0.9], "claims_checked": [0.0, 0.9],
    ...                   "flagged": [1.0, 0.0], "twin_rate": [0.4, 0.05]})
    >>> v = twin_values(t)
    >>> v["twin_plain_null"], v["twin_checked_null"], v["twin_flag_signal"]
    ('10 %', '0 %', '0 %')
    >>> print(v["twin_sentence"])
    with the twins' check the false-claim rate on grid_proxy_5 falls from 10 % to 0 % and the
    hit rate on genuine_increment stays at 90 %
    """
    values = {"twin_n": int(twins.n.iloc[0]), "twin_reps": int(twins.reps.max()),
              "twin_placebos": int(twins.placebos.iloc[0])}
    rows = {}
    for kind in ("null", "signal"):
        part = twins[twins.kind == kind]
        rows[kind] = part.iloc[0] if len(part) else None
        for key, column in (("plain", "claims_plain"), ("checked", "claims_checked"),
                            ("flag", "flagged")):
            values[f"twin_{key}_{kind}"] = pct(rows[kind][column]) if len(part) else "–"
        values[f"twin_scenario_{kind}"] = str(rows[kind].scenario) if len(part) else "–"
    null, signal = rows["null"], rows["signal"]
    sentence = (f"with the twins' check the false-claim rate on {null.scenario} "
                f"{_moved(null.claims_plain, null.claims_checked)}")
    if signal is not None:
        sentence += (f" and the hit rate on {signal.scenario} "
                     f"{_moved(signal.claims_plain, signal.claims_checked)}")
    values["twin_sentence"] = sentence
    values["twin_size_sentence"] = "this null was not in the size table of this run"
    if calibration is not None and null is not None:
        cell = calibration[(calibration.scenario == null.scenario) & (calibration.method == "crossfit")
                           & (calibration.n == values["twin_n"])]
        if len(cell):
            values["twin_size_sentence"] = _twin_size_sentence(cell.iloc[0], alpha)
    return values


def _twin_size_sentence(cell: pd.Series, alpha: float) -> str:
    """Whether the cross-fitted test misses the twin study's null at its n (one size-table cell).

    Examples
    --------
    >>> cell = pd.Series({"n": 60, "rate": 0.64, "lo": 0.57})
    >>> print(_twin_size_sentence(cell, 0.05))
    at n = 60, the smallest n of this run, the cross-fitted test rejects this null in 64 % of the
    ledgers of the size table, significantly above alpha: the learner misses this shape at this n
    """
    text = (f"at n = {int(cell.n)}, the smallest n of this run, the cross-fitted test rejects "
            f"this null in {pct(float(cell.rate))} of the ledgers of the size table, ")
    if cell.lo > alpha:
        return text + "significantly above alpha: the learner misses this shape at this n"
    return text + ("not shown to be above alpha: at this n the learner fits this shape, so the "
                   "twins have little to catch here")


# ------------------------------------------------ few configurations, many seeds
#: Configurations of the seeded-grid study (each run with :data:`SEEDED_SEEDS` seeds): both
#: fewer than the 148 that the learner's smooth block needs for seven controls.
SEEDED_CONFIGS = (30, 100)
SEEDED_SEEDS = 5
#: Permutations of the among-seeds test, as the audit runs it for a claim.
SEEDED_DRAWS = 499
#: How a sentence says :func:`null_status`.
_STATUS_WORDS = {"over": "over-rejects", "under": "is conservative", "held": "holds alpha"}
#: How the prose names each ledger of the seeded-grid study.
SEEDED_LABELS = {"proxy": "design proxy (null)", "increment": "per-run increment (signal)"}


def _seeded_task(args: tuple) -> dict:
    kind, configs, rep, seed, alpha = args
    frame = seeded_grid(kind, configs, SEEDED_SEEDS, seed=[seed, configs, rep, 23])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # no cluster=: the audit clusters the seeds itself
        row = audit(frame, ["metric"], "target", list(SEEDED_GRID_CONTROLS), seed=seed + rep,
                    alpha=alpha).table.iloc[0]
    _, p, _ = within_configuration_test(frame.metric.to_numpy(), frame.target.to_numpy(),
                                        frame.config.to_numpy(), draws=SEEDED_DRAWS,
                                        rng=np.random.default_rng([seed, configs, rep, 29]))
    return {"kind": kind, "configs": configs, "rep": rep, "rejects": bool(row.adj_p < alpha),
            "claims": str(row.classification) in CLAIMS, "within": bool(p < alpha)}


def _smooth_needs(frame: pd.DataFrame) -> int:
    """The configurations the learner's smooth block needs for the seeded grid's controls."""
    numeric, categorical = SEEDED_GRID_CONTROLS[:5], SEEDED_GRID_CONTROLS[5:]
    return control_basis(frame[list(numeric)].to_numpy(float),
                         frame[list(categorical)].to_numpy()).smooth_rows


def seeded_study(configs_values: Sequence[int], reps: int, alpha: float, seed: int,
                 workers: int) -> pd.DataFrame:
    """The audit on grids with few configurations and several seeds each.

    For every number of configurations in ``configs_values``, ``reps`` ledgers
    of :func:`mbe_helpers.simulate.seeded_grid` (seven controls,
    :data:`SEEDED_SEEDS` seeds per configuration) of each kind (``proxy``, a
    conditional null; ``increment``, a signal) are audited with the defaults
    (``adjust="auto"``, no ``cluster=``: the audit clusters the seeds by
    configuration itself). Counted per ledger: the cross-fitted test rejects
    (``adj_p < alpha``), the class claims information (:data:`CLAIMS`), and
    the among-seeds test (:func:`mbe_helpers.crossfit.within_configuration_test`,
    :data:`SEEDED_DRAWS` permutations) rejects.

    Returns
    -------
    DataFrame
        ``kind, configs, seeds, needs`` (the configurations the learner's
        smooth block needs), ``reps`` and, for each of ``rejects, claims,
        within``, the count, its rate and Wilson 95 % interval
        (``rejects_rate, rejects_lo, rejects_hi``, ...).

    Examples
    --------
    >>> t = seeded_study([20], reps=2, alpha=0.05, seed=0, workers=1)
    >>> t[["kind", "configs", "seeds", "reps", "claims"]]
            kind  configs  seeds  reps  claims
    0      proxy       20      5     2       0
    1  increment       20      5     2       2
    """
    tasks = [(kind, int(c), rep, seed, alpha) for c in configs_values
             for kind in SEEDED_LABELS for rep in range(reps)]
    ledgers = pd.DataFrame(_map_tasks(_seeded_task, tasks, workers))
    needs = _smooth_needs(seeded_grid("proxy", int(configs_values[0]), SEEDED_SEEDS, seed=seed))
    records = []
    for (kind, configs), group in ledgers.groupby(["kind", "configs"], sort=False):
        record = {"kind": kind, "configs": int(configs), "seeds": SEEDED_SEEDS, "needs": needs,
                  "reps": len(group)}
        for column in ("rejects", "claims", "within"):
            count = int(group[column].sum())
            lo, hi = wilson_interval(count, len(group))
            record.update({column: count, f"{column}_rate": count / len(group),
                           f"{column}_lo": lo, f"{column}_hi": hi})
        records.append(record)
    return pd.DataFrame(records)


def seeded_table(table: pd.DataFrame) -> pd.DataFrame:
    """The seeded-grid study as text: rate and Wilson interval per ledger and test.

    Examples
    --------
    >>> t = pd.DataFrame({"kind": ["proxy"], "configs": [30], "seeds": [5], "reps": [40],
    ...                   **{f"{c}{s}": [v] for c in ("rejects", "claims", "within")
    ...                      for s, v in (("_rate", 0.5), ("_lo", 0.35), ("_hi", 0.65))}})
    >>> seeded_table(t).iloc[0].tolist()
    ['design proxy (null)', '30 x 5', '50 % (35.0–65.0 %)', '50 % (35.0–65.0 %)', '50 % (35.0–65.0 %)']
    """
    out = pd.DataFrame({"ledger": table.kind.map(SEEDED_LABELS),
                        "configurations x seeds": [f"{c} x {s}" for c, s in
                                                   zip(table.configs, table.seeds)]})
    for column, label in (("rejects", "cross-fitted test rejects"),
                          ("claims", "audit claims information"),
                          ("within", "among-seeds test rejects")):
        out[label] = _with_interval(table[f"{column}_rate"], table[f"{column}_lo"],
                                    table[f"{column}_hi"])
    return out


def seeded_values(table: pd.DataFrame, alpha: float) -> dict:
    """Values and sentences of the seeded-grid section.

    Keys: ``seeded_reps, seeded_seeds, seeded_controls, seeded_configs_text,
    seeded_needs``;
    ``seeded_reject_sentence`` (the cross-fitted test on the nulls, with
    :func:`null_status` per cell), ``seeded_claim_sentence`` (false claims on
    the nulls, claims on the signals) and ``seeded_within_sentence`` (the
    among-seeds test's size and power).

    Examples
    --------
    >>> t = pd.DataFrame({"kind": ["proxy", "increment"], "configs": [30, 30], "seeds": 5,
    ...                   "needs": 148, "reps": 40, "rejects": [24, 40], "rejects_rate": [0.6, 1.0],
    ...                   "rejects_lo": [0.45, 0.91], "rejects_hi": [0.73, 1.0],
    ...                   "claims": [0, 40], "claims_rate": [0.0, 1.0],
    ...                   "within": [2, 40], "within_rate": [0.05, 1.0],
    ...                   "within_lo": [0.01, 0.91], "within_hi": [0.17, 1.0]})
    >>> v = seeded_values(t, 0.05)
    >>> print(v["seeded_reject_sentence"])
    the cross-fitted test rejects the design proxy in 60 % of the ledgers at 30 configurations
    (Wilson 95 % interval 45.0–73.0 %: it over-rejects)
    >>> print(v["seeded_claim_sentence"])
    the audit claimed information beyond the controls in 0 of 40 null ledgers at 30
    configurations, and in 40 of 40 of the increments
    """
    nulls, signals = table[table.kind == "proxy"], table[table.kind == "increment"]
    configs = [int(c) for c in dict.fromkeys(table.configs)]
    values = {"seeded_reps": int(table.reps.max()), "seeded_seeds": int(table.seeds.iloc[0]),
              "seeded_controls": len(SEEDED_GRID_CONTROLS),
              "seeded_configs_text": and_join([str(c) for c in configs]),
              "seeded_needs": int(table.needs.max())}
    rejects = [f"{pct(r.rejects_rate)} of the ledgers at {r.configs} configurations (Wilson 95 % "
               f"interval {100 * r.rejects_lo:.1f}–{100 * r.rejects_hi:.1f} %: it "
               f"{_STATUS_WORDS[null_status(r.rejects_lo, r.rejects_hi, alpha)]})"
               for r in nulls.itertuples()]
    values["seeded_reject_sentence"] = ("the cross-fitted test rejects the design proxy in "
                                        + and_join(rejects))
    claims = [f"{r.claims} of {r.reps} null ledgers at {r.configs} configurations"
              for r in nulls.itertuples()]
    hits = and_join([f"{r.claims} of {r.reps}" for r in signals.itertuples()])
    values["seeded_claim_sentence"] = (f"the audit claimed information beyond the controls in "
                                       f"{and_join(claims)}, and in {hits} of the increments")
    size = and_join([f"{pct(r.within_rate)} at {r.configs} configurations"
                     for r in nulls.itertuples()])
    power = and_join([pct(r.within_rate) for r in signals.itertuples()])
    values["seeded_within_sentence"] = (f"the among-seeds test rejected {size} of the nulls (its "
                                        f"size) and {power} of the increments (its power)")
    return values


# --------------------------------------------------------------- coverage
def coverage_table(table: pd.DataFrame) -> pd.DataFrame:
    """Coverage of the cross-fitted 95 % interval as text: rows (kind, scenario), columns n.

    Examples
    --------
    >>> t = pd.DataFrame({"scenario": ["a"], "kind": ["null"], "n": [300], "method": ["crossfit"],
    ...                   "coverage": [0.95], "coverage_lo": [0.91], "coverage_hi": [0.97]})
    >>> coverage_table(t).loc[("null", "a"), 300]
    '95 % (91.0–97.0 %)'
    """
    cells = table[(table.method == "crossfit") & table.coverage.notna()].copy()
    cells["text"] = _with_interval(cells.coverage, cells.coverage_lo, cells.coverage_hi)
    wide = cells.pivot_table(index=["kind", "scenario"], columns="n", values="text",
                             aggfunc="first", sort=False)
    wide.columns.name = "coverage at n ="
    return wide


def coverage_values(table: pd.DataFrame, n: int, nominal: float = 0.95) -> dict:
    """Sentences on the cross-fitted interval's coverage: ``coverage_focus`` and ``coverage_low``.

    A cell *under-covers* when its Wilson interval lies below ``nominal``.

    Examples
    --------
    >>> t = pd.DataFrame({"scenario": ["a", "b"], "kind": "null", "n": 300, "method": "crossfit",
    ...                   "coverage": [0.95, 0.80], "coverage_lo": [0.91, 0.74],
    ...                   "coverage_hi": [0.97, 0.85]})
    >>> v = coverage_values(t, 300)
    >>> print(v["coverage_focus"])
    at n = 300 the interval contains the true adjusted correlation in 80 %–95 % of the ledgers of a scenario
    >>> print(v["coverage_low"])
    it covers significantly less than 95 % on b at n = 300 (80 %)
    """
    cells = table[(table.method == "crossfit") & table.coverage.notna()]
    focus = cells[cells.n == n]
    low = cells[cells.coverage_hi < nominal].sort_values("coverage")
    listing = [f"{r.scenario} at n = {r.n} ({pct(r.coverage)})" for r in low.itertuples()]
    return {"coverage_focus": (f"at n = {n} the interval contains the true adjusted correlation "
                               f"in {pct(focus.coverage.min())}–{pct(focus.coverage.max())} of the "
                               "ledgers of a scenario"),
            "coverage_low": (f"it covers significantly less than {pct(nominal)} on {and_join(listing)}"
                             if listing
                             else f"no cell covers significantly less than {pct(nominal)}")}


#: Scenarios and resamples of the bootstrap-interval coverage check.
BOOTSTRAP_SCENARIOS = ("linear_proxy", "genuine_increment")
BOOTSTRAP_RESAMPLES = 200


def _rank_truth(name: str, n: int = 20_000) -> dict:
    """``raw_r`` and ``partial_r`` of a scenario on one ledger of ``n`` rows (the interval's target)."""
    row = audit(truth_ledger(name, n), "metric", "target", list(SCENARIOS[name].controls),
                adjust="rank").table.iloc[0]
    return {"raw": float(row.raw_r), "partial": float(row.partial_r)}


def _bootstrap_task(args: tuple) -> list[dict]:
    name, n, rep, seed, truth, resamples = args
    scenario = SCENARIOS[name]
    frame = scenario.generate(np.random.default_rng([seed, n, rep, 13, sum(map(ord, name))]), n)
    row = audit(frame, "metric", "target", list(scenario.controls), adjust="rank",
                bootstrap=resamples, seed=seed + rep).table.iloc[0]
    return [{"scenario": name, "n": n, "interval": what,
             "covered": bool(row[f"{what}_lo"] <= truth[what] <= row[f"{what}_hi"])}
            for what in ("raw", "partial")]


def bootstrap_coverage(scenarios: Sequence[str], n_values: Sequence[int], reps: int, seed: int,
                       workers: int, resamples: int = BOOTSTRAP_RESAMPLES) -> pd.DataFrame:
    """Coverage of the audit's bootstrap intervals (Fisher z) of raw and partial rho.

    Each ledger is audited with ``adjust="rank", bootstrap=resamples``; the
    truth is the estimate on one ledger of 20,000 rows.

    Returns
    -------
    DataFrame
        ``scenario, n, interval, reps, covered, coverage, lo, hi`` (Wilson 95 % interval).

    Examples
    --------
    >>> t = bootstrap_coverage(["genuine_increment"], [60], reps=4, seed=0, workers=1, resamples=50)
    >>> t[["scenario", "n", "interval", "reps"]].values.tolist()
    [['genuine_increment', 60, 'partial', 4], ['genuine_increment', 60, 'raw', 4]]
    """
    truths = {name: _rank_truth(name) for name in scenarios}
    tasks = [(name, int(n), rep, seed, truths[name], resamples)
             for name in scenarios for n in n_values for rep in range(reps)]
    rows = _map_tasks(_bootstrap_task, tasks, workers)
    flat = pd.DataFrame([r for pair in rows for r in pair])
    out = (flat.groupby(["scenario", "n", "interval"], sort=False).covered
           .agg(["size", "sum"]).reset_index().rename(columns={"size": "reps", "sum": "covered"}))
    out = out.sort_values(["scenario", "n", "interval"]).reset_index(drop=True)
    out["coverage"] = out.covered / out.reps
    bounds = [wilson_interval(int(k), int(m)) for k, m in zip(out.covered, out.reps)]
    out["lo"], out["hi"] = [b[0] for b in bounds], [b[1] for b in bounds]
    return out


def bootstrap_values(table: pd.DataFrame) -> dict:
    """``bootstrap_range``: the range of the bootstrap intervals' coverage, as text.

    Examples
    --------
    >>> t = pd.DataFrame({"coverage": [0.935, 0.96]})
    >>> bootstrap_values(t)["bootstrap_range"]
    '94 %–96 %'
    """
    return {"bootstrap_range": f"{pct(table.coverage.min())}–{pct(table.coverage.max())}"}


# --------------------------------------------------------------- verdict
def holders(table: pd.DataFrame, n: int, alpha: float) -> list[str]:
    """Methods that over-reject no null at ``n`` (no Wilson interval above alpha).

    Examples
    --------
    >>> t = pd.DataFrame({"scenario": ["a", "a"], "kind": "null", "n": 300,
    ...                   "method": ["rank-t", "crossfit"], "rate": [0.5, 0.06],
    ...                   "lo": [0.4, 0.03], "hi": [0.6, 0.1]})
    >>> holders(t, 300, 0.05)
    ['crossfit']
    """
    out = []
    for method in [m for m in METHODS if m in set(table.method)]:
        nulls = _cells(table, n, method, "null")
        if len(nulls) and not (_statuses(nulls, alpha) == "over").any():
            out.append(method)
    return out


def holders_sentence(table: pd.DataFrame, n: int, alpha: float) -> str:
    """Which methods over-reject no null at ``n`` (or which comes closest).

    Examples
    --------
    >>> t = pd.DataFrame({"scenario": ["a", "a"], "kind": "null", "n": 300,
    ...                   "method": ["rank-t", "crossfit"], "rate": [0.5, 0.06],
    ...                   "lo": [0.4, 0.03], "hi": [0.6, 0.1]})
    >>> holders_sentence(t, 300, 0.05)
    'at n = 300 only crossfit rejects no null significantly more often than 5 %'
    """
    kept = holders(table, n, alpha)
    claim = f"significantly more often than {pct(alpha)}"
    if len(kept) == 1:
        return f"at n = {n} only {kept[0]} rejects no null {claim}"
    if kept:
        return f"at n = {n} {and_join(kept)} reject no null {claim}"
    nulls = table[(table.n == n) & (table.kind == "null")]
    scores = _over_rejections(table, n, alpha)
    best = scores.index[0]
    failing = nulls[(nulls.method == best) & (_statuses(nulls, alpha) == "over")]
    return (f"at n = {n} every method rejects some null {claim}; the fewest such nulls are "
            f"{int(scores.over.iloc[0])} of {int(scores['size'].iloc[0])}, for {best}: "
            f"{_listing(failing.sort_values('rate', ascending=False))}")


def verdict(table: pd.DataFrame, n: int, alpha: float) -> dict:
    """The closing values: ``verdict_focus, verdict_largest, largest_n, verdict_power``.

    ``verdict_power`` gives, for each method that keeps size at ``n`` (see
    :func:`holders`), its lowest power there over the signals.

    Examples
    --------
    >>> t = pd.DataFrame({"scenario": ["a", "a", "s", "s"],
    ...                   "kind": ["null", "null", "signal", "signal"], "n": 300,
    ...                   "method": ["rank-t", "crossfit"] * 2, "rate": [0.5, 0.06, 1.0, 0.9],
    ...                   "lo": [0.4, 0.03, 0.98, 0.85], "hi": [0.6, 0.1, 1.0, 0.94]})
    >>> values = verdict(t, 300, 0.05)
    >>> print(values["verdict_focus"])
    at n = 300 only crossfit rejects no null significantly more often than 5 %
    >>> print(values["verdict_power"])
    the lowest power on a signal at n = 300 is 90 % for crossfit
    >>> worse = t.assign(lo=[0.4, 0.07, 0.98, 0.85])          # now crossfit over-rejects too
    >>> print(verdict(worse, 300, 0.05)["verdict_power"])
    the lowest power on a signal at n = 300 is 90 % for crossfit (the method with the fewest
    over-rejected nulls there)
    """
    largest = int(table.n.max())
    kept = holders(table, n, alpha)
    values = {"verdict_focus": holders_sentence(table, n, alpha),
              "verdict_largest": (holders_sentence(table, largest, alpha) if largest != n
                                  else f"n = {n} is also the largest sample size that was run"),
              "largest_n": largest}
    which = ""
    scores = _over_rejections(table, n, alpha)
    if not kept and len(scores):
        kept, which = [scores.index[0]], " (the method with the fewest over-rejected nulls there)"
    signals = table[(table.n == n) & (table.kind == "signal") & table.method.isin(kept)]
    if signals.empty:
        values["verdict_power"] = f"no method that keeps size at n = {n} has a power to report"
    else:
        lowest = signals.groupby("method", sort=False).rate.min()
        values["verdict_power"] = (f"the lowest power on a signal at n = {n} is "
                                   + and_join([f"{pct(r)} for {m}" for m, r in lowest.items()])
                                   + which)
    return values


def _over_rejections(table: pd.DataFrame, n: int, alpha: float) -> pd.DataFrame:
    """Per method at ``n``: nulls over-rejected (``over``), nulls run (``size``) and the mean null
    rate (``rate``), the method with the fewest over-rejections first (ties: lowest mean rate)."""
    nulls = table[(table.n == n) & (table.kind == "null")]
    scores = (nulls.assign(over=_statuses(nulls, alpha) == "over").groupby("method")
              .agg(over=("over", "sum"), size=("over", "size"), rate=("rate", "mean")))
    return scores.sort_values(["over", "rate"], kind="stable")


__all__ = ["BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SCENARIOS", "CLAIM_SCENARIOS", "METHOD_LABELS",
           "PLACEBO_SCENARIO", "POWER_GOAL", "Params", "TWIN_SCENARIOS", "and_join",
           "bootstrap_coverage", "bootstrap_values", "claim_rates", "claim_values",
           "coverage_table", "coverage_values", "failures_sentence", "holders", "holders_sentence",
           "method_key", "null_status", "pct", "placebo_check", "placebo_values", "plot_rates",
           "power_sentence", "rates_at", "run_size_power", "scenario_table", "scenario_values",
           "size_power_values", "size_sentence", "summarise_claims", "trend_sentence",
           "twin_values", "twin_withholding", "validate", "verdict", "worst_sentence"]
