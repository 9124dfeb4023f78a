"""Hypothesis strategies for SAE-shaped inputs, drawn as NumPy arrays.

Data are drawn once with NumPy and converted with each backend's ``asarray``, so every
backend sees identical inputs (what differential tests need) and drawing stays fast.

>>> from hypothesis import given
>>> from sae_ref.validation.strategies import pre_activations
>>> @given(pre_activations())
... def test_shape(z):
...     assert z.ndim == 2
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st


@st.composite
def pre_activations(draw, *, max_batch: int = 12, max_h: int = 48, min_h: int = 1,
                    dtype=np.float32, ties: bool | None = None):
    """A (B, h) matrix of pre-activations with negatives, zeros and (often) exact ties.

    ``ties=True`` draws from a small grid of values so that many entries are equal; ``False``
    draws distinct continuous values; ``None`` lets hypothesis choose.
    """
    B = draw(st.integers(1, max_batch))
    h = draw(st.integers(min_h, max_h))
    seed = draw(st.integers(0, 2**32 - 1))
    tied = draw(st.booleans()) if ties is None else ties
    rng = np.random.default_rng(seed)
    if tied:
        levels = draw(st.integers(2, 6))
        z = rng.integers(-levels // 2, levels, size=(B, h)).astype(np.float64) / 4.0
    else:
        z = rng.standard_normal((B, h)) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
        z += rng.uniform(-1e-6, 1e-6, size=(B, h))  # break any accidental equality
    frac_neg = draw(st.sampled_from([0.0, 0.5, 0.95, 1.0]))
    if frac_neg == 1.0:
        z = -np.abs(z)
    elif frac_neg > 0:
        z = np.where(rng.random((B, h)) < frac_neg, -np.abs(z), z)
    return z.astype(dtype)


@st.composite
def sae_problems(draw, *, max_batch: int = 10, max_d: int = 12, max_h: int = 40,
                 dtype=np.float64):
    """(x, params-as-dict) for a small SAE: x [B, d], W_enc [d, h], b_enc [h], W_dec [h, d]
    with unit rows, b_dec [d], theta [h] (positive)."""
    B = draw(st.integers(1, max_batch))
    d = draw(st.integers(2, max_d))
    h = draw(st.integers(2, max_h))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    W_enc = rng.standard_normal((d, h)) / np.sqrt(d)
    W_dec = rng.standard_normal((h, d))
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    params = {
        "W_enc": W_enc.astype(dtype),
        "b_enc": (0.1 * rng.standard_normal(h)).astype(dtype),
        "W_dec": W_dec.astype(dtype),
        "b_dec": (0.1 * rng.standard_normal(d)).astype(dtype),
        "theta": rng.uniform(0.05, 0.5, size=h).astype(dtype),
    }
    x = rng.standard_normal((B, d)).astype(dtype)
    return x, params


def unit_rows(rng: np.random.Generator, h: int, d: int, dtype=np.float64) -> np.ndarray:
    """A random (h, d) decoder with unit-norm rows."""
    W = rng.standard_normal((h, d))
    return (W / np.linalg.norm(W, axis=1, keepdims=True)).astype(dtype)
