"""Where things run: the repository root, artifact and data folders, devices, seeds, progress bars.

Every chapter and every executor (in process, process pools, Dask workers)
resolves paths and devices through these few functions, so a relative
``data_root`` or ``results_dir`` means the same folder wherever the code runs:
it is taken from the repository root (the nearest folder upward holding
``_toc.yml`` and ``book/``, else the folder above an editable install), and
from the current folder only when there is no repository. torch is imported
only by the functions that need it.

Examples
--------
>>> resolve_device("cpu")
'cpu'
>>> resolve_data_root("/data/mnist").as_posix()
'/data/mnist'
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mbe_helpers.errors import MBEInputError

_RNG_LOCK = threading.RLock()   # guards torch's global RNG (model init, dropout) across threads


# ---------------------------------------------------------------------- folders
def is_book_root(path: Path) -> bool:
    """True when ``path`` holds ``_toc.yml`` and a ``book/`` folder.

    Examples
    --------
    >>> import tempfile
    >>> is_book_root(find_root()), is_book_root(Path(tempfile.mkdtemp()))
    (True, False)
    """
    return (path / "_toc.yml").is_file() and (path / "book").is_dir()


def find_root(start: str | Path | None = None) -> Path:
    """Find the repository root: the nearest folder upward holding ``_toc.yml`` and ``book/``.

    Falls back to the folder above the installed package (editable install).

    Raises
    ------
    MBEInputError
        When no such folder exists.

    Examples
    --------
    >>> is_book_root(find_root())
    True
    """
    start = Path(start or Path.cwd()).resolve()
    for candidate in (start, *start.parents):
        if is_book_root(candidate):
            return candidate
    package_parent = Path(__file__).resolve().parents[1]
    if is_book_root(package_parent):
        return package_parent
    raise MBEInputError(
        f"no book found above {start}: run inside the repository "
        "(a folder with _toc.yml and book/) or pass --root."
    )


def _from_root(path: Path) -> Path:
    if path.is_absolute():
        return path
    try:
        return find_root() / path
    except MBEInputError:
        return Path.cwd() / path


def resolve_results_dir(results_dir: str | Path) -> Path:
    """Return the chapter's artifact folder, created if missing (relative: from the repository root).

    Examples
    --------
    >>> import tempfile
    >>> folder = resolve_results_dir(Path(tempfile.mkdtemp()) / "a" / "b")
    >>> folder.is_dir()
    True
    """
    path = _from_root(Path(results_dir))
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_data_root(data_root: str | Path | None = None) -> Path:
    """Folder of downloaded data sets: ``data_root``, else ``$MBE_DATA_ROOT``, else ``data/``.

    A relative folder is taken from the repository root, so a chapter's
    kernel (started in ``book/``) and a Dask worker read the same files.

    Examples
    --------
    >>> resolve_data_root("data") == find_root() / "data"
    True
    """
    chosen = data_root if data_root is not None else os.environ.get("MBE_DATA_ROOT") or "data"
    return _from_root(Path(chosen))


# ---------------------------------------------------------------------- devices
def resolve_device(device: str) -> str:
    """``"auto"`` becomes ``"cuda"`` when a GPU is visible, else ``"cpu"``; other names pass through.

    Examples
    --------
    >>> resolve_device("cuda:1")
    'cuda:1'
    """
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def seeded(seed: int, device: str | Any = "cpu") -> Iterator[None]:
    """Run a block on torch's global RNG seeded with ``seed``, then restore it (thread-safe).

    Examples
    --------
    >>> import torch
    >>> with seeded(3):
    ...     a = torch.rand(2)
    >>> with seeded(3):
    ...     b = torch.rand(2)
    >>> bool((a == b).all())
    True
    """
    import torch

    device = torch.device(device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with _RNG_LOCK, torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)
        yield


# ---------------------------------------------------------------- progress bars
def progress(iterable=None, *, total: int | None = None, initial: int = 0, desc: str = "",
             unit: str = "it", enabled: bool = True):
    """A tqdm bar over ``iterable`` (or a manual one of ``total``), shown where someone can see it.

    Shown only when ``enabled`` and in a notebook or a terminal; ``tqdm.auto``
    is imported without its warning about missing ipywidgets (it would land in
    an executed chapter), and a disabled bar never touches ``tqdm.notebook``.

    Examples
    --------
    >>> list(progress([1, 2], desc="x", enabled=False))
    [1, 2]
    """
    if not enabled:
        from tqdm.std import tqdm as plain_tqdm

        return plain_tqdm(iterable, total=total, initial=initial, disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from tqdm.auto import tqdm
    try:
        from tqdm.notebook import tqdm as notebook_tqdm

        in_notebook = issubclass(tqdm, notebook_tqdm)
    except ImportError:
        in_notebook = False
    shown = in_notebook or sys.stderr.isatty()
    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, disable=not shown)
