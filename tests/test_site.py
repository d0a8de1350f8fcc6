"""The built documentation site: nothing internal leaks into it, formulas render
offline, and the conventions table is readable at 1280 px.

The site is built once per test session into a temporary folder (about ten
seconds; skipped without Sphinx, i.e. without ``pip install -e ".[docs]"``).  The
browser check drives headless Chromium (Debian's ``chromium`` package, which
``.ci/run`` installs) and is skipped where no Chromium is found.
"""

from __future__ import annotations

import html.parser
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("sphinx")
    pytest.importorskip("pydata_sphinx_theme")
    out = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-q",
            "-W",
            "--keep-going",
            "-b",
            "html",
            str(ROOT / "docs"),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    return out


class _Text(html.parser.HTMLParser):
    """The text a reader sees: everything outside <script> and <style>."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def _pages(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("*.html") if "_static" not in p.parts)


def _visible_text(page: Path) -> str:
    parser = _Text()
    parser.feed(page.read_text(encoding="utf-8"))
    return " ".join(parser.parts)


# Internal references a reader cannot resolve: the source documents bnorm was
# commissioned from ("article 000") and issue numbers ("#3").
_INTERNAL = re.compile(r"\barticles?\s+0\d*|\bthe articles\b|#\d", re.IGNORECASE)


def test_site_has_no_internal_references(site: Path) -> None:
    pages = _pages(site)
    assert len(pages) > 20, "the site looks incomplete"
    found = {}
    for page in pages:
        hits = sorted({m.group(0) for m in _INTERNAL.finditer(_visible_text(page))})
        if hits:
            found[str(page.relative_to(site))] = hits
    assert not found, f"internal references in the built site: {found}"


def test_internal_reference_pattern_catches_what_it_must() -> None:
    for text in ("as article 000 does", "Article 002's layer", "the articles' bug", "Speed (#3)"):
        assert _INTERNAL.search(text), text
    for text in ("the article column", "Chapter 3", "C# code", "a batch of 3"):
        assert not _INTERNAL.search(text), text


def test_formulas_render_offline(site: Path) -> None:
    assert (site / "_static" / "mathjax" / "tex-chtml.js").is_file()
    page = (site / "guide" / "batch-norm.html").read_text(encoding="utf-8")
    scripts = re.findall(r"<script[^>]*\ssrc=\"([^\"]+)\"", page)
    assert any(s.endswith("_static/mathjax/tex-chtml.js") for s in scripts), scripts
    remote = [s for s in scripts if re.match(r"(https?:)?//", s)]
    assert not remote, f"scripts loaded from the network: {remote}"


def test_navigation_order(site: Path) -> None:
    """The header lists the sections in the order a user needs them, none under "More"."""
    page = (site / "index.html").read_text(encoding="utf-8")
    header = page[page.index('class="bd-navbar-elements') :]
    header = header[: header.index("</ul>")]
    titles = [re.sub(r"<[^>]+>", "", t).strip() for t in re.findall(r"<a[^>]*>(.*?)</a>", header, re.S)]
    assert titles == [
        "Getting started",
        "User guide",
        "Porting",
        "Demo",
        "API reference",
        "Performance",
        "Changelog",
        "Contributing",
    ], titles


_PROBE = """<script>
window.addEventListener("load", function () {
  var table = document.querySelector("article table");
  var cell = Array.from(table.querySelectorAll("th")).find(function (c) {
    return c.textContent.trim() === "bnorm";
  });
  // Scroll the page vertically only (never the table's own box), so that the
  // header row is in the viewport, then ask what a reader sees at the cell's
  // centre and at its right edge: clipping by a scroll box or overlap by a
  // sidebar shows up as another element there.
  window.scrollTo(0, cell.getBoundingClientRect().top + window.scrollY - 200);
  var r = cell.getBoundingClientRect();
  var y = r.top + r.height / 2;
  function seen(x) {
    var e = document.elementFromPoint(x, y);
    return e !== null && cell.contains(e);
  }
  var out = {viewport: window.innerWidth, left: r.left, right: r.right, width: r.width,
             centre_seen: seen(r.left + r.width / 2), right_edge_seen: seen(r.right - 4)};
  var pre = document.createElement("pre");
  pre.id = "bnorm-probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_conventions_table_bnorm_column_visible_at_1280px(site: Path, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium (Debian: apt-get install chromium)")
    page = site / "guide" / "conventions.html"
    probe = page.with_name("conventions-probe.html")  # beside it, so relative links resolve
    probe.write_text(
        page.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8"
    )
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
        "--window-size=1280,900",
    ]
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120
    )
    found = re.search(r'<pre id="bnorm-probe"[^>]*>([^<]*)</pre>', dom.stdout)
    assert found, f"the probe did not run: {dom.stderr[-2000:]}"
    box = json.loads(found.group(1))
    # The bnorm column is on screen, at a readable width, and the table is not cut off.
    assert box["viewport"] == 1280, box
    assert 0 <= box["left"] and box["right"] <= box["viewport"], box
    assert box["width"] >= 150, box
    assert box["centre_seen"] and box["right_edge_seen"], box
    # A screenshot for a person to look at when this fails.
    subprocess.run(
        [browser, *flags, f"--screenshot={tmp_path / 'conventions-1280.png'}", page.as_uri()],
        capture_output=True,
        timeout=120,
    )
