"""The `Example` blocks in the public docstrings run as written (the contracts they show hold)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import splitflower
import splitflower.algorithms
import splitflower.strategies


def _modules() -> list[str]:
    # algorithms/ and strategies/ are installed into the package from folders of their own,
    # so walking splitflower's own path would not find them.
    packages = (splitflower, splitflower.algorithms, splitflower.strategies)
    names = {p.__name__ for p in packages}
    for package in packages:
        names |= {m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")}
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples in {name} failed"
