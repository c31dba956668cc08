"""The credit chapters (book/03_calibration_controls, book/04_fa_diagnostics): contract and smoke runs."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest

from mbe_helpers import book
from mbe_helpers.errors import MBEInputError
from notebooks import cells, glue_roles, glued, source

REPO = Path(__file__).resolve().parents[1]
CHAPTERS = ("03_calibration_controls", "04_fa_diagnostics")
ARTIFACTS = {
    "03_calibration_controls": ("calibration.csv", "accuracy.csv", "per_layer.csv", "calibrated_scale.csv",
                                "calibrated_scale_per_layer.csv", "sensitivity.csv", "verdict.csv",
                                "per_layer.png", "calibrated_scale.png", "sensitivity.png"),
    "04_fa_diagnostics": ("layers.csv", "verdicts.csv", "accuracy.csv", "summary.csv",
                          "shallow_baselines.csv", "verdict_table.csv", "alignment.csv", "survival.csv",
                          "stream_norms.png", "stability.png", "frozen_margin.png"),
}


def number(values: dict[str, str], key: str) -> float:
    return float(values[key])


@pytest.mark.parametrize("stem", CHAPTERS)
def test_notebook_contract(stem: str) -> None:
    path = REPO / "book" / f"{stem}.ipynb"
    code = [c for c in cells(path) if c["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"].get("tags", [])
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)
    params = source(code[0])
    assert all("  # " in line for line in params.splitlines()), "every parameter has a one-line comment"
    for name in ("dataset", "width", "n_blocks", "epochs", "lr", "batch_size", "seeds", "penalty", "eps",
                 "n_directions", "eval_size", "results_dir", "device"):
        assert re.search(rf"^{name} = ", params, re.M), name
    assert "params = check(" in source(code[1])   # the schema of chapters/params.py
    # cells stay short; the parameters and the flat table of checks are exempt
    assert max(len(source(c).splitlines()) for c in code[2:]) <= 15
    headings = "\n".join(source(c) for c in cells(path) if c["cell_type"] == "markdown")
    for heading in ("## Overview", "## Prerequisites", "## Imports", "## Verdict", "## Summary"):
        assert heading in headings
    figures = [c for c in code if "mystnb" in c["metadata"]]
    assert len(figures) >= 3 and all(c["metadata"]["mystnb"]["figure"]["caption"] for c in figures)


def test_chapters_are_registered_in_profiles_and_toc() -> None:
    profiles = book.load_profiles(REPO)
    toc = (REPO / "_toc.yml").read_text()
    for stem in CHAPTERS:
        assert set(profiles[stem]) == {"smoke", "default", "paper"}
        assert profiles[stem]["paper"]["dataset"] == "cifar10"
        assert f"book/{stem}" in toc
    assert toc.index("book/00_method") < toc.index("book/03_calibration_controls") < toc.index(
        "book/04_fa_diagnostics")


@pytest.fixture(scope="module")
def smoke(smoke_chapter) -> dict[str, tuple[Path, Path]]:
    return {stem: smoke_chapter(stem) for stem in CHAPTERS}


@pytest.mark.slow
@pytest.mark.parametrize("stem", CHAPTERS)
def test_smoke_run_glues_every_number_in_the_prose_and_writes_artifacts(smoke, stem: str) -> None:
    executed, results = smoke[stem]
    assert not book.notebook_errors(executed)
    values = glued(executed)
    missing = glue_roles(REPO / "book" / f"{stem}.ipynb") - set(values)
    assert not missing, f"prose refers to unglued values: {sorted(missing)}"
    for name in ARTIFACTS[stem]:
        assert (results / name).stat().st_size > (5_000 if name.endswith(".png") else 20), name


@pytest.mark.slow
def test_smoke_calibration_controls_anchor_the_scale(smoke) -> None:
    executed, results = smoke["03_calibration_controls"]
    values = glued(executed)
    assert number(values, "positive_rho") > 0.99 and number(values, "pos_min_rho") > 0.99
    assert abs(number(values, "negative_rho")) < 0.2
    assert number(values, "positive_frac") == pytest.approx(1.0)
    assert values["anchor_sentence"].strip("'").endswith("so the scale is anchored")
    for condition in ("fa", "dfa", "dfa_penalized", "dfa_shuffled"):
        lo, mid, hi = (number(values, f"{condition}_{k}") for k in ("lo", "rho", "hi"))
        assert lo <= mid <= hi
    verdict = pd.read_csv(results / "verdict.csv")
    assert list(verdict.condition) == ["positive", "negative", "fa", "dfa", "dfa_penalized", "dfa_shuffled"]
    table = pd.read_csv(results / "calibration.csv")
    assert set(table.seed) == {0, 1} and set(table.layer) == {0, 1, 2}


@pytest.mark.slow
def test_smoke_fa_diagnostics_verdict_table_and_survival(smoke) -> None:
    executed, results = smoke["04_fa_diagnostics"]
    values = glued(executed)
    table = pd.read_csv(results / "verdict_table.csv", index_col=0)
    assert list(table.index) == ["bp", "fa", "dfa", "dfa_penalized", "dfa_shuffled", "frozen", "init"]
    assert table.loc["frozen", "d_frozen_baseline"] == "skipped"
    survival = pd.read_csv(results / "survival.csv").set_index("method")
    assert survival.loc["bp", "rho"] > 0.99
    accuracy = pd.read_csv(results / "accuracy.csv")
    assert set(accuracy.seed) == {0, 1}
    assert math.isfinite(number(values, "init_stability")) and math.isfinite(number(values, "no_blocks_acc"))


@pytest.mark.parametrize("stem, override, message", [
    ("03_calibration_controls", {"seeds": [0]}, "seeds must have at least 2 items, got [0]."),
    ("03_calibration_controls", {"conditions": ["fa", "dfa"]},
     "conditions must contain positive and negative, got ['fa', 'dfa']."),
    ("04_fa_diagnostics", {"methods": ["sgd"]}, "methods (item 0) must be 'bp', 'fa', 'dfa'"),
])
def test_bad_parameter_fails_in_one_sentence(tmp_path: Path, stem: str, override: dict, message: str) -> None:
    chapter = book.get_chapter(stem, REPO)
    with pytest.raises(MBEInputError) as info:
        book.execute_chapter(chapter, "smoke", override, root=REPO, output=tmp_path / "bad.ipynb",
                             results_dir=tmp_path, progress=False)
    assert f"bad parameter: {message}" in str(info.value)
    assert not (tmp_path / "bad.ipynb").exists()


@pytest.mark.slow
def test_missing_cifar_files_are_named_in_one_sentence(tmp_path: Path) -> None:
    chapter = book.get_chapter("03_calibration_controls", REPO)
    with pytest.raises(book.ChapterError) as info:
        book.execute_chapter(chapter, "smoke", {"dataset": "cifar10", "data_root": str(tmp_path / "none")},
                             root=REPO, output=tmp_path / "cifar.ipynb", results_dir=tmp_path, progress=False)
    assert "MBEInputError: cifar10 files not found in" in str(info.value)
