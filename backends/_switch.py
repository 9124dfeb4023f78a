"""A setting that a ``with`` block turns on or off: True, False, or None (the default)."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def within(var, op: str, enabled):
    """Set the context variable ``var`` to ``enabled`` for the block; ``op`` names the
    setting in the error for anything but True, False or None."""
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"{op}: argument 'enabled' must be True, False or None, got {enabled!r}")
    token = var.set(enabled)
    try:
        yield
    finally:
        var.reset(token)
