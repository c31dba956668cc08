"""The ``mbe-book`` command: list, run and build chapters; audit a table of runs.

Examples
--------
::

    mbe-book list
    mbe-book run method -p n 200 -p seed 3 --profile smoke
    mbe-book run heterogeneous_grid --track mlflow://grid --tracking-uri sqlite:///mlflow.db
    mbe-book build --profile default
    mbe-book audit runs.csv --metrics fim,sci --target acc --controls lr,wd,arch \\
        --bootstrap 1000 --adjust auto --placebos 200 --out report.md --out report.csv
    mbe-book audit runs.csv --metrics fim,sci --target gap --controls lr,wd --comparators lr,wd,width
    mbe-book audit results/ledger.jsonl --metrics fim_norm@20 --target test_acc
    mbe-book audit mlflow://grid --tracking-uri sqlite:///mlflow.db --metrics fim_norm@20 --target test_acc

Bad input (an unknown chapter, parameter, column or file) is reported in one
sentence on stderr with exit status 2; a chapter or site build that fails
exits with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from mbe_helpers import book
from mbe_helpers.errors import MBEInputError, MissingExtraError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"mbe-book: error: {message} (see {self.prog} --help).\n")


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mbe-book`` with its four subcommands.

    Examples
    --------
    >>> args = build_parser().parse_args(["run", "method", "-p", "n", "200", "--profile", "smoke"])
    >>> args.command, args.chapter, args.parameter, args.profile, args.func is cmd_run
    ('run', 'method', [['n', '200']], 'smoke', True)
    >>> args = build_parser().parse_args(["audit", "runs.csv", "--metrics", "fim,sci",
    ...                                   "--target", "acc"])
    >>> args.metrics, args.placebos
    (['fim', 'sci'], 200)
    """
    parser = _Parser(prog="mbe-book", description="Run, list and build the MBE book; audit a CSV of runs.")
    parser.add_argument("--root", type=Path, default=None,
                        help="repository root (default: found upward from the current folder)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="show chapters, their parameters, defaults and profile overrides")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("run", help="execute one chapter headless (papermill)")
    p.add_argument("chapter", help="chapter stem or short name, e.g. 00_method or method")
    p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="override a parameter; VALUE is parsed as YAML (repeatable)")
    p.add_argument("--profile", default="default", help="smoke, default or paper (default: default)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--track", default=None, metavar="mlflow://EXPERIMENT",
                   help="also log the chapter's grid runs to this MLflow experiment")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's own)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("build", help="run every chapter, then build the site into _build/html")
    p.add_argument("--profile", default="default", help="smoke, default or paper (default: default)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("audit", help="audit metrics in a table of runs (one row per trained model)")
    p.add_argument("source", help="the runs: .csv, .tsv, .parquet, .jsonl or .json (a grid ledger "
                   "too), or mlflow://EXPERIMENT")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's own)")
    p.add_argument("--status", type=_csv_list, default=["ok"],
                   help="ledger and MLflow runs to keep, comma-separated (default: ok; 'all' keeps all)")
    p.add_argument("--metrics", type=_csv_list, required=True, help="comma-separated metric columns")
    p.add_argument("--target", required=True, help="target column, e.g. final test accuracy")
    p.add_argument("--controls", type=_csv_list, default=[], help="comma-separated control columns")
    p.add_argument("--groupby", default=None, help="audit separately within each value of this column")
    p.add_argument("--bootstrap", type=int, default=0, help="bootstrap resamples for CIs (0: none)")
    p.add_argument("--permutations", type=int, default=0, help="permutations for the partial p (0: none)")
    p.add_argument("--cluster", default=None, help="resample whole groups of this column in the bootstrap")
    p.add_argument("--adjust", default="auto", help="auto (default), rank (published MBE) or crossfit")
    p.add_argument("--folds", type=int, default=5, help="folds of the cross-fitted adjustment")
    p.add_argument("--dedupe", action="store_true",
                   help="keep one of each group of runs identical in every audited column")
    p.add_argument("--placebos", type=int, default=200,
                   help="noise and proxy placebos per group for the self-calibration (0: none)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--effect", type=float, default=0.20, help="|rho| that counts as an effect")
    p.add_argument("--washout", type=float, default=0.10, help="|partial rho| below which a metric washes out")
    p.add_argument("--out", type=Path, action="append", default=[],
                   help="write the report: .md (markdown) or .csv (table); repeatable")
    p.add_argument("--comparators", type=_csv_list, default=[], metavar="HP1,HP2,...",
                   help="also report Jiang et al.'s granulated Kendall and conditional MI and Dziugaite "
                        "et al.'s robust sign-error over these hyperparameter columns (whole table)")
    p.set_defaults(func=cmd_audit)
    return parser


def _console() -> Any:
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 200))


_MISSING = object()


