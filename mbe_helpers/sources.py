"""Where researchers keep their runs: one loader from a file or an MLflow experiment to a table.

``read_runs(source)`` returns one row per run, ready for :func:`mbe_helpers.audit.audit`:

* ``runs.csv`` (separator sniffed from the header: comma, semicolon or tab)
  and ``runs.tsv``;
* ``runs.parquet`` (needs ``pip install 'mbe-helpers[parquet]'``);
* ``runs.jsonl`` / ``runs.json``: JSON records, one object per line or a list
  of objects.  A ledger of :func:`mbe_helpers.grid.run_grid` (every record
  has a ``config_hash``) works directly: its latest row per config, only
  ``ok`` runs unless ``status`` says otherwise;
* ``mlflow://EXPERIMENT``: one row per run of an MLflow experiment, at
  ``tracking_uri`` (default: MLflow's own, or ``MLFLOW_TRACKING_URI``); see
  :func:`mbe_helpers.tracking.read_experiment` (needs ``pip install 'mbe-helpers[mlflow]'``).

A missing file, a folder, an unknown extension, an unreadable file, a header
that names a column twice, a missing experiment and an unreachable tracking
store are refused in one sentence (:class:`~mbe_helpers.errors.MBEInputError`).
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from mbe_helpers.errors import MBEInputError, require_extra

SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".jsonl": "jsonl",
            ".ndjson": "jsonl", ".json": "json"}
KINDS = ".csv, .tsv, .parquet, .jsonl or .json"


def read_runs(source: str | os.PathLike, *, tracking_uri: str | os.PathLike | None = None,
              status: str | Sequence[str] | None = "ok") -> pd.DataFrame:
    """Read a table of runs from a file or an MLflow experiment.

    Parameters
    ----------
    source : path or str
        A ``.csv``, ``.tsv``, ``.parquet``, ``.jsonl`` / ``.ndjson`` or
        ``.json`` file, or ``mlflow://EXPERIMENT``.
    tracking_uri : str, optional
        MLflow tracking URI for ``mlflow://`` sources (``sqlite:///mlflow.db``,
        ``http://host:5000``, ...); default MLflow's own (``MLFLOW_TRACKING_URI``
        when set).
    status : str, list of str or None
        For a grid ledger and for MLflow: keep the runs with this status
        (``"ok"``, ``"diverged"``, ``"failed"``); ``None`` keeps all.  CSV,
        TSV, parquet and JSON records that are not a ledger are read whole.

    Returns
    -------
    DataFrame
        One row per run.  A ledger gives the columns of
        :func:`mbe_helpers.grid.read_ledger`; MLflow gives those of
        :func:`mbe_helpers.tracking.read_experiment`.

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> pd.DataFrame({"lr": [0.1, 0.01], "acc": [0.9, 0.8]}).to_csv(folder / "runs.csv", index=False)
    >>> read_runs(folder / "runs.csv").acc.tolist()
    [0.9, 0.8]
    >>> read_runs(folder / "runs.xlsx")
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: cannot read runs from ...runs.xlsx: extension '.xlsx' is not a known format; ...
    """
    text = os.fspath(source) if isinstance(source, os.PathLike) else source
    if not isinstance(text, str) or not text.strip():
        raise MBEInputError(f"the source of runs must be a file path or mlflow://EXPERIMENT, "
                            f"got {source!r}.")
    _check_status(status)
    if text.lower().startswith("mlflow://"):
        from mbe_helpers import tracking

        return tracking.read_experiment(tracking.experiment_of(text), tracking_uri, status=status)
    if "://" in text:
        raise MBEInputError(f"cannot read runs from {text}: the only URL form known is "
                            "mlflow://EXPERIMENT; give a file path otherwise.")
    path = Path(text)
    kind = SUFFIXES.get(path.suffix.lower())
    if path.is_dir():
        raise MBEInputError(f"{path} is a folder; give the file of runs inside it.")
    if kind is None:
        what = f"extension {path.suffix!r}" if path.suffix else "no extension"
        raise MBEInputError(f"cannot read runs from {path}: {what} is not a known format; "
                            f"use {KINDS}, or mlflow://EXPERIMENT.")
    if not path.is_file():
        raise MBEInputError(f"no such file: {path}.")
    if kind in ("csv", "tsv"):
        frame = read_csv(path, "\t" if kind == "tsv" else None)
    elif kind == "parquet":
        frame = _read_parquet(path)
    else:
        frame = _read_json(path, kind, status)
    _refuse_repeated(path, list(frame.columns))
    return frame


def _check_status(status: object) -> None:
    if status is None or isinstance(status, str):
        return
    if isinstance(status, Sequence) and all(isinstance(s, str) for s in status) and len(status):
        return
    raise MBEInputError(f"status must be a status such as 'ok', a list of them or None, "
                        f"got {status!r}.")


def _refuse_repeated(path: Path, names: list) -> None:
    repeated = sorted(str(n) for n, count in Counter(names).items() if count > 1)
    if repeated:
        raise MBEInputError(f"{path} names column {repeated[0]!r} more than once; "
                            "give every column a distinct name.")


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0].rstrip(".") if lines else "no message"


def read_csv(path: str | os.PathLike, separator: str | None = None) -> pd.DataFrame:
    """Read a CSV (or TSV) of runs, refusing an unreadable or ambiguous file in one sentence.

    Without ``separator`` it is sniffed from the header line (comma, semicolon,
    tab); a header that names a column twice is refused rather than renamed.

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "runs.csv"
    >>> _ = path.write_text(chr(10).join(["lr;acc", "0.1;0.9", ""]))
    >>> read_csv(path)
        lr  acc
    0  0.1  0.9
    """
    path = Path(path)
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            header = handle.readline()
        if separator is None:
            separator = max(",;\t", key=header.count) if header.strip() else ","
        names = next(csv.reader([header], delimiter=separator)) if header.strip() else []
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise MBEInputError(f"{path} names column {repeated[0]!r} more than once in its header; "
                                "give every column a distinct name.")
        return pd.read_csv(path, sep=separator)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        kind = "TSV" if separator == "\t" and path.suffix.lower() == ".tsv" else "CSV"
        raise MBEInputError(f"could not read {path} as {kind}: {_first_line(str(exc))}.") from None


def _read_parquet(path: Path) -> pd.DataFrame:
    require_extra("pyarrow", "parquet", f"reading {path.name}")
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - ArrowInvalid, OSError, ...
        raise MBEInputError(f"could not read {path} as parquet: {_first_line(str(exc))}.") from None
    _refuse_repeated(path, table.column_names)
    return table.to_pandas()


def _keep(frame: pd.DataFrame, status: str | Sequence[str] | None) -> pd.DataFrame:
    if status is None or "status" not in frame:
        return frame
    wanted = [status] if isinstance(status, str) else list(status)
    return frame[frame["status"].isin(wanted)].reset_index(drop=True)


def _read_json(path: Path, kind: str, status: str | Sequence[str] | None) -> pd.DataFrame:
    """JSON records (lines, or a list of objects); a grid ledger as :func:`read_ledger` reads it."""
    from mbe_helpers import grid

    data = path.read_bytes()
    rows = None
    if kind == "json":
        try:
            whole = json.loads(data)
        except ValueError:
            whole = None  # perhaps one record per line after all
        else:
            if not isinstance(whole, list) or not all(isinstance(r, dict) for r in whole):
                what = type(whole).__name__ if not isinstance(whole, list) else "list of non-objects"
                raise MBEInputError(f"{path} holds a JSON {what}; give a list of run records "
                                    "([{...}, ...]) or one JSON object per line.")
            rows = whole
    if rows is None:
        if data.strip() and not any(grid._record(line)[0] is not None
                                    for line in data.splitlines() if line.strip()):
            raise MBEInputError(f"could not read {path} as JSON records: no line holds a JSON object.")
        rows = grid._LedgerReader(path).read()  # skips torn lines with a warning, like the ledger
    if rows and all("config_hash" in r for r in rows):  # the grid's ledger: latest row per config
        return _keep(grid.ledger_frame(rows), status)
    return pd.DataFrame(rows)
