"""Backend names: one argument chooses where the arrays live.

>>> from sae_ref.arrays import resolve
>>> xp, device = resolve("numpy")
>>> xp.__name__
'array_api_compat.numpy'
"""

from __future__ import annotations

import numpy as np
from array_api_compat import array_namespace, device as device_of

#: The names :func:`resolve` accepts.
BACKENDS = ("numpy", "torch", "torch-cuda", "cupy", "strict")


def resolve(backend: str):
    """``(xp, device)`` for a backend name: numpy, torch (CPU), torch-cuda, cupy or strict.

    ``strict`` is array-api-strict, the standard and nothing else: slow, for checking.
    """
    if backend == "numpy":
        xp = array_namespace(np.zeros(1))
    elif backend in ("torch", "torch-cuda"):
        import torch

        dev = "cuda" if backend == "torch-cuda" else "cpu"
        if dev == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("backend 'torch-cuda' asked for, but torch sees no CUDA device")
        t = torch.zeros(1, device=dev)
        return array_namespace(t), device_of(t)
    elif backend == "cupy":
        import cupy

        xp = array_namespace(cupy.zeros(1))
    elif backend == "strict":
        import array_api_strict

        xp = array_api_strict
    else:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    return xp, device_of(xp.zeros(1))


def to_numpy(a) -> np.ndarray:
    """A NumPy copy of any backend's array (host transfer; for reports and tests)."""
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    if type(a).__module__.startswith("cupy"):
        return a.get()
    if type(a).__module__.startswith("array_api_strict"):
        return np.asarray(a._array)
    return np.asarray(a)
