"""Test fixtures: every property runs on every available backend.

The session-scoped ``backend`` fixture yields numpy, torch (CPU) and array-api-strict, plus
CuPy and torch-CUDA when a GPU is present. Inputs are drawn with NumPy and moved with
``backend.asarray`` so all backends see the identical data.

Hypothesis profiles: ``ci`` (derandomised, bounded, no deadline; chosen when CI is set),
``dev`` (the default locally) and ``thorough``; pick one with HYPOTHESIS_PROFILE.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from sae_ref.arrays import to_numpy

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

    def dtype(self, name: str):
        return getattr(self.xp, name)

    @staticmethod
    def numpy(a) -> np.ndarray:
        return to_numpy(a)

    def __repr__(self) -> str:
        return self.name


def _available() -> list[str]:
    names = ["numpy", "torch", "strict"]
    try:
        import torch

        if torch.cuda.is_available():
            names.append("torch-cuda")
    except ImportError:
        names.remove("torch")
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

    xp, device = resolve(name)
    if name == "strict":
        # array-api-strict's second fake device: any creation call that forgets device=
        # lands on the default device and the next operation mixing the two fails.
        device = xp.Device("device1")
    return Backend(name, xp, device)


@pytest.fixture(scope="session", params=BACKEND_NAMES)
def backend(request) -> Backend:
    return make_backend(request.param)


@pytest.fixture(scope="session")
def all_backends() -> list[Backend]:
    return [make_backend(n) for n in BACKEND_NAMES]
