"""Doctests of optional features skip cleanly when their extras are missing.

``pytest --doctest-modules src`` collects every docstring example.  A module
whose examples need an optional package (the demo's scikit-learn, matplotlib
and tqdm, say) declares it, as astropy's pytest-doctestplus does::

    __doctest_requires__ = {"*": ("sklearn", "matplotlib")}   # every example here
    __doctest_requires__ = {"load_digits": ("sklearn",)}       # one function's

and its examples are skipped, with the install line in the reason, where one of
those modules cannot be imported.  This file sits outside the package: it is not
installed.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import sys

import pytest


def _missing(modules: tuple[str, ...] | list[str]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the examples whose ``__doctest_requires__`` packages are missing as skipped."""
    for item in items:
        if not isinstance(item, pytest.DoctestItem) or item.dtest is None:
            continue
        name = item.dtest.name  # e.g. "bnorm.demo.data.load_digits"
        # The module is the longest imported prefix of the example's dotted name.
        module = next(
            (
                sys.modules[m]
                for m in sorted(sys.modules, key=len, reverse=True)
                if name == m or name.startswith(m + ".")
            ),
            None,
        )
        requires = getattr(module, "__doctest_requires__", None)
        if module is None or not requires:
            continue
        local = name[len(module.__name__) + 1 :] or "*"
        needed = [
            mod for pattern, mods in requires.items() if fnmatch.fnmatch(local, pattern) for mod in mods
        ]
        missing = _missing(needed)
        if missing:
            item.add_marker(
                pytest.mark.skip(reason=f"needs {', '.join(missing)} (an optional extra of bnorm)")
            )
