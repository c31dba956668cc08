"""The book machinery: chapter registry, profiles, headless runs, site build.

A *chapter* is a notebook ``book/NN_name.ipynb`` (``NN`` two digits). Its
first code cell is tagged ``parameters``; every assignment in that cell is a
parameter, its literal value is the default and its trailing comment the
one-line description. ``book/profiles.yml`` holds, per chapter, the overrides
of the three profiles::

    00_method:
      smoke: {n: 400, n_bootstrap: 200}
      default: {}           # the notebook defaults
      paper: {n: 2000}

Nothing here is specific to a chapter: a new notebook in ``book/`` (and,
optionally, its entry in ``profiles.yml``) is all a chapter needs.

Running a chapter executes it with papermill and the ``python3`` kernel, in
the ``book/`` folder, writing ``_build/executed/<profile>/<chapter>.ipynb``;
the runner injects ``results_dir = results/<profile>/<chapter>`` (relative to
the repository root). Parameters are checked against the chapter's schema
(:mod:`mbe_helpers.chapters.params`) before a kernel starts. A run whose
parameters differ from its profile's is a *custom* run: it goes to
``_build/executed/custom/<chapter>-<digest>.ipynb`` and
``results/custom/<chapter>-<digest>/`` and never touches a profile's files.
A notebook is executed into a temporary file and replaces the previous one
only when every cell ran; a failed run is kept as ``<chapter>.failed.ipynb``.
Building the book runs every chapter, stages the executed notebooks next to
``_config.yml``, ``_toc.yml`` and the pages in ``_build/stage/`` with
execution switched off, and calls ``jupyter-book build`` (1.x) so that the
site lands in ``_build/html/``. This module knows nothing of statistics.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import json
import re
import shutil
import subprocess
import sys
import tokenize
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mbe_helpers.errors import MBEInputError, require_extra
from mbe_helpers.runtime import find_root, is_book_root, resolve_results_dir  # noqa: F401 (re-exported)

PROFILES = ("smoke", "default", "paper")
KERNEL = "python3"
#: Quiet the kernel process log (TCP warning, interrupt at shutdown); cell errors still surface.
KERNEL_ARGS = ["--IPKernelApp.log_level=CRITICAL"]
CHAPTER_RE = re.compile(r"^(\d\d)_(\w+)$")
ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


class ChapterError(RuntimeError):
    """A chapter raised while executing; the message names the chapter and the cell error.

    Examples
    --------
    >>> import json, tempfile
    >>> nb = Path(tempfile.mkdtemp()) / "00_x.ipynb"
    >>> error = {"output_type": "error", "ename": "ValueError", "evalue": "n < 1"}
    >>> _ = nb.write_text(json.dumps({"cells": [{"cell_type": "code", "outputs": [error]}]}))
    >>> stage_book(nb.parent, [nb])
    Traceback (most recent call last):
    ...
    mbe_helpers.book.ChapterError: executed notebook 00_x.ipynb holds an error output (ValueError: n < 1).
    """


class BuildError(RuntimeError):
    """jupyter-book refused the staged book; the message quotes the first problem.

    Examples
    --------
    >>> issubclass(BuildError, RuntimeError), issubclass(BuildError, MBEInputError)
    (True, False)
    """


@dataclass(frozen=True)
class Parameter:
    """One knob of a chapter, read from its ``parameters`` cell.

    Examples
    --------
    >>> Parameter("n", 500, "number of simulated runs")
    Parameter(name='n', default=500, comment='number of simulated runs')
    """

    name: str
    default: Any
    comment: str = ""


@dataclass(frozen=True)
class Chapter:
    """A notebook of the book with its parameters and profile overrides.

    Attributes
    ----------
    stem : str
        File stem, e.g. ``"00_method"``; names the executed notebook and the
        results folder.
    path : Path
        The source notebook.
    parameters : dict of str to Parameter
        In the order of the ``parameters`` cell.
    profiles : dict of str to dict
        Overrides per profile (``smoke``, ``default``, ``paper``).

    Examples
    --------
    >>> params = {"n": Parameter("n", 500), "seed": Parameter("seed", 0)}
    >>> ch = Chapter("00_method", Path("book/00_method.ipynb"), params, {"smoke": {"n": 400}})
    >>> ch.name, ch.defaults(), ch.profiles["smoke"]
    ('method', {'n': 500, 'seed': 0}, {'n': 400})
    """

    stem: str
    path: Path
    parameters: dict[str, Parameter] = field(default_factory=dict)
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Short name without the number prefix, e.g. ``"method"``."""
        return self.stem.split("_", 1)[1]

    def defaults(self) -> dict[str, Any]:
        """Notebook defaults of every parameter."""
        return {p.name: p.default for p in self.parameters.values()}


