"""Every page of the built site, opened in headless Chromium as a reader would.

Checks per page: it loads without requesting anything off the machine, no
image is broken, math is typeset (no raw ``\\(`` or ``$$`` left in the text),
no Sphinx error box, and every internal link points at an existing file.
A screenshot of each page is kept in ``_build/screenshots`` of the smoke build.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                       "(`make test` installs it where apt-get is available)"),
]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]

PAGE_STATE = """async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  const text = Array.from(document.querySelectorAll('article, main, body'))[0].cloneNode(true);
  text.querySelectorAll('pre, code, script, style, .highlight').forEach(e => e.remove());
  return {
    broken: Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src),
    images: document.images.length,
    text: text.innerText,
    errors: Array.from(document.querySelectorAll('.system-message, .problematic')).map(e => e.innerText.slice(0, 120)),
    math: document.querySelectorAll('mjx-container').length,
    links: Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href')),
  };
}"""


def site_pages(html: Path) -> list[Path]:
    return sorted(p for p in html.rglob("*.html") if "_static" not in p.parts and "_sources" not in p.parts)


def broken_links(page: Path, hrefs: list[str]) -> list[str]:
    bad = []
    for href in hrefs:
        url = urlparse(href)
        if url.scheme or href.startswith(("#", "mailto:")) or not url.path:
            continue
        target = (page.parent / unquote(url.path)).resolve()
        if not target.exists():
            bad.append(href)
    return bad


def read_page(page, path: Path) -> dict:
    """Open a page and return its state once it has settled (index.html redirects)."""
    page.goto(path.as_uri(), wait_until="load")
    for _ in range(5):
        try:
            return page.evaluate(PAGE_STATE)
        except playwright.Error:                               # navigated meanwhile: wait and retry
            page.wait_for_load_state("load")
    return page.evaluate(PAGE_STATE)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with playwright.sync_playwright() as p:
        profile = tmp_path_factory.mktemp("chromium-profile")
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1280, "height": 900})
        yield context
        context.close()


def test_every_page_reads_right(smoke_book: Path, browser) -> None:
    html = smoke_book / "_build" / "html"
    shots = smoke_book / "_build" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    pages = site_pages(html)
    assert len(pages) >= 6, pages
    outside, problems, typeset = [], [], 0
    page = browser.new_page()
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
    for path in pages:
        state = read_page(page, path)
        page.screenshot(path=str(shots / f"{path.relative_to(html).as_posix().replace('/', '__')}.png"),
                        full_page=False)
        name = path.relative_to(html).as_posix()
        problems += [f"{name}: broken image {src}" for src in state["broken"]]
        problems += [f"{name}: Sphinx error box: {e}" for e in state["errors"]]
        problems += [f"{name}: raw math left: {m}" for m in ("\\(", "\\[", "$$") if m in state["text"]]
        landed = Path(unquote(urlparse(page.url).path))           # index.html redirects
        problems += [f"{name}: dead link {h}" for h in broken_links(landed, state["links"])]
        typeset += state["math"]
    page.close()
    assert not problems, "\n".join(problems)
    assert not outside, f"pages requested resources off the machine: {sorted(set(outside))[:5]}"
    assert typeset > 20, "the methods page should show typeset equations"
