"""Shared fixtures: the whole book built once per test session under the smoke profile."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smoke_book(tmp_path_factory) -> Path:
    """A copy of the repository's book, every chapter executed (smoke) and the site built.

    Returns the root of the copy: ``_build/html``, ``_build/executed/smoke`` and
    ``results/smoke`` are inside it; the real ``_build`` is never touched.
    """
    from mbe_helpers import book

    root = tmp_path_factory.mktemp("smoke") / "repo"
    root.mkdir()
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "book", root / "book", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    saved = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "Agg"        # as under `make`: figures must still reach the notebooks
    try:
        book.build_book(root, "smoke", progress=False)
    finally:
        os.environ.pop("MPLBACKEND") if saved is None else os.environ.update(MPLBACKEND=saved)
    return root


@pytest.fixture(scope="session")
def smoke_chapter(smoke_book: Path):
    """``stem -> (executed notebook, results folder)`` of a chapter in the session's smoke build."""

    def outputs(stem: str) -> tuple[Path, Path]:
        return (smoke_book / "_build" / "executed" / "smoke" / f"{stem}.ipynb",
                smoke_book / "results" / "smoke" / stem)

    return outputs


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest, and most reproducibly, on one torch thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
