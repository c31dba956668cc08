"""The ``mbe-book`` command line: list, run, audit, and its one-sentence errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mbe_helpers.cli import main
from mbe_helpers.simulate import simulate_method_cases
from notebooks import copy_book

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent




def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mbe-book: error: ") and "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def runs_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("runs") / "runs.csv"
    simulate_method_cases(n=300, seed=1).to_csv(path, index=False)
    return path


# ---------------------------------------------------------------------- list
def test_list_shows_parameters_defaults_comments_and_profiles(capsys) -> None:
    assert main(["--root", str(REPO), "list"]) == 0
    out = capsys.readouterr().out
    for text in ("00_method (method)", "n_bootstrap", "1000", "simulated training runs", "smoke", "paper"):
        assert text in out
    row = next(line for line in out.splitlines() if " n_bootstrap " in line)
    assert "200" in row and "2000" in row  # smoke and paper overrides


# ----------------------------------------------------------------- run errors
@pytest.mark.parametrize(("args", "expected"), [
    (["run", "nope"], "unknown chapter 'nope'; known chapters: 00_method"),
    (["run", "method", "-p", "epochs", "3"], "unknown parameter 'epochs' for chapter 00_method; "
                                             "known parameters: n, metric_noise"),
    (["run", "method", "--profile", "fast"], "unknown profile 'fast'; known profiles: smoke, default, paper."),
    (["run", "method", "-p", "n", "many"], "bad parameter: n must be a valid integer, got 'many'."),
    (["run", "method", "-p", "n", "10"], "bad parameter: n must be greater than or equal to 50, got 10."),
    (["run", "calibration_controls", "-p", "seeds", "[0]"],
     "bad parameter: seeds must have at least 2 items, got [0]."),
])
def test_run_refuses_bad_names_in_one_sentence(capsys, args: list[str], expected: str) -> None:
    assert main(["--root", str(REPO), *args]) == 2
    assert expected in one_error_line(capsys.readouterr().err)


def test_usage_error_is_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run"])
    assert info.value.code == 2
    assert "the following arguments are required: chapter" in one_error_line(capsys.readouterr().err)


# --------------------------------------------------------------------- audit
def test_audit_prints_table_and_writes_reports(capsys, runs_csv: Path, tmp_path: Path) -> None:
    md, csv = tmp_path / "report.md", tmp_path / "out" / "report.csv"
    status = main(["audit", str(runs_csv), "--metrics", "loss_proxy,independent_signal",
                   "--target", "final_acc", "--controls", "early_loss,arch", "--bootstrap", "200",
                   "--adjust", "rank", "--placebos", "0", "--out", str(md), "--out", str(csv)])
    assert status == 0
    out = capsys.readouterr().out
    assert "loss_proxy" in out and "washout" in out and "survives" in out
    assert "| loss_proxy" in md.read_text()
    table = pd.read_csv(csv)
    assert list(table.metric) == ["loss_proxy", "independent_signal"]
    assert {"raw_lo", "partial_hi", "classification"} <= set(table.columns)


def test_audit_calibrated_by_default_with_placebo_table(capsys, runs_csv: Path, tmp_path: Path) -> None:
    md, csv = tmp_path / "report.md", tmp_path / "report.csv"
    status = main(["audit", str(runs_csv), "--metrics", "loss_proxy,independent_signal",
                   "--target", "final_acc", "--controls", "early_loss,arch", "--placebos", "50",
                   "--out", str(md), "--out", str(csv)])
    assert status == 0
    out = capsys.readouterr().out
    assert "Placebo self-calibration" in out and "crossfit" in out
    assert "**Placebo self-calibration**" in md.read_text()
    table = pd.read_csv(csv)
    assert set(table.adjust) == {"crossfit"} and table.adj_r.notna().all()
    assert table.set_index("metric").classification["independent_signal"] == "survives"
    calibration = pd.read_csv(tmp_path / "report_calibration.csv")
    assert set(calibration.kind) == {"noise", "proxy", "twin"} and (calibration.K == 50).all()


@pytest.mark.parametrize("flags, message", [
    (["--adjust", "spline"], "unknown adjust 'spline'; choose one of auto, rank, crossfit"),
    (["--folds", "1"], "folds must be at least 2"),
    (["--placebos", "-1"], "placebos must be a non-negative integer"),
    (["--placebos", "100000"], "more than the limit of 10000"),
])
def test_audit_bad_calibration_flags(capsys, runs_csv: Path, flags, message) -> None:
    status = main(["audit", str(runs_csv), "--metrics", "loss_proxy", "--target", "final_acc",
                   "--controls", "early_loss", *flags])
    assert status == 2 and message in one_error_line(capsys.readouterr().err)


def test_audit_refuses_to_overwrite_its_input(capsys, runs_csv: Path) -> None:
    before = runs_csv.read_bytes()
    status = main(["audit", str(runs_csv), "--metrics", "loss_proxy", "--target", "final_acc",
                   "--out", str(runs_csv)])
    assert status == 2 and "is the input file" in one_error_line(capsys.readouterr().err)
    assert runs_csv.read_bytes() == before


def test_audit_groupby_and_permutations(capsys, runs_csv: Path) -> None:
    status = main(["audit", str(runs_csv), "--metrics", "simpson_metric", "--target", "final_acc",
                   "--controls", "early_loss,arch", "--groupby", "arch", "--permutations", "200",
                   "--seed", "3"])
    assert status == 0
    out = capsys.readouterr().out
    assert "arch=mlp" in out and "perm_p" in out


@pytest.mark.parametrize(("args", "expected"), [
    (["--metrics", "nosuch", "--target", "final_acc"], "nosuch"),
    (["--metrics", "loss_proxy", "--target", "final_acc", "--out", "r.txt"], "--out must end in .md or .csv"),
])
def test_audit_bad_input_exits_2_with_one_line(capsys, runs_csv: Path, args, expected) -> None:
    assert main(["audit", str(runs_csv), *args]) == 2
    assert expected in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(("args", "expected"), [
    (["--out", "/proc/no/report.md"], "--out /proc/no/report.md: cannot write in /proc ("),
    (["--comparators", "nosuch"], "nosuch"),
])
def test_audit_refuses_before_auditing(capsys, runs_csv: Path, args, expected) -> None:
    """Found by a fuzzing pass: these errors came after the whole audit (and its printed table),
    an unwritable --out naming an internal temporary file."""
    status = main(["audit", str(runs_csv), "--metrics", "loss_proxy", "--target", "final_acc",
                   "--placebos", "0", *args])
    captured = capsys.readouterr()
    assert status == 2 and expected in one_error_line(captured.err)
    assert "MBE audit" not in captured.out


def test_audit_missing_file_from_the_console_script(tmp_path: Path) -> None:
    proc = subprocess.run([BIN / "mbe-book", "audit", str(tmp_path / "none.csv"), "--metrics", "a",
                           "--target", "b"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert one_error_line(proc.stderr) == f"mbe-book: error: no such file: {tmp_path / 'none.csv'}."


def test_audit_unreadable_csv(capsys, tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert main(["audit", str(empty), "--metrics", "a", "--target", "b"]) == 2
    assert "could not read" in one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------- running chapters
def executed_cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


@pytest.mark.slow
def test_mbe_book_run_smoke_writes_notebook_and_results(tmp_path: Path) -> None:
    root = copy_book(tmp_path)
    proc = subprocess.run([BIN / "mbe-book", "--root", str(root), "run", "00_method", "--profile", "smoke",
                           "-p", "seed", "0"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    executed = root / "_build" / "executed" / "smoke" / "00_method.ipynb"
    assert "_build/executed/smoke/00_method.ipynb" in proc.stdout
    injected = next(c for c in executed_cells(executed) if "injected-parameters" in c["metadata"].get("tags", []))
    source = "".join(injected["source"])
    assert "n = 400" in source and "n_bootstrap = 200" in source and "seed = 0" in source
    assert 'results_dir = "results/smoke/00_method"' in source and str(root) not in source
    results = root / "results" / "smoke" / "00_method"
    assert {"audit.csv", "verdict.csv", "runs.csv", "loss_proxy.png"} <= {p.name for p in results.iterdir()}
    assert "00_method: 100%" in proc.stderr  # the progress bar


@pytest.mark.slow
def test_custom_rerun_never_touches_the_profile_run(tmp_path: Path) -> None:
    root = copy_book(tmp_path)
    run = [BIN / "mbe-book", "--root", str(root), "run", "00_method", "--profile", "smoke", "--no-progress"]
    assert subprocess.run(run, capture_output=True, text=True, check=False).returncode == 0
    profile_files = {p: p.read_bytes() for p in [root / "_build/executed/smoke/00_method.ipynb",
                                                  *(root / "results/smoke/00_method").iterdir()]}
    bad = subprocess.run([*run, "-p", "n", "-5"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "bad parameter: n must be greater than or equal to 50" in bad.stderr
    custom = subprocess.run([*run, "-p", "n", "300"], capture_output=True, text=True, check=False)
    assert custom.returncode == 0, custom.stderr[-2000:]
    folder = next((root / "results" / "custom").iterdir())
    assert folder.name.startswith("00_method-") and f"artifacts: results/custom/{folder.name}" in custom.stdout
    assert pd.read_csv(folder / "audit.csv").n.eq(300).all()
    assert (root / "_build" / "executed" / "custom" / f"{folder.name}.ipynb").is_file()
    assert {p: p.read_bytes() for p in profile_files} == profile_files   # the profile run untouched


@pytest.mark.slow
def test_plain_papermill_runs_a_chapter(tmp_path: Path) -> None:
    out, results = tmp_path / "out.ipynb", tmp_path / "results"
    proc = subprocess.run([BIN / "papermill", "book/00_method.ipynb", str(out), "-p", "seed", "3",
                           "-p", "n", "300", "-p", "n_bootstrap", "100", "-p", "results_dir", str(results),
                           "--no-progress-bar"], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.is_file()
    assert pd.read_csv(results / "audit.csv").n.eq(300).all()
