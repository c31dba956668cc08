"""Reading executed chapter notebooks in tests: cells, sources, glued values, glue roles."""

from __future__ import annotations

import json
import re
from pathlib import Path


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