def _show(value: Any) -> str:
    return "" if value is _MISSING else repr(value)


def cmd_list(args: argparse.Namespace) -> int:
    """Print a table of chapters with parameters, defaults, overrides and comments.

    Examples
    --------
    >>> import contextlib, io
    >>> out = io.StringIO()
    >>> with contextlib.redirect_stdout(out):
    ...     status = cmd_list(build_parser().parse_args(["list"]))
    >>> status, "00_method (method)" in out.getvalue()
    (0, True)
    """
    from rich.table import Table

    chapters = book.discover_chapters(args.root)
    table = Table(title="Chapters of the MBE book (profile columns show overrides of the default)")
    for column in ("chapter", "parameter", "default", *(p for p in book.PROFILES if p != "default"),
                   "meaning"):
        table.add_column(column, overflow="fold")
    for chapter in chapters:
        params = list(chapter.parameters.values()) or [None]
        for i, param in enumerate(params):
            label = f"{chapter.stem} ({chapter.name})" if i == 0 else ""
            if param is None:
                table.add_row(label, "-", "", "", "", "no parameters cell")
                continue
            over = {p: chapter.profiles.get(p, {}).get(param.name, _MISSING) for p in book.PROFILES}
            default = param.default if over["default"] is _MISSING else over["default"]
            table.add_row(label, param.name, repr(default), _show(over["smoke"]), _show(over["paper"]),
                          param.comment)
        table.add_section()
    _console().print(table)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Execute one chapter and say where the notebook and artifacts went.

    Examples
    --------
    >>> cmd_run(build_parser().parse_args(["run", "method", "-p", "n", "10"]))
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: bad parameter: n must be greater than or equal to 50, got 10.
    >>> cmd_run(build_parser().parse_args(["run", "method", "-p", "n", "200", "-p", "n", "300"]))
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: parameter 'n' is given more than once with -p; give it once.
    """
    root = args.root or book.find_root()
    chapter = book.get_chapter(args.chapter, root)
    book.check_profile(args.profile)
    names = [name for name, _ in args.parameter]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise MBEInputError(f"parameter {twice[0]!r} is given more than once with -p; give it once.")
    overrides = {name: book.parse_value(value) for name, value in args.parameter}
    book.resolve_parameters(chapter, args.profile, overrides)      # refuse bad values before a kernel
    out, results = book.run_location(root, args.profile, chapter, overrides)
    with _tracking(args.track, args.tracking_uri):
        out = book.execute_chapter(chapter, args.profile, overrides, root=root,
                                   progress=not args.no_progress)
    kind = "custom parameters" if "custom" in out.parts else args.profile
    print(f"executed {chapter.stem} ({kind}): {book._relative(out, Path(root))}")
    print(f"artifacts: {book._relative(Path(overrides.get('results_dir', results)), Path(root))}")
    return 0


@contextlib.contextmanager
def _tracking(track: str | None, tracking_uri: str | None) -> Iterator[None]:
    """Hand ``--track`` to the chapter's kernel (``MBE_TRACK``, ``MLFLOW_TRACKING_URI``).

    The store is opened here first, so a bad tracker fails in one sentence
    before the chapter runs; :func:`mbe_helpers.metrics.run_with_ledger` reads
    the variables in the kernel.
    """
    if track is None:
        if tracking_uri is not None:
            raise MBEInputError("--tracking-uri needs --track mlflow://EXPERIMENT.")
        yield
        return
    from mbe_helpers.tracking import open_tracker

    tracker = open_tracker(track, tracking_uri)
    saved = {k: os.environ.get(k) for k in ("MBE_TRACK", "MLFLOW_TRACKING_URI")}
    os.environ.update(MBE_TRACK=f"mlflow://{tracker.experiment}", MLFLOW_TRACKING_URI=tracker.uri)
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.update({key: value})
    print(f"tracked in MLflow: experiment {tracker.experiment!r} at {tracker.uri}")


def cmd_build(args: argparse.Namespace) -> int:
    """Run every chapter, then build the site.

    Examples
    --------
    >>> cmd_build(build_parser().parse_args(["build", "--profile", "fast"]))
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: unknown profile 'fast'; known profiles: smoke, default, paper.
    """
    index = book.build_book(args.root, args.profile, progress=not args.no_progress)
    print(f"site built: {index}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Audit metrics of a table of runs, print the table and write the requested reports.

    Examples
    --------
    >>> import contextlib, io, tempfile
    >>> import numpy as np, pandas as pd
    >>> folder = Path(tempfile.mkdtemp())
    >>> rng = np.random.default_rng(0)
    >>> b = rng.normal(size=30)
    >>> pd.DataFrame({"b": b, "m": b + rng.normal(0, .3, 30),
    ...               "y": b + rng.normal(0, .3, 30)}).to_csv(folder / "runs.csv", index=False)
    >>> args = build_parser().parse_args(["audit", str(folder / "runs.csv"), "--metrics", "m",
    ...                                   "--target", "y", "--controls", "b", "--adjust", "rank",
    ...                                   "--placebos", "0", "--out", str(folder / "report.md")])
    >>> with contextlib.redirect_stdout(io.StringIO()):
    ...     status = cmd_audit(args)
    >>> status, (folder / "report.md").read_text().splitlines()[0]
    (0, "**MBE audit: target 'y', controlling for b**")
    """
    from mbe_helpers.audit import audit
    from mbe_helpers.sources import read_runs

    bad = [p for p in args.out if p.suffix.lower() not in (".md", ".csv")]
    if bad:
        raise MBEInputError(f"--out must end in .md or .csv, got {bad[0]}.")
    folders = [p for p in args.out if p.is_dir()]
    if folders:
        raise MBEInputError(f"--out {folders[0]} is a folder; give a file name such as "
                            f"{folders[0] / 'report.md'}.")
    source = None if "://" in args.source else Path(args.source).resolve()
    clash = [p for p in args.out if p.resolve() == source]
    if clash:
        raise MBEInputError(f"--out {clash[0]} is the input file; write the report to another path "
                            "so the runs are not overwritten.")
    for path in args.out:
        _check_writable(path)
    with warnings.catch_warnings(record=True) as caught:  # e.g. MLflow columns that keep a prefix
        warnings.simplefilter("always")
        runs = read_runs(args.source, tracking_uri=args.tracking_uri,
                         status=None if args.status == ["all"] else args.status)
    for warning in caught:
        print(f"mbe-book: note: {warning.message}", file=sys.stderr)
    tables, section = _comparators(runs, args)       # before the audit: its errors come first
    result = audit(runs, args.metrics, args.target, args.controls, groupby=args.groupby,
                   bootstrap=args.bootstrap, permutations=args.permutations, cluster=args.cluster,
                   seed=args.seed, effect=args.effect, washout=args.washout, adjust=args.adjust,
                   folds=args.folds, placebos=args.placebos, dedupe=args.dedupe)
    result.show(console=_console())
    print(section, end="")
    for path in args.out:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".md":
            _write_atomic(path, result.to_markdown() + section)
        else:
            _write_atomic(path, result.to_frame().to_csv(index=False))
            if len(result.calibration):
                calibration = path.with_name(path.stem + "_calibration.csv")
                _write_atomic(calibration, result.calibration.to_csv(index=False))
                print(f"wrote {calibration}")
            for name, table in tables.items():
                extra = path.with_name(f"{path.stem}_{name}.csv")
                _write_atomic(extra, table.to_csv(index=False))
                print(f"wrote {extra}")
        print(f"wrote {path}")
    return 0


