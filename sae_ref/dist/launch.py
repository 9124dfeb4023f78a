"""Starting ranks: real processes on one machine (tests, benchmarks), or a ``torchrun`` launch.

:func:`spawn` runs ``fn(rank, size, *args)`` in ``nproc`` fresh Python processes joined in one
``torch.distributed`` process group and returns their results in rank order. If any rank
fails (an exception, a non-zero exit, or a signal such as SIGKILL) the others are stopped at
once and :class:`RankError` says which rank failed and how. Under ``torchrun``,
:func:`comm_from_env` joins the group that the launcher describes in the environment::

    torchrun --nproc-per-node 2 my_script.py      # in my_script.py: comm = comm_from_env()

>>> from sae_ref.dist.launch import is_torchrun
>>> is_torchrun() in (True, False)
True
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import time
import traceback
from multiprocessing.connection import wait

from sae_ref.dist.comm import LocalComm, TorchComm, timeout

MASTER_ADDR = "127.0.0.1"
_GRACE_S = 2.0  # after a first failure: how long to collect the other ranks' causes


class RankError(RuntimeError):
    """One or more ranks of :func:`spawn` failed.

    Attributes
    ----------
    failures : dict[int, str]
        Each failed rank and its cause (the signal's name, the exit code, or the traceback
        text), the root cause first.
    """

    def __init__(self, failures: dict[int, str]):
        self.failures = failures
        parts = [f"rank {r} {why}" for r, why in failures.items()]
        super().__init__("spawn: " + ";\n".join(parts))


def spawn(fn, nproc: int, *args, backend: str = "gloo", timeout_s: float = 120.0,
          deadline_s: float | None = None) -> list:
    """Run ``fn(rank, size, *args)`` in ``nproc`` processes joined in one process group.

    Each process is a fresh interpreter (the ``spawn`` start method) with ``MASTER_ADDR``
    (127.0.0.1), ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
    ``LOCAL_WORLD_SIZE`` set, and ``torch.distributed`` already initialised: build a
    :class:`~sae_ref.dist.TorchComm` (or call :func:`comm_from_env`) inside ``fn``. The
    rendezvous store lives in this process on a free port, so no port is guessed.

    Parameters
    ----------
    fn : callable
        A module-level function (it is pickled by reference); its return value must be
        picklable.
    nproc : int
        Number of ranks, at least 1.
    *args
        Passed to every rank after ``rank`` and ``size`` (pickled once per rank).
    backend : "gloo" or "nccl"
        With NCCL, rank r uses CUDA device ``r % torch.cuda.device_count()``.
    timeout_s : float
        The process group's timeout: a collective waiting longer raises in that rank.
    deadline_s : float or None
        If given, stop every rank and raise :class:`RankError` when the whole run takes longer.

    Returns
    -------
    list
        ``fn``'s return values in rank order.

    Raises
    ------
    RankError (a RuntimeError)
        If any rank raised (with its traceback text), exited with a non-zero code, or was
        killed by a signal (named, e.g. SIGKILL). The other ranks are terminated promptly:
        the children are watched directly, so a rank blocked in a collective with a dead peer
        does not hold the call up.
    """
    nproc = _check_spawn(fn, nproc, backend, timeout_s)
    import torch.distributed as dist

    store = dist.TCPStore(MASTER_ADDR, 0, nproc, True, timeout=timeout(timeout_s), wait_for_workers=False)
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    try:
        for rank in range(nproc):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_run_rank, name=f"sae-ref-rank-{rank}",
                            args=(fn, rank, nproc, store.port, backend, timeout_s, args, send))
            p.start()
            send.close()
            procs.append(p)
            conns.append(recv)
        return _watch(procs, conns, deadline_s)
    finally:
        _stop(procs)
        for c in conns:
            c.close()
        del store


def _check_spawn(fn, nproc, backend, timeout_s):
    if not callable(fn):
        raise TypeError(f"spawn: argument 'fn' must be callable, got {type(fn).__name__}")
    try:
        pickle.dumps(fn)
    except Exception as e:  # noqa: BLE001 (whatever pickling raises, the answer is the same)
        raise TypeError(f"spawn: argument 'fn' must be picklable (a module-level function), got {fn!r}: {e}") from None
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"spawn: argument 'nproc' must be an integer >= 1, got {nproc!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"spawn: argument 'backend' must be 'gloo' or 'nccl', got {backend!r}")
    if not timeout_s > 0:
        raise ValueError(f"spawn: argument 'timeout_s' must be positive, got {timeout_s!r}")
    return nproc


def _run_rank(fn, rank, size, port, backend, timeout_s, args, conn):
    """The body of each child: join the group, run ``fn``, send ("ok", value) or ("error", text)."""
    os.environ.update(MASTER_ADDR=MASTER_ADDR, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size))
    import torch
    import torch.distributed as dist

    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        store = dist.TCPStore(MASTER_ADDR, port, size, False, timeout=timeout(timeout_s))
        dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout(timeout_s))
        message = ("ok", fn(rank, size, *args))
    except BaseException:  # noqa: BLE001 (every failure of the rank goes back to the parent)
        message = ("error", traceback.format_exc())
    try:
        conn.send(message)
    except Exception:  # noqa: BLE001 (an unpicklable result is reported, not lost)
        conn.send(("error", "its result could not be sent back:\n" + traceback.format_exc()))
    conn.close()
    if dist.is_initialized():
        dist.destroy_process_group()


def _watch(procs, conns, deadline_s):
    """Collect every rank's message; after a first failure, the other causes for a moment, then
    raise."""
    nproc = len(procs)
    results, failures = {}, {}
    pending = {c: r for r, c in enumerate(conns)}
    running = {p.sentinel: r for r, p in enumerate(procs)}
    deadline = None if deadline_s is None else time.monotonic() + deadline_s
    grace_end = None
    while len(results) < nproc:
        if failures and grace_end is None:
            grace_end = time.monotonic() + _GRACE_S
        ends = [t for t in (deadline, grace_end) if t is not None]
        left = min(ends) - time.monotonic() if ends else None
        if (left is not None and left <= 0) or not (pending or running):
            break
        for obj in wait(list(pending) + list(running), timeout=left):
            if obj in pending:
                _receive(obj, pending.pop(obj), results, failures)
            elif obj in running:
                r = running.pop(obj)
                if conns[r] in pending and conns[r].poll():  # its message came before the exit
                    _receive(conns[r], pending.pop(conns[r]), results, failures)
                procs[r].join()
                _exited(r, procs[r].exitcode, results, failures)
    if len(results) == nproc:
        return [results[r] for r in range(nproc)]
    if not failures:
        failures = {r: (4, r, f"did not finish within deadline_s = {deadline_s} s")
                    for r in range(nproc) if r not in results}
    raise RankError(_root_cause_first(failures))


def _receive(conn, rank, results, failures):
    try:
        kind, value = conn.recv()
    except (EOFError, OSError):
        return  # it died before sending; its exit status tells why
    if kind == "ok":
        results[rank] = value
    else:
        failures[rank] = (3, len(failures), f"raised an exception:\n{value}")


def _exited(rank, code, results, failures):
    if rank in results or rank in failures:
        return
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        failures[rank] = (0, len(failures), f"was killed by signal {name}")
    elif code:
        failures[rank] = (1, len(failures), f"exited with code {code}")
    else:
        failures[rank] = (2, len(failures), "exited without returning a result")


def _root_cause_first(failures):
    """Signals, then exit codes, then missing results, then exceptions (often a peer's death),
    then late ranks, each kind in the order seen; ``failures[r]`` is ``(kind, seen, text)``."""
    return {r: failures[r][2] for r in sorted(failures, key=lambda r: failures[r][:2])}


def _stop(procs, wait_s: float = 2.0):
    """Terminate the ranks still running (SIGTERM, then SIGKILL after ``wait_s``)."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + wait_s
    for p in procs:
        p.join(max(end - time.monotonic(), 0.0))
        if p.is_alive():
            p.kill()
            p.join()


# --- torchrun ---------------------------------------------------------------------------------
def is_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (or :func:`spawn`): RANK, WORLD_SIZE and
    LOCAL_RANK are set in the environment."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def comm_from_env(backend: str | None = None, *, timeout_s: float = 1800.0):
    """The communicator for this process: a :class:`~sae_ref.dist.TorchComm` under ``torchrun``,
    else a :class:`~sae_ref.dist.LocalComm`.

    Under ``torchrun`` the default process group is initialised here if it is not yet
    (``env://``: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE from the launcher), with
    ``backend`` (default NCCL when CUDA is available, else Gloo); with NCCL the CUDA device
    is ``LOCAL_RANK``.
    """
    if not is_torchrun():
        return LocalComm()
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend, timeout=timeout(timeout_s))
    return TorchComm()
