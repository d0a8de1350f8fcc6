"""Sphinx configuration for the bnorm documentation.

Build (warnings are errors, as in CI)::

    pip install -e ".[docs]" && sphinx-build -W --keep-going -b html docs docs/_build/html

The build needs no network, and neither does the built site: intersphinx has no
remote inventories, and MathJax is shipped with the site (the docs extra installs
``sphinx-mathjax-offline``, which copies MathJax 3 into ``_static/mathjax``), so
formulas render offline.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Document the source tree next to this file (a worktree or a fresh clone), not
# whatever bnorm happens to be installed.
sys.path.insert(0, str(ROOT / "src"))

# The version lives in one place, src/bnorm/_version.py (hatch reads the same file).
_match = re.search(
    r"^__version__\s*=\s*[\"']([^\"']+)[\"']",
    (ROOT / "src" / "bnorm" / "_version.py").read_text(encoding="utf-8"),
    re.MULTILINE,
)
if _match is None:  # pragma: no cover - a broken _version.py must fail the build loudly
    raise RuntimeError("no __version__ = '...' line in src/bnorm/_version.py")

project = "bnorm"
author = "bnorm developers"
copyright = "bnorm developers, BSD-3-Clause"
release = _match.group(1)
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "numpydoc",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    # MathJax 3 copied into the site and used instead of a CDN: formulas render offline.
    "sphinx-mathjax-offline",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []

# -- cross-references ----------------------------------------------------------
nitpicky = False
# No remote inventories: the build must work offline.  References such as
# :func:`torch.nn.functional.batch_norm` render as code without a link.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
intersphinx_disabled_reftypes = ["*"]

# -- MyST ----------------------------------------------------------------------
myst_enable_extensions = [
    "amsmath",  # \begin{aligned} ... blocks
    "dollarmath",  # $inline$ and $$display$$ math
    "colon_fence",
    "deflist",
]
myst_heading_anchors = 3
myst_dmath_double_inline = True

# -- autodoc / numpydoc --------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the signatures show them; numpydoc sections give the shapes
autosummary_generate = False
numpydoc_show_class_members = False  # autodoc :members: lists them; avoids duplicates
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks: set[str] = set()

# -- HTML ----------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"bnorm {release}"
html_static_path = ["_static"]
html_css_files = ["bnorm.css"]  # a wide article column; tables wrap or scroll, never clip
html_theme_options = {
    "navigation_with_keys": False,
    # The header holds the eight sections of index.md's toctree; none hides under "More".
    "header_links_before_dropdown": 8,
    "show_toc_level": 2,
    # No right-hand column: "On this page" sits in the left sidebar, below the
    # section's pages, so the article gets the width (at 1280 px a third column
    # left the conventions table clipped).
    "secondary_sidebar_items": [],
    "footer_start": ["copyright"],
    "footer_end": [],
}
# The left sidebar lists the section's pages, then the headings of this page.
html_sidebars = {"**": ["sidebar-nav-bs", "page-toc"]}
html_show_sourcelink = False


# -- the top-level overview (docs/api/bnorm.md) -------------------------------
# `.. bnorm-public-names` in that page becomes a table of every name in
# bnorm.__all__ linking to where it is documented: the public module whose API
# page (docs/api/<module>.md) lists it.  Names no such module exports are
# documented on the page itself.  New exports appear without editing the page.
_MARKER = ".. bnorm-public-names"
_DATA_DOCS = {
    "__version__": "The version of bnorm (from ``src/bnorm/_version.py``).",
    "CONVENTIONS": "The presets accepted by ``convention=``, by name: "
    ":class:`bnorm.Convention` records (see the conventions guide).",
}


def _documents(module: Any, name: str, obj: Any) -> bool:
    """Whether ``automodule:: module`` with ``:members:`` documents `obj` as `name`."""
    if getattr(module, name, None) is not obj:
        return False
    public: list[str] | None = getattr(module, "__all__", None)
    if public is not None:
        return name in public
    return bool(getattr(obj, "__module__", None) == module.__name__)


def _public_names_rst() -> str:
    bnorm = importlib.import_module("bnorm")
    pages = sorted(p.stem for p in (ROOT / "docs" / "api").glob("*.md") if p.stem != "bnorm")
    modules = []
    for stem in pages:
        try:
            modules.append(importlib.import_module(f"bnorm.{stem}"))
        except ImportError:
            continue
    linked: list[str] = []
    here: list[str] = []
    for name in bnorm.__all__:
        obj = getattr(bnorm, name)
        if inspect.ismodule(obj):
            continue
        home = next((m for m in modules if _documents(m, name, obj)), None)
        if home is not None:
            linked.append(f"   ~{home.__name__}.{name}")
        elif inspect.isclass(obj):
            here.append(f".. autoclass:: bnorm.{name}\n   :members:\n")
        elif callable(obj):
            here.append(f".. autofunction:: bnorm.{name}\n")
        else:
            value = repr(obj)
            option = f":value: {value}" if len(value) <= 40 else f":type: {type(obj).__name__}"
            here.append(f".. py:data:: bnorm.{name}\n   {option}\n\n   {_DATA_DOCS.get(name, '')}\n")
    table = ".. currentmodule:: None\n\n.. autosummary::\n   :nosignatures:\n\n" + "\n".join(linked) + "\n"
    return table + ("\n" + "\n".join(here) if here else "")


def _insert_public_names(app: Any, docname: str, source: list[str]) -> None:
    if docname == "api/bnorm" and _MARKER in source[0]:
        source[0] = source[0].replace(_MARKER, _public_names_rst())


def setup(app: Any) -> dict[str, Any]:
    app.connect("source-read", _insert_public_names)
    return {"parallel_read_safe": True}
