"""The torch-free core install: the built wheel in a fresh virtualenv audits a CSV without torch.

``test_core_wheel_audits_a_csv_without_torch`` builds the wheel once per
version of the sources (kept in the temporary folder, keyed by a hash of
them), installs it into a fresh virtualenv with the core dependencies only
(from the registry or pip's cache) and runs ``mbe-book audit`` there.  Set
``MBE_SKIP_WHEEL_TEST=1`` to skip it.  It prints the size and install time of
the core virtualenv (``pytest -s``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import tomllib
import venv
from pathlib import Path

import pandas as pd
import pytest

from mbe_helpers.cli import main
from mbe_helpers.simulate import simulate_method_cases

REPO = Path(__file__).resolve().parents[1]
AUDIT = ["--metrics", "loss_proxy,independent_signal", "--target", "final_acc",
         "--controls", "early_loss", "--placebos", "20", "--seed", "5"]
EXTRA_MODULES = {"torch": ["torch", "torchvision", "mnist1d", "sklearn"],
                 "dask": ["dask", "distributed"], "mlflow": ["mlflow"], "parquet": ["pyarrow"],
                 "book": ["papermill", "jupyter_book", "ipykernel", "jupyterlab"]}
BLOCK = """
import importlib.util
import sys

class _NotInstalled:  # as if these were not installed: imports fail, find_spec says None
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, _NotInstalled())
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: (None if name.split(".")[0] in {blocked!r}
                                             else _find_spec(name, *a))
