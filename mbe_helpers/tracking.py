"""MLflow as a home for runs: read an experiment as a table, log a grid's runs to one.

``read_experiment(name, tracking_uri)`` returns one row per run (the loader
behind ``read_runs("mlflow://NAME")``); :class:`MLflowTracker` logs finished
grid runs (``run_grid(..., tracker="mlflow://NAME")``), each once: a run is
tagged with its ``config_hash``, and hashes already in the experiment are
skipped, so resuming a grid never logs a run twice.  The JSON-lines ledger
stays the source of truth for resuming; MLflow is a copy of it.

The tracking URI is ``tracking_uri`` when given, else MLflow's own default
(``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///mlflow.db`` in the current
folder).  A store that cannot be reached, a SQLite file or folder that does not
exist (when reading) and an unknown experiment are refused in one sentence
(:class:`~mbe_helpers.errors.MBEInputError`).

Names MLflow does not accept (``fim_norm@20``: only letters, digits, ``_``,
``-``, ``.``, space and ``/`` are allowed) are logged with ``_`` in place of
the other characters; the tag ``mbe.names`` keeps the original names, and
:func:`read_experiment` restores them.  MLflow stores an infinite metric as
the largest float; reading gives the infinity back.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mbe_helpers.errors import MBEInputError, require_extra

log = logging.getLogger(__name__)

SCHEME = "mlflow://"
HASH_TAG = "config_hash"   # the grid's key: runs carrying it are the grid's, once each
STATUS_TAG = "status"      # ok / diverged, as in the ledger
NAMES_TAG = "mbe.names"    # original names of escaped keys (JSON), possibly in chunks .1, .2, ...
INFO_COLUMNS = ("run_id", "run_name", "run_status", "start_time", "end_time")
_MAX_KEY, _MAX_PARAM, _MAX_TAG = 250, 6000, 8000  # MLflow's limits
_BAD_CHARS = re.compile(r"[^\w.\- ]")
_RUN_STATUS = {"FINISHED": "ok", "FAILED": "failed", "KILLED": "failed"}


def experiment_of(source: str, what: str = "source") -> str:
    """The experiment name of ``mlflow://NAME``, refusing any other form in one sentence.

    Examples
    --------
    >>> experiment_of("mlflow://grid")
    'grid'
    >>> experiment_of("grid")
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: the source must look like mlflow://EXPERIMENT, got 'grid'.
    """
    text = str(source)
    if not text.lower().startswith(SCHEME) or not text[len(SCHEME):].strip():
        raise MBEInputError(f"the {what} must look like mlflow://EXPERIMENT, got {text!r}.")
    return text[len(SCHEME):].strip()


def _flat(text: Any) -> str:
    """An error message as one line without a final period."""
    return " ".join(str(text).split()).rstrip(".") or "no message"


# ------------------------------------------------------------------ the store


def resolve_uri(tracking_uri: str | os.PathLike | None) -> str:
    """``tracking_uri`` or MLflow's default, with relative SQLite and file paths made absolute.

    Absolute, so that a chapter executed in another folder writes to the same store.

    Examples
    --------
    >>> resolve_uri("sqlite:///runs.db").startswith("sqlite:////")     # doctest: +SKIP
    True
    """
    require_extra("mlflow", "mlflow", "tracking runs in MLflow")
    import mlflow

    uri = str(tracking_uri) if tracking_uri is not None else mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rest = uri[len("sqlite:///"):]
        if rest and rest != ":memory:" and not rest.startswith(":"):
            uri = "sqlite:///" + str(Path(rest).resolve())
    elif "://" not in uri and not uri.startswith("databricks") and uri not in ("", "uc"):
        uri = Path(uri).resolve().as_uri()
    return uri


def _local_file(uri: str) -> Path | None:
    """The file or folder a local ``sqlite:`` or ``file:`` store lives in, else ``None``."""
    if uri.startswith("sqlite:///"):
        rest = uri[len("sqlite:///"):].split("?")[0]
        return None if rest in ("", ":memory:") else Path("/" + rest.lstrip("/"))
    if uri.startswith("file:"):
        from urllib.parse import unquote, urlparse
        return Path(unquote(urlparse(uri).path))
    return None


def _check_reachable(uri: str, must_exist: bool) -> None:
    """Refuse a missing local store (when reading) or a server nobody answers at, in one sentence."""
    local = _local_file(uri)
    if local is not None:
        if must_exist and not local.exists():
            raise MBEInputError(f"no MLflow tracking store at {uri}: {local} does not exist "
                                "(give the tracking URI of the store, or set MLFLOW_TRACKING_URI).")
        if not must_exist and not local.parent.is_dir():
            raise MBEInputError(f"cannot create the MLflow tracking store {uri}: the folder "
                                f"{local.parent} does not exist.")
        return
    if uri.startswith(("http://", "https://")):
        import requests
        try:  # any answer will do; MLflow itself would retry a dead server for minutes
            requests.get(uri, timeout=10)
        except requests.RequestException as exc:
            text = str(exc)
            reason = ("connection refused" if "refused" in text.lower() or "Errno 111" in text
                      else "no answer within 10 s" if isinstance(exc, requests.Timeout)
                      else "host not found" if "resolve" in text.lower() or "Name or service" in text
                      else type(exc).__name__)
            raise MBEInputError(f"cannot reach the MLflow tracking server at {uri}: {reason}.") from None
        return
    scheme = uri.split("://")[0].split("+")[0] if "://" in uri else ""
    known = _schemes()
    if known and scheme not in known:
        raise MBEInputError(f"the tracking URI {uri} has a scheme MLflow does not know ({scheme!r}); "
                            "use sqlite:///FILE, file:///FOLDER, http(s)://HOST:PORT or another of "
                            f"{', '.join(sorted(s for s in known if s))}.")


def _schemes() -> set[str]:
    """The URI schemes MLflow has tracking stores for (empty when it cannot say)."""
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry
        return set(_tracking_store_registry._registry)
    except Exception:  # noqa: BLE001 - a private registry: without it MLflow's own error stands
        return set()


def _client(uri: str, must_exist: bool) -> Any:
    _check_reachable(uri, must_exist)
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri=uri)
    except Exception as exc:  # noqa: BLE001 - unknown scheme, bad database, ...
        raise _store_error(uri, exc) from None


def _store_error(uri: str, exc: BaseException) -> MBEInputError:
    return MBEInputError(f"could not use the MLflow tracking store {uri}: "
                         f"{type(exc).__name__}: {_flat(exc)[:300]}.")


def _call(uri: str, fn, *args, **kwargs):
    """An MLflow client call whose failure (store gone, bad database) becomes one sentence."""
    try:
        return fn(*args, **kwargs)
    except MBEInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - MlflowException, SQLAlchemy and HTTP errors
        raise _store_error(uri, exc) from None


def _experiment(client: Any, uri: str, name: str, create: bool) -> str:
    """The id of experiment ``name``, created when ``create``; else refused when unknown."""
    found = _call(uri, client.get_experiment_by_name, name)
    if found is not None and found.lifecycle_stage != "deleted":
        return found.experiment_id
    if found is not None:
        raise MBEInputError(f"the MLflow experiment {name!r} at {uri} is deleted; restore it or "
                            "choose another name.")
    if create:
        try:
            return _call(uri, client.create_experiment, name)
        except MBEInputError:  # another runner may have created it just now
            again = _call(uri, client.get_experiment_by_name, name)
            if again is None:
                raise
            return again.experiment_id
    known = [e.name for e in _call(uri, client.search_experiments, max_results=20)]
    there = ", ".join(repr(n) for n in known) if known else "none"
    raise MBEInputError(f"no MLflow experiment named {name!r} at {uri} (experiments there: {there}).")


def _runs(client: Any, uri: str, experiment_id: str) -> Iterator[Any]:
    """Every active run of the experiment, oldest first."""
    token = None
    while True:
        page = _call(uri, client.search_runs, [experiment_id], max_results=1000,
                     order_by=["attributes.start_time ASC"], page_token=token)
        yield from page
        token = page.token
        if not token:
            return


# ------------------------------------------------------------------ reading


def _names_map(tags: Mapping[str, str]) -> dict[tuple[str, str], str]:
    """``(kind, logged name) -> original name`` from the ``mbe.names`` tags of a run."""
    out = {}
    for key, value in tags.items():
        if key == NAMES_TAG or key.startswith(NAMES_TAG + "."):
            try:
                entries = json.loads(value)
            except ValueError:
                continue
            for entry in entries if isinstance(entries, list) else []:
                if isinstance(entry, list) and len(entry) == 3:
                    out[(entry[0], entry[1])] = entry[2]
    return out


def _metric_value(value: float) -> float:
    """MLflow's SQL stores keep an infinity as the largest float: give the infinity back."""
    if isinstance(value, float) and abs(value) == sys.float_info.max:
        return math.copysign(math.inf, value)
    return value


