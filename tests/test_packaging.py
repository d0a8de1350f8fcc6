"""The declared support is true: the NumPy floor and the Pythons CI tests."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bnorm._requirements import MIN_NUMPY, check_numpy

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT_TEXT = (ROOT / "pyproject.toml").read_text(encoding="utf-8")  # tomllib is 3.11+: regexes
CI = (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_the_declared_floor_is_the_checked_one() -> None:
    (floor_text,) = re.findall(r'^dependencies = \["numpy>=([0-9.]+)"\]', PYPROJECT_TEXT, re.M)
    floor = tuple(int(v) for v in floor_text.split("."))
    assert floor == MIN_NUMPY


@pytest.mark.parametrize("version", ["2.0.0", "2.0.2", "2.4.6", "2.5.0rc1", "3.0.0.dev0"])
def test_supported_numpy_versions_pass(version: str) -> None:
    check_numpy(version)


@pytest.mark.parametrize("version", ["1.25.2", "1.26.4", "1.26.0rc1"])
def test_older_numpy_versions_are_refused(version: str) -> None:
    with pytest.raises(
        ImportError,
        match=rf'bnorm needs NumPy >= 2\.0, found NumPy {re.escape(version)}: pip install "numpy>=2\.0"',
    ):
        check_numpy(version)


def test_importing_bnorm_with_numpy_1_raises_a_clear_import_error(tmp_path: Path) -> None:
    # A stand-in "numpy" package of version 1.26.4 ahead of the real one on the path.
    fake = tmp_path / "numpy"
    fake.mkdir()
    (fake / "__init__.py").write_text('__version__ = "1.26.4"\n', encoding="utf-8")
    code = "import bnorm"
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": f"{tmp_path}:{ROOT / 'src'}", "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert run.returncode != 0
    assert 'ImportError: bnorm needs NumPy >= 2.0, found NumPy 1.26.4: pip install "numpy>=2.0"' in run.stderr


def test_classifiers_list_the_pythons_ci_tests() -> None:
    classified = set(re.findall(r'"Programming Language :: Python :: (3\.\d+)"', PYPROJECT_TEXT))
    core = set(re.search(r'^core_pythons="([^"]+)"', CI, re.M).group(1).split())
    # CI runs the full suite on the machine's default Python and the core tests on the others.
    assert core < classified and len(classified - core) == 1, (classified, core)
    (floor,) = re.findall(r'^requires-python = ">=(3\.\d+)"', PYPROJECT_TEXT, re.M)
    assert min(classified, key=lambda v: tuple(map(int, v.split(".")))) == floor
