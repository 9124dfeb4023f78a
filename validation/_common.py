"""Pieces every check shares: options, calling the implementation, describing differences.

>>> import numpy as np
>>> from sae_ref.validation._common import values_differ
>>> values_differ(np.array([1.0, 2.0]), np.array([1.0, 2.0 + 1e-12]), rtol=1e-9)
False
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sae_ref.validation.interface import Interface, make_interface
from sae_ref.validation.report import describe_difference, positions  # noqa: F401 (re-exported)
from sae_ref.validation.runner import MAX_EXAMPLES, Finding, call_user

DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class Options:
    """How a check runs: the conversions, the input dtype and hypothesis's budget."""

    io: Interface
    dtype: type
    max_examples: int
    seed: int
    shrink: bool

    @property
    def eps(self) -> float:
        return float(np.finfo(self.dtype).eps)

    def run_kw(self) -> dict:
        return {"max_examples": self.max_examples, "seed": self.seed, "shrink": self.shrink}


def options(op: str, *, xp=None, device=None, to_user=None, from_user=None, dtype="float32",
            max_examples: int = MAX_EXAMPLES, seed: int = 0, shrink: bool = True) -> Options:
    """Check and bundle the keyword arguments every ``check_*`` function takes."""
    if dtype not in DTYPES and np.dtype(dtype).name not in DTYPES:
        raise ValueError(f"{op}: argument 'dtype' must be one of {list(DTYPES)}, got {dtype!r}")
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise ValueError(f"{op}: argument 'max_examples' must be a positive integer, got {max_examples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{op}: argument 'seed' must be an integer, got {seed!r}")
    return Options(make_interface(xp, device, to_user, from_user), np.dtype(dtype).type,
                   max_examples, seed, bool(shrink))


def check_callable(op: str, name: str, fn, required: bool = True):
    if fn is None and not required:
        return None
    if not callable(fn):
        raise TypeError(f"{op}: argument '{name}' must be callable, got {fn!r}")
    return fn


def call(opts: Options, fn, *args, what: str = "the implementation"):
    """``fn`` on the example's inputs: NumPy arrays go through ``to_user``, everything else
    (k, theta, bandwidth) is passed as is; the result comes back through ``from_user``."""
    user_args = [opts.io.to_user(a) if isinstance(a, np.ndarray) else a for a in args]
    out = call_user(fn, *user_args, what=what)
    return call_user(opts.io.from_user, out, what=f"converting the output of {what}")


def as_float64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def dense_output(opts: Options, fn, shape, *args, what="the implementation"):
    """The implementation's output as a float64 array of ``shape``, or a :class:`Finding`."""
    out = call(opts, fn, *args, what=what)
    if tuple(np.shape(out)) != tuple(shape):
        return Finding(f"{what} returned shape {tuple(np.shape(out))}, expected {tuple(shape)}", got=np.asarray(out))
    out = as_float64(out)
    if not np.all(np.isfinite(out)):
        return Finding(f"{what} returned NaN or infinity", got=out)
    return out


def scalar_output(opts: Options, fn, *args, what="the implementation"):
    """The implementation's output as a Python float, or a :class:`Finding`."""
    out = call(opts, fn, *args, what=what)
    if np.size(out) != 1:
        return Finding(f"{what} returned shape {tuple(np.shape(out))}, expected a single number", got=np.asarray(out))
    value = float(np.reshape(out, ()))
    if not np.isfinite(value):
        return Finding(f"{what} returned {value}", got=np.asarray(value))
    return value


def values_differ(got, expected, *, rtol: float, atol: float = 0.0) -> bool:
    got, expected = as_float64(got), as_float64(expected)
    if got.shape != expected.shape:
        return True
    return bool(np.any(np.abs(got - expected) > atol + rtol * np.abs(expected)))
