"""When torch's GPU path runs fused Triton kernels instead of chains of composed kernels.

Triton is an optional dependency (torch ships it with its CUDA builds). Each fused kernel sits
behind a backend primitive whose composed form (the chain of standard calls it replaces) stays
the fallback and the oracle in the tests. A kernel runs:

- on CUDA tensors, by default, when Triton imports (:func:`triton_kernels` ``None``);
- on CPU tensors in the GPU's sync-free mode, within ``triton_kernels(True)`` and with
  Triton's interpreter on (``TRITON_INTERPRET=1`` set before the kernels' module is first
  imported): the tests run the kernels this way on a machine without a GPU;
- never within ``triton_kernels(False)``.
"""

from __future__ import annotations

import contextvars
import functools
import os
import warnings

from ._switch import within

_ENABLED = contextvars.ContextVar("sae_ref_triton", default=None)


def triton_kernels(enabled: bool | None = True):
    """Within this block the fused Triton kernels run where :func:`usable` allows
    (``True``: also on CPU tensors under the interpreter; ``False``: nowhere; ``None``: the
    default, CUDA tensors only)."""
    return within(_ENABLED, "triton_kernels", enabled)


@functools.cache
def available() -> bool:
    """Whether Triton imports."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # not installed, or installed without a working compiler
        return False
    return True


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (on the host, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


#: why the fused kernels are off for this process (a kernel failed), or None
FAILURE: str | None = None


def failed(name: str, err: Exception) -> None:
    """Turn the fused kernels off for the process after kernel ``name`` raised ``err`` (a
    compile or launch error: the composed forms run instead), with a RuntimeWarning."""
    global FAILURE
    FAILURE = f"{name}: {type(err).__name__}: {err}"
    warnings.warn(f"the fused Triton kernels are off for this process (the composed kernels run): "
                  f"{FAILURE}", RuntimeWarning, stacklevel=3)


def off() -> bool:
    """Whether the fused kernels run nowhere: within ``triton_kernels(False)``, after a kernel
    failed, or without Triton."""
    return _ENABLED.get() is False or FAILURE is not None or not available()


def usable(*tensors) -> bool:
    """Whether the fused kernels run on these torch tensors (all on one device, the GPU
    path's)."""
    from . import is_sync_free

    if off() or not tensors:
        return False
    enabled = _ENABLED.get()
    kinds = {t.device.type for t in tensors}
    if kinds == {"cuda"}:
        return True
    return bool(enabled) and kinds == {"cpu"} and interpreting() and is_sync_free(tensors[0])


def flat_block(n: int, gpu: int = 1024, most: int = 1 << 16) -> int:
    """Elements a program of a flat (one-dimensional) kernel takes: ``gpu`` on a GPU; under the
    interpreter, whose cost is per program, all ``n`` at once up to ``most`` (a power of two,
    at least ``gpu``)."""
    if not interpreting():
        return gpu
    import triton

    return max(gpu, min(most, triton.next_power_of_2(max(n, 1))))
