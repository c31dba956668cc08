"""environment.yml (conda users) installs the same project as pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def load() -> tuple[dict, dict]:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return env, project


def pip_section(env: dict) -> list[str]:
    sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(sections) == 1, "environment.yml needs exactly one pip section"
    return sections[0]


def test_environment_pins_python_311_and_pip() -> None:
    env, project = load()
    plain = [d for d in env["dependencies"] if isinstance(d, str)]
    assert "python=3.11" in plain and "pip" in plain
    assert project["requires-python"] == ">=3.11"


def test_pip_section_installs_the_project_with_its_extras() -> None:
    env, project = load()
    editable = [line for line in pip_section(env) if line.startswith("-e ")]
    assert len(editable) == 1
    match = re.fullmatch(r"-e \.\[([\w,-]+)\]", editable[0])
    assert match, editable[0]
    extras = set(match.group(1).split(","))
    assert extras == {"book", "dev"}  # as `make venv`; both bring the torch, dask, mlflow and parquet extras
    assert set(project["optional-dependencies"]) == {"torch", "dask", "mlflow", "parquet", "book", "dev"}
    for extra in extras:
        assert "mbe-helpers[torch,dask,mlflow,parquet]" in project["optional-dependencies"][extra]


def test_pip_section_uses_the_tested_constraints() -> None:
    env, _ = load()
    assert "-c constraints.txt" in pip_section(env)
    assert (REPO / "constraints.txt").is_file()
