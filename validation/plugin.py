"""A pytest plugin: the ``sae_ref_validate`` fixture runs any check and fails the test on a
broken invariant, printing the report (minimal example, sae-ref's output, the difference).

Enable it with ``-p sae_ref.validation.plugin`` on the command line, or in a ``conftest.py``::

    pytest_plugins = ["sae_ref.validation.plugin"]

then::

    def test_my_batch_topk(sae_ref_validate):
        sae_ref_validate.batch_topk(my_batch_topk)
        sae_ref_validate.jumprelu(vjp=my_vjp, parameterization="log_theta", xp=torch)
        sae_ref_validate.sae(my_torch_sae)

Options: ``--sae-ref-max-examples N`` (examples per invariant, default each check's own) and
``--sae-ref-seed S`` (default 0).

>>> from sae_ref.validation.plugin import Validator
>>> v = Validator(max_examples=3)
>>> from sae_ref.activations import topk
>>> v.topk(topk).ok
True
"""

from __future__ import annotations

import pytest

from sae_ref.validation.report import Report


class Validator:
    """Runs checks by name (``validator.batch_topk(fn, ...)``) and raises on failure.

    ``validator.run(name, ...)`` returns the report without raising.
    """

    def __init__(self, *, max_examples: int | None = None, seed: int = 0):
        self.max_examples = max_examples
        self.seed = seed

    @property
    def names(self) -> list[str]:
        from sae_ref.validation.checks import CHECKS

        return sorted(CHECKS)

    def run(self, name: str, *args, **kwargs) -> Report:
        from sae_ref.validation.checks import CHECKS

        if name not in CHECKS:
            raise ValueError(f"sae_ref_validate: unknown check {name!r}; known: {self.names}")
        kwargs.setdefault("seed", self.seed)
        if self.max_examples is not None:
            kwargs.setdefault("max_examples", self.max_examples)
        return CHECKS[name](*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        from sae_ref.validation.checks import CHECKS

        if name not in CHECKS:
            raise AttributeError(f"sae_ref_validate has no check {name!r}; known: {sorted(CHECKS)}")

        def check(*args, **kwargs) -> Report:
            __tracebackhide__ = True  # pytest shows the report, not this frame
            return self.run(name, *args, **kwargs).raise_if_failed()

        return check


def pytest_addoption(parser):
    group = parser.getgroup("sae-ref", "sae-ref validation checks")
    group.addoption("--sae-ref-max-examples", type=int, default=None, metavar="N",
                    help="examples per invariant in sae_ref_validate checks (default: each check's own)")
    group.addoption("--sae-ref-seed", type=int, default=0, metavar="S",
                    help="hypothesis seed of sae_ref_validate checks (default 0)")


@pytest.fixture
def sae_ref_validate(request) -> Validator:
    """A :class:`Validator` configured from the command-line options."""
    return Validator(max_examples=request.config.getoption("--sae-ref-max-examples"),
                     seed=request.config.getoption("--sae-ref-seed"))
