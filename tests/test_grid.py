"""Tests of mbe_helpers.grid: sampling, hashing, the ledger, resume after SIGKILL, executors."""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mbe_helpers.errors import MBEInputError
from mbe_helpers.grid import (Choice, LogUniform, Uniform, append_records, config_hash,
                              read_ledger, run_grid, sample_configs)
from mbe_helpers.train import TrainRun, train_run

TINY = {"width": 8, "depth": 1, "epochs": 3, "n_train": 150, "probe_epochs": [1, 3]}


pytestmark = pytest.mark.usefixtures("one_thread")


def double(config: dict) -> dict:
    """A cheap run function."""
    return {"y": 2 * config["x"]}


class Flaky:
    """Fails the first ``failures`` calls per config, then doubles; counts calls."""

    def __init__(self, failures: int):
        self.failures, self.calls, self.lock = failures, {}, threading.Lock()

    def __call__(self, config: dict) -> dict:
        with self.lock:
            self.calls[config["x"]] = self.calls.get(config["x"], 0) + 1
            if self.calls[config["x"]] <= self.failures:
                raise RuntimeError(f"worker lost on x={config['x']}")
        return double(config)


def metric_columns(frame: pd.DataFrame) -> pd.DataFrame:
    drop = ["seconds", "engine", "finished_at", "attempts"]
    return frame.drop(columns=[c for c in drop if c in frame]).reset_index(drop=True)


# ---------------------------------------------------------------- sampling and hashing


def test_sample_configs_is_reproducible_and_within_bounds():
    space = {"lr": LogUniform(1e-4, 1e-1), "width": LogUniform(8, 128, integer=True),
             "p": Uniform(0.0, 0.5), "seed": Uniform(0, 9, integer=True),
             "optimizer": Choice(("adam", "sgd")), "epochs": 20, "probe_epochs": [5, 10],
             "wd": {"log-uniform": [1e-6, 1e-2]}, "depth": {"choice": [1, 2, 3]}}
    a, b = sample_configs(space, 200, seed=1), sample_configs(space, 200, seed=1)
    pd.testing.assert_frame_equal(a, b)
    assert not a["lr"].equals(sample_configs(space, 200, seed=2)["lr"])
    assert a["lr"].between(1e-4, 1e-1).all() and a["wd"].between(1e-6, 1e-2).all()
    assert np.log(a["lr"]).mean() == pytest.approx(np.log([1e-4, 1e-1]).mean(), abs=0.4)
    assert a["width"].between(8, 128).all() and a["width"].dtype.kind == "i"
    assert set(a["seed"]) == set(range(10)) and set(a["optimizer"]) == {"adam", "sgd"}
    assert (a["epochs"] == 20).all() and a["probe_epochs"][0] == [5, 10]
    assert set(a["depth"]) == {1, 2, 3} and a["p"].between(0, 0.5).all()


def test_adding_a_dimension_leaves_other_columns_unchanged():
    small = sample_configs({"lr": LogUniform(1e-3, 1.0)}, 20, seed=0)
    large = sample_configs({"width": Choice((8, 16)), "lr": LogUniform(1e-3, 1.0)}, 20, seed=0)
    pd.testing.assert_series_equal(small["lr"], large["lr"])


@pytest.mark.parametrize("space, n, fragment", [
    ({"lr": {"gaussian": [0, 1]}}, 3, "space entry 'lr' must be a constant or one of"),
    ({"lr": LogUniform(0.0, 1.0)}, 3, "0 < low <= high"),
    ({"lr": 1.0}, -1, "n must be a non-negative integer"),
])
def test_bad_spaces_fail_with_one_sentence(space, n, fragment):
    with pytest.raises(MBEInputError, match=fragment):
        sample_configs(space, n, seed=0)


def test_config_hash_is_stable_and_canonical():
    assert config_hash({"a": 1, "b": "x"}) == config_hash({"b": "x", "a": 1})
    assert config_hash({"width": 64}) == config_hash({"width": np.float64(64.0)})
    assert config_hash({"lr": 0.1}) != config_hash({"lr": 0.1000001})
    assert config_hash({"e": (5, 10)}) == config_hash({"e": [5, 10]})
    assert len(config_hash({})) == 16


# ---------------------------------------------------------------- the ledger