def _coerce_param(series: pd.Series) -> pd.Series:
    """Params are text in MLflow: numbers (and True / False) become numbers where all parse."""
    present = series.dropna()
    present = present[present != "None"]
    if present.empty:
        return series
    if present.isin(["True", "False"]).all():
        return series.map({"True": True, "False": False})
    numbers = pd.to_numeric(present, errors="coerce")
    if numbers.notna().all():
        return pd.to_numeric(series.where(series != "None"), errors="coerce")
    return series


def _effective_status(tag: Any, run_status: str) -> str:
    if isinstance(tag, str):
        return tag
    return _RUN_STATUS.get(run_status, run_status.lower())


def read_experiment(experiment: str, tracking_uri: str | os.PathLike | None = None, *,
                    status: str | Sequence[str] | None = "ok") -> pd.DataFrame:
    """One row per run of an MLflow experiment, oldest first.

    Parameters
    ----------
    experiment : str
        The experiment's name.
    tracking_uri : str, optional
        Default: MLflow's own (``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``).
    status : str, list of str or None
        Keep runs with this status: their ``status`` tag (as logged by
        :func:`~mbe_helpers.grid.run_grid`), else MLflow's run status with
        ``FINISHED`` counting as ``ok`` and ``FAILED`` / ``KILLED`` as
        ``failed``.  ``None`` keeps every run.

    Returns
    -------
    DataFrame
        ``run_id``, ``run_name``, then the ``params.*``, ``metrics.*`` and
        ``tags.*`` columns without their prefix where the bare name is
        unique (a warning names the columns that keep it), params as numbers
        where every value parses as one, then ``run_status``, ``start_time``
        and ``end_time``.  MLflow's own ``mlflow.*`` tags and this package's
        ``mbe.*`` tags are left out.

    Examples
    --------
    >>> runs = read_experiment("grid", "sqlite:///mlflow.db")          # doctest: +SKIP
    >>> runs[["config_hash", "status", "lr", "test_acc"]].head(2)       # doctest: +SKIP
    """
    uri = resolve_uri(tracking_uri)
    client = _client(uri, must_exist=True)
    experiment_id = _experiment(client, uri, experiment, create=False)
    rows = []
    for run in _runs(client, uri, experiment_id):
        tags = dict(run.data.tags)
        names = _names_map(tags)
        row: dict[str, Any] = {"run_id": run.info.run_id, "run_name": run.info.run_name}
        for kind, values in (("params", run.data.params), ("metrics", run.data.metrics),
                             ("tags", tags)):
            for key, value in values.items():
                if kind == "tags" and key.startswith(("mlflow.", "mbe.")):
                    continue
                value = _metric_value(value) if kind == "metrics" else value
                row[f"{kind}.{names.get((kind, key), key)}"] = value
        row.update(run_status=run.info.status,
                   start_time=pd.to_datetime(run.info.start_time, unit="ms", utc=True),
                   end_time=pd.to_datetime(run.info.end_time, unit="ms", utc=True)
                   if run.info.end_time else pd.NaT)
        if status is not None:
            wanted = {status} if isinstance(status, str) else set(status)
            if _effective_status(tags.get(STATUS_TAG), run.info.status) not in wanted:
                continue
        rows.append(row)
    frame = pd.DataFrame(rows, columns=None if rows else list(INFO_COLUMNS))
    for column in frame.columns:
        if column.startswith("params."):
            frame[column] = _coerce_param(frame[column])
    return _strip_prefixes(frame)


