"""Audit sources: CSV, TSV, parquet, JSON records, the grid's ledger and a real MLflow store.

The MLflow tests use a real tracking store in a temporary SQLite file (no
mocks) and skip when mlflow is not installed; the parquet tests skip without
pyarrow.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mbe_helpers import book, probes
from mbe_helpers.audit import audit, read_runs
from mbe_helpers.cli import main
from mbe_helpers.errors import MBEInputError
from mbe_helpers.grid import FINISHED, read_ledger, run_grid, sample_configs

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before mlflow is imported: no calls out

REPO = Path(__file__).resolve().parents[1]
METRICS = ["fim_norm@5", "loss_proxy@5"]
TARGET = "test_acc"
CONTROLS = ["val_loss@5", "lr", "arch"]
FAILING, DIVERGING = 5, 3


def fake_run(config: dict) -> dict:
    """A run in microseconds with the shape of a real one: a baseline, two metrics, a target."""
    if config["seed"] == FAILING:
        raise RuntimeError("CUDA out of memory")
    rng = np.random.default_rng(config["seed"])
    capability, trait = rng.normal(size=2) + [math.log10(config["lr"]) / 4, 0.0]
    if config["seed"] == DIVERGING:
        return {"status": "diverged", "val_loss@5": math.nan, "fim_norm@5": math.nan,
                "loss_proxy@5": math.nan, TARGET: math.nan, "diverged_epoch": 2}
    return {"val_loss@5": float(-capability + 0.3 * rng.normal()),
            "fim_norm@5": float(trait + 0.5 * rng.normal()),
            "loss_proxy@5": float(-capability + 0.5 * rng.normal()),
            TARGET: float(capability + trait + 0.3 * rng.normal()),
            "grad_peak": math.inf if config["seed"] == 0 else float(rng.exponential()),
            "engine": "fake", "layers": np.int64(config["width"] // 8)}


def configs(n: int) -> list[dict]:
    space = {"lr": {"log_uniform": [1e-4, 1e-1]}, "arch": {"choice": ["mlp", "cnn"]},
             "width": {"choice": [16, 32]}, "probe_epochs": [1, 5]}
    frame = sample_configs(space, n, seed=0)
    frame["seed"] = range(n)
    return frame.to_dict("records")


def audit_table(frame: pd.DataFrame, **kw) -> pd.DataFrame:
    return audit(frame, METRICS, TARGET, CONTROLS, placebos=0, **kw).to_frame()


def one_sentence(message: str) -> str:
    assert "\n" not in message and message.endswith("."), message
    return message


# ------------------------------------------------------------------ files


def test_csv_tsv_parquet_and_json_records_round_trip(tmp_path: Path) -> None:
    frame = pd.DataFrame({"run": ["a", "b", "c"], "lr": [0.1, 0.01, np.nan], "width": [16, 32, 64],
                          "ok": [True, False, True]})
    frame.to_csv(tmp_path / "runs.csv", index=False)
    frame.to_csv(tmp_path / "runs.tsv", sep="\t", index=False)
    frame.to_csv(tmp_path / "semicolon.csv", sep=";", index=False)
    frame.to_json(tmp_path / "runs.jsonl", orient="records", lines=True)
    frame.to_json(tmp_path / "runs.json", orient="records")
    for name in ("runs.csv", "runs.tsv", "semicolon.csv", "runs.jsonl", "runs.json"):
        pd.testing.assert_frame_equal(read_runs(tmp_path / name), frame, check_dtype=False)
    assert read_runs(str(tmp_path / "runs.jsonl")).width.dtype.kind == "i"


def test_parquet_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    frame = pd.DataFrame({"run": ["a", "b"], "lr": [0.1, np.nan], "width": [16, 32]})
    frame.to_parquet(tmp_path / "runs.parquet")
    pd.testing.assert_frame_equal(read_runs(tmp_path / "runs.parquet"), frame, check_dtype=False)


def test_a_grid_ledger_is_read_as_the_grid_reads_it(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    grid = run_grid(configs(12), fake_run, ledger, progress=False, retries=0)
    run_grid(configs(12), fake_run, ledger, progress=False, retries=0)  # the failure again: 2 rows
    assert ledger.read_text().count('"failed"') == 2
    everything = read_runs(ledger, status=None)
    pd.testing.assert_frame_equal(everything, read_ledger(ledger))
    assert len(everything) == 12 and set(everything.status) == {"ok", "diverged", "failed"}
    ok = read_runs(ledger)
    assert len(ok) == 10 and set(ok.status) == {"ok"}
    assert list(ok.config_hash) == list(grid.config_hash[grid.status == "ok"])
    finished = read_runs(ledger, status=list(FINISHED))
    assert len(finished) == 11
    records = [json.loads(line) for line in ledger.read_text().splitlines()]
    (tmp_path / "ledger.json").write_text(json.dumps(records))
    pd.testing.assert_frame_equal(read_runs(tmp_path / "ledger.json"), ok)


def test_torn_last_line_of_a_ledger_is_skipped(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    run_grid(configs(4), fake_run, ledger, progress=False)
    with open(ledger, "ab") as handle:
        handle.write(b'{"config_hash": "abc", "status": "ok", "test_acc": 0.')
    assert len(read_runs(ledger, status=None)) == 4


@pytest.mark.parametrize(("name", "content", "fragment"), [
    ("runs.xlsx", "a,b\n1,2\n", "'.xlsx' is not a known format; use .csv, .tsv, .parquet, .jsonl or .json"),
    ("runs", "a,b\n1,2\n", "no extension is not a known format"),
    ("missing.csv", None, "no such file:"),
    ("dup.csv", "a,b,a\n1,2,3\n", "names column 'a' more than once"),
    ("empty.csv", "", "could not read"),
    ("dict.json", '{"a": [1, 2]}', "holds a JSON dict; give a list of run records"),
    ("text.jsonl", "a,b\n1,2\n", "no line holds a JSON object"),
    ("bad.parquet", "not parquet", "could not read"),
])
def test_bad_files_are_one_sentence(tmp_path: Path, name: str, content: str | None, fragment: str) -> None:
    if name.endswith(".parquet"):
        pytest.importorskip("pyarrow")
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(MBEInputError) as caught:
        read_runs(path)
    assert fragment in one_sentence(str(caught.value))


def test_folders_urls_and_bad_status_are_one_sentence(tmp_path: Path) -> None:
    for source, fragment in [(tmp_path, "is a folder"), ("s3://bucket/runs.csv", "mlflow://EXPERIMENT"),
                             ("", "file path or mlflow://EXPERIMENT"), ("mlflow://", "mlflow://EXPERIMENT")]:
        with pytest.raises(MBEInputError, match=fragment) as caught:
            read_runs(source)
        one_sentence(str(caught.value))
    with pytest.raises(MBEInputError, match="status must be"):
        read_runs(tmp_path / "x.csv", status=3)


# ------------------------------------------------------------------ MLflow


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """A grid of 40 fake runs logged to a real SQLite MLflow store over four calls.

    1. 10 configs without a tracker; 2. 25 configs with it (the 10 are logged
    from the ledger, 15 as they finish); 3. all 40 (a resume); 4. all 40 again.
    """
    pytest.importorskip("mlflow")
    folder = tmp_path_factory.mktemp("mlflow")
    uri, ledger = f"sqlite:///{folder / 'mlflow.db'}", folder / "ledger.jsonl"
    counts = []
    for i, n in enumerate((10, 25, 40, 40)):
        tracker = None if i == 0 else "mlflow://grid"
        run_grid(configs(n), fake_run, ledger, progress=False, retries=0, tracker=tracker,
                 tracking_uri=uri)
        counts.append(len(logged_hashes(uri)) if i else 0)
    return {"uri": uri, "ledger": ledger, "folder": folder, "counts": counts}


def logged_hashes(uri: str, experiment: str = "grid") -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=1000)
    return [r.data.tags.get("config_hash") for r in runs]


def test_grid_logs_each_finished_run_once_and_resuming_adds_none(store: dict) -> None:
    ledger = read_ledger(store["ledger"])
    finished = set(ledger.config_hash[ledger.status.isin(FINISHED)])
    assert len(ledger) == 40 and len(finished) == 39  # one config fails every time
    assert store["counts"] == [0, 24, 39, 39]
    hashes = logged_hashes(store["uri"])
    assert len(hashes) == len(set(hashes)) == 39 and set(hashes) == finished


def test_mlflow_runs_read_back_as_the_ledger_holds_them(store: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no column keeps its prefix here
        runs = read_runs("mlflow://grid", tracking_uri=store["uri"])
    ledger = read_runs(store["ledger"])
    assert list(runs.config_hash) == list(ledger.config_hash)  # the ledger's order, ok runs only
    assert list(runs.columns[:4]) == ["run_id", "run_name", "config_hash", "status"]
    present = [c for c in ledger.columns if ledger[c].notna().any()]  # not only of other runs
    assert set(present) <= set(runs.columns) and "error" not in present
    for column in present:
        left, right = runs[column].reset_index(drop=True), ledger[column]
        if column == "probe_epochs":  # a list param is its JSON text
            assert (left == right.map(json.dumps)).all()
        elif right.dtype.kind in "if":
            np.testing.assert_array_equal(left.to_numpy(float), right.to_numpy(float))
        else:
            assert list(left) == list(right), column
    assert runs.seed.dtype.kind == "i" and runs.width.dtype.kind == "i"  # params parsed as numbers
    assert math.isinf(runs.grad_peak.iloc[0])  # MLflow's largest float is read back as inf
    everything = read_runs("mlflow://grid", tracking_uri=store["uri"], status=None)
    assert len(everything) == 39 and (everything.status == "diverged").sum() == 1


def test_same_audit_from_csv_parquet_jsonl_and_mlflow(store: dict, tmp_path: Path, capsys) -> None:
    folder = store["folder"]
    ok = read_runs(store["ledger"])
    ok.to_csv(tmp_path / "runs.csv", index=False)
    sources = [str(store["ledger"]), str(tmp_path / "runs.csv"), "mlflow://grid"]
    try:
        import pyarrow  # noqa: F401
        ok.to_parquet(tmp_path / "runs.parquet")
        sources.append(str(tmp_path / "runs.parquet"))
    except ImportError:
        pass
    tables = {}
    for i, source in enumerate(sources):
        out = folder / f"audit_{i}.csv"
        status = main(["audit", source, "--tracking-uri", store["uri"], "--metrics", ",".join(METRICS),
                       "--target", TARGET, "--controls", ",".join(CONTROLS), "--placebos", "0",
                       "--out", str(out)])
        assert status == 0, capsys.readouterr().err
        tables[source] = pd.read_csv(out)
    reference = tables[str(tmp_path / "runs.csv")]
    assert reference.n.eq(38).all()
    for source, table in tables.items():
        gap = (table.partial_r - reference.partial_r).abs().max()
        print(f"max |partial_r difference| {source}: {gap:.3g}")
        assert gap <= 1e-12
        pd.testing.assert_frame_equal(table, reference, check_exact=False, rtol=1e-12, atol=1e-12)
    crossfit = audit_table(ok, adjust="crossfit", folds=3)  # folds follow the row order
    assert (crossfit.adjust == "crossfit").all()
    pd.testing.assert_frame_equal(audit_table(read_runs("mlflow://grid", tracking_uri=store["uri"]),
                                              adjust="crossfit", folds=3), crossfit)


def test_ambiguous_names_keep_their_prefix_and_foreign_runs_count_by_mlflow_status(store) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store["uri"])
    experiment = client.create_experiment("foreign")
    for status, lr in (("FINISHED", "0.1"), ("FINISHED", "1e-3"), ("FAILED", "0.5")):
        run = client.create_run(experiment)
        client.log_param(run.info.run_id, "lr", lr)
        client.log_param(run.info.run_id, "optimizer", "adam")
        client.log_metric(run.info.run_id, "lr", 0.5)
        client.log_metric(run.info.run_id, "acc", 0.9)
        client.set_tag(run.info.run_id, "owner", "me")
        client.set_terminated(run.info.run_id, status)
    with pytest.warns(UserWarning, match=r"2 MLflow columns keep their prefix .*params\.lr, metrics\.lr"):
        runs = read_runs("mlflow://foreign", tracking_uri=store["uri"])
    assert len(runs) == 2 and {"params.lr", "metrics.lr", "acc", "optimizer", "owner"} <= set(runs)
    assert runs["params.lr"].tolist() == [0.1, 0.001]  # numbers where every value parses
    assert runs.attrs["prefixed"] == ["params.lr", "metrics.lr"]
    with pytest.warns(UserWarning):
        assert len(read_runs("mlflow://foreign", tracking_uri=store["uri"], status=None)) == 3


def test_bad_mlflow_sources_are_one_sentence(store: dict, tmp_path: Path, capsys) -> None:
    cases = [
        ("mlflow://nosuch", store["uri"], "no MLflow experiment named 'nosuch' at"),
        ("mlflow://grid", f"sqlite:///{tmp_path / 'absent.db'}", "does not exist"),
        ("mlflow://grid", "http://127.0.0.1:9", "cannot reach the MLflow tracking server at "
                                                 "http://127.0.0.1:9: connection refused."),
        ("mlflow://grid", "nosuchscheme://x", "has a scheme MLflow does not know ('nosuchscheme')"),
    ]
    for source, uri, fragment in cases:
        with pytest.raises(MBEInputError) as caught:
            read_runs(source, tracking_uri=uri)
        assert fragment in one_sentence(str(caught.value))
        assert main(["audit", source, "--tracking-uri", uri, "--metrics", "a", "--target", "b"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
    assert "experiments there: " in str(pytest.raises(MBEInputError, read_runs, "mlflow://nosuch",
                                                      tracking_uri=store["uri"]).value)
    assert not (tmp_path / "absent.db").exists()  # reading never creates a store


def test_bad_trackers_fail_before_any_run(store: dict, tmp_path: Path) -> None:
    for tracker, fragment in [("wandb://x", "must look like mlflow://EXPERIMENT"),
                              ("mlflow://", "must look like mlflow://EXPERIMENT"),
                              (3, "must look like mlflow://EXPERIMENT")]:
        with pytest.raises(MBEInputError, match=fragment):
            run_grid(configs(2), fake_run, tmp_path / "l.jsonl", progress=False, tracker=tracker)
    with pytest.raises(MBEInputError, match="cannot reach"):
        run_grid(configs(2), fake_run, tmp_path / "l.jsonl", progress=False, tracker="mlflow://g",
                 tracking_uri="http://127.0.0.1:9")
    assert not (tmp_path / "l.jsonl").exists()


def test_mbe_book_run_track_logs_the_chapter_grid(store: dict, tmp_path: Path, monkeypatch,
                                                  capsys) -> None:
    """``--track`` reaches the chapter's run_with_ledger (the chapter itself is a stand-in here)."""
    seen = {}

    def chapter(chapter, profile, overrides, root, progress):  # what a grid chapter's kernel does
        seen["env"] = os.environ["MBE_TRACK"], os.environ["MLFLOW_TRACKING_URI"]
        probes.run_with_ledger(pd.DataFrame(configs(6)), fake_run, tmp_path / "ledger.jsonl")
        return tmp_path / "executed.ipynb"

    monkeypatch.setattr(book, "execute_chapter", chapter)
    monkeypatch.delenv("MBE_TRACK", raising=False)
    assert main(["--root", str(REPO), "run", "00_method", "--track", "mlflow://chapter",
                 "--tracking-uri", store["uri"]]) == 0
    assert seen["env"] == ("mlflow://chapter", store["uri"])
    assert "tracked in MLflow: experiment 'chapter'" in capsys.readouterr().out
    assert len(read_runs("mlflow://chapter", tracking_uri=store["uri"])) == 4  # ok runs of 6
    assert "MBE_TRACK" not in os.environ
    assert main(["--root", str(REPO), "run", "00_method", "--tracking-uri", store["uri"]]) == 2
    assert "--tracking-uri needs --track" in capsys.readouterr().err
