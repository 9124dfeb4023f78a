"""Every docstring example in the installed package runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import sae_ref
import sae_ref.backends
import sae_ref.validation


def _modules() -> list[str]:
    # the mapped subpackages live outside sae_ref/ in a source tree: walk each package
    names = {"sae_ref", "sae_ref.backends", "sae_ref.validation"}
    for pkg in (sae_ref, sae_ref.backends, sae_ref.validation):
        names.update(m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."))
    return sorted(n for n in names if not n.endswith("_cupy"))  # CuPy needs a GPU


MODULES = _modules()


def test_every_module_is_collected():
    """The walk finds the core, the backends and the validation package."""
    for name in ("sae_ref.activations", "sae_ref.backends", "sae_ref.validation.strategies"):
        assert name in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