# ---------------------------------------------------------------- parameters
def _comments_by_line(source: str) -> dict[int, str]:
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT}


def parse_parameters_cell(source: str) -> dict[str, Parameter]:
    """Parse the assignments of a ``parameters`` cell.

    Each ``name = literal  # comment`` line gives one :class:`Parameter`; a
    comment on the line above is used when the line has none. A value that is
    not a Python literal is kept as its source text.

    Examples
    --------
    >>> cell = '''n = 500          # number of runs
    ... # noise of the metric
    ... metric_noise = 0.5
    ... model = make_model()'''
    >>> for p in parse_parameters_cell(cell).values():
    ...     print(p)
    Parameter(name='n', default=500, comment='number of runs')
    Parameter(name='metric_noise', default=0.5, comment='noise of the metric')
    Parameter(name='model', default='make_model()', comment='')
    """
    tree = ast.parse(source)
    comments = _comments_by_line(source)
    params: dict[str, Parameter] = {}
    for node in tree.body:
        target = _single_target(node)
        if target is None:
            continue
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            value = ast.get_source_segment(source, node.value)
        comment = comments.get(node.end_lineno) or comments.get(node.lineno - 1, "")
        params[target] = Parameter(target, value, comment)
    return params


def _single_target(node: ast.stmt) -> str | None:
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
        target = node.targets[0]
    elif isinstance(node, ast.AnnAssign) and node.value is not None:
        target = node.target
    else:
        return None
    return target.id if isinstance(target, ast.Name) else None


def read_parameters(notebook: str | Path) -> dict[str, Parameter]:
    """Parameters of a notebook (empty when it has no ``parameters`` cell).

    Examples
    --------
    >>> import json, tempfile
    >>> source = '''n = 500  # number of runs
    ... seed = 0'''
    >>> cell = {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": source}
    >>> nb = Path(tempfile.mkdtemp()) / "00_x.ipynb"
    >>> _ = nb.write_text(json.dumps({"cells": [cell]}))
    >>> {name: p.default for name, p in read_parameters(nb).items()}
    {'n': 500, 'seed': 0}
    """
    nb = json.loads(Path(notebook).read_text(encoding="utf-8"))
    for cell in nb.get("cells", []):
        tags = cell.get("metadata", {}).get("tags", [])
        if cell.get("cell_type") == "code" and "parameters" in tags:
            source = cell["source"]
            return parse_parameters_cell("".join(source) if isinstance(source, list) else source)
    return {}


def parse_value(text: str) -> Any:
    """Parse a command-line value as YAML 1.1 (``200`` -> int, ``[1, 2]`` -> list, ``on`` -> True).

    ``null``, ``~`` and ``None`` give None; YAML 1.1 reads ``on``, ``off``,
    ``yes`` and ``no`` as booleans. Numbers in scientific notation that YAML
    1.1 leaves as text (``1e-3``, ``1.0e3``) are read as floats, also inside
    lists. Text that is not valid YAML stays a string.

    Examples
    --------
    >>> parse_value("200"), parse_value("[1, 2]"), parse_value("0.001"), parse_value("None")
    (200, [1, 2], 0.001, None)
    >>> parse_value("on"), parse_value("1e-3"), parse_value("[1e-5, 1e-3]"), parse_value("{a: 1")
    (True, 0.001, [1e-05, 0.001], '{a: 1')
    """
    if text.strip() == "None":
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if value is None and text.strip() not in ("null", "~"):
        return text
    return _scientific(value)


def _scientific(value: Any) -> Any:
    """Strings such as ``1e-3`` (scientific notation YAML 1.1 does not read) as floats."""
    if isinstance(value, list):
        return [_scientific(v) for v in value]
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
        return float(value)
    return value