def _strip_prefixes(frame: pd.DataFrame) -> pd.DataFrame:
    """``params.lr`` -> ``lr`` where no other column would be called ``lr``; warn about the rest."""
    bare = {c: c.split(".", 1)[1] for c in frame.columns
            if c.startswith(("params.", "metrics.", "tags."))}
    counts = pd.Series([*bare.values(), *(c for c in frame.columns if c not in bare)]).value_counts()
    kept = [c for c, name in bare.items() if counts[name] > 1]
    if kept:
        warnings.warn(f"{len(kept)} MLflow column{'s' if len(kept) > 1 else ''} keep their prefix "
                      f"because the bare name is taken: {', '.join(kept)}.", UserWarning, stacklevel=3)
    frame = frame.rename(columns={c: name for c, name in bare.items() if c not in kept})
    lead = [c for c in ("run_id", "run_name", HASH_TAG, STATUS_TAG) if c in frame]
    tail = [c for c in INFO_COLUMNS[2:] if c in frame]
    frame = frame[lead + [c for c in frame.columns if c not in lead and c not in tail] + tail]
    frame.attrs["prefixed"] = kept
    return frame


# ------------------------------------------------------------------ logging


def _logged_name(name: str, kind: str, used: dict[str, str]) -> str:
    """A name MLflow accepts for ``name``, distinct from the others of its kind in this run."""
    clean = _BAD_CHARS.sub("_", str(name)) or "_"
    if clean.startswith(".."):
        clean = "_" + clean
    clean = clean[:_MAX_KEY]
    candidate, n = clean, 1
    while used.get(candidate, name) != name:
        n += 1
        candidate = f"{clean[:_MAX_KEY - 8]}_{n}"
    used[candidate] = name
    return candidate


