"""Test fixtures: every property runs on every available backend.

The session-scoped ``backend`` fixture yields numpy, torch (CPU), ``torch-gpu-path`` and
array-api-strict, plus CuPy and torch-CUDA when a GPU is present. Inputs are drawn with NumPy
and moved with ``backend.asarray`` so all backends see the identical data.

``torch-gpu-path`` is torch on the CPU taking every decision a CUDA device takes: the
sync-free mode of :mod:`sae_ref.backends` is forced around each test that uses it (fixed-size
selections, padded codes inside the step, scatter-add products, no NumPy-view fast paths), so
every property runs, on every CI run, through the calls a GPU step makes. ``numpy-gpu-path``
is NumPy in the same mode with its primitives taken through the bridge to torch's
(``backends/_bridge.py``, the path a CuPy step takes to the fused kernels): NumPy arrays
handed to torch's GPU-path primitives as zero-copy views. A test that loops over
``all_backends`` runs each backend's calls inside ``backend.path()``.

Hypothesis profiles: ``ci`` (derandomised, bounded, no deadline; chosen when CI is set),
``dev`` (the default locally) and ``thorough``; pick one with HYPOTHESIS_PROFILE.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from sae_ref.arrays import to_numpy

try:  # without a GPU, the fused Triton kernels run in Triton's interpreter (before they load)
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.function_scoped_fixture,
                                                     HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=25, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=40, **_COMMON)
settings.register_profile("thorough", max_examples=500, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@dataclass(frozen=True)
class Backend:
    """One array library on one device, as the tests see it."""

    name: str
    xp: Any
    device: Any

    def asarray(self, a, dtype=None):
        """A NumPy array (or nested list) as this backend's array; dtype from NumPy's name."""
        a = np.asarray(a)
        if dtype is None:
            dtype = a.dtype
        dt = getattr(self.xp, np.dtype(dtype).name) if np.dtype(dtype) != np.bool_ else self.xp.bool
        return self.xp.asarray(a, dtype=dt, device=self.device)

    @property
    def gpu_path(self) -> bool:
        """Whether this backend takes a GPU's execution path (a CUDA device, or its CPU stand-in)."""
        return self.name in GPU_PATH_NAMES

    def path(self):
        """A context in which this backend's calls take its device's path: for
        ``torch-gpu-path`` the sync-free mode and the fused Triton kernels (in Triton's
        interpreter; a real GPU takes both by default), for ``numpy-gpu-path`` those and the
        NumPy backend through the bridge to torch, nothing for the others."""
        from sae_ref.backends import sync_free, triton_kernels

        if self.name not in ("torch-gpu-path", "numpy-gpu-path"):
            return contextlib.nullcontext()
        both = contextlib.ExitStack()
        both.enter_context(sync_free(True))
        both.enter_context(triton_kernels(True))
        if self.name == "numpy-gpu-path":
            both.enter_context(_bridged_numpy())
        return both

    def dtype(self, name: str):
        return getattr(self.xp, name)

    @staticmethod
    def numpy(a) -> np.ndarray:
        return to_numpy(a)

    def __repr__(self) -> str:
        return self.name


GPU_PATH_NAMES = ("torch-gpu-path", "numpy-gpu-path", "torch-cuda", "cupy")


@functools.cache
def _numpy_through_torch():
    from triton_devices import NumpyThroughTorch

    return NumpyThroughTorch()


@contextlib.contextmanager
def _bridged_numpy():
    """The NumPy backend taken through the bridge to torch's primitives within the block."""
    from sae_ref import backends

    before = backends._NATIVE.get("numpy")
    backends._NATIVE["numpy"] = _numpy_through_torch()
    try:
        yield
    finally:
        if before is None:
            backends._NATIVE.pop("numpy")
        else:
            backends._NATIVE["numpy"] = before


def _available() -> list[str]:
    names = ["numpy", "torch", "torch-gpu-path", "numpy-gpu-path", "strict"]
    try:
        import torch

        if torch.cuda.is_available():
            names.append("torch-cuda")
    except ImportError:
        names.remove("torch")
        names.remove("torch-gpu-path")
    if "torch" not in names or importlib.util.find_spec("triton") is None:
        names.remove("numpy-gpu-path")  # the bridge needs torch, its kernels Triton
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            names.append("cupy")
    except Exception:
        pass
    return names


BACKEND_NAMES = _available()


def make_backend(name: str) -> Backend:
    from sae_ref.arrays import resolve

    xp, device = resolve({"torch-gpu-path": "torch", "numpy-gpu-path": "numpy"}.get(name, name))
    if name == "strict":
        # array-api-strict's second fake device: any creation call that forgets device=
        # lands on the default device and the next operation mixing the two fails.
        device = xp.Device("device1")
    return Backend(name, xp, device)


@pytest.fixture(scope="session", params=BACKEND_NAMES)
def backend(request) -> Backend:
    return make_backend(request.param)


@pytest.fixture(autouse=True)
def _device_path(request):
    """Each test that takes the ``backend`` fixture runs inside that backend's :meth:`Backend.path`."""
    b = request.getfixturevalue("backend") if "backend" in request.fixturenames else None
    if not isinstance(b, Backend):  # no backend, or a test's own parameter of that name
        yield
        return
    with b.path():
        yield


@pytest.fixture(scope="session")
def all_backends() -> list[Backend]:
    return [make_backend(n) for n in BACKEND_NAMES]
