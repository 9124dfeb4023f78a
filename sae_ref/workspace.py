"""Scratch arrays that training steps reuse instead of allocating each step.

A step of a large SAE fills a few big temporaries: the [B, h] pre-activations (256 MiB at
B=4096, h=16384 in float32) and the [h, d] gradients of the encoder and the decoder (48 MiB
each at d=768). Fresh arrays of that size come from the operating system as new pages, and
touching them for the first time costs a page fault per page, which on small machines can
take longer than the arithmetic that fills them. A :class:`Workspace` keeps such arrays from one step to the next; libraries write into
them through ``out=`` (NumPy, torch, CuPy) or the compiled kernels. Under the pure Array API
there is no ``out=``, and the workspace is simply not written into.

A :class:`~sae_ref.train.TrainState` carries one workspace, shared by the states that follow
it; a step claims it for its duration, and a step that finds it claimed (another thread
stepping a related state) allocates its own arrays instead. Nothing a step returns refers to
workspace memory. A workspace is not saved in checkpoints and pickles as an empty one.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

from array_api_compat import array_namespace, device as device_of


class Workspace:
    """Named arrays kept from step to step (see the module docstring)."""

    def __init__(self):
        self._arrays: dict = {}
        self._lock = threading.Lock()

    @contextmanager
    def claim(self):
        """This workspace for the duration of the block, or None if another thread holds it."""
        got = self._lock.acquire(blocking=False)
        try:
            yield self if got else None
        finally:
            if got:
                self._lock.release()

    def array(self, name: str, xp, shape: tuple, dtype, device):
        """The array kept under ``name`` if it has this library, shape, dtype and device, else
        a new empty one kept from now on. Its contents are whatever the last user left."""
        a = self._arrays.get(name)
        if (a is None or array_namespace(a) is not xp or tuple(a.shape) != tuple(shape)
                or a.dtype != dtype or device_of(a) != device):
            a = xp.empty(tuple(shape), dtype=dtype, device=device)
            self._arrays[name] = a
        return a

    def clear(self) -> None:
        """Release every kept array."""
        self._arrays.clear()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def __repr__(self):
        return f"Workspace({sorted(self._arrays)})"
