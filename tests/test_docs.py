"""The documentation's examples run, and the site covers every public module.

Every ``>>>`` example in a fenced ``pycon`` (or ``python``) block of a page under
docs/ is executed as a doctest, one namespace per page (blocks run in order, as
a reader would type them).  MyST pages are not doctested by Sphinx, so this is
what keeps the guides honest.

A page whose examples need an optional package says so in a MyST comment line
(not rendered): ``% doctest-requires: torch`` (several: ``torch, keras``).  Its
examples are skipped, as a whole, when a package cannot be imported.
"""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil
import re
from pathlib import Path

import numpy as np
import pytest

import bnorm

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

_FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})(?P<info>[^\n]*)\n(?P<body>.*?)^(?P=fence)[ \t]*$", re.M | re.S)
_DOCTEST_LANGS = {"pycon", "python", "py", "{doctest}"}


def _pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)


def _example_text(page: Path) -> str:
    """The ``>>>`` blocks of `page`, concatenated; empty when it has none."""
    blocks = []
    for m in _FENCE.finditer(page.read_text(encoding="utf-8")):
        lang = m.group("info").strip().split(" ")[0] if m.group("info").strip() else ""
        if lang in _DOCTEST_LANGS and re.search(r"^\s*>>>", m.group("body"), re.M):
            blocks.append(m.group("body"))
    return "\n".join(blocks)


_PAGES_WITH_EXAMPLES = [p for p in _pages() if _example_text(p)]
_REQUIRES = re.compile(r"^%\s*doctest-requires:\s*(?P<modules>[\w., ]+?)\s*$", re.M)


def _skip_unless_importable(page: Path) -> None:
    """pytest.skip unless every module the page's ``% doctest-requires:`` lines name imports."""
    for m in _REQUIRES.finditer(page.read_text(encoding="utf-8")):
        for module in (name.strip() for name in m.group("modules").split(",")):
            if module == "keras":
                os.environ.setdefault("KERAS_BACKEND", "torch")  # Keras 3 with the backend CI has
            pytest.importorskip(module, reason=f"{page.name} needs {module}")


@pytest.mark.parametrize("page", _PAGES_WITH_EXAMPLES, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_examples(page: Path) -> None:
    _skip_unless_importable(page)
    text = _example_text(page)
    parser = doctest.DocTestParser()
    test = parser.get_doctest(text, {"__name__": "__docs__"}, str(page.relative_to(ROOT)), str(page), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    with np.printoptions(legacy=False):
        result = runner.run(test, out=_Collect())
    assert result.failed == 0, _Collect.last


class _Collect:
    """Collects doctest's failure report so the assertion message shows it."""

    last = ""

    def __init__(self) -> None:
        _Collect.last = ""

    def __call__(self, s: str) -> None:
        _Collect.last += s


def test_the_guides_have_examples() -> None:
    for name in ("getting-started.md", "guide/batch-norm.md", "guide/train-eval.md", "guide/conventions.md"):
        assert DOCS / name in _PAGES_WITH_EXAMPLES, f"{name} has no >>> examples"


def test_pages_needing_an_optional_package_skip_without_it(tmp_path: Path) -> None:
    page = tmp_path / "needs.md"
    page.write_text("# x\n\n% doctest-requires: numpy, bnorm_no_such_package\n", encoding="utf-8")
    with pytest.raises(pytest.skip.Exception, match=r"needs\.md needs bnorm_no_such_package"):
        _skip_unless_importable(page)
    page.write_text("# x\n\n% doctest-requires: numpy\n", encoding="utf-8")
    _skip_unless_importable(page)  # importable: runs


def test_porting_guides_declare_their_framework() -> None:
    for name, module in (("porting-pytorch.md", "torch"), ("porting-keras.md", "keras")):
        text = (DOCS / name).read_text(encoding="utf-8")
        assert re.search(rf"^% doctest-requires: {module}$", text, re.M), name
        assert DOCS / name in _PAGES_WITH_EXAMPLES, f"{name} has no >>> examples"


def test_doctest_runner_catches_a_wrong_example(tmp_path: Path) -> None:
    page = tmp_path / "wrong.md"
    page.write_text("```pycon\n>>> 1 + 1\n3\n```\n", encoding="utf-8")
    parser = doctest.DocTestParser()
    test = parser.get_doctest(_example_text(page), {}, "wrong", str(page), 0)
    result = doctest.DocTestRunner().run(test, out=lambda s: None)
    assert result.failed == 1


def _public_modules() -> list[str]:
    names = []
    for info in pkgutil.iter_modules(bnorm.__path__):
        if not info.name.startswith("_"):
            names.append(info.name)
    return sorted(names)


def test_api_page_for_every_public_module() -> None:
    missing = []
    for name in ["bnorm", *(f"bnorm.{m}" for m in _public_modules())]:
        importlib.import_module(name)
        short = name.split(".")[-1]
        page = DOCS / "api" / f"{short}.md"
        if not page.exists():
            missing.append(f"{name}: no docs/api/{short}.md")
            continue
        text = page.read_text(encoding="utf-8")
        if not re.search(rf"^# {re.escape(name)}\s*$", text, re.M):
            missing.append(f"{name}: docs/api/{short}.md lacks the heading '# {name}'")
        if not re.search(rf"^\.\. automodule:: {re.escape(name)}\s*$", text, re.M):
            missing.append(f"{name}: docs/api/{short}.md lacks '.. automodule:: {name}'")
    assert not missing, "\n".join(missing)


_TOCTREE = re.compile(r"^```\{toctree\}\n(?P<body>.*?)^```", re.M | re.S)


def _toctree_entries(page: Path) -> set[str]:
    """The pages `page`'s toctrees list, as paths under docs/ without ``.md``."""
    entries = set()
    for m in _TOCTREE.finditer(page.read_text(encoding="utf-8")):
        for line in m.group("body").splitlines():
            line = line.strip()
            if not line or line.startswith(":"):
                continue
            target = re.fullmatch(r".*<(.+)>", line)
            name = target.group(1) if target else line
            folder = page.parent.relative_to(DOCS)
            entries.add(name.lstrip("/") if name.startswith("/") else str(folder / name).removeprefix("./"))
    return entries


def test_every_page_is_in_the_navigation() -> None:
    listed = set().union(*(_toctree_entries(p) for p in _pages()))
    pages = {str(p.relative_to(DOCS).with_suffix("")) for p in _pages()} - {"index"}
    assert pages - listed == set(), f"pages in no toctree: {sorted(pages - listed)}"
    assert listed - pages == set(), f"toctree entries with no page: {sorted(listed - pages)}"


def test_docs_version_is_the_package_version() -> None:
    namespace: dict[str, object] = {"__file__": str(DOCS / "conf.py")}
    exec(compile((DOCS / "conf.py").read_text(encoding="utf-8"), str(DOCS / "conf.py"), "exec"), namespace)
    assert namespace["release"] == bnorm.__version__


# -- the conventions guide's claims, checked against the frameworks themselves --
_X = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]])
_X2 = np.array([[0.0, 0.0], [2.0, 4.0]])


