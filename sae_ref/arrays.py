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


def resolve(backend: str, device=None):
    """``(xp, device)`` for a backend name: numpy, torch, torch-cuda, cupy or strict.

    ``device`` picks the device where the library has several: for torch any torch device
    string (``"cpu"``, ``"cuda"``, ``"cuda:1"``; ``backend="torch", device="cuda"`` is
    ``"torch-cuda"``), for CuPy a GPU number. ``strict`` is array-api-strict, the standard and
    nothing else: slow, for checking.
    """
    if backend == "numpy":
        _host_only(backend, device)
        xp = array_namespace(np.zeros(1))
    elif backend in ("torch", "torch-cuda"):
        import torch

        dev = torch.device(device if device is not None else ("cuda" if backend == "torch-cuda" else "cpu"))
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"backend {backend!r} on device {str(dev)!r} asked for, but torch sees no CUDA device")
        t = torch.zeros(1, device=dev)
        return array_namespace(t), device_of(t)
    elif backend == "cupy":
        try:
            import cupy
        except ImportError as e:
            raise ModuleNotFoundError(
                f"resolve: backend 'cupy' needs CuPy, which cannot be imported ({e}): install it "
                "with pip install 'sae-ref[cupy]' (cupy-cuda12x, for CUDA 12), or train on the GPU "
                "with backend 'torch' and device 'cuda'", name="cupy") from None

        if device is not None:
            with cupy.cuda.Device(int(str(device).removeprefix("cuda:"))):
                a = cupy.zeros(1)
            return array_namespace(a), device_of(a)
        xp = array_namespace(cupy.zeros(1))
    elif backend == "strict":
        import array_api_strict

        xp = array_api_strict
        if device is not None:
            devs = {str(d): d for d in xp.__array_namespace_info__().devices()}
            if str(device) not in devs:
                raise ValueError(f"resolve: argument 'device' for backend 'strict' must be one of {sorted(devs)}, got {device!r}")
            return xp, devs[str(device)]
    else:
        raise ValueError(f"resolve: argument 'backend' must be one of {list(BACKENDS)}, got {backend!r}")
    return xp, device_of(xp.zeros(1))


def _host_only(backend, device):
    if device is not None and str(device) != "cpu":
        raise ValueError(f"resolve: backend {backend!r} runs on the CPU only, got device {device!r}")


def from_host(xp, a: np.ndarray, *, dtype, device):
    """The host array ``a`` as an array of ``xp`` on ``device`` without making a GPU wait
    (:meth:`sae_ref.backends.StandardBackend.from_host`): how the training loop moves each
    batch."""
    from sae_ref.backends import get_backend

    return get_backend(xp).from_host(xp, a, dtype=dtype, device=device)


def to_numpy(a) -> np.ndarray:
    """A NumPy copy of any backend's array (host transfer; for reports and tests)."""
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    if type(a).__module__.startswith("cupy"):
        return a.get()
    if type(a).__module__.startswith("array_api_strict"):
        return np.asarray(a._array)
    return np.asarray(a)
