"""Argument checks shared by the public operations.

Every public op checks its arguments and raises an error that names the op, the argument and
what was expected. The checks of values (NaN/inf) read one boolean back to the host; inside
a training loop, where the inputs were checked once, they can be switched off with
:func:`no_checks`.
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers

from array_api_compat import array_namespace, device as device_of, is_array_api_obj

_CHECK_VALUES = contextvars.ContextVar("sae_ref_check_values", default=True)


@contextlib.contextmanager
def no_checks():
    """Skip the NaN/inf checks (one host read-back each) inside this block.

    Shape, dtype, namespace and device checks stay on: they cost nothing.
    """
    token = _CHECK_VALUES.set(False)
    try:
        yield
    finally:
        _CHECK_VALUES.reset(token)


def namespace(op: str, **arrays):
    """The one array namespace of the named arrays (``None`` entries skipped).

    Raises TypeError naming the arguments when they come from different libraries, and
    ValueError when they sit on different devices.
    """
    given = {k: a for k, a in arrays.items() if a is not None}
    for name, a in given.items():
        if not is_array_api_obj(a):
            raise TypeError(f"{op}: argument '{name}' must be an array, got {type(a).__name__}")
    names = list(given)
    try:
        xp = array_namespace(*given.values())
    except TypeError:
        libs = {n: type(a).__module__.split(".")[0] for n, a in given.items()}
        raise TypeError(
            f"{op}: arguments {names} must all come from one array library, got {libs}"
        ) from None
    devs = {n: device_of(a) for n, a in given.items()}
    first = names[0]
    for n in names[1:]:
        if devs[n] != devs[first]:
            raise ValueError(
                f"{op}: arguments must be on one device; '{first}' is on {devs[first]} "
                f"but '{n}' is on {devs[n]}"
            )
    return xp


def floating(op: str, xp, name: str, a, ndim: int | None = None, shape=None):
    """Check that ``a`` is a real floating array with ``ndim`` dims (and ``shape``, None = any)."""
    if not xp.isdtype(a.dtype, "real floating"):
        raise TypeError(f"{op}: argument '{name}' must have a real floating dtype, got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(
            f"{op}: argument '{name}' must have {ndim} dimension(s), got shape {tuple(a.shape)}"
        )
    if shape is not None:
        want = tuple(shape)
        got = tuple(a.shape)
        if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
            pretty = tuple("*" if w is None else w for w in want)
            raise ValueError(f"{op}: argument '{name}' must have shape {pretty}, got {got}")


def same_dtype(op: str, **arrays):
    """Check that the named floating arrays share one dtype."""
    given = {k: a for k, a in arrays.items() if a is not None}
    dtypes = {k: a.dtype for k, a in given.items()}
    if len(set(map(str, dtypes.values()))) > 1:
        raise TypeError(f"{op}: arguments must share one floating dtype, got {dtypes}")


def finite(op: str, xp, name: str, a):
    """Check that ``a`` has no NaN or infinity (skipped inside :func:`no_checks`)."""
    if _CHECK_VALUES.get() and not bool(xp.all(xp.isfinite(a))):
        raise ValueError(f"{op}: argument '{name}' contains NaN or infinity")


def nonempty_batch(op: str, name: str, a):
    if a.shape[0] == 0:
        raise ValueError(f"{op}: argument '{name}' is an empty batch (shape {tuple(a.shape)})")


def integer_in(op: str, name: str, value, low: int, high: int, what: str = "") -> int:
    """Check that ``value`` is an int in ``[low, high]`` and return it as a Python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: argument '{name}' must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{op}: argument '{name}' must be in [{low}, {high}]{what}, got {value}")
    return int(value)


def positive_number(op: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{op}: argument '{name}' must be a positive number, got {value!r}")
    if value != value or value == float("inf"):
        raise ValueError(f"{op}: argument '{name}' must be finite, got {value!r}")
    return float(value)


def finite_number(op: str, name: str, value) -> float:
    """Check that ``value`` is a finite real number (not a string, not NaN/inf)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: argument '{name}' must be a number, got {value!r}")
    if value != value or abs(value) == float("inf"):
        raise ValueError(f"{op}: argument '{name}' must be finite, got {value!r}")
    return float(value)


def choice(op: str, name: str, value, options):
    if value not in options:
        raise ValueError(f"{op}: argument '{name}' must be one of {list(options)}, got {value!r}")
    return value
