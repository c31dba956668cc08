"""Chapters 1 and 2 (the FIM_norm case study): contract and smoke execution."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mbe_helpers import book
from mbe_helpers.errors import MBEInputError
from mbe_helpers.probes import BATTERY
from notebooks import cells, glued, source

REPO = Path(__file__).resolve().parents[1]
ACID = REPO / "book" / "01_acid_test.ipynb"
GRID = REPO / "book" / "02_heterogeneous_grid.ipynb"
ROLE = re.compile(r"\{glue:text\}`([^`:]+)(?::([^`]+))?`")


def check_roles(executed: Path) -> dict[str, str]:
    """Every {glue:text} role of the prose was glued; the formatted ones hold numbers."""
    values = glued(executed)
    prose = "\n".join(source(c) for c in cells(executed) if c["cell_type"] == "markdown")
    roles = ROLE.findall(prose)
    assert roles
    for name, spec in roles:
        assert name in values, f"{name} is used in the prose but never glued"
        if spec:
            float(values[name])  # myst-nb formats the value as a number
    return values


@pytest.mark.parametrize("path", [ACID, GRID], ids=["acid", "grid"])
def test_chapter_contract(path: Path) -> None:
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"].get("tags", [])
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    headings = "\n".join(source(c) for c in nb["cells"] if c["cell_type"] == "markdown")
    for heading in ("## Overview", "## Prerequisites", "## Parameters", "## Imports", "## Verdict",
                    "## Summary"):
        assert heading in headings
    assert max(len(source(c).splitlines()) for c in code[1:]) <= 15
    params = book.read_parameters(path)
    assert "results_dir" in params and all(p.comment for p in params.values())
    assert "params = check(" in source(code[1])   # the schema of chapters/params.py
    for cell in code:
        if "savefig" in source(cell):
            assert cell["metadata"]["mystnb"]["figure"]["caption"]


def test_profiles_and_table_of_contents_place_both_chapters() -> None:
    chapters = {c.stem: c for c in book.discover_chapters(REPO)}  # refuses unknown parameters
    for stem in ("01_acid_test", "02_heterogeneous_grid"):
        assert set(chapters[stem].profiles) == {"smoke", "default", "paper"}
    toc = yaml.safe_load((REPO / "_toc.yml").read_text(encoding="utf-8"))
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    numbered = [f for f in files if re.match(r"book/\d\d_", f)]
    # "Can the audit be trusted?" (05) is read right after the method chapter; the rest in order
    assert numbered[:2] == ["book/00_method", "book/05_audit_calibration"]
    assert numbered[2:] == sorted(numbered[2:])
    assert {"book/01_acid_test", "book/02_heterogeneous_grid"} <= set(numbered)


def run(name: str, tmp: Path, overrides: dict | None = None, results: Path | None = None) -> Path:
    chapter = book.get_chapter(name, REPO)
    return book.execute_chapter(chapter, "smoke", overrides, root=REPO,
                                output=tmp / f"{chapter.stem}.ipynb",
                                results_dir=results or tmp / "results", progress=False)


@pytest.fixture(scope="module")
def acid_smoke(smoke_chapter) -> tuple[Path, Path]:
    return smoke_chapter("01_acid_test")


@pytest.fixture(scope="module")
def grid_smoke(smoke_chapter) -> tuple[Path, Path]:
    return smoke_chapter("02_heterogeneous_grid")


@pytest.mark.slow
def test_acid_test_smoke_run(acid_smoke) -> None:
    executed, results = acid_smoke
    values = check_roles(executed)
    assert values["n_configs"] == "10" and values["n_reused"] == "0"  # (3 + 3 - 1) x 2 seeds
    assert int(values["n_ok"]) + int(values["n_not_ok"]) == 10
    verdict = pd.read_csv(results / "verdict.csv")
    expected = {f"{m}@{e}" for m in (*BATTERY, "val_loss") for e in (5, 30)}
    assert set(verdict.metric) == expected and set(verdict.verdict) <= {"PASS", "FAIL"}
    table = pd.read_csv(results / "acid_test.csv")
    assert set(table.probe) == {"capacity", "noise"} and (table.n_conditions == 3).all()
    for name in ("ledger.jsonl", "runs.csv", "probes.png", "rho.png"):
        assert (results / name).stat().st_size > 0
    assert values["fim_end_verdict"].strip("'") in {"PASS", "FAIL"}


@pytest.mark.slow
def test_heterogeneous_grid_smoke_run(grid_smoke) -> None:
    executed, results = grid_smoke
    values = check_roles(executed)
    assert values["n_runs"] == "16" and values["n_reused"] == "0"
    summary = pd.read_csv(results / "audit_summary.csv")
    assert list(summary.metric) == [*BATTERY, "positive_control"]
    assert {"class_baseline", "class_design", "class_both", "perm_p_both", "q_both"} <= set(summary)
    controls = pd.read_csv(results / "controls.csv")
    assert list(controls.control) == ["positive"]     # the placebos judge the audit's size
    placebos = pd.read_csv(results / "placebos.csv")
    assert set(placebos.audit) == {"baseline", "design", "both"} and set(placebos.kind) <= {"noise", "proxy", "twin"}
    replication = pd.read_csv(results / "replication.csv")
    assert list(replication.given) == ["lr, weight_decay", "val_loss@10"] and replication.n.eq(40).all()
    assert {"replication_raw_r", "replication_partial_r", "replication_class", "placebo_rate",
            "proxy_placebo_rate"} <= set(values)
    temporal = pd.read_csv(results / "temporal.csv")
    assert sorted(set(temporal.epoch)) == [5, 10, 20]
    for name in ("ledger.jsonl", "configs.csv", "design.png", "audit.png", "fim_norm.png",
                 "temporal.png", "audit_both.csv"):
        assert (results / name).stat().st_size > 0


@pytest.mark.slow
def test_heterogeneous_grid_rerun_with_fewer_runs_reuses_the_ledger(grid_smoke, tmp_path) -> None:
    _, results = grid_smoke
    executed = run("heterogeneous_grid", tmp_path, {"n_runs": 15}, results=results)
    values = glued(executed)
    assert values["n_runs"] == "15" and values["n_reused"] == "15" and values["n_trained"] == "0"


def test_bad_parameter_fails_in_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(MBEInputError, match=r"^bad parameter: n_seeds must be greater than or equal "
                                            r"to 2, got 1\.$"):
        run("acid_test", tmp_path, {"n_seeds": 1})
