"""The method chapter (book/00_method.ipynb): contract and smoke execution."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from mbe_helpers import book
from mbe_helpers.errors import MBEInputError
from mbe_helpers.simulate import EXPECTED_CLASSES
from notebooks import cells, glued, source

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "book" / "00_method.ipynb"


def test_first_code_cell_is_tagged_parameters_and_outputs_are_stripped() -> None:
    code = [c for c in cells(NOTEBOOK) if c["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"].get("tags", [])
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)
    assert json.loads(NOTEBOOK.read_text())["metadata"]["kernelspec"]["name"] == "python3"


def test_sections_of_the_contract_are_present() -> None:
    headings = "\n".join(source(c) for c in cells(NOTEBOOK) if c["cell_type"] == "markdown")
    for heading in ("## Overview", "## Prerequisites", "## Imports", "## Verdict", "## Summary"):
        assert heading in headings


def test_cells_are_short() -> None:
    assert max(len(source(c).splitlines()) for c in cells(NOTEBOOK) if c["cell_type"] == "code") <= 15


def test_every_glue_role_has_a_glue_call() -> None:
    import re

    text = "\n".join(source(c) for c in cells(NOTEBOOK))
    roles = {m.split(":")[0] for m in re.findall(r"\{glue:text\}`([^`]+)`", text)}
    static = set(re.findall(r'glue\("(\w+)"', text))
    dynamic = {f"{m}_{col}" for m in EXPECTED_CLASSES
               for col in ("raw_r", "raw_lo", "raw_hi", "partial_r", "partial_lo", "partial_hi", "class")}
    assert roles and roles <= static | dynamic


@pytest.fixture(scope="module")
def smoke_run(smoke_chapter) -> tuple[Path, Path]:
    return smoke_chapter("00_method")


@pytest.mark.slow
def test_smoke_run_classifies_the_four_cases_as_expected(smoke_run) -> None:
    executed, results = smoke_run
    verdict = pd.read_csv(results / "verdict.csv", index_col="metric")
    assert verdict.observed.to_dict() == EXPECTED_CLASSES
    values = glued(executed)
    assert values["n_match"] == "4" and values["n_cases"] == "4"
    assert values["verdict_sentence"].strip("'") == "every case received the class its construction implies"
    assert float(values["simpson_metric_raw_r"]) < 0 < float(values["simpson_metric_partial_r"])
    assert float(values["within_min"]) > 0


@pytest.mark.slow
def test_smoke_run_writes_artifacts_with_bootstrap_intervals(smoke_run) -> None:
    _, results = smoke_run
    table = pd.read_csv(results / "audit.csv")
    assert len(table) == 4 and (table.n == 400).all()
    assert (table.raw_lo <= table.raw_r).all() and (table.raw_r <= table.raw_hi).all()
    for metric in EXPECTED_CLASSES:
        assert (results / f"{metric}.png").stat().st_size > 10_000


@pytest.mark.slow
def test_bad_parameter_fails_in_one_sentence(tmp_path: Path) -> None:
    chapter = book.get_chapter("method", REPO)
    with pytest.raises(MBEInputError, match=r"^bad parameter: n must be greater than or equal to 50, "
                                            r"got 10\.$"):
        book.execute_chapter(chapter, "smoke", {"n": 10}, root=REPO, output=tmp_path / "bad.ipynb",
                             results_dir=tmp_path, progress=False)
    assert not (tmp_path / "bad.ipynb").exists()      # refused before a kernel started


@pytest.mark.slow
def test_plain_papermill_gets_the_same_sentence(tmp_path: Path) -> None:
    """The notebook's validation cell calls the same schema, so papermill users read the same message."""
    import papermill as pm

    with pytest.raises(pm.PapermillExecutionError) as info:
        pm.execute_notebook(REPO / "book" / "00_method.ipynb", tmp_path / "out.ipynb",
                            parameters={"n": 10}, kernel_name="python3", progress_bar=False,
                            cwd=str(REPO / "book"))
    assert info.value.evalue == "bad parameter: n must be greater than or equal to 50, got 10."
