"""Reading executed chapter notebooks in tests: cells, sources, glued values, glue roles."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cells(path: Path) -> list[dict]:
    return json.loads(Path(path).read_text(encoding="utf-8"))["cells"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def glued(path: Path) -> dict[str, str]:
    """Glue key -> text/plain value of an executed notebook."""
    found = {}
    for cell in cells(path):
        for out in cell.get("outputs", []):
            record = out.get("metadata", {}).get("scrapbook", {})
            if record.get("name"):
                found[record["name"]] = out["data"].get(record.get("mime_prefix", "") + "text/plain", "")
    return found


def glue_roles(path: Path) -> set[str]:
    """Keys pasted with {glue:text} in the markdown cells."""
    text = "\n".join(source(c) for c in cells(path) if c["cell_type"] == "markdown")
    return {m.split(":")[0] for m in re.findall(r"\{glue:text\}`([^`]+)`", text)}


def copy_book(tmp_path: Path) -> Path:
    """A private copy of the book so runs do not touch the user's _build/ and results/."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "book", root / "book", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    return root