def test_rerun_skips_finished_runs_and_changed_space_appends(tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    counter = Flaky(failures=0)
    first = run_grid([{"x": i} for i in range(5)], counter, ledger, progress=False)
    assert list(first["y"]) == [0, 2, 4, 6, 8] and set(first["status"]) == {"ok"}
    before = ledger.read_bytes()
    again = run_grid([{"x": i} for i in range(3, 8)], counter, ledger, progress=False)
    assert list(again["x"]) == [3, 4, 5, 6, 7] and list(again["y"]) == [6, 8, 10, 12, 14]
    assert counter.calls == {i: 1 for i in range(8)}
    assert ledger.read_bytes().startswith(before)
    assert len(read_ledger(ledger)) == 8


def test_torn_last_line_is_ignored_and_repaired(tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    run_grid([{"x": i} for i in range(3)], double, ledger, progress=False)
    with open(ledger, "ab") as handle:
        handle.write(b'{"config_hash": "abc", "status": "ok", "y": 12')  # killed mid-write
    assert len(read_ledger(ledger)) == 3
    out = run_grid([{"x": i} for i in range(4)], double, ledger, progress=False)
    assert list(out["y"]) == [0, 2, 4, 6]
    lines = ledger.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["status"] == "ok" for line in lines)


def test_resume_after_sigkill_loses_nothing_and_duplicates_nothing(tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    script = tmp_path / "grid_script.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from mbe_helpers.grid import run_grid

        def slow_double(config):
            time.sleep(0.05)
            return {"y": 2 * config["x"]}

        run_grid([{"x": i} for i in range(60)], slow_double, sys.argv[1], progress=False)
    """))
    child = subprocess.Popen([sys.executable, str(script), str(ledger)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if ledger.exists() and ledger.read_bytes().count(b"\n") >= 5:
            break
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    survived = read_ledger(ledger)
    assert 5 <= len(survived) < 60
    counter = Flaky(failures=0)
    out = run_grid([{"x": i} for i in range(60)], counter, ledger, progress=False)
    assert len(counter.calls) == 60 - len(survived)
    assert not set(counter.calls) & set(survived["x"])
    rows = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert len(rows) == 60 == len({r["config_hash"] for r in rows})
    assert list(out["y"]) == [2 * i for i in range(60)]


def test_append_records_writes_whole_lines(tmp_path):
    ledger = tmp_path / "sub" / "ledger.jsonl"
    append_records(ledger, [{"config_hash": "a", "v": np.float32(1.5), "t": (1, 2)},
                            {"config_hash": "b", "v": float("nan")}])
    frame = read_ledger(ledger)
    assert list(frame["config_hash"]) == ["a", "b"] and frame["v"][0] == 1.5
    assert math.isnan(frame["v"][1]) and ledger.read_bytes().endswith(b"\n")


# ---------------------------------------------------------------- failures and executors


@pytest.mark.parametrize("pool", [None, "threads"])
def test_failures_are_retried_then_recorded(tmp_path, pool):
    executor = ThreadPoolExecutor(2) if pool else None
    flaky, broken = Flaky(failures=1), Flaky(failures=10)
    try:
        ok = run_grid([{"x": 1}, {"x": 2}], flaky, tmp_path / "a.jsonl", executor, False)
        bad = run_grid([{"x": 1}], broken, tmp_path / "b.jsonl", executor, False, retries=2)
    finally:
        if executor:
            executor.shutdown()
    assert list(ok["status"]) == ["ok", "ok"] and list(ok["attempts"]) == [2, 2]
    assert bad["status"][0] == "failed" and bad["attempts"][0] == 3
    assert bad["error"][0] == "RuntimeError: worker lost on x=1" and broken.calls == {1: 3}
    rerun = run_grid([{"x": 1}], Flaky(failures=0), tmp_path / "b.jsonl", progress=False)
    assert rerun["status"][0] == "ok" and len(read_ledger(tmp_path / "b.jsonl")) == 1


class BrokenPool(cf.Executor):
    """An executor whose workers are gone."""

    def submit(self, fn, /, *args, **kwargs):
        raise cf.BrokenExecutor("the pool lost its workers")


def unserialisable(config: dict) -> dict:
    return {"y": object()}


def test_broken_pools_bad_configs_and_bad_records_are_recorded(tmp_path):
    broken = run_grid([{"x": 1}], double, tmp_path / "a.jsonl", BrokenPool(), False, retries=1)
    assert broken["error"][0] == "BrokenExecutor: the pool lost its workers"
    assert broken["attempts"][0] == 2
    bad = run_grid([{"widht": 3}, {**TINY}], train_run, tmp_path / "b.jsonl", progress=False)
    assert list(bad["status"]) == ["failed", "ok"] and bad["attempts"][0] == 1
    assert bad["error"][0].startswith("MBEInputError: unknown config keys ['widht']")
    odd = run_grid([{"x": 1}], unserialisable, tmp_path / "c.jsonl", progress=False)
    assert odd["status"][0] == "failed" and "not JSON-able" in odd["error"][0]


def test_diverging_config_is_recorded_and_the_grid_goes_on(tmp_path):
    configs = [{**TINY, "optimizer": "sgd", "momentum": 0.0, "lr": lr} for lr in (1e30, 0.1)]
    out = run_grid(configs, train_run, tmp_path / "l.jsonl", progress=False)
    assert list(out["status"]) == ["diverged", "ok"]
    assert out["diverged_epoch"][0] >= 1 and out["test_acc"][1] > 0


def test_thread_pool_grid_equals_in_process_grid_even_with_dropout(tmp_path):
    configs = sample_configs({**TINY, "lr": LogUniform(1e-3, 1e-1), "seed": Choice((0, 1, 2, 3)),
                              "dropout": {"choice": [0.0, 0.3]}, "batch_size": 50}, 6, seed=3)
    inline = run_grid(configs, train_run, tmp_path / "a.jsonl", progress=False)
    with ThreadPoolExecutor(2) as pool:
        threaded = run_grid(configs, train_run, tmp_path / "b.jsonl", pool, progress=False)
    pd.testing.assert_frame_equal(metric_columns(inline), metric_columns(threaded))


def test_dask_local_cluster_grid_equals_in_process_grid(tmp_path):
    distributed = pytest.importorskip("distributed")
    configs = sample_configs({**TINY, "lr": LogUniform(1e-3, 1e-1), "seed": Choice((0, 1, 2)),
                              "optimizer": Choice(("adam", "sgd"))}, 6, seed=4)
    inline = run_grid(configs, train_run, tmp_path / "a.jsonl", progress=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        on_dask = run_grid(configs, train_run, tmp_path / "b.jsonl", client, progress=False)
    pd.testing.assert_frame_equal(metric_columns(inline), metric_columns(on_dask))


def test_grouped_runs_go_through_the_ensemble(tmp_path):
    configs = [{**TINY, "dtype": "float64", "lr": lr, "seed": s}
               for lr, s in [(0.01, 0), (0.02, 1), (0.03, 2)]] + [{**TINY, "model": "resmlp"}]
    out = run_grid(configs, TrainRun(ensemble=True), tmp_path / "e.jsonl", progress=False)
    alone = run_grid(configs, TrainRun(ensemble=False), tmp_path / "s.jsonl", progress=False)
    assert list(out["engine"]) == ["ensemble:3"] * 3 + ["sequential"]
    pd.testing.assert_frame_equal(metric_columns(out), metric_columns(alone), rtol=1e-9)


def test_bad_arguments_fail_with_one_sentence(tmp_path):
    with pytest.raises(MBEInputError, match="JSON lines: name it with .jsonl"):
        run_grid([{"x": 1}], double, tmp_path / "ledger.csv")
    with pytest.raises(MBEInputError, match="executor must be None"):
        run_grid([{"x": 1}], double, tmp_path / "l.jsonl", executor=42)
    with pytest.raises(MBEInputError, match="not JSON-able"):
        run_grid([{"x": object()}], double, tmp_path / "l.jsonl")


def test_progress_bar_is_quiet_when_not_a_terminal(tmp_path, capsys):
    run_grid([{"x": i} for i in range(3)], double, tmp_path / "l.jsonl", progress=True)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_missing_cells_take_defaults_and_share_a_hash(tmp_path):
    frame = pd.DataFrame([{"x": 1, "extra": np.nan}, {"x": 2, "extra": 5.0}])
    out = run_grid(frame, double, tmp_path / "l.jsonl", progress=False)
    assert config_hash({"x": 1}) == out["config_hash"][0]
    assert math.isnan(out["extra"][0]) and out["extra"][1] == 5


def test_complete_last_record_without_newline_is_kept(tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    run_grid([{"x": i} for i in range(3)], double, ledger, progress=False)
    ledger.write_bytes(ledger.read_bytes()[:-1])  # killed just before the last "\n"
    assert list(read_ledger(ledger)["y"]) == [0, 2, 4]
    counter = Flaky(failures=0)
    out = run_grid([{"x": i} for i in range(5)], counter, ledger, progress=False)
    assert counter.calls == {3: 1, 4: 1} and list(out["y"]) == [0, 2, 4, 6, 8]
    rows = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert [r["x"] for r in rows] == [0, 1, 2, 3, 4] and len(read_ledger(ledger)) == 5


def test_lines_that_are_not_objects_are_skipped_with_a_warning(tmp_path, caplog):
    ledger = tmp_path / "ledger.jsonl"
    run_grid([{"x": 0}], double, ledger, progress=False)
    with open(ledger, "ab") as handle:
        handle.write(b'[1, 2]\nnull\n"text"\n')
    assert list(read_ledger(ledger)["x"]) == [0]
    assert caplog.text.count("not a JSON object") == 3
    out = run_grid([{"x": 0}, {"x": 1}], double, ledger, progress=False)
    assert list(out["y"]) == [0, 2]
    with open(ledger, "ab") as handle:
        handle.write(b"[3]")  # a last line that is not a record is dropped on the next append
    run_grid([{"x": 2}], double, ledger, progress=False)
    assert ledger.read_bytes().endswith(b"}\n") and len(read_ledger(ledger)) == 3


def test_a_ledger_path_that_is_a_directory_is_one_sentence(tmp_path):
    with pytest.raises(MBEInputError, match=r"is a directory; give a file inside it, e\.g\."):
        run_grid([{"x": 1}], double, tmp_path)
    with pytest.raises(MBEInputError, match="is a directory"):
        read_ledger(tmp_path)


def test_two_concurrent_runners_split_the_grid_and_train_each_config_once(tmp_path):
    ledger, calls = tmp_path / "ledger.jsonl", tmp_path / "calls"
    script = tmp_path / "runner.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time
        from pathlib import Path
        from mbe_helpers.grid import run_grid

        def slow_double(config):
            with open(sys.argv[2], "a") as log:
                log.write(f"{config['x']} {os.getpid()}\\n")
            time.sleep(0.05)
            return {"y": 2 * config["x"], "pid": os.getpid()}

        Path(sys.argv[3] + sys.argv[4]).touch()
        while not Path(sys.argv[3]).exists():  # start together
            time.sleep(0.005)
        out = run_grid([{"x": i} for i in range(40)], slow_double, sys.argv[1], progress=False)
        print(len(out), sorted(out["x"]) == list(range(40)), set(out["status"]))
    """))
    go = tmp_path / "go"
    children = [subprocess.Popen([sys.executable, str(script), str(ledger), str(calls), str(go),
                                  f".ready{i}"], stdout=subprocess.PIPE, text=True)
                for i in range(2)]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(
            Path(f"{go}.ready{i}").exists() for i in range(2)):
        time.sleep(0.01)
    go.touch()
    outputs = [child.communicate(timeout=120)[0] for child in children]
    assert [child.returncode for child in children] == [0, 0]
    assert outputs == ["40 True {'ok'}\n"] * 2
    trained = [line.split() for line in calls.read_text().splitlines()]
    assert sorted(int(x) for x, _ in trained) == list(range(40))  # each config exactly once
    assert len({pid for _, pid in trained}) == 2  # and the work was split
    rows = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert len(rows) == 40 == len({r["config_hash"] for r in rows})
    assert not (tmp_path / ".ledger.jsonl.claims").exists()


def test_bad_training_configs_are_recorded_at_once_with_their_sentence(tmp_path, caplog):
    configs = [{**TINY, "lr": "fast"}, {**TINY, "activation": "swish"}, {**TINY, "device": "tpu"},
               {**TINY}]
    out = run_grid(configs, train_run, tmp_path / "l.jsonl", progress=False, retries=2)
    assert list(out["status"]) == ["failed", "failed", "failed", "ok"]
    assert list(out["attempts"]) == [1, 1, 1, 1] and "attempt" not in caplog.text
    assert out["error"][0] == ("MBEInputError: config key 'lr' must be a finite number "
                               "(e.g. 0.001), got 'fast'")
    assert out["error"][1].startswith("MBEInputError: unknown activation 'swish'; choose one of")
    assert out["error"][2].startswith("MBEInputError: unknown device 'tpu'; use 'cpu'")