def check_value(chapter: Chapter, name: str, value: Any) -> None:
    """Refuse a value whose type does not fit the parameter's default.

    ints are accepted for floats; a default of ``None`` accepts anything.

    Examples
    --------
    >>> params = {"n": Parameter("n", 500), "lr": Parameter("lr", 0.1)}
    >>> ch = Chapter("00_x", Path("x.ipynb"), params)
    >>> check_value(ch, "lr", 1)          # an int is fine for a float
    >>> check_value(ch, "n", "many")
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: parameter 'n' of chapter 00_x expects int (default 500), got ...
    """
    default = chapter.parameters[name].default
    if default is None or value is None:
        return
    expected = type(default)
    ok = isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool)
    if expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise MBEInputError(
            f"parameter {name!r} of chapter {chapter.stem} expects {expected.__name__} "
            f"(default {default!r}), got {value!r}."
        )


def check_profile(profile: str) -> None:
    """Refuse an unknown profile name in one sentence.

    Examples
    --------
    >>> check_profile("smoke")
    >>> check_profile("fast")
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: unknown profile 'fast'; known profiles: smoke, default, paper.
    """
    if profile not in PROFILES:
        raise MBEInputError(f"unknown profile {profile!r}; known profiles: {', '.join(PROFILES)}.")


def check_names(chapter: Chapter, names: Iterable[str], where: str = "") -> None:
    """Refuse parameter names the chapter does not declare, listing the known ones.

    Examples
    --------
    >>> ch = Chapter("00_x", Path("x.ipynb"), {"n": Parameter("n", 500)})
    >>> check_names(ch, ["n"])
    >>> check_names(ch, ["m"], where=" in profiles.yml (smoke)")
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: unknown parameter 'm' in profiles.yml (smoke) for chapter ...
    """
    for name in names:
        if name not in chapter.parameters:
            known = ", ".join(chapter.parameters) or "none"
            raise MBEInputError(
                f"unknown parameter {name!r}{where} for chapter {chapter.stem}; "
                f"known parameters: {known}."
            )


def resolve_parameters(chapter: Chapter, profile: str = "default",
                       overrides: Mapping[str, Any] | None = None,
                       results_dir: str | Path | None = None) -> dict[str, Any]:
    """Parameters to inject: profile overrides, then ``overrides``, then ``results_dir``.

    ``results_dir`` is only injected when the chapter declares it and the
    caller did not override it.

    Examples
    --------
    >>> ch = Chapter("00_x", Path("x.ipynb"),
    ...              {"n": Parameter("n", 500), "seed": Parameter("seed", 0),
    ...               "results_dir": Parameter("results_dir", None)}, {"smoke": {"n": 100}})
    >>> resolve_parameters(ch, "smoke", {"seed": 1}, results_dir="results/smoke/00_x")
    {'n': 100, 'seed': 1, 'results_dir': 'results/smoke/00_x'}
    >>> resolve_parameters(ch, "default")
    {}
    """
    check_profile(profile)
    overrides = dict(overrides or {})
    check_names(chapter, overrides)
    params = {**chapter.profiles.get(profile, {}), **overrides}
    if results_dir is not None and "results_dir" in chapter.parameters:
        params.setdefault("results_dir", str(results_dir))
    check_parameters(chapter, params)
    return params


def check_parameters(chapter: Chapter, params: Mapping[str, Any]) -> None:
    """Check the chapter's full parameter set (defaults, then ``params``) before a kernel starts.

    Chapters of this book are checked by their schema in
    :data:`mbe_helpers.chapters.params.SCHEMAS`; a notebook added without one
    gets the type check of :func:`check_value`.

    Examples
    --------
    >>> check_parameters(get_chapter("00_method"), {"n": 200})
    >>> check_parameters(get_chapter("00_method"), {"n": 10})
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: bad parameter: n must be greater than or equal to 50, got 10.
    """
    from mbe_helpers.chapters import params as schemas

    if chapter.stem in schemas.SCHEMAS:
        schemas.check(chapter.stem, {**chapter.defaults(), **params})
        return
    for name, value in params.items():
        check_value(chapter, name, value)


