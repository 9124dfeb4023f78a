"""The batch protocol shared by every data source: a resumable iterator of ``[B, d]`` arrays.

A source has ``d`` (features per row) and ``stream(batch_size, *, seed, position, xp, device,
dtype, nonfinite, ...)``. The stream is a pure function of ``(seed, position)``: batch ``i`` is
the same array whether the stream started at 0 and ran to ``i`` or started at ``position=i``,
so a training run resumes, bit for bit, from the one integer ``stream.position``.

Each batch is built in NumPy on the host, checked for NaN/inf there (cheap, no device
synchronisation), and only then moved to the backend with ``xp.asarray``.

:meth:`BatchStream.prefetch` moves that host work (reading, shuffling, checking, converting,
and on a GPU the copy on a side stream) onto a background thread that runs a bounded number
of batches ahead while the device trains on the current one. The batches, the errors and
``position`` are the same as without it: batch ``i`` is still a pure function of ``i``.

>>> import numpy as np
>>> from sae_ref.data.stream import BatchStream
>>> s = BatchStream("Counter", lambda i: (np.full((2, 3), float(i)), None), lambda b, info: "")
>>> next(s)[:, 0].tolist(), s.position
([0.0, 0.0], 1)
"""

from __future__ import annotations

import numbers
import queue
import threading
import time
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


def finite(batch: np.ndarray) -> bool:
    """Whether every value of the host array is finite, in one or two fast passes: float16 by
    its exponent bits (NumPy's float16 ``isfinite`` is several times slower than the batch's
    other work), other dtypes by their minimum and maximum (NaN propagates into both, an
    infinity is one of them)."""
    if batch.size == 0:
        return True
    if batch.dtype == np.float16:
        bits = np.bitwise_and(batch.view(np.uint16), 0x7C00)  # all-ones exponent: inf or NaN
        return int(bits.max()) != 0x7C00
    return bool(np.isfinite(batch.min()) and np.isfinite(batch.max()))


def finite_rows(data: np.ndarray) -> np.ndarray:
    """Per row of the 2-D host array, whether all its values are finite (float16 by its
    exponent bits, as :func:`finite`)."""
    if data.dtype == np.float16:
        return (np.bitwise_and(data.view(np.uint16), 0x7C00) != 0x7C00).all(axis=1)
    return np.isfinite(data).all(axis=1)


def on_gpu(xp, device) -> bool:
    """Whether a stream to ``xp`` on ``device`` delivers GPU arrays (torch CUDA, CuPy)."""
    from array_api_compat import is_cupy_namespace, is_torch_namespace

    if xp is None:
        return False
    if is_cupy_namespace(xp):
        return True
    return is_torch_namespace(xp) and getattr(device, "type", str(device or "cpu")).startswith("cuda")


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
        view of a file) and anything ``describe`` needs to locate a bad row. A source that
        draws its batches on the device returns them as arrays of ``xp`` on ``device``, in
        ``dtype``: those are delivered as they are (finite by construction, not checked).
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

        self._ahead = None  # the prefetching thread's (thread, queue, stop event), when on
        self.wait_seconds = 0.0  # time __next__ spent waiting for a batch (data waits)

    def __iter__(self):
        return self

    def _host(self, i: int):
        """Batch ``i`` made and checked on the host: ``(i, array, ready, where)`` with ``where``
        None for a finite batch (the array then on the backend), else the bad row's place."""
        batch, info = self._make(i)
        if not isinstance(batch, np.ndarray):  # made on the device, finite by construction
            return i, batch, None, None
        if finite(batch):
            from sae_ref.backends import get_backend

            a, ready = get_backend(self.xp).from_host_async(self.xp, batch, dtype=self.dtype,
                                                            device=self.device)
            return i, a, ready, None
        return i, None, None, self._describe(batch, info)

    def prefetch(self, depth: int = 2) -> BatchStream:
        """Make the next ``depth`` batches on a background thread (returns this stream).

        The thread reads, shuffles, checks and converts batch ``position``, ``position + 1``,
        ... into a queue of ``depth`` batches (bounded memory) while the caller trains; an
        error it meets (a corrupt shard, an unreadable file) is raised by ``__next__`` when
        that batch is due, as without prefetching. :meth:`close` (or leaving a ``with``
        block) stops the thread; it is a daemon, so an interrupted process never waits for it.
        """
        depth = check_int(f"{self.name}.prefetch", "depth", depth, 1)
        self.close()
        q, stop = queue.Queue(maxsize=depth), threading.Event()

        def run(start):
            i = start
            while not stop.is_set():
                try:
                    item = self._host(i)
                except BaseException as e:  # handed to the consumer, raised where it is due
                    item = (i, e, None, None)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if isinstance(item[1], BaseException):
                    return
                i += 1

        thread = threading.Thread(target=run, args=(self.position,), daemon=True,
                                  name=f"sae-ref prefetch: {self.name}")
        self._ahead = (thread, q, stop)
        thread.start()
        return self

    def close(self) -> None:
        """Stop the prefetching thread, if any, and wait for it (batches it made are dropped;
        ``position`` is the next batch this stream delivers)."""
        if self._ahead is None:
            return
        thread, q, stop = self._ahead
        self._ahead = None
        stop.set()
        while thread.is_alive():
            try:
                q.get(timeout=0.05)  # unblock a put
            except queue.Empty:
                pass
            thread.join(timeout=0.05)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _take(self, i: int):
        """Batch ``i``: from the prefetching thread (checking it is the one due), or made here."""
        if self._ahead is None:
            return self._host(i)
        t0 = time.perf_counter()
        got = self._ahead[1].get()
        self.wait_seconds += time.perf_counter() - t0
        if got[0] != i:  # cannot happen: the thread runs in order from this stream's position
            raise RuntimeError(f"{self.name}: prefetched batch {got[0]} where {i} was due")
        if isinstance(got[1], BaseException):
            self.close()
            raise got[1]
        return got

    def __next__(self):
        run = 0
        while True:
            i = self.position
            _, a, ready, where = self._take(i)
            if where is None:
                self.position = i + 1
                if ready is not None:
                    from sae_ref.backends import get_backend

                    get_backend(self.xp).wait_ready(a, ready)
                return a
            if self.nonfinite == "raise":
                self.close()
                raise NonFiniteBatch(f"{self.name}: the batch at position {i} contains NaN or "
                                     f"infinity{where}")
            self.position = i + 1
            self.skipped += 1
            run += 1
            if self._max_skips is not None and run >= self._max_skips:
                self.close()
                raise ValueError(f"{self.name}: {run} consecutive batches (positions "
                                 f"{i - run + 1} to {i}) contain NaN or infinity{where}; "
                                 f"skipping cannot find a finite batch")

    def __repr__(self) -> str:
        return (f"<BatchStream of {self.name} at position {self.position}, "
                f"{self.skipped} skipped>")
