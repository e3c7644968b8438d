"""The docstring examples of every module run as tests (``benchmarks/locustfile.py`` is left
out: importing locust monkey-patches the process; tests/test_benchmarks_service.py imports it
in a child)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ("models", "index_build", "service", "benchmarks")
SKIP = {"benchmarks.locustfile"}


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        names += [m.name for m in pkgutil.iter_modules(pkg.__path__, f"{package}.") if m.name not in SKIP]
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"