def _comparators(runs: Any, args: argparse.Namespace) -> tuple[dict, str]:
    """``--comparators``: the three tables per metric and their markdown section (none without it)."""
    if not args.comparators:
        return {}, ""
    from mbe_helpers.comparators import comparator_tables, comparators_markdown

    tables = comparator_tables(runs, args.metrics, args.target, args.comparators)
    return tables, comparators_markdown(tables, args.target)


def _check_writable(path: Path) -> None:
    """Refuse, before any work, a report path that cannot be written: a probe file is created
    (and removed) in its folder, or in the nearest existing folder above it (nothing is
    created for good here; the report's folders are made when it is written).

    Examples
    --------
    >>> _check_writable(Path("/proc/report.md"))
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: --out /proc/report.md: cannot write in /proc (No such file or directory); give a path in a folder you can write to.
    """
    import tempfile

    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise MBEInputError(f"--out {path}: cannot write in {folder} ({exc.strerror or exc}); give "
                            "a path in a folder you can write to.") from None


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path``, then rename: a kill never leaves half a report."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise MBEInputError(f"--out {path}: could not write the report ({exc.strerror or exc}); "
                            "give a path in a folder you can write to.") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mbe-book`` console script; returns the exit status.

    Examples
    --------
    >>> import contextlib, io
    >>> err = io.StringIO()
    >>> with contextlib.redirect_stderr(err):
    ...     status = main(["audit", "missing.csv", "--metrics", "m", "--target", "y"])
    >>> status, err.getvalue().strip()
    (2, 'mbe-book: error: no such file: missing.csv.')
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (MBEInputError, FileNotFoundError, MissingExtraError) as exc:
        return _fail(exc, 2)
    except (book.ChapterError, book.BuildError) as exc:
        return _fail(exc, 1)


def _fail(exc: BaseException, status: int) -> int:
    if isinstance(exc, FileNotFoundError) and exc.filename:
        message = f"no such file: {exc.filename}."
    else:
        message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"mbe-book: error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
