"""Every docstring example in the installed package runs and prints what it says.

An example that needs an optional extra (matplotlib, torch, ...) is skipped, with the reason,
where the extra is not installed: a module declares what its examples need in
``__doctest_requires__`` (docstring name pattern -> module names; ``"*"``: every example),
and a module that cannot be imported without an optional library is skipped whole.
"""

from __future__ import annotations

import doctest
import fnmatch
import importlib
import importlib.util
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


#: the optional libraries of the extras (torch, cupy, data, plots, docs)
OPTIONAL = {"torch", "cupy", "cupyx", "matplotlib", "transformers", "safetensors", "tqdm", "sae_lens"}


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        top = (e.name or "").split(".")[0]
        if top in OPTIONAL:
            pytest.skip(f"{name} needs {top}, which is not installed (an optional extra)")
        raise


def _missing(module, test_name: str) -> list[str]:
    """The modules that the example ``test_name`` declares it needs and that are not installed."""
    local = test_name[len(module.__name__) + 1:]
    needs = [m for pattern, mods in getattr(module, "__doctest_requires__", {}).items()
             if fnmatch.fnmatch(local, pattern) for m in mods]
    return [m for m in needs if importlib.util.find_spec(m) is None]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    """Every example of the module prints what it shows (those whose optional extra is
    missing are skipped; if all are, the test is)."""
    module = _import(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in doctest.DocTestFinder().find(module) if t.examples]
    skipped = {t.name: _missing(module, t.name) for t in tests}
    skipped = {k: v for k, v in skipped.items() if v}
    for test in tests:
        if test.name not in skipped:
            runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
    if skipped and len(skipped) == len(tests):
        pytest.skip(f"{name}: the examples need {sorted({m for v in skipped.values() for m in v})}, not installed")


def test_doctest_requirements_name_existing_docstrings():
    """Every pattern in a module's ``__doctest_requires__`` matches one of its examples (a
    renamed function cannot leave its example unguarded)."""
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        patterns = getattr(module, "__doctest_requires__", {})
        names = [t.name[len(name) + 1:] for t in doctest.DocTestFinder().find(module) if t.examples]
        for pattern in patterns:
            assert any(fnmatch.fnmatch(n, pattern) for n in names), f"{name}: {pattern!r} matches no example"
