"""The chapters' parameter schemas (mbe_helpers.chapters.params) and the custom-run folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from mbe_helpers import book
from mbe_helpers.chapters import params
from mbe_helpers.chapters.prose import _GLUED, glued_table
from mbe_helpers.errors import MBEInputError

REPO = Path(__file__).resolve().parents[1]
CHAPTERS = book.discover_chapters(REPO)


def test_every_chapter_has_a_schema_matching_its_parameters_cell() -> None:
    assert {c.stem for c in CHAPTERS} == set(params.SCHEMAS)
    for chapter in CHAPTERS:
        assert set(params.SCHEMAS[chapter.stem].model_fields) == set(chapter.parameters), chapter.stem


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_defaults_and_every_profile_pass_their_schema(chapter) -> None:
    for profile in book.PROFILES:
        values = {**chapter.defaults(), **chapter.profiles.get(profile, {})}
        if values.get("device", "cpu") != "cpu":
            values["device"] = "cpu"          # the paper profile asks for a GPU this machine may lack
        params.check(chapter.stem, values)


@pytest.mark.parametrize("stem, name, value, message", [
    ("00_method", "n", True, "n must be a valid integer, got True."),
    ("00_method", "metric_noise", float("nan"), "metric_noise must be a finite number, got nan."),
    ("00_method", "seed", "1", "seed must be a valid integer, got '1'."),
    ("01_acid_test", "early_epoch", 150, "early_epoch must be below epochs (150), got 150."),
    ("01_acid_test", "sizes", [50, 50, 100], "sizes must not repeat a value, got [50, 50, 100]."),
    ("02_heterogeneous_grid", "audit_epoch", 7, "audit_epoch must be one of probe_epochs"),
    ("02_heterogeneous_grid", "lr_range", [0.1, 1e-4], "lr_range must be [low, high] with low <= high"),
    ("02_heterogeneous_grid", "device", "tpu", "device must be cpu, auto, cuda or cuda:<index>, got 'tpu'."),
    ("03_calibration_controls", "sensitivity_layer", 9, "sensitivity_layer must be a stream state"),
    ("03_calibration_controls", "conditions", ["positive", "negative"],
     "sensitivity_conditions must be listed in conditions too"),
    ("04_fa_diagnostics", "model", "mlp", "model must be 'resmlp' or 'vit', got 'mlp'."),
    ("04_fa_diagnostics", "methods", ["frozen"], "methods must include a trained rule besides frozen"),
    ("05_audit_calibration", "results_dir", " ", "results_dir must be a non-empty path, got ' '."),
])
def test_bad_values_get_one_sentence(stem, name, value, message) -> None:
    chapter = next(c for c in CHAPTERS if c.stem == stem)
    with pytest.raises(MBEInputError) as info:
        params.check(stem, {**chapter.defaults(), name: value})
    text = str(info.value)
    assert text.startswith("bad parameter: ") and message in text and "\n" not in text


def test_unknown_chapter_is_refused() -> None:
    with pytest.raises(MBEInputError, match="no parameter schema for chapter '99_x'"):
        params.check("99_x", {})


def test_custom_runs_get_their_own_folder(tmp_path: Path) -> None:
    chapter = next(c for c in CHAPTERS if c.stem == "00_method")
    same = book.run_location(tmp_path, "smoke", chapter, {"n": 400})     # smoke sets n = 400
    assert same == (book.executed_path(tmp_path, "smoke", chapter), book.results_path(tmp_path, "smoke", chapter))
    out, results = book.run_location(tmp_path, "smoke", chapter, {"n": 500})
    assert results.parent == tmp_path / "results" / "custom" and out.stem == results.name
    assert book.run_location(tmp_path, "smoke", chapter, {"n": 500}) == (out, results)   # stable
    assert book.run_location(tmp_path, "smoke", chapter, {"n": 501})[1] != results


def test_artifact_dir_of_a_plain_papermill_run_is_custom() -> None:
    chapter = next(c for c in CHAPTERS if c.stem == "00_method")
    checked = params.check("00_method", {**chapter.defaults(), "results_dir": None, "n": 333})
    folder = checked.artifact_dir()
    try:
        assert folder.parent == REPO / "results" / "custom" and folder.name.startswith("00_method-")
    finally:
        folder.rmdir()


def test_glued_table_lists_what_the_prose_glues() -> None:
    _GLUED.clear()
    _GLUED.update({"n": 3, "r": 0.123456, "s": "text"})
    assert glued_table().to_dict("list") == {"key": ["n", "r", "s"], "value": ["3", "0.1235", "text"]}