def parameter_digest(chapter: Chapter, params: Mapping[str, Any]) -> str:
    """Eight hex digits naming the full parameter set of a run (``results_dir`` left out).

    Examples
    --------
    >>> ch = Chapter("00_x", Path("x.ipynb"), {"n": Parameter("n", 1)})
    >>> parameter_digest(ch, {"n": 2}) == parameter_digest(ch, {"n": 2, "results_dir": "a"})
    True
    """
    from mbe_helpers.chapters.params import digest

    return digest({**chapter.defaults(), **params})


def run_location(root: str | Path, profile: str, chapter: Chapter,
                 overrides: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """``(executed notebook, artifact folder)`` of a run.

    The profile's own paths when the overrides leave every parameter as the
    profile sets it; otherwise ``_build/executed/custom/<stem>-<digest>.ipynb``
    and ``results/custom/<stem>-<digest>``.

    Examples
    --------
    >>> ch = Chapter("00_x", Path("x.ipynb"), {"n": Parameter("n", 1)}, {"smoke": {"n": 2}})
    >>> [p.as_posix() for p in run_location("r", "smoke", ch, {"n": 2})]
    ['r/_build/executed/smoke/00_x.ipynb', 'r/results/smoke/00_x']
    >>> run_location("r", "smoke", ch, {"n": 3})[1].as_posix()
    'r/results/custom/00_x-4ba3321a'
    """
    profile_values = {**chapter.profiles.get(profile, {})}
    given = {k: v for k, v in (overrides or {}).items() if k != "results_dir"}
    if all(profile_values.get(k, chapter.defaults().get(k)) == v for k, v in given.items()):
        return executed_path(root, profile, chapter), results_path(root, profile, chapter)
    name = f"{chapter.stem}-{parameter_digest(chapter, {**profile_values, **given})}"
    return (Path(root) / "_build" / "executed" / "custom" / f"{name}.ipynb",
            Path(root) / "results" / "custom" / name)


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to the repository root when inside it (no machine paths in the book)."""
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(Path(path).resolve())


# ------------------------------------------------------------------ registry
def load_profiles(root: str | Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Read ``book/profiles.yml``: chapter -> profile -> overrides (empty when absent).

    Examples
    --------
    >>> import tempfile
    >>> load_profiles(find_root())["00_method"]["smoke"]
    {'n': 400, 'n_bootstrap': 200}
    >>> load_profiles(tempfile.mkdtemp())          # no book/profiles.yml
    {}
    """
    path = Path(root) / "book" / "profiles.yml"
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    entries = data.values() if isinstance(data, dict) else [None]
    overrides = [o for v in entries if isinstance(v, dict) for o in v.values()]
    if not isinstance(data, dict) or not all(isinstance(v, dict | None) for v in entries) \
            or not all(isinstance(o, dict | None) for o in overrides):
        raise MBEInputError(f"{path} must map chapter -> profile -> {{parameter: value}}.")
    return {str(k): {str(p): dict(o or {}) for p, o in (v or {}).items()} for k, v in data.items()}


def discover_chapters(root: str | Path | None = None) -> list[Chapter]:
    """All chapters ``book/NN_*.ipynb`` of the book at ``root``, in file order.

    Profile entries are checked: an unknown chapter, profile or parameter in
    ``profiles.yml`` is refused in one sentence.

    Examples
    --------
    >>> [chapter.stem for chapter in discover_chapters()][:3]
    ['00_method', '01_acid_test', '02_heterogeneous_grid']
    """
    root = Path(root) if root is not None else find_root()
    if not is_book_root(root):
        raise MBEInputError(f"{root} is not the root of a book (it needs _toc.yml and book/).")
    paths = sorted(p for p in (root / "book").glob("*.ipynb") if CHAPTER_RE.match(p.stem))
    profiles = load_profiles(root)
    chapters = []
    for path in paths:
        entry = profiles.pop(path.stem, None) or profiles.pop(path.stem.split("_", 1)[1], {})
        chapter = Chapter(path.stem, path, read_parameters(path), entry)
        for profile, overrides in entry.items():
            check_profile(profile)
            check_names(chapter, overrides, where=f" in profiles.yml ({profile})")
        chapters.append(chapter)
    if profiles:
        raise MBEInputError(
            f"profiles.yml names chapter {next(iter(profiles))!r}, which is not in book/; "
            f"chapters: {', '.join(c.stem for c in chapters) or 'none'}."
        )
    return chapters


def get_chapter(name: str, root: str | Path | None = None) -> Chapter:
    """Look a chapter up by stem (``00_method``), short name (``method``) or file name.

    Examples
    --------
    >>> get_chapter("method").stem, get_chapter("book/01_acid_test.ipynb").name
    ('00_method', 'acid_test')
    >>> get_chapter("appendix")
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: unknown chapter 'appendix'; known chapters: 00_method, ...
    """
    key = Path(name).name.removesuffix(".ipynb")
    chapters = discover_chapters(root)
    for chapter in chapters:
        if key in (chapter.stem, chapter.name):
            return chapter
    known = ", ".join(c.stem for c in chapters) or "none"
    raise MBEInputError(f"unknown chapter {name!r}; known chapters: {known}.")


# ----------------------------------------------------------------- execution
def executed_path(root: str | Path, profile: str, chapter: Chapter) -> Path:
    """Where the executed notebook of ``chapter`` goes: ``_build/executed/<profile>/<stem>.ipynb``.

    Examples
    --------
    >>> ch = Chapter("00_method", Path("book/00_method.ipynb"))
    >>> executed_path("repo", "smoke", ch).as_posix()
    'repo/_build/executed/smoke/00_method.ipynb'
    """
    return Path(root) / "_build" / "executed" / profile / f"{chapter.stem}.ipynb"


def results_path(root: str | Path, profile: str, chapter: Chapter) -> Path:
    """Artifact folder of ``chapter``: ``results/<profile>/<stem>``.

    Examples
    --------
    >>> ch = Chapter("00_method", Path("book/00_method.ipynb"))
    >>> results_path("repo", "smoke", ch).as_posix()
    'repo/results/smoke/00_method'
    """
    return Path(root) / "results" / profile / chapter.stem


def execute_chapter(chapter: Chapter, profile: str = "default",
                    overrides: Mapping[str, Any] | None = None, *,
                    root: str | Path | None = None, output: str | Path | None = None,
                    results_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Execute one chapter headless with papermill and return the executed notebook.

    Parameters
    ----------
    chapter : Chapter
    profile : {"smoke", "default", "paper"}
    overrides : mapping, optional
        Parameter values on top of the profile.
    root : path, optional
        Repository root (default: found from the current directory).
    output, results_dir : path, optional
        Defaults :func:`executed_path` and :func:`results_path`.
    progress : bool
        Show a tqdm bar (one tick per cell) labelled with the chapter.

    Raises
    ------
    ChapterError
        When a cell raises; the partly executed notebook is kept.

    Examples
    --------
    >>> chapter = get_chapter("method")
    >>> executed_path(find_root(), "smoke", chapter).relative_to(find_root()).as_posix()
    '_build/executed/smoke/00_method.ipynb'
    >>> execute_chapter(chapter, "smoke", {"n": 10})      # refused before a kernel starts
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: bad parameter: n must be greater than or equal to 50, got 10.
    """
    root = Path(root) if root is not None else find_root()
    default_output, default_results = run_location(root, profile, chapter, overrides)
    output = Path(output) if output else default_output
    results = Path(results_dir) if results_dir else default_results
    params = resolve_parameters(chapter, profile, overrides, _relative(results, root))
    output.parent.mkdir(parents=True, exist_ok=True)
    require_extra("papermill", "book", "executing a chapter")
    import papermill as pm  # heavy; only for runs

    bar = {"desc": chapter.stem, "leave": True} if progress else False
    running = output.with_name(f".{output.stem}.running.ipynb")
    failed = output.with_name(f"{output.stem}.failed.ipynb")
    try:
        with _inline_figures():
            pm.execute_notebook(chapter.path, running, parameters=params, kernel_name=KERNEL,
                                cwd=str(chapter.path.parent), progress_bar=bar, log_output=False,
                                extra_arguments=KERNEL_ARGS)
    except pm.PapermillExecutionError as exc:
        os.replace(running, failed)
        raise ChapterError(
            f"chapter {chapter.stem} failed in cell [{exc.exec_count}] with "
            f"{exc.ename}: {_first_line(exc.evalue).rstrip('.')} (failed notebook kept at {failed}; "
            f"the previous {output.name} is untouched)."
        ) from None
    except Exception as exc:  # kernel missing, bad notebook, ...
        if running.exists():
            os.replace(running, failed)
        raise ChapterError(
            f"chapter {chapter.stem} could not run: {type(exc).__name__}: {_first_line(str(exc))}."
        ) from exc
    os.replace(running, output)
    failed.unlink(missing_ok=True)
    return output


@contextlib.contextmanager
def _inline_figures():
    """Let the kernel show figures inline even when the caller set ``MPLBACKEND`` (e.g. Agg).

    The kernel inherits the environment; a non-interactive backend there
    would silently drop every figure from the executed notebook.
    """
    saved = os.environ.pop("MPLBACKEND", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["MPLBACKEND"] = saved


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def run_chapters(chapters: Sequence[Chapter], profile: str = "default", *,
                 root: str | Path | None = None, progress: bool = True) -> list[Path]:
    """Execute chapters in order; the first failure stops the run (earlier outputs stay).

    Examples
    --------
    >>> run_chapters(discover_chapters(), "fast")         # refused before any chapter runs
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: unknown profile 'fast'; known profiles: smoke, default, paper.
    """
    return [execute_chapter(ch, profile, root=root, progress=progress) for ch in chapters]


def notebook_errors(notebook: str | Path) -> list[str]:
    """Error outputs of an executed notebook, skipping cells tagged ``raises-exception``.

    Examples
    --------
    >>> import json, tempfile
    >>> error = {"output_type": "error", "ename": "ValueError", "evalue": "n must be positive"}
    >>> expected = {"cell_type": "code", "metadata": {"tags": ["raises-exception"]},
    ...             "outputs": [error]}
    >>> cells = [{"cell_type": "code", "outputs": [error]}, expected]
    >>> nb = Path(tempfile.mkdtemp()) / "00_x.ipynb"
    >>> _ = nb.write_text(json.dumps({"cells": cells}))
    >>> notebook_errors(nb)
    ['ValueError: n must be positive']
    """
    nb = json.loads(Path(notebook).read_text(encoding="utf-8"))
    found = []
    for cell in nb.get("cells", []):
        if "raises-exception" in cell.get("metadata", {}).get("tags", []):
            continue
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                found.append(f"{out.get('ename')}: {_first_line(out.get('evalue', ''))}")
    return found


# ------------------------------------------------------------------- staging
def _toc_files(node: Any) -> set[str]:
    if isinstance(node, dict):
        own = {str(node["file"])} if "file" in node else set()
        return own.union(*(_toc_files(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_toc_files(v) for v in node))
    return set()


def add_missing_chapters(toc: dict, files: Sequence[str]) -> dict:
    """Append chapter files absent from ``toc`` to its first part (or its chapters).

    Examples
    --------
    >>> toc = {"root": "book/intro", "chapters": [{"file": "book/00_method"}]}
    >>> add_missing_chapters(toc, ["book/00_method", "book/06_new"])
    {'root': 'book/intro', 'chapters': [{'file': 'book/00_method'}, {'file': 'book/06_new'}]}
    """
    present = {f.removesuffix(".ipynb") for f in _toc_files(toc)}
    missing = [f for f in files if f not in present]
    if missing:
        parts = toc.get("parts")
        target = parts[0].setdefault("chapters", []) if parts else toc.setdefault("chapters", [])
        target.extend({"file": f} for f in missing)
    return toc


def stage_book(root: str | Path, notebooks: Sequence[str | Path],
               stage_dir: str | Path | None = None) -> Path:
    """Copy config, toc, pages and executed notebooks into a fresh stage folder.

    The staged ``_config.yml`` has ``execute_notebooks: "off"``, so jupyter-book
    renders the papermill outputs instead of re-executing. Executed notebooks
    holding an error output are refused.

    Returns
    -------
    Path
        The stage folder (default ``<root>/_build/stage``).

    Examples
    --------
    >>> import json, tempfile
    >>> tmp = Path(tempfile.mkdtemp())
    >>> nb = tmp / "00_method.ipynb"
    >>> empty = {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    >>> _ = nb.write_text(json.dumps(empty))
    >>> stage = stage_book(find_root(), [nb], stage_dir=tmp / "stage")
    >>> sorted(p.name for p in stage.iterdir()), (stage / "book" / "00_method.ipynb").is_file()
    (['_config.yml', '_toc.yml', 'book'], True)
    >>> yaml.safe_load((stage / "_config.yml").read_text())["execute"]["execute_notebooks"]
    'off'
    """
    root = Path(root)
    stage = Path(stage_dir) if stage_dir else root / "_build" / "stage"
    for nb in notebooks:
        if errors := notebook_errors(nb):
            raise ChapterError(f"executed notebook {Path(nb).name} holds an error output ({errors[0]}).")
    if stage.exists():
        shutil.rmtree(stage)
    shutil.copytree(root / "book", stage / "book",
                    ignore=shutil.ignore_patterns("*.ipynb", ".ipynb_checkpoints", "__pycache__"))
    for nb in notebooks:
        shutil.copyfile(nb, stage / "book" / Path(nb).name)
    config = yaml.safe_load((root / "_config.yml").read_text(encoding="utf-8")) or {}
    config.setdefault("execute", {})["execute_notebooks"] = "off"
    (stage / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    toc = yaml.safe_load((root / "_toc.yml").read_text(encoding="utf-8"))
    toc = add_missing_chapters(toc, [f"book/{Path(nb).stem}" for nb in notebooks])
    (stage / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False), encoding="utf-8")
    return stage


# --------------------------------------------------------------------- build
def jupyter_book_command() -> list[str]:
    """The ``jupyter-book`` executable next to this Python, else the one on PATH.

    Examples
    --------
    >>> Path(jupyter_book_command()[0]).name
    'jupyter-book'
    """
    local = Path(sys.executable).with_name("jupyter-book")
    found = str(local) if local.exists() else shutil.which("jupyter-book")
    if not found:
        raise BuildError("jupyter-book is not installed; install it with pip install 'mbe-helpers[book]'.")
    return [found]


def build_site(stage_dir: str | Path, out_root: str | Path, *, strict: bool = True) -> Path:
    """Run ``jupyter-book build`` on a staged book; the site goes to ``<out_root>/_build/html``.

    With ``strict`` every Sphinx warning (a missing glue key, an unknown
    citation, a broken reference) fails the build, reported in one sentence;
    the full log is kept in ``<out_root>/_build/jupyter-book.log``.

    Returns
    -------
    Path
        ``<out_root>/_build/html/index.html``.

    Examples
    --------
    >>> Path(jupyter_book_command()[0]).name      # the program build_site runs on the stage
    'jupyter-book'
    """
    out_root = Path(out_root)
    cmd = [*jupyter_book_command(), "build", str(stage_dir), "--path-output", str(out_root),
           "--builder", "html", "--all"]
    if strict:
        cmd += ["--warningiserror", "--keep-going"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log = out_root / "_build" / "jupyter-book.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + proc.stderr, encoding="utf-8")
    index = out_root / "_build" / "html" / "index.html"
    if proc.returncode or not index.is_file():
        raise BuildError(f"jupyter-book build failed: {_first_problem(proc.stdout + proc.stderr)} "
                         f"(full log: {log}).")
    return index


def _first_problem(log: str) -> str:
    lines = [ln.strip() for ln in ANSI_RE.sub("", log).splitlines()]
    hits = [ln for ln in lines if re.search(r"WARNING|ERROR|Error|Exception", ln)]
    return (hits or [ln for ln in lines if ln] or ["no output"])[0]


def build_book(root: str | Path | None = None, profile: str = "default", *,
               progress: bool = True, strict: bool = True) -> Path:
    """Run every chapter with ``profile``, stage them and build the site.

    Returns
    -------
    Path
        ``<root>/_build/html/index.html``.

    Raises
    ------
    ChapterError
        The first chapter that raised; chapters executed before it are kept.
    BuildError
        jupyter-book failed.

    Examples
    --------
    >>> build_book(find_root(), "fast")          # refused before any chapter runs
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: unknown profile 'fast'; known profiles: smoke, default, paper.
    """
    root = Path(root) if root is not None else find_root()
    check_profile(profile)
    chapters = discover_chapters(root)
    notebooks = run_chapters(chapters, profile, root=root, progress=progress)
    stage = stage_book(root, notebooks)
    return build_site(stage, root, strict=strict)
