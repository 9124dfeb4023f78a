"""Running one invariant under hypothesis and keeping its minimal failing example.

An :class:`Invariant` is a strategy that draws an example (a dict of NumPy inputs) and a
``check(example)`` that returns ``None`` when the invariant holds on it and a
:class:`Finding` when it does not. :func:`run_invariants` searches each invariant with
:func:`hypothesis.find` under fixed settings (a bounded number of examples, a fixed seed, no
deadline, no example database, so a check is reproducible and writes no files), lets
hypothesis shrink a failure to a minimal example, and evaluates the check once more on it to
record the implementation's output, sae-ref's output and their difference.

An exception raised by the implementation under test counts as a failure of the invariant
being checked (its message is kept); an exception raised by the check itself is reported as
an ``error`` outcome.

>>> from hypothesis import strategies as st
>>> from sae_ref.validation.runner import Finding, Invariant, run_invariants
>>> inv = Invariant("demo.small", "x < 10", st.integers(0, 100).map(lambda x: {"x": x}),
...                 lambda ex: None if ex["x"] < 10 else Finding(f"{ex['x']} >= 10"))
>>> outcome = run_invariants("demo", [inv], max_examples=50).outcomes[0]
>>> outcome.status, outcome.example
('failed', {'x': 10})
"""

from __future__ import annotations

import random
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from hypothesis import HealthCheck, Phase, find, settings
from hypothesis.errors import Flaky, NoSuchExample, Unsatisfiable

from sae_ref.validation.report import Outcome, Report, describe_difference

#: Default number of examples each invariant is tried on.
MAX_EXAMPLES = 50


@dataclass
class Finding:
    """Why an invariant failed on one example."""

    message: str
    got: Any = None
    expected: Any = None
    difference: str = ""


@dataclass(frozen=True)
class Invariant:
    """A named property and how to test it (see the module docstring).

    ``applies`` is ``None`` when the invariant applies, else the reason it is skipped.
    """

    id: str
    statement: str
    strategy: Any
    check: Callable[[dict], Finding | None]
    applies: str | None = None


class UserError(Exception):
    """The implementation under test raised; the original exception is ``__cause__``."""

    def __init__(self, what: str, exc: BaseException):
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        super().__init__(f"{what} raised {detail}")


def call_user(fn, *args, what: str = "the implementation", **kwargs):
    """``fn(*args, **kwargs)``, with any exception it raises wrapped in :class:`UserError`."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # the implementation's own failure is a finding, not a crash
        raise UserError(what, exc) from exc


def run_invariants(subject: str, invariants, *, max_examples: int = MAX_EXAMPLES,
                   seed: int = 0, shrink: bool = True) -> Report:
    """Search every invariant and gather the outcomes in a :class:`Report`."""
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise ValueError(f"{subject}: argument 'max_examples' must be a positive integer, got {max_examples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{subject}: argument 'seed' must be an integer, got {seed!r}")
    phases = [Phase.generate, Phase.shrink] if shrink else [Phase.generate]
    conf = settings(max_examples=max_examples, deadline=None, database=None, derandomize=False,
                    phases=phases, suppress_health_check=list(HealthCheck), print_blob=False)
    return Report(subject, [_run_one(inv, conf, seed) for inv in invariants])


def _evaluate(inv: Invariant, example: dict) -> Finding | None:
    try:
        return inv.check(example)
    except UserError as e:
        return Finding(str(e))


def _run_one(inv: Invariant, conf, seed: int) -> Outcome:
    if inv.applies is not None:
        return Outcome(inv.id, inv.statement, "skipped", message=inv.applies)
    try:
        example = find(inv.strategy, lambda ex: _evaluate(inv, ex) is not None,
                       settings=conf, random=random.Random(seed))
    except NoSuchExample:
        return Outcome(inv.id, inv.statement, "passed")
    except Unsatisfiable as e:
        return Outcome(inv.id, inv.statement, "error", message=f"no valid example could be drawn: {e}")
    except Flaky as e:
        return Outcome(inv.id, inv.statement, "failed",
                       message=f"the result changed between two calls on the same input (not deterministic): {e}")
    except Exception as e:  # noqa: BLE001 (the check itself broke: report it, keep the others)
        detail = "".join(traceback.format_exception_only(type(e), e)).strip()
        return Outcome(inv.id, inv.statement, "error", message=f"the check could not run: {detail}")
    finding = _evaluate(inv, example)
    if finding is None:  # shrinking ended on an example that passes on a second call
        return Outcome(inv.id, inv.statement, "failed", example=example,
                       message="failed once on this example and passed when run again (not deterministic)")
    difference = finding.difference
    if not difference and isinstance(finding.got, np.ndarray) and isinstance(finding.expected, np.ndarray):
        difference = describe_difference(finding.got, finding.expected)
    return Outcome(inv.id, inv.statement, "failed", message=finding.message, example=example,
                   got=finding.got, expected=finding.expected, difference=difference)
