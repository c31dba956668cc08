"""Chapter 05 (book/05_audit_calibration.ipynb) and its module mbe_helpers.chapters.audit_calibration."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import yaml

from mbe_helpers import MBEInputError, book
from mbe_helpers.audit import wilson_interval
from mbe_helpers.chapters import audit_calibration as chapter
from mbe_helpers.simulate import METHODS, SCENARIOS
from notebooks import cells, glue_roles, glued, source

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "book" / "05_audit_calibration.ipynb"
STEM = "05_audit_calibration"
DEFAULTS = dict(n_values=[60, 150, 300, 1000], reps=200, scenarios=None, alpha=0.05, focus_n=300,
                claim_reps=100, twin_reps=40, seeded_reps=40, placebos=200, seed=0, workers=2,
                results_dir="out")

# Rejections out of REPS per (scenario, n, method): u_proxy breaks the rank-linear tests and
# gets worse with n, crossfit holds both nulls, the signal is found by all from n = 300.
REPS = 200
COUNTS = {
    ("independent_null", 60): {"raw": 10, "rank-t": 11, "rank-perm": 9, "crossfit": 12},
    ("independent_null", 300): {"raw": 9, "rank-t": 10, "rank-perm": 10, "crossfit": 11},
    ("u_proxy", 60): {"raw": 190, "rank-t": 60, "rank-perm": 58, "crossfit": 11},
    ("u_proxy", 300): {"raw": 200, "rank-t": 200, "rank-perm": 199, "crossfit": 9},
    ("genuine_increment", 60): {"raw": 150, "rank-t": 120, "rank-perm": 118, "crossfit": 100},
    ("genuine_increment", 300): {"raw": 200, "rank-t": 198, "rank-perm": 197, "crossfit": 190},
}


def constructed_table(counts=COUNTS, reps=REPS) -> pd.DataFrame:
    """A calibration table in the layout of run_calibration, from given rejection counts."""
    rows = []
    for (scenario, n), by_method in counts.items():
        for method, k in by_method.items():
            lo, hi = wilson_interval(k, reps)
            covered = reps - 10 if method == "crossfit" else None   # 95 % of the intervals cover
            c_lo, c_hi = wilson_interval(covered, reps) if covered is not None else (np.nan, np.nan)
            rows.append(dict(scenario=scenario, kind=SCENARIOS[scenario].kind, n=n, method=method,
                             reps=reps, rejections=k, rate=k / reps, lo=lo, hi=hi,
                             coverage=covered / reps if covered is not None else np.nan,
                             coverage_lo=c_lo, coverage_hi=c_hi))
    return pd.DataFrame(rows)


def constructed_claims() -> pd.DataFrame:
    classes = pd.DataFrame({
        "scenario": ["u_proxy"] * 4 + ["linear_proxy"] * 4,
        "auto": ["inconclusive", "weak-or-mixed", "inconclusive", "survives",
                 "inconclusive", "inconclusive", "inconclusive", "inconclusive"],
        "rank": ["survives"] * 4 + ["washout", "washout", "survives", "washout"],
    })
    return chapter.summarise_claims(classes, 300)


def constructed_placebo(rank_proxy_rejections: int = 150) -> pd.DataFrame:
    rows = []
    for requested, used, cls, noise, proxy in (
            ("auto", "crossfit", "inconclusive", 10, 11),
            ("rank", "rank", "survives", 9, rank_proxy_rejections)):
        for kind, k in (("noise", noise), ("proxy", proxy)):
            lo, hi = wilson_interval(k, 200)
            rows.append(dict(requested=requested, classification=cls, group="all", kind=kind,
                             adjust=used, K=200, rejections=k, rate=k / 200, lo=lo, hi=hi,
                             alpha=0.05, note=""))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- parameters
def test_validate_resolves_scenarios_and_sorts_sizes() -> None:
    params = chapter.validate(**{**DEFAULTS, "n_values": [300, 60]})
    assert params.n_values == (60, 300)
    assert params.scenarios == tuple(SCENARIOS)
    assert params.claim_scenarios == chapter.CLAIM_SCENARIOS
    assert params.placebo_scenario == chapter.PLACEBO_SCENARIO


def test_claim_and_placebo_scenarios_fall_back_to_the_nulls_that_were_run() -> None:
    params = chapter.validate(**{**DEFAULTS, "scenarios": ["genuine_increment", "step_proxy"]})
    assert params.claim_scenarios == ("step_proxy",)
    assert params.placebo_scenario == "step_proxy"


@pytest.mark.parametrize("name, value, message", [
    ("reps", 5, "bad parameter: reps must be greater than or equal to 10, got 5."),
    ("n_values", [], "bad parameter: n_values must have at least 1 item, got []."),
    ("n_values", [60, 60], "bad parameter: n_values must not repeat a value, got [60, 60]."),
    ("alpha", 0.7, "bad parameter: alpha must be less than 0.5, got 0.7."),
    ("focus_n", 500, "bad parameter: focus_n must be one of n_values [60, 150, 300, 1000], got 500."),
    ("scenarios", ["no_such"], "bad parameter: scenarios must come from"),
    ("scenarios", ["genuine_increment"], "bad parameter: scenarios must include a null scenario"),
    ("placebos", 5, "bad parameter: placebos must be greater than or equal to 20, got 5."),
    ("workers", 0, "bad parameter: workers must be greater than or equal to 1, got 0."),
])
def test_validate_refuses_bad_values_in_one_sentence(name, value, message) -> None:
    with pytest.raises(MBEInputError) as info:
        chapter.validate(**{**DEFAULTS, name: value})
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


# ------------------------------------------------------------------ formats
def test_formats() -> None:
    assert [chapter.pct(v) for v in (1.0, 0.05, 0.035, 0.0, float("nan"))] == \
        ["100 %", "5 %", "3.5 %", "0 %", "–"]
    assert chapter.and_join(["a"]) == "a" and chapter.and_join(["a", "b", "c"]) == "a, b and c"
    assert chapter.method_key("rank-perm") == "rank_perm"
    assert chapter.null_status(*wilson_interval(10, 200), 0.05) == "held"
    assert chapter.null_status(*wilson_interval(30, 200), 0.05) == "over"
    assert chapter.null_status(*wilson_interval(0, 200), 0.05) == "under"


def test_scenario_table_lists_every_scenario_with_its_truth() -> None:
    table = chapter.scenario_table()
    assert list(table.scenario) == list(SCENARIOS)
    assert set(table.kind) == {"null", "signal"} and table.truth.str.len().min() > 10
    assert table.set_index("scenario").loc["clustered_null", "cluster"] == "config"
    counts = chapter.scenario_values(list(SCENARIOS))
    assert counts["n_nulls"] + counts["n_signals"] == counts["n_scenarios"] == len(SCENARIOS)


# ---------------------------------------------------------- size and power
def test_size_sentences_name_the_failing_nulls_with_their_rates() -> None:
    table = constructed_table()
    rank = chapter.size_sentence(table, "rank-t", 300, 0.05)
    assert rank.startswith("The rank-linear adjustment with its t test holds 1 of 2 nulls at n = 300")
    assert rank.endswith("it over-rejects u_proxy (100 %)")
    assert chapter.size_sentence(table, "crossfit", 300, 0.05) == (
        "The cross-fitted adjustment with its GCM test holds every null at n = 300: "
        "each Wilson interval contains 5 %")
    assert "was not run on a null at n = 1000" in chapter.size_sentence(table, "raw", 1000, 0.05)


def test_conservative_nulls_are_reported_apart() -> None:
    counts = {**COUNTS, ("independent_null", 300): {**COUNTS[("independent_null", 300)], "crossfit": 0}}
    sentence = chapter.size_sentence(constructed_table(counts), "crossfit", 300, 0.05)
    assert sentence.endswith("holds 1 of 2 nulls at n = 300; it is conservative on independent_null (0 %)")


def test_worst_trend_and_power_sentences() -> None:
    table = constructed_table()
    assert chapter.worst_sentence(table, "rank-t", 300).startswith(
        "Its worst null is u_proxy, rejected in 100 % of 200 runs at n = 300")
    assert chapter.trend_sentence(table, "rank-t") == (
        "Its highest null rejection rate is 30 % at n = 60 (u_proxy) and 100 % at n = 300 (u_proxy)")
    assert chapter.failures_sentence(table, "rank-t", 0.05) == (
        "Over all sizes run it over-rejects u_proxy (at every n)")
    assert chapter.failures_sentence(table, "crossfit", 0.05) == (
        "Over all sizes run it over-rejects no null")
    power = chapter.power_sentence(table, "crossfit", 300)
    assert power == ("It detects genuine_increment in 95 % of runs at n = 300; the smallest n run "
                     "at which it has at least 80 % power on every signal is 300")
    assert chapter.power_sentence(table, "raw", 60).endswith("on every signal is 300")
    weak = table.assign(rate=np.where(table.kind == "signal", 0.5, table.rate))
    assert "at no n that was run" in chapter.power_sentence(weak, "crossfit", 300)


def test_size_power_values_cover_every_method() -> None:
    values = chapter.size_power_values(constructed_table(), 300, 0.05)
    for method in METHODS:
        key = chapter.method_key(method)
        assert {f"size_{key}", f"worst_{key}", f"trend_{key}", f"fails_{key}", f"power_{key}",
                f"held_{key}"} <= set(values)
    assert values["held_crossfit"] == 2 and values["held_rank_t"] == 1
    assert values["n_values_text"] == "60 and 300" and values["reps"] == REPS
    assert all(isinstance(v, (str, int)) for v in values.values())


def test_rates_at_is_one_row_per_scenario_and_one_column_per_method() -> None:
    wide = chapter.rates_at(constructed_table(), 300)
    assert list(wide.columns) == list(METHODS)
    assert wide.index.tolist() == [("null", "independent_null"), ("null", "u_proxy"),
                                   ("signal", "genuine_increment")]
    assert wide.loc[("null", "u_proxy"), "rank-t"] == "100 % (98.1–100.0 %)"


def test_figure_has_one_panel_per_scenario_and_readable_text() -> None:
    import matplotlib.pyplot as plt

    fig = chapter.plot_rates(constructed_table(), 0.05)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == [
        "independent_null\n(null)", "u_proxy\n(null)", "genuine_increment\n(signal)"]
    texts = [t for ax in shown for t in (ax.title, ax.xaxis.label, ax.yaxis.label,
                                          *ax.get_xticklabels(), *ax.get_yticklabels())]
    texts += list(fig.legends[0].get_texts())
    assert min(t.get_fontsize() for t in texts if t.get_text()) >= 8
    assert any(np.allclose(line.get_ydata(), 0.05) for line in shown[0].get_lines())
    plt.close(fig)


# --------------------------------------------------------------- verdict
def test_verdict_names_the_methods_that_keep_size() -> None:
    table = constructed_table()
    assert chapter.holders(table, 300, 0.05) == ["crossfit"]
    values = chapter.verdict(table, 300, 0.05)
    assert values["verdict_focus"] == (
        "at n = 300 only crossfit rejects no null significantly more often than 5 %")
    assert values["verdict_largest"] == "n = 300 is also the largest sample size that was run"
    assert values["verdict_power"] == "the lowest power on a signal at n = 300 is 95 % for crossfit"
    assert chapter.verdict(table, 60, 0.05)["verdict_largest"].startswith("at n = 300 only crossfit")


def test_verdict_when_every_method_fails_a_null() -> None:
    counts = {**COUNTS, ("independent_null", 300): {m: 40 for m in METHODS}}
    values = chapter.verdict(constructed_table(counts), 300, 0.05)
    assert values["verdict_focus"] == (
        "at n = 300 every method rejects some null significantly more often than 5 %; "
        "the fewest such nulls are 1 of 2, for crossfit: independent_null (20 %)")
    assert values["verdict_power"].startswith("the lowest power on a signal at n = 300 is ")
    assert values["verdict_power"].endswith(
        "for crossfit (the method with the fewest over-rejected nulls there)")


# ------------------------------------------------------- claims, placebos
def test_claim_rates_count_the_claiming_classes() -> None:
    claims = constructed_claims()
    rates = claims.set_index(["scenario", "adjust"]).rate
    assert rates[("u_proxy", "rank")] == 1.0 and rates[("u_proxy", "auto")] == 0.25
    assert rates[("linear_proxy", "rank")] == 0.25 and rates[("linear_proxy", "auto")] == 0.0
    values = chapter.claim_values(claims)
    assert values["claim_rate_rank"] == "62 %" and values["claim_rate_auto"] == "12 %"
    assert values["claim_worst_rank"] == "u_proxy (100 %)" and values["claim_ledgers"] == 8
    assert values["claim_sentence"] == (
        "requiring evidence from the cross-fitted test cuts the false claims from 62 % to 12 %")


def test_placebo_values_say_which_adjustment_is_flagged() -> None:
    values = chapter.placebo_values(constructed_placebo(), "u_proxy", 300)
    assert values["placebo_proxy_rank"] == "75 %" and values["placebo_noise_auto"] == "5 %"
    assert values["placebo_flag_rank"] == "flags the adjustment as untrustworthy"
    assert values["placebo_flag_auto"] == "raises no flag"
    assert values["placebo_sentence"].startswith("the placebos catch the rank-linear adjustment")
    quiet = chapter.placebo_values(constructed_placebo(10), "u_proxy", 300)
    assert quiet["placebo_sentence"].startswith("the placebos flag neither adjustment")


def test_claims_and_placebos_on_real_ledgers_are_reproducible() -> None:
    first = chapter.claim_rates(["u_proxy"], 150, 4, 0.05, seed=3, workers=1)
    again = chapter.claim_rates(["u_proxy"], 150, 4, 0.05, seed=3, workers=1)
    pd.testing.assert_frame_equal(first, again)
    assert set(first.adjust) == {"auto", "rank"} and (first.reps == 4).all()
    assert first.set_index("adjust").loc["rank", "claims"] == 4   # the rank classes fall for the U
    placebo = chapter.placebo_check("u_proxy", 300, 40, 0.05, seed=0)
    assert list(placebo.requested) == ["auto", "auto", "auto", "rank", "rank"]
    assert list(placebo.kind) == ["noise", "proxy", "twin", "noise", "proxy"] and (placebo.K == 40).all()
    assert placebo.set_index(["requested", "kind"]).loc[("rank", "proxy"), "lo"] > 0.05


def test_twin_withholding_table_and_sentences() -> None:
    twins = chapter.twin_withholding(["grid_proxy_5", "genuine_increment"], 60, 3, 40, 0.05,
                                     seed=1, workers=1)       # seed 1: one of 3 null ledgers flagged
    assert list(twins.scenario) == ["grid_proxy_5", "genuine_increment"]
    assert list(twins.kind) == ["null", "signal"] and (twins.reps == 3).all()
    assert (twins.claims_checked <= twins.claims_plain).all()          # withholding only removes
    assert twins.set_index("scenario").flagged["grid_proxy_5"] > 0
    values = chapter.twin_values(twins)
    assert values["twin_reps"] == 3 and values["twin_scenario_signal"] == "genuine_increment"
    alone = chapter.twin_values(twins[twins.kind == "null"])
    assert alone["twin_plain_signal"] == "–" and "hit rate" not in alone["twin_sentence"]


def test_seeded_study_gates_the_design_proxy_and_finds_the_increment() -> None:
    study = chapter.seeded_study([30], reps=6, alpha=0.05, seed=0, workers=1)
    assert list(study.kind) == ["proxy", "increment"] and (study.reps == 6).all()
    rows = study.set_index("kind")
    assert rows.claims["proxy"] <= 1 and rows.claims["increment"] == 6
    assert rows.within["increment"] == 6 and rows.rejects["increment"] == 6
    assert study.equals(chapter.seeded_study([30], reps=6, alpha=0.05, seed=0, workers=1))
    values = chapter.seeded_values(study, 0.05)
    assert values["seeded_configs_text"] == "30" and values["seeded_controls"] == 7
    assert "6 of 6 of the increments" in values["seeded_claim_sentence"]
    assert list(chapter.seeded_table(study).columns)[2:] == [
        "cross-fitted test rejects", "audit claims information", "among-seeds test rejects"]


def test_twin_scenarios_fall_back_to_what_was_run() -> None:
    params = chapter.validate(**{**DEFAULTS, "scenarios": ["u_proxy", "independent_null"]})
    assert params.twin_scenarios == ("u_proxy",)
    assert chapter.validate(**DEFAULTS).twin_scenarios == chapter.TWIN_SCENARIOS


# ---------------------------------------------------------------- notebook
def code_cells() -> list[dict]:
    return [c for c in cells(NOTEBOOK) if c["cell_type"] == "code"]


def test_chapter_contract() -> None:
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = code_cells()
    assert "parameters" in code[0]["metadata"].get("tags", [])
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    headings = "\n".join(source(c) for c in nb["cells"] if c["cell_type"] == "markdown")
    for heading in ("## Overview", "## Prerequisites", "## Parameters", "## Imports",
                    "## The scenarios", "## Where each method fails", "## Verdict", "## Summary"):
        assert heading in headings
    for cell in code:
        text = source(cell)
        assert len(text.splitlines()) <= 15
        assert not re.search(r"^\s*(def|class|elif)\b", text, re.M)
        if "savefig" in text:
            assert cell["metadata"]["mystnb"]["figure"]["caption"]
    assert "chapter.validate(" in source(code[1])
    params = book.read_parameters(NOTEBOOK)
    assert all(p.comment for p in params.values())
    assert {k: params[k].default for k in DEFAULTS if k != "results_dir"} == \
        {k: v for k, v in DEFAULTS.items() if k != "results_dir"}


def test_prose_types_no_numbers_it_does_not_glue() -> None:
    prose = "\n".join(source(c) for c in cells(NOTEBOOK) if c["cell_type"] == "markdown")
    prose = re.sub(r"\{glue:text\}`[^`]+`|\{cite:p\}`[^`]+`|\{numref\}`[^`]+`", "", prose)
    prose = re.sub(r"`[^`]*`", "", prose).replace("95 %", "").replace("one cell in twenty", "")
    assert not re.findall(r"\d+(?:\.\d+)? ?%", prose)


def constructed_twins() -> pd.DataFrame:
    return pd.DataFrame({"scenario": ["additive_proxy_5", "genuine_increment"],
                         "kind": ["null", "signal"], "n": 300, "reps": 40, "placebos": 200,
                         "claims_plain": [0.1, 0.95], "claims_checked": [0.0, 0.95],
                         "flagged": [1.0, 0.0], "twin_rate": [0.4, 0.05]})


def constructed_seeded() -> pd.DataFrame:
    rates = {f"{c}{s}": [v, 1.0] for c in ("rejects", "claims", "within")
             for s, v in (("", 0), ("_rate", 0.0), ("_lo", 0.0), ("_hi", 0.09))}
    return pd.DataFrame({"kind": ["proxy", "increment"], "configs": 30, "seeds": 5,
                         "needs": 148, "reps": 40, **rates})


def test_every_glue_role_is_produced_by_the_chapter_module() -> None:
    table = constructed_table()
    produced = {**chapter.scenario_values(list(SCENARIOS)),
                **chapter.size_power_values(table, 300, 0.05),
                **chapter.claim_values(constructed_claims()),
                **chapter.placebo_values(constructed_placebo(), "u_proxy", 300),
                **chapter.verdict(table, 300, 0.05),
                **chapter.coverage_values(table, 300),
                **chapter.bootstrap_values(pd.DataFrame({"coverage": [0.94, 0.96]})),
                **chapter.twin_values(constructed_twins()),
                **chapter.seeded_values(constructed_seeded(), 0.05)}
    text = "\n".join(source(c) for c in code_cells())
    static = set(re.findall(r'glue\("(\w+)"', text))
    assert glue_roles(NOTEBOOK) <= set(produced) | static


def test_profiles_toc_and_references() -> None:
    chapters = {c.stem: c for c in book.discover_chapters(REPO)}   # refuses unknown parameters
    assert set(chapters[STEM].profiles) == {"smoke", "default", "paper"}
    assert chapters[STEM].profiles["default"] == {}
    toc = yaml.safe_load((REPO / "_toc.yml").read_text(encoding="utf-8"))
    files = [c["file"] for c in toc["parts"][0]["chapters"]]
    assert files.index(f"book/{STEM}") == files.index("book/00_method") + 1
    bib = (REPO / "book" / "references.bib").read_text(encoding="utf-8")
    assert "@article{shah2020hardness," in bib and "@article{freedman1983nonstochastic," in bib


# ------------------------------------------------------------ smoke build
@pytest.mark.slow
def test_smoke_run_glues_every_key_and_writes_artifacts(smoke_chapter) -> None:
    executed, results = smoke_chapter(STEM)
    assert executed.is_file() and book.notebook_errors(executed) == []
    values = glued(executed)
    assert glue_roles(executed) <= set(values)
    for method in METHODS:
        assert values[f"size_{chapter.method_key(method)}"]
    assert values["reps"] == "20" and values["focus_n"] == "300"
    calibration = pd.read_csv(results / "calibration.csv", keep_default_na=False)  # kind "null"
    assert set(calibration.n) == {60, 300} and (calibration.reps == 20).all()
    assert set(calibration.scenario) == set(SCENARIOS) and set(calibration.method) == set(METHODS)
    assert set(calibration.kind) == {"null", "signal"}
    assert (calibration.lo <= calibration.rate).all() and (calibration.rate <= calibration.hi).all()
    claims = pd.read_csv(results / "claims.csv")
    assert set(claims.scenario) == set(chapter.CLAIM_SCENARIOS) and (claims.reps == 20).all()
    assert len(pd.read_csv(results / "placebo.csv")) == 5  # noise, proxy, twin (auto) + noise, proxy (rank)
    twins = pd.read_csv(results / "twins.csv")
    assert list(twins.scenario) == list(chapter.TWIN_SCENARIOS) and (twins.reps == 5).all()
    crossfit_rows = calibration[calibration.method == "crossfit"]
    assert crossfit_rows.coverage.astype(float).between(0, 1).all()
    boot = pd.read_csv(results / "bootstrap_coverage.csv")
    assert set(boot.scenario) == set(chapter.BOOTSTRAP_SCENARIOS) and set(boot.interval) == {"raw", "partial"}
    assert boot.coverage.between(0, 1).all() and (boot.reps == 20).all()
    assert (results / "size_power.png").stat().st_size > 20_000
