"""What a check found: one :class:`Outcome` per invariant, gathered in a :class:`Report`.

An outcome names its invariant (a short id such as ``"batch_topk.ties_to_lower_flat_index"``
and a one-sentence statement) and says whether it held. When it did not, the outcome keeps
hypothesis's shrunk **minimal failing example**, the implementation's output on it, sae-ref's
output on it and a description of the difference.

>>> from sae_ref.validation.report import Outcome, Report, describe_difference
>>> r = Report("demo", [Outcome("demo.holds", "1 + 1 = 2", "passed")])
>>> r.ok, r.failed
(True, [])
>>> print(r)
demo: 1 invariant(s), all hold
  [pass] demo.holds
>>> import numpy as np
>>> describe_difference(np.array([[1., 0.]]), np.array([[1., 2.]]))
'1 of 2 entries differ, at [(0, 1)]; max |got - sae-ref| = 2'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

STATUSES = ("passed", "failed", "error", "skipped")


class ValidationError(AssertionError):
    """Raised by :meth:`Report.raise_if_failed`; its message is the whole report, so pytest
    prints every broken invariant with its minimal example."""

    def __init__(self, report: Report):
        super().__init__(str(report))
        self.report = report


@dataclass
class Outcome:
    """One invariant's result.

    Attributes
    ----------
    id : str
        ``"<subject>.<invariant>"``, stable across releases (tests may refer to it).
    statement : str
        The invariant in one sentence, from ALGORITHMS.md.
    status : {"passed", "failed", "error", "skipped"}
        ``error``: the check itself could not run (a bug in the check, or inputs it could not
        generate); ``skipped``: the invariant does not apply (the reason is in ``message``).
    message : str
        What went wrong on the minimal example (empty when passed).
    example : dict or None
        The minimal failing example: the inputs by argument name (NumPy arrays, numbers).
    got, expected : any
        The implementation's output and sae-ref's output on ``example`` (NumPy arrays).
    difference : str
        Where and by how much ``got`` and ``expected`` differ.
    """

    id: str
    statement: str
    status: str
    message: str = ""
    example: dict | None = None
    got: Any = None
    expected: Any = None
    difference: str = ""

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"Outcome: argument 'status' must be one of {list(STATUSES)}, got {self.status!r}")

    @property
    def ok(self) -> bool:
        return self.status in ("passed", "skipped")

    def to_dict(self) -> dict:
        """A JSON-serialisable copy (arrays as nested lists)."""
        return {
            "id": self.id, "statement": self.statement, "status": self.status,
            "message": self.message, "difference": self.difference,
            "example": None if self.example is None else {k: _plain(v) for k, v in self.example.items()},
            "got": _plain(self.got), "expected": _plain(self.expected),
        }

    def __str__(self) -> str:
        tag = {"passed": "pass", "failed": "FAIL", "error": "ERROR", "skipped": "skip"}[self.status]
        lines = [f"  [{tag}] {self.id}"]
        if self.status in ("failed", "error"):
            lines.append(f"      invariant: {self.statement}")
        if self.message:
            lines.append(_indent(self.message, "      "))
        if self.example is not None:
            lines.append("      minimal example:")
            lines.extend(_indent(f"{k} = {_show(v)}", "        ") for k, v in self.example.items())
        if self.got is not None:
            lines.append(_indent(f"got      = {_show(self.got)}", "      "))
        if self.expected is not None:
            lines.append(_indent(f"sae-ref  = {_show(self.expected)}", "      "))
        if self.difference:
            lines.append(_indent(f"difference: {self.difference}", "      "))
        return "\n".join(lines)


@dataclass
class Report:
    """The outcomes of one or more checks.

    ``ok`` is True when no invariant failed or errored; ``failed`` lists the ids that did;
    ``report[id]`` is one outcome; ``str(report)`` is the human summary;
    :meth:`raise_if_failed` turns a failure into an ``AssertionError`` for pytest.
    """

    subject: str
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)

    @property
    def failed(self) -> list[str]:
        return [o.id for o in self.outcomes if not o.ok]

    @property
    def ids(self) -> list[str]:
        return [o.id for o in self.outcomes]

    def __getitem__(self, invariant_id: str) -> Outcome:
        for o in self.outcomes:
            if o.id == invariant_id:
                return o
        raise KeyError(f"Report: no invariant {invariant_id!r}; known: {self.ids}")

    def __contains__(self, invariant_id: str) -> bool:
        return invariant_id in self.ids

    def raise_if_failed(self) -> Report:
        """Raise :class:`ValidationError` (an ``AssertionError``) if any invariant failed;
        return the report otherwise."""
        if not self.ok:
            raise ValidationError(self)
        return self

    def to_dict(self) -> dict:
        return {"subject": self.subject, "ok": self.ok, "outcomes": [o.to_dict() for o in self.outcomes]}

    @classmethod
    def combine(cls, subject: str, reports) -> Report:
        """One report holding the outcomes of several."""
        return cls(subject, [o for r in reports for o in r.outcomes])

    def __str__(self) -> str:
        n = len(self.outcomes)
        bad = self.failed
        skipped = sum(o.status == "skipped" for o in self.outcomes)
        head = f"{self.subject}: {n} invariant(s), "
        head += "all hold" if not bad else f"{len(bad)} broken: {', '.join(bad)}"
        if skipped:
            head += f" ({skipped} skipped)"
        return "\n".join([head] + [str(o) for o in self.outcomes])


def positions(mask: np.ndarray, limit: int = 8) -> str:
    idx = [tuple(int(i) for i in p) for p in np.argwhere(mask)]
    text = str(idx[:limit])
    return text[:-1] + ", ...]" if len(idx) > limit else text


def describe_difference(got, expected, *, atol: float = 0.0) -> str:
    """Where and by how much two arrays differ (entries further apart than ``atol``)."""
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape:
        return f"shape {got.shape} against {expected.shape}"
    diff = np.abs(got - expected)
    bad = diff > atol
    if not np.any(bad):
        return "none"
    if got.ndim == 0:
        return f"|got - sae-ref| = {float(diff):.6g}"
    return (f"{int(bad.sum())} of {bad.size} entries differ, at {positions(bad)}; "
            f"max |got - sae-ref| = {float(diff.max()):.6g}")


def _plain(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def _show(v) -> str:
    if isinstance(v, np.ndarray):
        text = np.array2string(v, precision=8, separator=", ", threshold=400, max_line_width=96)
        return f"{text}  ({v.dtype}, shape {v.shape})" if v.ndim else f"{text} ({v.dtype})"
    if isinstance(v, (list, tuple)) and v and isinstance(v[0], np.ndarray):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    return repr(v)


def _indent(text: str, pad: str) -> str:
    return "\n".join(pad + line for line in text.splitlines())