def _text(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else (
        json.dumps(value) if isinstance(value, (list, dict)) else str(value))
    if len(text) > limit:
        log.warning("MLflow keeps at most %d characters of a value; cut %d", limit, len(text) - limit)
        text = text[:limit - 3] + "..."
    return text


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class MLflowTracker:
    """Logs finished grid runs to an MLflow experiment, each ``config_hash`` once.

    Parameters
    ----------
    experiment : str
        Experiment name; created when missing.
    tracking_uri : str, optional
        Default: MLflow's own (``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``).
    ledger : path, optional
        Recorded as the tag ``mbe.ledger`` of every run.

    Examples
    --------
    >>> tracker = MLflowTracker("grid", "sqlite:///mlflow.db")         # doctest: +SKIP
    >>> run_grid(configs, run_fn, "ledger.jsonl", tracker=tracker)     # doctest: +SKIP
    """

    def __init__(self, experiment: str, tracking_uri: str | os.PathLike | None = None, *,
                 ledger: str | os.PathLike | None = None):
        self.experiment = experiment
        self.uri = resolve_uri(tracking_uri)
        self.client = _client(self.uri, must_exist=False)
        self.experiment_id = _experiment(self.client, self.uri, experiment, create=True)
        self.ledger = str(Path(ledger).resolve()) if ledger is not None else None
        self.logged: set[str] = set()
        self._last_ms = 0
        self.refresh()

    def __repr__(self) -> str:
        return f"MLflowTracker({self.experiment!r}, tracking_uri={self.uri!r})"

    def refresh(self) -> None:
        """Re-read which ``config_hash`` values the experiment already holds."""
        self.logged = {run.data.tags[HASH_TAG] for run in _runs(self.client, self.uri,
                                                                 self.experiment_id)
                       if HASH_TAG in run.data.tags}

    def _clock(self) -> int:
        """Milliseconds, strictly increasing: MLflow then lists runs in the order they were logged."""
        self._last_ms = max(int(time.time() * 1000), self._last_ms + 1)
        return self._last_ms

    def log(self, config: Mapping[str, Any], row: Mapping[str, Any]) -> bool:
        """Log one ledger row (params = ``config``, the rest as metrics or tags) unless already there.

        Returns whether a run was created.
        """
        key = str(row[HASH_TAG])
        if key in self.logged:
            return False
        used: dict[str, dict[str, str]] = {"params": {}, "metrics": {}, "tags": {}}
        escaped: list[list[str]] = []

        def name(kind: str, original: str) -> str:
            logged = _logged_name(original, kind, used[kind])
            if logged != original:
                escaped.append([kind, logged, original])
            return logged

        from mlflow.entities import Metric, Param, RunTag

        stamp = self._clock()
        params = [Param(name("params", k), _text(v, _MAX_PARAM)) for k, v in config.items()
                  if v is not None]
        metrics, tags = [], []
        for k, v in row.items():
            if k in config or k in (HASH_TAG, STATUS_TAG) or v is None:
                continue
            if _is_number(v):
                metrics.append(Metric(name("metrics", k), float(v), stamp, 0))
            else:
                tags.append(RunTag(name("tags", k), _text(v, _MAX_TAG)))
        tags += [RunTag(f"{NAMES_TAG}.{i}" if i else NAMES_TAG, chunk)
                 for i, chunk in enumerate(_chunks(escaped))]
        if self.ledger:
            tags.append(RunTag("mbe.ledger", _text(self.ledger, _MAX_TAG)))
        tags += [RunTag(STATUS_TAG, str(row.get(STATUS_TAG, "ok"))), RunTag(HASH_TAG, key)]
        run = _call(self.uri, self.client.create_run, self.experiment_id, start_time=stamp,
                    run_name=key)
        for m, p, t in _split(metrics, params, tags):  # the hash tag is in the last batch
            _call(self.uri, self.client.log_batch, run.info.run_id, metrics=m, params=p, tags=t)
        _call(self.uri, self.client.set_terminated, run.info.run_id, "FINISHED", end_time=stamp)
        self.logged.add(key)
        return True

    def log_missing(self, items: Iterable[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> int:
        """Log every ``(config, row)`` whose hash the experiment lacks; returns how many."""
        return sum(self.log(config, row) for config, row in items)


def _chunks(entries: list[list[str]]) -> list[str]:
    """``mbe.names`` as JSON lists of at most MLflow's tag length each."""
    chunks, current = [], []
    for entry in entries:
        if current and len(json.dumps(current + [entry])) > _MAX_TAG:
            chunks.append(json.dumps(current))
            current = []
        current.append(entry)
    return chunks + ([json.dumps(current)] if current else [])


def _split(metrics: list, params: list, tags: list) -> list[tuple[list, list, list]]:
    """Batches within MLflow's limits (1000 entities, 100 params, 100 tags).

    The last two tags (status and config_hash) come last, alone when the run
    needs several batches: a run whose logging was cut short carries no hash,
    so the next sync logs it again in full.
    """
    if len(params) <= 100 and len(tags) <= 100 and len(metrics) + len(params) + len(tags) <= 1000:
        return [(metrics, params, tags)]
    head, last = tags[:-2], tags[-2:]
    batches = [([], params[i:i + 100], []) for i in range(0, len(params), 100)]
    batches += [([], [], head[i:i + 100]) for i in range(0, len(head), 100)]
    batches += [(metrics[i:i + 1000], [], []) for i in range(0, len(metrics), 1000)]
    return batches + [([], [], last)]


def open_tracker(tracker: Any, tracking_uri: str | os.PathLike | None = None, *,
                 ledger: str | os.PathLike | None = None) -> MLflowTracker:
    """``"mlflow://NAME"`` (or an :class:`MLflowTracker`) as a tracker; bad forms in one sentence.

    Examples
    --------
    >>> open_tracker(42)
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: tracker must look like mlflow://EXPERIMENT, got 42.
    """
    if isinstance(tracker, MLflowTracker):
        return tracker
    if not isinstance(tracker, str):
        raise MBEInputError(f"tracker must look like mlflow://EXPERIMENT, got {tracker!r}.")
    return MLflowTracker(experiment_of(tracker, "tracker"), tracking_uri, ledger=ledger)
