"""Sampling configurations, running them on any executor, and the resumable run ledger.

``sample_configs(space, n, seed)`` draws a grid; ``run_grid(configs, run_fn,
ledger_path)`` runs every config not yet in the ledger and returns one row
per config.  ``run_fn(config: dict) -> dict`` is any importable (picklable)
function returning one flat record, e.g. :data:`mbe_helpers.train.train_run`.

The ledger is a JSON-lines file, one object per finished run, keyed by
``config_hash``.  JSON lines rather than CSV because (1) a record is appended
as one ``write`` + ``fsync`` of a whole line, and a line torn by a kill can
never parse as JSON, whereas a torn CSV row can parse as a valid row with a
truncated number; (2) rows may have different keys (failed runs, new probes,
a changed config space) without rewriting a header; (3) types and error
texts round-trip exactly.  Use ``read_ledger(path).to_csv(...)`` for a CSV copy.

Several runners may share one ledger (two terminals, two cluster jobs): each
claims a config just before training it by taking an OS file lock
(:mod:`filelock`) named after its hash in the folder ``.<ledger>.claims``,
and skips configs another runner holds, waiting for their rows at the end.
The operating system releases the lock of a killed process, so a claim never
outlives its runner.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock, Timeout

from mbe_helpers import runtime
from mbe_helpers.errors import MBEInputError, require_extra

log = logging.getLogger(__name__)

RunFn = Callable[[dict], dict]
FINISHED = ("ok", "diverged")
POLL_SECONDS = 0.2  # how often a runner looks for configs other runners finish


# ---------------------------------------------------------------- sampling


@dataclass(frozen=True)
class LogUniform:
    """``exp(U(log low, log high))``; rounded to int when ``integer``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> [f"{v:.1e}" for v in LogUniform(1e-4, 1e-1).sample(rng, 3)]
    ['8.1e-03', '6.4e-04', '1.3e-04']
    >>> LogUniform(100, 1000, integer=True).sample(rng, 3)
    [104, 651, 818]
    """

    low: float
    high: float
    integer: bool = False

    def sample(self, rng: np.random.Generator, n: int) -> list:
        if not 0 < self.low <= self.high:
            raise MBEInputError(f"log-uniform bounds must satisfy 0 < low <= high, got "
                                f"{self.low}, {self.high}")
        values = np.exp(rng.uniform(np.log(self.low), np.log(self.high), size=n))
        return _maybe_int(np.clip(values, self.low, self.high), self.integer)


@dataclass(frozen=True)
class Uniform:
    """``U(low, high)``; integers in ``[low, high]`` (inclusive) when ``integer``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> Uniform(0, 9, integer=True).sample(rng, 5)
    [8, 6, 5, 2, 3]
    >>> [round(v, 2) for v in Uniform(0.0, 0.4).sample(rng, 3)]
    [0.01, 0.33, 0.37]
    """

    low: float
    high: float
    integer: bool = False

    def sample(self, rng: np.random.Generator, n: int) -> list:
        if not self.low <= self.high:
            raise MBEInputError(f"uniform bounds must satisfy low <= high, got "
                                f"{self.low}, {self.high}")
        if self.integer:
            return [int(v) for v in rng.integers(int(self.low), int(self.high) + 1, size=n)]
        return [float(v) for v in rng.uniform(self.low, self.high, size=n)]


@dataclass(frozen=True)
class Choice:
    """One of ``options``, uniformly.

    Examples
    --------
    >>> Choice(("adam", "sgd")).sample(np.random.default_rng(0), 4)
    ['sgd', 'sgd', 'sgd', 'adam']
    """

    options: tuple

    def sample(self, rng: np.random.Generator, n: int) -> list:
        if not len(self.options):
            raise MBEInputError("a choice needs at least one option")
        return [self.options[i] for i in rng.integers(len(self.options), size=n)]


def _maybe_int(values: np.ndarray, integer: bool) -> list:
    return [int(round(v)) for v in values] if integer else [float(v) for v in values]


def _distribution(key: str, spec: Any) -> LogUniform | Uniform | Choice | None:
    """Read one entry of a space: a distribution, its dict form, or ``None`` for a constant."""
    if isinstance(spec, (LogUniform, Uniform, Choice)):
        return spec
    if not isinstance(spec, Mapping):
        return None
    values = {k.replace("-", "_"): v for k, v in spec.items()}
    kinds = set(values) - {"integer"}
    integer = bool(values.get("integer", False))
    if kinds == {"log_uniform"}:
        return LogUniform(*values["log_uniform"], integer=integer)
    if kinds == {"uniform"}:
        return Uniform(*values["uniform"], integer=integer)
    if kinds == {"choice"}:
        return Choice(tuple(values["choice"]))
    raise MBEInputError(f"space entry {key!r} must be a constant or one of log_uniform, "
                        f"uniform, choice, got {spec!r}")


def sample_configs(space: Mapping[str, Any], n: int, seed: int) -> pd.DataFrame:
    """Draw ``n`` configurations from a space, reproducibly.

    Parameters
    ----------
    space : dict
        ``name -> spec`` where a spec is :class:`LogUniform`, :class:`Uniform`,
        :class:`Choice`, the same as a dict as written in YAML
        (``{"log_uniform": [1e-4, 1e-1]}``, ``{"uniform": [0, 9], "integer":
        true}``, ``{"choice": [16, 32]}``), or any other value, lists
        included, which is a constant.
    n : int
        Number of configurations.
    seed : int
        Each column is drawn from its own stream derived from ``seed`` and the
        column name, so adding a dimension leaves the other columns unchanged.

    Returns
    -------
    DataFrame
        One row per configuration, one column per space entry.

    Examples
    --------
    >>> space = {"lr": LogUniform(1e-4, 1e-1), "width": Choice((16, 32)),
    ...          "seed": {"uniform": [0, 99], "integer": True}, "epochs": 20}
    >>> configs = sample_configs(space, 4, seed=0)
    >>> configs.shape, configs.epochs.tolist()
    ((4, 4), [20, 20, 20, 20])
    >>> configs.width.tolist(), configs.seed.tolist()
    ([32, 16, 16, 32], [10, 21, 3, 47])
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise MBEInputError(f"n must be a non-negative integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise MBEInputError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(space, Mapping):
        raise MBEInputError(f"space must be a mapping of names to specs, got "
                            f"{type(space).__name__}; pass e.g. {{'lr': LogUniform(1e-4, 1e-1)}}")
    columns = {}
    for key, spec in space.items():
        dist = _distribution(key, spec)
        rng = np.random.default_rng([int(seed), zlib.crc32(str(key).encode())])
        columns[key] = [spec] * int(n) if dist is None else dist.sample(rng, int(n))
    return pd.DataFrame(columns, index=pd.RangeIndex(int(n)))


# ---------------------------------------------------------------- configs and hashes


def _native(value: Any) -> Any:
    """Plain JSON-able Python value (numpy / torch scalars unwrapped, tuples as lists)."""
    if isinstance(value, np.generic) or (hasattr(value, "item") and getattr(value, "ndim", 1) == 0):
        value = value.item()
    if isinstance(value, Mapping):
        return {str(k): _native(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_native(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"value {value!r} of type {type(value).__name__} is not JSON-able")


def _canonical(value: Any) -> Any:
    """Hash form: integral floats as ints, so 64 and 64.0 give the same key."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def config_hash(config: Mapping[str, Any]) -> str:
    """Stable 16-hex-digit key of a config (SHA-256 of its canonical JSON).

    Examples
    --------
    >>> key = config_hash({"lr": 0.01, "width": 32})
    >>> len(key), key == config_hash({"width": 32, "lr": 0.01})
    (16, True)
    """
    text = json.dumps(_canonical(_native(dict(config))), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _config_list(configs: pd.DataFrame | Sequence[Mapping[str, Any]]) -> list[dict]:
    """Configs as plain dicts; missing cells (None / NaN) are left out."""
    if isinstance(configs, pd.DataFrame):
        rows = configs.to_dict("records")
    elif isinstance(configs, (Mapping, str, bytes)) or not isinstance(configs, Iterable):
        raise MBEInputError(f"configs must be a DataFrame or a list of dicts (one per run), got "
                            f"{type(configs).__name__}; wrap a single config in a list")
    else:
        rows = list(configs)
    out = []
    for row in rows:
        if not isinstance(row, Mapping):
            raise MBEInputError(f"each config must be a dict, got {type(row).__name__}")
        try:
            clean = _native({k: v for k, v in row.items() if not _is_missing(v)})
        except TypeError as exc:
            raise MBEInputError(
                f"config {dict(row)!r} holds a value that is not JSON-able") from exc
        out.append(clean)
    return out


# ---------------------------------------------------------------- the ledger


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[int]:
    """Open ``path`` for appending under an exclusive advisory lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, 0o644)
    try:
        try:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX)
        except ImportError:  # Windows: single writer assumed
            pass
        yield fd
    finally:
        os.close(fd)  # closing releases the lock


def _read_at(fd: int, size: int, offset: int) -> bytes:
    os.lseek(fd, offset, os.SEEK_SET)  # appends still go to the end (O_APPEND)
    return os.read(fd, size)


def _drop_torn_tail(fd: int) -> None:
    """Before appending: end a complete last record with its lost newline, drop a torn one."""
    size = os.fstat(fd).st_size
    if size == 0 or _read_at(fd, 1, size - 1) == b"\n":
        return
    end = size
    while end > 0:
        start = max(0, end - 65536)
        cut = _read_at(fd, end - start, start).rfind(b"\n")
        if cut >= 0:
            end = start + cut + 1
            break
        end = start
    if _record(_read_at(fd, size - end, end))[0] is not None:
        os.write(fd, b"\n")  # killed just before its newline: the record is whole
        log.warning("completed the last ledger line, which had lost its newline")
        return
    os.ftruncate(fd, end)
    log.warning("dropped a torn last line of the ledger")


def append_records(path: str | Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Append records to a JSON-lines ledger durably: whole lines, then ``fsync``.

    A process killed during the call leaves at most a partial last line,
    which readers ignore and the next append removes.

    Examples
    --------
    >>> import tempfile
    >>> ledger = Path(tempfile.mkdtemp()) / "ledger.jsonl"
    >>> append_records(ledger, [{"config_hash": "a", "status": "ok", "acc": 0.9}])
    >>> append_records(ledger, [{"config_hash": "b", "status": "failed"}])
    >>> len(ledger.read_text().splitlines())
    2
    """
    data = b"".join((json.dumps(_native(dict(r))) + "\n").encode() for r in records)
    if not data:
        return
    with _locked(Path(path)) as fd:
        _drop_torn_tail(fd)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)


def _record(line: bytes) -> tuple[dict | None, str]:
    """A ledger line as a record, or ``None`` and why it is not one."""
    try:
        row = json.loads(line)
    except ValueError:  # JSONDecodeError, or UTF-8 cut mid-character
        return None, "torn"
    return (row, "") if isinstance(row, dict) else (None, "not a JSON object")


class _LedgerReader:
    """Reads a ledger incrementally: each :meth:`read` returns the records added since the last.

    A last line without its newline counts when it is a whole record (its
    newline is added by the next append; the empty line this leaves is skipped).
    """

    def __init__(self, path: Path):
        self.path, self.offset, self.lines = path, 0, 0

    def read(self, warn_tail: bool = True) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        *lines, tail = data.split(b"\n")
        rows = []
        for line in lines:
            self.lines += 1
            if line.strip():
                rows.append(self._row(line, f"line {self.lines}"))
        self.offset += len(data) - len(tail)
        if tail.strip():
            row, why = _record(tail)
            if row is not None:
                self.offset += len(tail)
                rows.append(row)
            elif warn_tail:
                log.warning("ignoring the %s last line of %s", why, self.path)
        return [r for r in rows if r is not None]

    def _row(self, line: bytes, where: str) -> dict | None:
        row, why = _record(line)
        if row is None:
            log.warning("ignoring a ledger line that is %s (%s) in %s", why, where, self.path)
        return row


def _latest_rows(path: Path) -> dict[str, dict]:
    """The latest row of every ``config_hash`` in the ledger, in order of first appearance."""
    return {row.get("config_hash"): row for row in _LedgerReader(path).read()}


def _ledger_path(path: str | Path) -> Path:
    ledger = Path(path)
    if ledger.is_dir():
        raise MBEInputError(f"the ledger path {ledger} is a directory; give a file inside it, "
                            f"e.g. {ledger / 'ledger.jsonl'}")
    return ledger


def _frame(rows: Sequence[dict], first: Sequence[str] = ()) -> pd.DataFrame:
    """Rows as a DataFrame: ``config_hash``, ``status``, then ``first``, then the rest."""
    frame = pd.DataFrame(list(rows))
    if frame.empty:
        return pd.DataFrame(columns=["config_hash", "status"])
    lead = list(dict.fromkeys(c for c in ("config_hash", "status", *first) if c in frame))
    return frame[lead + [c for c in frame.columns if c not in lead]]


def read_ledger(path: str | Path) -> pd.DataFrame:
    """Read a ledger: one row per ``config_hash`` (its latest record).

    Torn lines and lines that are not JSON objects are skipped with a warning;
    a last record that lost its newline is kept.  A missing file is refused
    (:class:`MBEInputError`) rather than read as an empty ledger.

    Examples
    --------
    >>> import tempfile
    >>> ledger = Path(tempfile.mkdtemp()) / "ledger.jsonl"
    >>> append_records(ledger, [{"config_hash": "a", "status": "failed"},
    ...                         {"config_hash": "b", "status": "ok"},
    ...                         {"config_hash": "a", "status": "ok"}])
    >>> read_ledger(ledger)[["config_hash", "status"]]
      config_hash status
    0           a     ok
    1           b     ok
    """
    ledger = _ledger_path(path)
    if not ledger.exists():
        raise MBEInputError(f"the ledger {ledger} does not exist; check the path, or create it "
                            "with run_grid(configs, run_fn, path)")
    return ledger_frame(_LedgerReader(ledger).read())


def ledger_frame(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Ledger records as :func:`read_ledger` returns them: the latest row of every ``config_hash``.

    Examples
    --------
    >>> ledger_frame([{"config_hash": "a", "status": "failed"}, {"config_hash": "a", "status": "ok"},
    ...               {"config_hash": "b", "status": "ok", "acc": 0.9}])
      config_hash status  acc
    0           a     ok  NaN
    1           b     ok  0.9
    """
    return _frame(list({row.get("config_hash"): row for row in records}.values()))


# ---------------------------------------------------------------- running


def _call(run_fn: RunFn, configs: list[dict]) -> list[dict]:
    """Worker side: run one config, or a group through ``run_fn.run_many``."""
    if len(configs) == 1:
        records = [run_fn(dict(configs[0]))]
    else:
        records = list(run_fn.run_many([dict(c) for c in configs]))  # type: ignore[attr-defined]
    if len(records) != len(configs) or not all(isinstance(r, Mapping) for r in records):
        raise TypeError("run_fn must return one dict per config")
    return [dict(r) for r in records]


@dataclass
class _Task:
    hashes: list[str]
    configs: list[dict]
    attempt: int = 1


def _tasks(pending: list[tuple[str, dict]], run_fn: RunFn) -> list[_Task]:
    """One task per config, or per group of configs ``run_fn`` can batch."""
    group_key = getattr(run_fn, "group_key", None)
    if group_key is None or not hasattr(run_fn, "run_many"):
        return [_Task([h], [c]) for h, c in pending]
    limit = max(1, int(getattr(run_fn, "max_group", 128)))
    groups: dict[Any, list[tuple[str, dict]]] = {}
    tasks = []
    for h, c in pending:
        key = group_key(c)
        if key is None:
            tasks.append(_Task([h], [c]))
        else:
            groups.setdefault(key, []).append((h, c))
    for members in groups.values():
        for i in range(0, len(members), limit):
            chunk = members[i:i + limit]
            tasks.append(_Task([h for h, _ in chunk], [c for _, c in chunk]))
    return tasks


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 2000 else text[:2000] + "..."


class _Claims:
    """Per-config file locks beside the ledger, so that concurrent runners split a grid.

    A lock is an OS lock, released by the kernel when its process dies, so a
    killed runner leaves no claim behind.  Whoever takes a lock re-reads the
    ledger before running: the lock guards "not yet run", the ledger says "done".
    """

    def __init__(self, ledger: Path):
        self.folder = ledger.with_name(f".{ledger.name}.claims")
        self.held: dict[str, FileLock] = {}

    def take(self, config_hash: str) -> bool:
        if config_hash in self.held:
            return True
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.folder / f"{config_hash}.lock")
        try:
            lock.acquire(blocking=False)
        except (Timeout, FileNotFoundError):  # held by another runner, or its folder just went
            return False
        self.held[config_hash] = lock
        return True

    def release(self, config_hash: str) -> None:
        lock = self.held.pop(config_hash, None)
        if lock is not None:
            lock.release()
            with contextlib.suppress(OSError):  # the row is in the ledger: the file may go
                Path(lock.lock_file).unlink()

    def close(self) -> None:
        for config_hash in list(self.held):
            self.release(config_hash)
        with contextlib.suppress(OSError):  # only when no other runner uses it
            self.folder.rmdir()


def _window(pool: cf.Executor | None) -> int:
    """Tasks claimed ahead of the workers: one in process, two per known worker otherwise."""
    if pool is None:
        return 1
    client = getattr(pool, "_client", None)  # distributed's ClientExecutor
    workers = (sum(client.nthreads().values()) if client is not None
               else getattr(pool, "_max_workers", 0))
    return 2 * workers if workers else sys.maxsize


class _Runner:
    """Driver side: claims, retries, ledger appends and the progress bar."""

    def __init__(self, run_fn: RunFn, ledger: Path, retries: int, bar: Any,
                 reader: _LedgerReader, done: set[str], tracker: Any = None):
        self.run_fn, self.ledger, self.retries, self.bar = run_fn, ledger, retries, bar
        self.reader, self.done, self.tracker = reader, done, tracker
        self.claims = _Claims(ledger)
        self.waiting: dict[str, dict] = {}  # configs another runner holds
        self.waiting_seen = False  # whether another runner finished some config of this grid

    def _refresh(self) -> None:
        """Every row appended since the start finishes its config (by this runner or another)."""
        for row in self.reader.read(warn_tail=False):
            self.done.add(row.get("config_hash"))
            if self.waiting.pop(row.get("config_hash"), None) is not None:
                self.bar.update(1)

    def _claim(self, task: _Task) -> _Task | None:
        """The part of ``task`` this runner now holds and nobody has finished."""
        taken = []
        for h, c in zip(task.hashes, task.configs):
            if self.claims.take(h):
                taken.append((h, c))
            else:
                self.waiting[h] = c
                self.waiting_seen = True
        self._refresh()
        for h, _ in taken:
            if h in self.done:  # finished by another runner since this one started
                self.claims.release(h)
                self.bar.update(1)
                self.waiting_seen = True
        mine = [(h, c) for h, c in taken if h not in self.done]
        return _Task([h for h, _ in mine], [c for _, c in mine], task.attempt) if mine else None

    def _retake(self) -> list[_Task]:
        """Configs whose holder has since finished them are dropped; the rest are tried again."""
        self._refresh()
        tasks = [_Task([h], [c]) for h, c in self.waiting.items()]
        self.waiting.clear()
        return tasks

    def succeeded(self, task: _Task, records: list[dict]) -> None:
        now = _now()
        rows = [{"config_hash": h, **c, "status": r.get("status", "ok"), **_without(r, "status"),
                 "attempts": task.attempt, "finished_at": now}
                for h, c, r in zip(task.hashes, task.configs, records)]
        try:
            append_records(self.ledger, rows)
        except TypeError as exc:  # a record value that JSON cannot hold
            for h, c in zip(task.hashes, task.configs):
                self._record_failure(_Task([h], [c], task.attempt), exc)
            return
        for h in task.hashes:
            self.claims.release(h)
        self.bar.update(len(rows))
        self.tracker = _track(self.tracker, [(c, row) for c, row in zip(task.configs, rows)])

    def _record_failure(self, task: _Task, exc: BaseException) -> None:
        append_records(self.ledger, [{"config_hash": task.hashes[0], **task.configs[0],
                                      "status": "failed", "error": _error_text(exc),
                                      "attempts": task.attempt, "finished_at": _now()}])
        self.claims.release(task.hashes[0])
        self.bar.update(1)

    def failed(self, task: _Task, exc: BaseException) -> list[_Task]:
        """Tasks to resubmit after ``task`` raised ``exc`` (recording it when exhausted)."""
        if len(task.configs) > 1:
            log.warning("a group of %d runs failed (%s); running them one by one",
                        len(task.configs), _error_text(exc))
            return [_Task([h], [c]) for h, c in zip(task.hashes, task.configs)]
        if task.attempt <= self.retries and not isinstance(exc, MBEInputError):
            log.warning("run %s failed (attempt %d): %s", task.hashes[0], task.attempt,
                        _error_text(exc))
            return [_Task(task.hashes, task.configs, task.attempt + 1)]
        self._record_failure(task, exc)
        return []

    def _submit(self, pool: cf.Executor | None, task: _Task, running: dict) -> None:
        """Start ``task`` on the pool, or run it here (``pool=None``) as a finished future."""
        if pool is None:
            future: cf.Future = cf.Future()
            try:
                future.set_result(_call(self.run_fn, task.configs))
            except Exception as exc:  # noqa: BLE001 - any run failure is recorded
                future.set_exception(exc)
            running[future] = task
            return
        try:
            running[pool.submit(_call, self.run_fn, task.configs)] = task
        except Exception as exc:  # noqa: BLE001 - e.g. a broken process pool
            for retry in self.failed(task, exc):
                self._submit(pool, retry, running)

    def run(self, pool: cf.Executor | None, tasks: list[_Task]) -> None:
        """Run ``tasks``, claiming each just before it starts; then wait for other runners."""
        queue, running, window, next_poll = list(tasks), {}, _window(pool), 0.0
        try:
            while queue or running or self.waiting:
                while queue and len(running) < window:
                    task = self._claim(queue.pop(0))
                    if task is not None:
                        self._submit(pool, task, running)
                if self.waiting and time.monotonic() >= next_poll:
                    queue += self._retake()
                    next_poll = time.monotonic() + POLL_SECONDS
                if not running:
                    if self.waiting and not queue:
                        log.info("waiting for %d configs another runner is training",
                                 len(self.waiting))
                        time.sleep(POLL_SECONDS)
                    continue
                done, _ = cf.wait(running, timeout=POLL_SECONDS if self.waiting else None,
                                  return_when=cf.FIRST_COMPLETED)
                for future in done:
                    task = running.pop(future)
                    try:
                        records = future.result()
                    except Exception as exc:  # noqa: BLE001 - worker failures are recorded
                        for retry in self.failed(task, exc):
                            self._submit(pool, retry, running)
                        continue
                    self.succeeded(task, records)
        finally:
            self.claims.close()


def _track(tracker: Any, items: Sequence[tuple[dict, dict]]) -> Any:
    """Log the finished rows among ``items`` (config, ledger row) that the tracker lacks.

    Returns the tracker, or ``None`` after a failure: the grid goes on, the
    ledger keeps every run, and the next call with this tracker logs the rest.
    """
    if tracker is None:
        return None
    try:
        tracker.log_missing((c, _native(row)) for c, row in items if row.get("status") in FINISHED)
    except Exception as exc:  # noqa: BLE001 - tracking must never lose a run of the grid
        log.warning("stopped logging to %r: %s; the ledger keeps every run, and the next run_grid "
                    "with this tracker logs the missing ones", tracker, _error_text(exc))
        return None
    return tracker


def _without(record: Mapping[str, Any], key: str) -> dict:
    return {k: v for k, v in record.items() if k != key}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def _executor(executor: Any) -> Iterator[cf.Executor | None]:
    """Resolve ``executor``: None, a ``concurrent.futures.Executor``, a Dask client,
    ``"processes"`` (one spawned process per core, one torch thread each), ``"dask"``
    (a fresh ``LocalCluster``) or a scheduler address."""
    if executor is None or isinstance(executor, cf.Executor):
        yield executor
        return
    if executor == "processes":
        import multiprocessing

        with cf.ProcessPoolExecutor(max_workers=os.cpu_count() or 1, initializer=_one_thread,
                                    mp_context=multiprocessing.get_context("spawn")) as pool:
            yield pool
        return
    if isinstance(executor, str):
        require_extra("distributed", "dask", f"executor={executor!r}")
        from distributed import Client, LocalCluster
        if executor == "dask":
            with LocalCluster(threads_per_worker=1, dashboard_address=None) as cluster, \
                    Client(cluster) as client:
                yield client.get_executor(pure=False)
            return
        if "://" in executor:
            with Client(executor) as client:
                yield client.get_executor(pure=False)
            return
    if hasattr(executor, "get_executor"):  # a distributed.Client the caller owns
        yield executor.get_executor(pure=False)
        return
    raise MBEInputError(f"executor must be None, a concurrent.futures.Executor, a Dask Client, "
                        f"'processes', 'dask' or a scheduler address like 'tcp://host:8786', "
                        f"got {executor!r}")


def _one_thread() -> None:
    """Worker initializer: one torch (and BLAS) thread per process, so workers do not oversubscribe."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


def run_grid(configs: pd.DataFrame | Sequence[Mapping[str, Any]], run_fn: RunFn,
             ledger_path: str | Path, executor: Any = None, progress: bool = True, *,
             retries: int = 2, rerun_failed: bool = True, tracker: Any = None,
             tracking_uri: str | os.PathLike | None = None) -> pd.DataFrame:
    """Run every config not yet finished in the ledger; return one row per config.

    Parameters
    ----------
    configs : DataFrame or list of dict
        One config per row; missing cells (None / NaN) are left out of the
        config.  Duplicate configs run once.
    run_fn : callable
        ``run_fn(config: dict) -> dict``, importable and picklable for process
        and Dask executors.  If it also has ``group_key(config)`` and
        ``run_many(configs)`` (as :class:`mbe_helpers.train.TrainRun` does),
        configs with the same non-None key are sent as one task of at most
        ``run_fn.max_group`` configs.
    ledger_path : path
        JSON-lines ledger (``.jsonl``); created if absent, only ever appended to.
    executor : None, Executor, Dask Client, "dask" or "tcp://host:port"
        ``None`` runs in this process; any ``concurrent.futures.Executor``;
        a ``distributed.Client``; ``"dask"`` starts a ``LocalCluster`` (one
        single-threaded worker per core) for the call; an address connects to
        a running scheduler.
    progress : bool
        tqdm progress bar (runs done / total, ETA), shown in terminals and
        notebooks only.
    retries : int
        A failing run is retried this many times, then recorded with status
        ``failed`` and its error text; bad input (:class:`MBEInputError`) and
        records JSON cannot hold are recorded at once.
    rerun_failed : bool
        Rerun configs whose latest ledger status is ``failed``.
    tracker : "mlflow://EXPERIMENT", optional
        Also log every finished run (``ok`` or ``diverged``) of the grid to
        this MLflow experiment (created when missing), at ``tracking_uri``
        (default: MLflow's own, or ``MLFLOW_TRACKING_URI``): params = the
        config, metrics = the numeric fields of the record, the other fields,
        ``status`` and ``config_hash`` as tags.  Runs finished before the call
        and missing there are logged too; a ``config_hash`` already in the
        experiment is never logged again.  The ledger stays the source of
        truth: a tracking failure during the grid is a warning, not an error.
        Needs ``pip install 'mbe-helpers[mlflow]'``.
    tracking_uri : str, optional
        MLflow tracking URI of ``tracker``.

    Notes
    -----
    Runners sharing a ledger split its configs: each claims a config just
    before training it (see the module docstring) and waits at the end for
    those other runners hold, so every runner returns every config.

    Returns
    -------
    DataFrame
        The latest ledger row of every config, in input order: ``config_hash``,
        ``status`` (``ok`` / ``diverged`` / ``failed``), the config, the record,
        ``attempts``, ``finished_at`` and, for failures, ``error``.

    Examples
    --------
    >>> import tempfile
    >>> ledger = Path(tempfile.mkdtemp()) / "ledger.jsonl"
    >>> def square(config):
    ...     return {"y": config["x"] ** 2}
    >>> runs = run_grid([{"x": 1}, {"x": 2}], square, ledger, progress=False)
    >>> runs[["x", "y", "status"]]
       x  y status
    0  1  1     ok
    1  2  4     ok
    >>> run_grid([{"x": 2}, {"x": 3}], square, ledger, progress=False).y.tolist()  # x = 2 reused
    [4, 9]
    """
    ledger = _ledger_path(ledger_path)
    if ledger.suffix.lower() == ".csv":
        raise MBEInputError(f"the ledger {ledger} is JSON lines: name it with .jsonl and export "
                            "CSV with read_ledger(path).to_csv(...)")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise MBEInputError(f"retries must be a non-negative integer, got {retries!r}")
    unique = {config_hash(c): c for c in _config_list(configs)}
    if tracker is not None:
        from mbe_helpers.tracking import open_tracker
        tracker = open_tracker(tracker, tracking_uri, ledger=ledger)
    skip = FINISHED if rerun_failed else (*FINISHED, "failed")
    reader = _LedgerReader(ledger)
    latest = {row.get("config_hash"): row for row in reader.read()}
    done = {h for h, row in latest.items() if row.get("status") in skip}
    tracker = _track(tracker, [(c, latest[h]) for h, c in unique.items() if h in latest])
    pending = [(h, c) for h, c in unique.items() if h not in done]
    log.info("grid: %d configs, %d already in the ledger, %d to run",
             len(unique), len(unique) - len(pending), len(pending))
    with _executor(executor) as pool, \
            runtime.progress(total=len(unique), initial=len(unique) - len(pending), desc="grid",
                             unit="run", enabled=progress) as bar:
        runner = _Runner(run_fn, ledger, retries, bar, reader, done, tracker)
        runner.run(pool, _tasks(pending, run_fn))
    latest = _latest_rows(ledger)
    if runner.tracker is not None and runner.waiting_seen:  # rows other runners finished
        runner.tracker.refresh()
        _track(runner.tracker, [(c, latest[h]) for h, c in unique.items() if h in latest])
    config_keys = dict.fromkeys(k for c in unique.values() for k in c)
    return _frame([latest[h] for h in unique if h in latest], first=list(config_keys))
