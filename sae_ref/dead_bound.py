r"""How many latents can be dead in the next steps: a bound the host knows without waiting.

On the GPU path the training step reads nothing back to the host, so it cannot size AuxK's
block by this step's dead count. It can size it by a **bound** known in advance. A latent's
counter (tokens since it last fired) grows by at most the batch size ``B`` a step, so a
latent dead at step :math:`t + s` (counter :math:`\ge T`, the dead threshold in tokens) had a
counter :math:`\ge T - sB` at step :math:`t`:

.. math:: \mathrm{dead}_{t+s} \subseteq \{j : \mathrm{since}_t[j] \ge T - sB\}.

After each step the count :math:`c_t = \#\{j: \mathrm{since}_t[j] \ge T - (L+1)B\}` is
started on its way to the host (a copy queued behind the step, :meth:`issue`); it bounds the
dead count of steps :math:`t+1, \dots, t+L+1`. Step :math:`u` reads the count issued after
step :math:`u - L - 1` (``L`` = :data:`LAG`): that step finished while the GPU ran the ones
after it, so the read does not wait for the device unless the host is more than ``L`` steps
ahead. AuxK's block then has :func:`capacity` columns: the dead ones first (ascending) and
padding, never fewer than the dead ones. The first step of a state with no count in flight
(a fresh state, another batch size) counts once, waiting for it. Checkpoints and pickled
states keep the counts in flight, read (:func:`settled`): the block's width changes the order
of a GEMM's sums, so a resumed run must size its blocks as the uninterrupted one did to take
the same bits.

Sizes come in powers of two up to ``h / 8``, then in multiples of ``h / 8``, so that a run
sees few distinct shapes (each is one CUDA graph when the step is captured).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from array_api_compat import array_namespace

#: Steps between issuing a count and reading it (1: the host waits only when more than one
#: step ahead of the device).
LAG = 1


@dataclass(frozen=True)
class Count:
    """A bound on the dead count issued after step ``t``, valid through step ``through``
    for batches of ``B`` rows (``handle``: the backend's host copy in flight)."""

    t: int
    through: int
    B: int
    handle: Any


def issue(be, since, t: int, B: int, threshold: int, horizon: int = LAG + 1) -> Count:
    """The bound for steps ``t + 1 .. t + horizon`` from the counters ``since`` after step
    ``t`` (dead threshold ``threshold`` tokens, batches of ``B``), its copy to the host queued."""
    xp = array_namespace(since)
    near = xp.count_nonzero(since >= threshold - horizon * B)
    return Count(t, t + horizon, B, be.to_host_async(near))


def read(be, counts: tuple, since, t: int, B: int, threshold: int) -> tuple[int, tuple]:
    """(the bound on step ``t``'s dead count, the counts still useful afterwards).

    Uses the oldest count in ``counts`` that covers step ``t`` at batch size ``B``; without
    one, counts from ``since`` (the counters before step ``t``) and waits for the result."""
    live = tuple(c for c in counts if c.through >= t and c.B == B and c.t < t)
    if live:
        return read_host(live[0].handle), live
    return read_host(issue(be, since, t - 1, B, threshold, horizon=1).handle), live


def read_host(handle) -> int:
    """The value behind a handle of the backend's ``to_host_async``: an int, a 0-D array, or
    ``(host array, event)``, whose event is waited for (it has passed when the handle is a
    step or more old)."""
    if isinstance(handle, tuple):
        host, done = handle
        done.synchronize()
        handle = host
    return int(handle)


def settled(counts: tuple) -> tuple:
    """``counts`` with their values read to the host (saved in checkpoints, so that a resumed
    run sizes AuxK's blocks as the uninterrupted one did: the block's width changes the order
    of the GEMM's sums, hence the last bits)."""
    return tuple(Count(c.t, c.through, c.B, read_host(c.handle)) for c in counts)


def capacity(bound: int, h: int) -> int:
    """The columns of AuxK's block for at most ``bound`` dead latents among ``h``: the
    smallest power of two ``>= bound`` from ``h / 64`` (and 1) up to ``h / 8``, then the
    smallest multiple of ``h / 8`` (at most ``h``): few distinct widths, none more than
    twice the bound or ``h / 8`` above it."""
    step = max(1, h // 8)
    if bound > step:
        return min(h, -(-bound // step) * step)
    cap = max(1, h // 64)
    while cap < bound:
        cap *= 2
    return min(cap, step)  # both at least the bound