def test_conventions_guide_torch_claims() -> None:
    torch = pytest.importorskip("torch")
    for momentum in (0.1, None):
        ref = torch.nn.BatchNorm1d(2, momentum=momentum).double()
        bn = bnorm.BatchNorm1d(2, momentum=momentum, dtype=np.float64)
        for batch in (_X, _X2):
            ref(torch.from_numpy(batch))
            bn(batch)
            assert bn.running_mean is not None and bn.running_var is not None
            np.testing.assert_allclose(bn.running_mean, ref.running_mean.numpy(), rtol=1e-15)
            np.testing.assert_allclose(bn.running_var, ref.running_var.numpy(), rtol=1e-15)


def test_conventions_guide_keras_claims() -> None:
    import os

    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    layer = keras.layers.BatchNormalization()
    x32 = _X.astype(np.float32)
    layer(x32, training=True)
    _, _, moving_mean, moving_variance = (np.asarray(w) for w in layer.get_weights())
    bn = bnorm.BatchNorm(2, convention="keras")
    bn(x32, training=True)
    assert bn.running_mean is not None and bn.running_var is not None
    np.testing.assert_allclose(bn.running_mean, moving_mean, rtol=1e-6)
    np.testing.assert_allclose(bn.running_var, moving_variance, rtol=1e-6)
    inference = keras.ops.convert_to_numpy(layer(x32))  # a plain Keras call is inference
    np.testing.assert_allclose(bn.eval()(x32), inference, rtol=1e-6)


def test_reliability_page_is_in_the_navigation_and_names_real_tests() -> None:
    index = (DOCS / "guide" / "index.md").read_text(encoding="utf-8")
    entries = [
        line.strip()
        for m in re.finditer(r"```\{toctree\}(.*?)```", index, re.S)
        for line in m.group(1).splitlines()
        if line.strip() and not line.strip().startswith(":")
    ]
    assert "/reliability" in entries, entries
    page = (DOCS / "reliability.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(tests/[\w/]+\.py)`", page))
    assert len(named) >= 8
    for path in named:
        assert (ROOT / path).is_file(), f"docs/reliability.md names {path}, which does not exist"
