"""The batch protocol shared by every data source: a resumable iterator of ``[B, d]`` arrays.

A source has ``d`` (features per row) and ``stream(batch_size, *, seed, position, xp, device,
dtype, nonfinite, ...)``. The stream is a pure function of ``(seed, position)``: batch ``i`` is
the same array whether the stream started at 0 and ran to ``i`` or started at ``position=i``,
so a training run resumes, bit for bit, from the one integer ``stream.position``.

Each batch is built in NumPy on the host, checked for NaN/inf there (cheap, no device
synchronisation), and only then moved to the backend with ``xp.asarray``.

>>> import numpy as np
>>> from sae_ref.data.stream import BatchStream
>>> s = BatchStream("Counter", lambda i: (np.full((2, 3), float(i)), None), lambda b, info: "")
>>> next(s)[:, 0].tolist(), s.position
([0.0, 0.0], 1)
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from sae_ref.arrays import from_host

#: What a stream does with a batch holding NaN or infinity.
NONFINITE = ("raise", "skip")


class NonFiniteBatch(ValueError):
    """A batch holds NaN or infinity and the stream was asked to raise.

    Attributes
    ----------
    detail : str
        What and where (the source, the position, the file and row), without the hint; a
        command line adds its own hint (``--nonfinite skip``) to it.
    """

    def __init__(self, detail: str, hint: str = "pass nonfinite='skip' to drop such batches"):
        super().__init__(f"{detail}; {hint}")
        self.detail = detail


def check_int(op: str, name: str, value, low: int) -> int:
    """``value`` as a Python int, checked to be an integer ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: argument '{name}' must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{op}: argument '{name}' must be >= {low}, got {value}")
    return int(value)


def resolve_dtype(op: str, xp, dtype):
    """The backend dtype a stream delivers: ``xp.float32`` by default, or a name like "float16"."""
    if dtype is None:
        return xp.float32
    if isinstance(dtype, str):
        if not hasattr(xp, dtype):
            raise ValueError(f"{op}: argument 'dtype' {dtype!r} is not a dtype of {xp.__name__}")
        dtype = getattr(xp, dtype)
    try:
        ok = xp.isdtype(dtype, "real floating")
    except (TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise TypeError(f"{op}: argument 'dtype' must be a real floating dtype of the array "
                        f"namespace, got {dtype!r}")
    return dtype


class BatchStream:
    """An endless iterator of ``[B, d]`` batches on one backend, resumable from ``position``.

    Parameters
    ----------
    name : str
        The source as named in error messages, e.g. ``"ActivationStore('acts')"``.
    make : callable
        ``make(i) -> (batch, info)``: batch ``i`` as a 2-D NumPy array (a fresh array, never a
        view of a file) and anything ``describe`` needs to locate a bad row.
    describe : callable
        ``describe(batch, info) -> str``: where the first non-finite value of a batch came
        from (file, row), appended to the error message.
    position : int
        The index of the first batch delivered.
    xp, device, dtype
        Where the batches go: an array namespace (default NumPy), a device of it, and a real
        floating dtype of it (default ``xp.float32``) or its name.
    nonfinite : {"raise", "skip"}
        ``"raise"``: a batch with NaN/inf raises :class:`NonFiniteBatch` (a ValueError), and
        ``position`` stays on it.
        ``"skip"``: it is dropped, counted in ``skipped``, and the next batch is delivered.
    max_skips : int, optional
        After this many consecutive skipped batches, raise instead of looping for ever (a
        source whose every batch holds a NaN row).

    Attributes
    ----------
    position : int
        Batches consumed from the deterministic sequence so far, skipped ones included:
        ``source.stream(..., position=stream.position)`` continues exactly here.
    skipped : int
        Batches dropped by this stream because they held NaN/inf.
    """

    def __init__(self, name: str, make: Callable[[int], tuple[np.ndarray, Any]],
                 describe: Callable[[np.ndarray, Any], str], *, position: int = 0, xp=None,
                 device=None, dtype=None, nonfinite: str = "raise",
                 max_skips: int | None = None):
        op = f"{name}.stream"
        if nonfinite not in NONFINITE:
            raise ValueError(f"{op}: argument 'nonfinite' must be one of {list(NONFINITE)}, "
                             f"got {nonfinite!r}")
        self.name = name
        self.position = check_int(op, "position", position, 0)
        self.skipped = 0
        self.xp = array_namespace(np.zeros(0)) if xp is None else xp
        self.device = device
        self.dtype = resolve_dtype(op, self.xp, dtype)
        self.nonfinite = nonfinite
        self._make = make
        self._describe = describe
        self._max_skips = max_skips

    def __iter__(self):
        return self

    def __next__(self):
        run = 0
        while True:
            i = self.position
            batch, info = self._make(i)
            if np.isfinite(batch).all():
                self.position = i + 1
                return from_host(self.xp, batch, dtype=self.dtype, device=self.device)
            where = self._describe(batch, info)
            if self.nonfinite == "raise":
                raise NonFiniteBatch(f"{self.name}: the batch at position {i} contains NaN or "
                                     f"infinity{where}")
            self.position = i + 1
            self.skipped += 1
            run += 1
            if self._max_skips is not None and run >= self._max_skips:
                raise ValueError(f"{self.name}: {run} consecutive batches (positions "
                                 f"{i - run + 1} to {i}) contain NaN or infinity{where}; "
                                 f"skipping cannot find a finite batch")

    def __repr__(self) -> str:
        return (f"<BatchStream of {self.name} at position {self.position}, "
                f"{self.skipped} skipped>")
