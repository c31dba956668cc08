"""The book machinery: registry, parameters, profiles, staging and the site build."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from mbe_helpers import MBEInputError, book

REPO = Path(__file__).resolve().parents[1]


def write_notebook(path: Path, params: str, *body: str, outputs=None) -> Path:
    """A small notebook: a parameters cell, then code cells."""
    cells = [new_markdown_cell(f"# {path.stem}")]
    first = new_code_cell(params)
    first.metadata["tags"] = ["parameters"]
    cells.append(first)
    cells += [new_code_cell(src) for src in body]
    if outputs:
        cells[-1].outputs = outputs
    nb = new_notebook(cells=cells, metadata={"kernelspec": {
        "name": "python3", "display_name": "Python 3", "language": "python"}})
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def make_root(tmp: Path, profiles: dict | None = None) -> Path:
    """A minimal book: config and toc from the repository, two chapters, profiles."""
    root = tmp / "repo"
    (root / "book").mkdir(parents=True)
    shutil.copy(REPO / "_config.yml", root / "_config.yml")
    toc = {"format": "jb-book", "root": "book/intro",
           "parts": [{"caption": "Chapters", "chapters": [{"file": "book/00_alpha"}]}]}
    (root / "_toc.yml").write_text(yaml.safe_dump(toc))
    (root / "book" / "intro.md").write_text("# Intro\n\nA test book.\n")
    shutil.copy(REPO / "book" / "references.bib", root / "book" / "references.bib")
    write_notebook(root / "book" / "00_alpha.ipynb",
                   "n = 10  # rows\nrate = 0.5  # a rate\n# the name of it\nlabel = 'a'\n"
                   "results_dir = 'results/default/00_alpha'  # artifacts",
                   "print(n * rate)")
    write_notebook(root / "book" / "01_beta.ipynb", "flag = True  # a switch", "print(flag)")
    (root / "book" / "notes.ipynb").write_text((root / "book" / "01_beta.ipynb").read_text())
    profiles = {"00_alpha": {"smoke": {"n": 2}, "paper": {"n": 1000}}} if profiles is None else profiles
    (root / "book" / "profiles.yml").write_text(yaml.safe_dump(profiles))
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_root(tmp_path)


# ------------------------------------------------------------------ registry
def test_discovers_numbered_notebooks_only(root: Path) -> None:
    chapters = book.discover_chapters(root)
    assert [c.stem for c in chapters] == ["00_alpha", "01_beta"]
    assert [c.name for c in chapters] == ["alpha", "beta"]


def test_repository_registry_has_the_method_chapter() -> None:
    chapters = {c.stem: c for c in book.discover_chapters(REPO)}
    method = chapters["00_method"]
    assert {"n", "seed", "n_bootstrap", "results_dir"} <= set(method.parameters)
    assert all(p.comment for p in method.parameters.values())
    assert set(method.profiles) <= set(book.PROFILES)


@pytest.mark.parametrize("name", ["00_alpha", "alpha", "00_alpha.ipynb", "book/00_alpha.ipynb"])
def test_get_chapter_accepts_stem_short_name_and_file(root: Path, name: str) -> None:
    assert book.get_chapter(name, root).stem == "00_alpha"


def test_unknown_chapter_refused_with_the_known_ones(root: Path) -> None:
    with pytest.raises(MBEInputError, match=r"unknown chapter 'gamma'; known chapters: 00_alpha, 01_beta\."):
        book.get_chapter("gamma", root)


def test_find_root_walks_up(root: Path) -> None:
    assert book.find_root(root / "book") == root.resolve()


def test_folder_without_book_refused(tmp_path: Path) -> None:
    with pytest.raises(MBEInputError, match="is not the root of a book"):
        book.discover_chapters(tmp_path)


# ---------------------------------------------------------------- parameters
def test_parameters_cell_gives_defaults_and_comments(root: Path) -> None:
    params = book.get_chapter("alpha", root).parameters
    assert list(params) == ["n", "rate", "label", "results_dir"]
    assert params["n"].default == 10 and params["n"].comment == "rows"
    assert params["rate"].default == 0.5
    assert params["label"].comment == "the name of it"  # comment on the line above


def test_non_literal_default_kept_as_source() -> None:
    params = book.parse_parameters_cell("import math\nx = math.pi  # pi\ny: int = 3\n")
    assert params["x"].default == "math.pi" and params["y"].default == 3


@pytest.mark.parametrize(("text", "value"), [
    ("200", 200), ("0.5", 0.5), ("true", True), ("[1, 2]", [1, 2]), ("mnist", "mnist"),
    ("null", None), ("", ""), ("a: [", "a: ["),
])
def test_parse_value_reads_yaml(text: str, value) -> None:
    assert book.parse_value(text) == value


def test_profile_then_overrides_then_results_dir(root: Path) -> None:
    alpha = book.get_chapter("alpha", root)
    assert book.resolve_parameters(alpha, "default") == {}
    assert book.resolve_parameters(alpha, "smoke", results_dir="/r") == {"n": 2, "results_dir": "/r"}
    got = book.resolve_parameters(alpha, "smoke", {"n": 5, "rate": 1}, results_dir="/r")
    assert got == {"n": 5, "rate": 1, "results_dir": "/r"}
    got = book.resolve_parameters(alpha, "paper", {"results_dir": "mine"}, results_dir="/r")
    assert got["results_dir"] == "mine"


def test_unknown_parameter_refused_listing_known_ones(root: Path) -> None:
    alpha = book.get_chapter("alpha", root)
    with pytest.raises(MBEInputError, match=r"unknown parameter 'm' for chapter 00_alpha; "
                                            r"known parameters: n, rate, label, results_dir\."):
        book.resolve_parameters(alpha, "default", {"m": 1})


@pytest.mark.parametrize(("name", "value"), [("n", "ten"), ("n", 2.5), ("n", True), ("flag", 1)])
def test_wrong_type_refused(root: Path, name: str, value) -> None:
    chapter = book.get_chapter("alpha" if name == "n" else "beta", root)
    with pytest.raises(MBEInputError, match=f"parameter '{name}' of chapter"):
        book.resolve_parameters(chapter, "default", {name: value})


def test_unknown_profile_refused(root: Path) -> None:
    alpha = book.get_chapter("alpha", root)
    with pytest.raises(MBEInputError, match=r"unknown profile 'fast'; known profiles: smoke, default, paper\."):
        book.resolve_parameters(alpha, "fast")


@pytest.mark.parametrize(("profiles", "message"), [
    ({"02_gamma": {"smoke": {}}}, "profiles.yml names chapter '02_gamma'"),
    ({"alpha": {"quick": {"n": 1}}}, "unknown profile 'quick'"),
    ({"alpha": {"smoke": {"epochs": 1}}}, r"unknown parameter 'epochs' in profiles.yml \(smoke\)"),
    ({"alpha": {"smoke": 3}}, r"must map chapter -> profile -> \{parameter: value\}"),
    (["alpha"], r"must map chapter -> profile"),
])
def test_bad_profiles_file_refused(tmp_path: Path, profiles: dict, message: str) -> None:
    with pytest.raises(MBEInputError, match=message):
        book.discover_chapters(make_root(tmp_path, profiles))


def test_short_name_keys_in_profiles(tmp_path: Path) -> None:
    root = make_root(tmp_path, {"alpha": {"smoke": {"n": 3}}})
    assert book.get_chapter("00_alpha", root).profiles["smoke"] == {"n": 3}


def test_resolve_results_dir_relative_to_root(root: Path, monkeypatch) -> None:
    monkeypatch.chdir(root / "book")
    path = book.resolve_results_dir("results/x/00_alpha")
    assert path == root.resolve() / "results" / "x" / "00_alpha" and path.is_dir()


# ------------------------------------------------------------------- staging
def test_stage_switches_execution_off_and_adds_missing_chapters(root: Path, tmp_path: Path) -> None:
    executed = [write_notebook(tmp_path / "ex" / f"{s}.ipynb", "x = 1") for s in ("00_alpha", "01_beta")]
    stage = book.stage_book(root, executed)
    config = yaml.safe_load((stage / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "off"
    toc = yaml.safe_load((stage / "_toc.yml").read_text())
    assert [c["file"] for c in toc["parts"][0]["chapters"]] == ["book/00_alpha", "book/01_beta"]
    assert (stage / "book" / "01_beta.ipynb").is_file() and (stage / "book" / "intro.md").is_file()
    assert not (stage / "book" / "notes.ipynb").exists()


def test_stage_refuses_notebook_with_error_output(root: Path, tmp_path: Path) -> None:
    error = new_output("error", ename="ZeroDivisionError", evalue="division by zero", traceback=[])
    bad = write_notebook(tmp_path / "ex" / "00_alpha.ipynb", "x = 1", "1 / 0", outputs=[error])
    with pytest.raises(book.ChapterError, match=r"00_alpha.ipynb holds an error output \(ZeroDivisionError"):
        book.stage_book(root, [bad])


def test_raises_exception_tag_is_allowed(tmp_path: Path) -> None:
    error = new_output("error", ename="ValueError", evalue="shown on purpose", traceback=[])
    nb = write_notebook(tmp_path / "n.ipynb", "x = 1", "raise ValueError", outputs=[error])
    assert book.notebook_errors(nb) == ["ValueError: shown on purpose"]
    data = nbformat.read(nb, as_version=4)
    data.cells[-1].metadata["tags"] = ["raises-exception"]
    nbformat.write(data, nb)
    assert book.notebook_errors(nb) == []


@pytest.mark.slow
def test_sphinx_warning_fails_the_build(root: Path, tmp_path: Path) -> None:
    (root / "book" / "intro.md").write_text("# Intro\n\nSee {doc}`missing_page`.\n")
    executed = write_notebook(tmp_path / "ex" / "00_alpha.ipynb", "x = 1")
    stage = book.stage_book(root, [executed])
    with pytest.raises(book.BuildError, match="jupyter-book build failed: .*missing_page"):
        book.build_site(stage, tmp_path / "out")


# --------------------------------------------------------------------- build
@pytest.mark.slow
def test_raising_chapter_stops_the_build_and_keeps_earlier_ones(root: Path) -> None:
    write_notebook(root / "book" / "01_beta.ipynb", "flag = True  # a switch",
                   "raise RuntimeError('the grid diverged')")
    with pytest.raises(book.ChapterError) as info:
        book.build_book(root, "smoke", progress=False)
    message = str(info.value)
    assert message.startswith("chapter 01_beta failed in cell [")
    assert "RuntimeError: the grid diverged" in message and "\n" not in message
    assert (root / "_build" / "executed" / "smoke" / "00_alpha.ipynb").is_file()
    assert not (root / "_build" / "html").exists()


@pytest.mark.slow
def test_smoke_build_of_the_real_book(smoke_book: Path) -> None:
    root = smoke_book
    index = root / "_build" / "html" / "index.html"
    assert index.is_file()
    html = root / "_build" / "html" / "book"
    method = (html / "00_method.html").read_text(encoding="utf-8")
    assert "The loss proxy" in method  # figure caption rendered
    assert "Fig. 1" in method
    assert 'src="http' not in method  # offline: no script or image from a CDN
    assert 'pasted-text">every case received the class its construction implies<' in method
    references = (html / "references.html").read_text(encoding="utf-8")
    for author in ("Spearman", "Benjamini", "Vallat", "Jiang", "Dziugaite", "Baba"):
        assert author in references
    assert (root / "results" / "smoke" / "00_method" / "audit.csv").is_file()
    assert (root / "_build" / "executed" / "smoke" / "00_method.ipynb").is_file()


def test_lab_kernel_is_this_environment() -> None:
    """`make lab` opens the chapters with the `python3` kernel of the environment holding the package."""
    import subprocess
    import sys

    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec(book.KERNEL)
    python = spec.argv[0] if spec.argv[0] != "python" else sys.executable
    probe = subprocess.run([python, "-c", "import mbe_helpers, sys; print(sys.prefix)"],
                           capture_output=True, text=True, check=True)
    assert Path(probe.stdout.strip()).resolve() == Path(sys.prefix).resolve()
    lab = subprocess.run([sys.executable, "-m", "jupyterlab", "--version"], capture_output=True, text=True)
    assert lab.returncode == 0 and lab.stdout.strip()[0].isdigit()