"""


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def pins() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().split()
    return {_norm(line.split("==")[0]): line.split("==")[1] for line in lines if "==" in line}


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _name(requirement: str) -> str:
    for stop in "[<>=!~; ":
        requirement = requirement.split(stop)[0]
    return _norm(requirement)


# ------------------------------------------------------------------ the declared dependencies


def test_core_leaves_out_torch_and_every_extra_is_pinned() -> None:
    meta = project()
    core = {_name(r) for r in meta["dependencies"]}
    assert not core & {"torch", "torchvision", "mnist1d", "dask", "distributed", "mlflow-skinny",
                       "pyarrow", "jupyter-book", "papermill", "scikit-learn"}
    extras = meta["optional-dependencies"]
    assert set(extras) == {"torch", "dask", "mlflow", "parquet", "book", "dev"}
    for name in ("book", "dev"):  # both bring every other extra
        assert "mbe-helpers[torch,dask,mlflow,parquet]" in extras[name]
    pinned = pins()
    named = core | {_name(r) for reqs in extras.values() for r in reqs} - {"mbe-helpers"}
    assert not sorted(named - set(pinned)), "every dependency needs a pin in constraints.txt"


def test_without_the_extras_the_core_works_and_torch_modules_name_their_extra(tmp_path: Path) -> None:
    """In this interpreter with every extra's modules hidden: the core audit runs, the rest says why."""
    runs = tmp_path / "runs.csv"
    simulate_method_cases(n=120, seed=1).to_csv(runs, index=False)
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    blocked = sorted({m for mods in EXTRA_MODULES.values() for m in mods})
    script = BLOCK.format(blocked=blocked) + textwrap.dedent(f"""
        import mbe_helpers, mbe_helpers.audit, mbe_helpers.grid, mbe_helpers.simulate
        import mbe_helpers.spectral, mbe_helpers.crossfit, mbe_helpers.probes, mbe_helpers.plots
        import mbe_helpers.runtime, mbe_helpers.sources, mbe_helpers.comparators
        from mbe_helpers.cli import main
        assert main(["audit", {str(runs)!r}, "--metrics", "loss_proxy", "--target", "final_acc",
                     "--controls", "early_loss", "--placebos", "0"]) == 0
        for name in ("train", "data", "models", "fisher", "credit", "feedback", "protocol",
                     "stream", "residual"):
            try:
                __import__("mbe_helpers." + name)
            except ModuleNotFoundError as exc:
                print("MESSAGE", exc)
        from mbe_helpers.sources import read_runs
        for source in ({str(tmp_path / "x.parquet")!r}, "mlflow://grid"):
            try:
                read_runs(source)
            except ModuleNotFoundError as exc:
                print("MESSAGE", exc)
        assert not [m for m in sys.modules if m.split(".")[0] in {blocked!r}]
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          check=False, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    messages = [line[len("MESSAGE "):] for line in proc.stdout.splitlines() if line.startswith("MESSAGE")]
    assert len(messages) == 11, proc.stdout
    assert messages[0] == ("mbe_helpers.train needs torch, which is not installed; install it with "
                           "pip install 'mbe-helpers[torch]'.")
    assert all("pip install 'mbe-helpers[torch]'." in m for m in messages[:9])
    assert messages[9].endswith("pip install 'mbe-helpers[parquet]'.")
    assert messages[10].endswith("pip install 'mbe-helpers[mlflow]'.")
    proc = subprocess.run([sys.executable, "-c", BLOCK.format(blocked=blocked) + textwrap.dedent("""
        from mbe_helpers.cli import main
        raise SystemExit(main(["run", "00_method"]))
    """)], cwd=REPO, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "mbe-book: error: executing a chapter needs papermill, which is not installed; install it "
        "with pip install 'mbe-helpers[book]'."), proc.stderr


# ------------------------------------------------------------------ the wheel in a fresh venv


def _sources_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted([REPO / "pyproject.toml", REPO / "README.md",
                        *(p for p in (REPO / "mbe_helpers").rglob("*") if p.is_file()
                          and "__pycache__" not in p.parts)]):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def built_wheel() -> Path:
    """The wheel of the current sources, built once into the temporary folder and reused."""
    cache = Path(tempfile.gettempdir()) / "mbe-helpers-wheels" / _sources_digest()
    found = sorted(cache.glob("mbe_helpers-*.whl"))
    if found:
        return found[0]
    with tempfile.TemporaryDirectory() as scratch:  # build from a copy: no build/ in the checkout
        src = Path(scratch) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(REPO / name, src / name)
        shutil.copytree(REPO / "mbe_helpers", src / "mbe_helpers",
                        ignore=shutil.ignore_patterns("__pycache__"))
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                               "--disable-pip-version-check", "-w", str(Path(scratch) / "out"),
                               str(src)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        cache.mkdir(parents=True, exist_ok=True)
        wheel = next((Path(scratch) / "out").glob("mbe_helpers-*.whl"))
        shutil.move(wheel, cache / wheel.name)
    return cache / wheel.name


@pytest.mark.slow
@pytest.mark.wheel
@pytest.mark.skipif(os.environ.get("MBE_SKIP_WHEEL_TEST") == "1", reason="MBE_SKIP_WHEEL_TEST=1")
def test_core_wheel_audits_a_csv_without_torch(tmp_path: Path, capsys) -> None:
    wheel = built_wheel()
    env_dir = tmp_path / "core-venv"
    clean = {k: v for k, v in os.environ.items()  # nothing of this interpreter's paths leaks in
             if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE", "VIRTUAL_ENV")}
    try:
        venv.create(env_dir, with_pip=True, symlinks=True)
        python = env_dir / "bin" / "python"
        start = time.perf_counter()
        proc = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-compile",
                               "--disable-pip-version-check", "-c", str(REPO / "constraints.txt"),
                               str(wheel)], capture_output=True, text=True, check=False, env=clean)
        seconds = time.perf_counter() - start
        assert proc.returncode == 0, proc.stderr[-3000:]
        size = int(subprocess.run(["du", "-sm", str(env_dir)], capture_output=True, text=True,
                                  check=True).stdout.split()[0])
        with capsys.disabled():
            print(f"\ncore virtualenv: {size} MiB, installed in {seconds:.0f} s")
        assert size < 1024, f"the core virtualenv takes {size} MiB"

        probe = textwrap.dedent("""
            for name in ("torch", "torchvision", "mlflow", "pyarrow", "dask", "papermill",
                         "mbe_helpers.train"):
                try:
                    __import__(name)
                except ModuleNotFoundError as exc:
                    print(type(exc).__name__, exc)
        """)
        check = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True,
                               env=clean)
        assert check.stdout.splitlines() == [
            *(f"ModuleNotFoundError No module named '{m}'"
              for m in ("torch", "torchvision", "mlflow", "pyarrow", "dask", "papermill")),
            "MissingExtraError mbe_helpers.train needs torch, which is not installed; install it "
            "with pip install 'mbe-helpers[torch]'."]

        runs = tmp_path / "runs.csv"
        simulate_method_cases(n=200, seed=1).to_csv(runs, index=False)
        there, here = tmp_path / "core.csv", tmp_path / "full.csv"
        proc = subprocess.run([env_dir / "bin" / "mbe-book", "audit", str(runs), *AUDIT,
                               "--out", str(there)], capture_output=True, text=True, check=False,
                              cwd=tmp_path, env=clean)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "survives" in proc.stdout
        assert main(["audit", str(runs), *AUDIT, "--out", str(here)]) == 0
        pd.testing.assert_frame_equal(pd.read_csv(there), pd.read_csv(here))
    finally:
        shutil.rmtree(env_dir, ignore_errors=True)
