"""Where a training step spends its time: wall-clock seconds by phase.

The step marks the end of each phase with :func:`mark`. Outside a :func:`phases` block a mark
is one global read and nothing else; inside it, the mark waits for the device (so GPU work
is charged to the phase that queued it) and adds the time since the previous mark to the
phase's total.

>>> import numpy as np
>>> from sae_ref.profile import phases
>>> from sae_ref.train import TrainConfig, init_state, step
>>> x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
>>> state = init_state(TrainConfig(h=128, k=4), x)
>>> with phases() as seconds:
...     state, _ = step(state, x)
>>> sorted(seconds)[:3]
['adam', 'auxk', 'backward']
"""

from __future__ import annotations

import time
from contextlib import contextmanager

_active: dict | None = None
_last = 0.0
_listeners: list = []


@contextmanager
def listen(fn):
    """Within the block, ``fn(name)`` is called at every :func:`mark`, before anything else
    (the GPU ledger of ``benchmarks/`` charges the torch calls it records to phases this way)."""
    _listeners.append(fn)
    try:
        yield
    finally:
        _listeners.remove(fn)


@contextmanager
def phases():
    """Collect per-phase seconds of the steps run inside the block into the yielded dict
    (summed over steps; phases in the order they were first marked)."""
    global _active, _last
    outer, outer_last = _active, _last
    _active, _last = {}, time.perf_counter()
    try:
        yield _active
    finally:
        _active, _last = outer, outer_last


def measuring() -> bool:
    """Whether :func:`phases` is timing (a captured CUDA graph would hide its phases)."""
    return _active is not None


def mark(name: str, array=None) -> None:
    """End the phase ``name``: wait for ``array``'s device, then charge the time since the
    previous mark to ``name``. A no-op outside :func:`phases`."""
    global _last
    for fn in _listeners:
        fn(name)
    if _active is None:
        return
    if array is not None:
        _wait(array)
    now = time.perf_counter()
    _active[name] = _active.get(name, 0.0) + (now - _last)
    _last = now


def _wait(array) -> None:
    """Block until the work that produced ``array`` is done (GPU libraries run asynchronously)."""
    mod = type(array).__module__
    if mod.startswith("torch"):
        import torch

        if array.device.type == "cuda":
            torch.cuda.synchronize(array.device)
    elif mod.startswith("cupy"):
        import cupy

        cupy.cuda.get_current_stream().synchronize()
