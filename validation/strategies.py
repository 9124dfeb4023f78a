"""Hypothesis strategies for SAE-shaped inputs, drawn as NumPy arrays.

Data are drawn once with NumPy and converted with each backend's ``asarray``, so every
backend sees identical inputs (what differential tests need) and drawing stays fast.

Two families. :func:`pre_activations` and :func:`sae_problems` draw a seed and fill large
arrays from it (fast, for the test suite's own properties). The elementwise strategies
(:func:`pre_activation_batches`, :func:`activation_batches`, :func:`latent_thresholds`,
:func:`unit_decoders`, :func:`sae_params`, :func:`ground_truth_batches`) draw every entry
through hypothesis, so a failure shrinks to a small, readable example: the checks of
:mod:`sae_ref.validation.checks` use them. Their values are float16-representable or on a
grid of exact values, so a float32 implementation and a float64 oracle see the same numbers
and equal entries tie exactly. :func:`on_backend` moves any strategy's draws to another array
library.

>>> from hypothesis import given
>>> from sae_ref.validation.strategies import pre_activations
>>> @given(pre_activations())
... def test_shape(z):
...     assert z.ndim == 2
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp


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


# --- elementwise strategies (hypothesis shrinks them entry by entry) --------------------------
#: Values on a grid: exact in float16/32/64, so equal entries tie exactly in every dtype.
GRID = (0.0, 0.5, 1.0, 1.5, 2.0, -0.5, -1.0, -2.0)
#: Powers of two: multiplying by one keeps every value (and every tie) exact.
SCALES = (1.0, 2.0**-8, 2.0**8)


def _elements(*, ties, negatives: bool, zeros: bool, low: float = 4.0):
    """Entries: grid values (``ties=True``), float16-representable values in [-low, low]
    (``False``: exact in float32, so NumPy float64 oracles see the very same numbers), or
    either (``None``)."""
    grid = [v for v in GRID if (negatives or v >= 0) and (zeros or v != 0)]
    lo = -low if negatives else 0.0
    cont = st.floats(lo, low, width=16, allow_subnormal=False)
    if not zeros:
        cont = cont.filter(lambda v: v != 0)
    if ties is True:
        return st.sampled_from(grid)
    if ties is False:
        return cont
    return st.one_of(st.sampled_from(grid), cont)


def _dims(draw, lo_hi_b, lo_hi_h):
    return draw(st.integers(*lo_hi_b), label="B"), draw(st.integers(*lo_hi_h), label="h")


@st.composite
def pre_activation_batches(draw, *, min_batch: int = 1, max_batch: int = 6, min_h: int = 1,
                           max_h: int = 10, dtype=np.float32, ties: bool | None = None,
                           negatives: bool = True, zeros: bool = True, scale: float | None = None,
                           shape: tuple[int, int] | None = None):
    """A (B, h) batch of encoder pre-activations, drawn entry by entry.

    ``ties``: True draws from :data:`GRID` (many exact ties), False draws distinct values (no
    two entries equal, so the selection is unique whatever the tie rule), None mixes both.
    ``negatives`` / ``zeros`` allow negative entries and exact zeros. The batch is multiplied
    by ``scale`` or by a power of two drawn from :data:`SCALES` (exact: ties survive).
    ``shape`` fixes (B, h).

    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, database=None)
    ... @given(pre_activation_batches(ties=True, max_h=4))
    ... def test(z):
    ...     assert z.dtype == np.float32 and 1 <= z.shape[1] <= 4
    >>> test()
    """
    B, h = shape if shape is not None else _dims(draw, (min_batch, max_batch), (min_h, max_h))
    el = _elements(ties=ties, negatives=negatives, zeros=zeros)
    z = draw(hnp.arrays(np.float64, (B, h), elements=el, unique=ties is False), label="pre")
    s = scale if scale is not None else draw(st.sampled_from(SCALES), label="scale")
    return (z * s).astype(dtype)


@st.composite
def activation_batches(draw, *, min_batch: int = 1, max_batch: int = 6, min_h: int = 1,
                       max_h: int = 10, dtype=np.float32, h: int | None = None,
                       all_positive: bool | None = None):
    """A (B, h) batch of sparse activations after a selection: non-negative, often zero.

    ``all_positive=True`` draws no zero at all, False allows zeros, None lets hypothesis
    choose (so both kinds of batch turn up).
    """
    B = draw(st.integers(min_batch, max_batch), label="B")
    h = h if h is not None else draw(st.integers(min_h, max_h), label="h")
    positive = draw(st.booleans(), label="all_positive") if all_positive is None else all_positive
    el = _elements(ties=None, negatives=False, zeros=not positive)
    return draw(hnp.arrays(np.float64, (B, h), elements=el), label="acts").astype(dtype)


@st.composite
def latent_thresholds(draw, pre, *, positive: bool = True):
    """A per-latent threshold [h] for the batch ``pre``: grid values, free values and exact
    copies of entries of ``pre`` (so that z == theta happens), in ``pre``'s dtype."""
    B, h = pre.shape
    out = np.empty(h, dtype=np.float64)
    for j in range(h):
        how = draw(st.sampled_from(["copy", "grid", "free"]), label=f"theta[{j}] kind")
        if how == "copy":
            v = float(pre[draw(st.integers(0, B - 1), label=f"theta[{j}] row"), j])
        elif how == "grid":
            v = draw(st.sampled_from([0.25, 0.5, 1.0, 2.0]), label=f"theta[{j}]")
        else:
            v = draw(st.floats(2.0**-6, 4.0, width=16), label=f"theta[{j}]")
        if positive and not v > 0:
            v = 0.5
        out[j] = v
    return out.astype(pre.dtype)


def _unit(W: np.ndarray) -> np.ndarray:
    W = np.array(W, dtype=np.float64)
    norms = np.linalg.norm(W, axis=1)
    for j in np.flatnonzero(norms == 0):  # a zero row has no direction: use a basis vector
        W[j, j % W.shape[1]] = 1.0
    return W / np.linalg.norm(W, axis=1, keepdims=True)


def coherence(W: np.ndarray) -> float:
    r""":math:`\max_{i \ne j} |\langle \hat w_i, \hat w_j \rangle|` of the rows (0 for one row)."""
    U = _unit(W)
    G = np.abs(U @ U.T)
    np.fill_diagonal(G, 0.0)
    return float(G.max()) if G.size > 1 else 0.0


@st.composite
def unit_decoders(draw, h: int, d: int, *, dtype=np.float64, max_coherence: float | None = None):
    r"""A decoder [h, d] with unit-norm rows.

    With ``max_coherence`` (needs ``h <= d``) the rows are quasi-orthogonal:
    :math:`|\langle w_i, w_j\rangle| \le` ``max_coherence`` for :math:`i \ne j` (an orthonormal
    set mixed with a drawn perturbation, the mix halved until the bound holds; 0 gives an
    orthonormal decoder). Without it the rows are free directions.
    """
    A = draw(hnp.arrays(np.float64, (h, d), elements=st.floats(-1, 1, width=16)), label="W_dec")
    if max_coherence is None:
        return _unit(A).astype(dtype)
    if h > d:
        raise ValueError(f"unit_decoders: max_coherence needs h <= d, got h = {h}, d = {d}")
    B = draw(hnp.arrays(np.float64, (d, d), elements=st.floats(-1, 1, width=16)), label="basis")
    Q, _ = np.linalg.qr(B)  # Householder: Q is orthogonal even for a singular draw
    base = Q.T[:h]
    t = draw(st.floats(0.0, 1.0), label="mix")
    for _ in range(60):
        W = _unit(base + t * A)
        if coherence(W) <= max_coherence:
            return W.astype(dtype)
        t /= 2
    return base.astype(dtype)


@st.composite
def sae_params(draw, d: int, h: int, *, dtype=np.float64, unit_decoder: bool = True,
               theta: bool = False):
    """A set of SAE parameters as a dict of NumPy arrays: ``W_enc`` [d, h], ``b_enc`` [h],
    ``W_dec`` [h, d] (unit rows when ``unit_decoder``), ``b_dec`` [d] and, with ``theta``, a
    positive per-latent threshold [h]."""
    w = st.floats(-1, 1, width=16)
    W_enc = draw(hnp.arrays(np.float64, (d, h), elements=w), label="W_enc") / np.sqrt(d)
    W_dec = draw(hnp.arrays(np.float64, (h, d), elements=w), label="W_dec")
    W_dec = _unit(W_dec) if unit_decoder else W_dec
    out = {
        "W_enc": W_enc,
        "b_enc": draw(hnp.arrays(np.float64, (h,), elements=st.floats(-0.5, 0.5, width=16)), label="b_enc"),
        "W_dec": W_dec,
        "b_dec": draw(hnp.arrays(np.float64, (d,), elements=st.floats(-1, 1, width=16)), label="b_dec"),
    }
    if theta:
        out["theta"] = draw(hnp.arrays(np.float64, (h,), elements=st.floats(2.0**-6, 1.0, width=16)), label="theta")
    return {k: v.astype(dtype) for k, v in out.items()}


@st.composite
def ground_truth_batches(draw, *, max_batch: int = 6, max_d: int = 8, max_l0: int = 3,
                         dtype=np.float64, max_coherence: float = 0.0):
    r"""Activations with a known ground truth: :math:`x = f D + b` with ``D`` [h, d] unit rows
    that are ``max_coherence``-quasi-orthogonal (``h <= d``), ``f`` [B, h] non-negative with at
    most ``max_l0`` active latents per row, and ``b`` [d].

    Returns a dict with ``x``, ``f``, ``D``, ``b``. With ``max_coherence=0`` and ``b = 0``,
    :math:`\|x_i\| = \|f_i\|` exactly (the AFA bound with equality).
    """
    d = draw(st.integers(2, max_d), label="d")
    h = draw(st.integers(1, d), label="h")
    B = draw(st.integers(1, max_batch), label="B")
    D = draw(unit_decoders(h, d, max_coherence=max_coherence), label="D")
    mags = draw(hnp.arrays(np.float64, (B, h), elements=st.floats(0, 4, width=16)), label="f")
    f = np.zeros((B, h))
    for i in range(B):
        keep = np.argsort(-mags[i], kind="stable")[:max_l0]
        f[i, keep] = mags[i, keep]
    b = draw(hnp.arrays(np.float64, (d,), elements=st.floats(-1, 1, width=16)), label="b")
    return {"x": (f @ D + b).astype(dtype), "f": f.astype(dtype), "D": D.astype(dtype), "b": b.astype(dtype)}


def on_backend(strategy, xp, device=None):
    """``strategy`` with every NumPy array it draws (also inside dicts, lists and tuples) moved
    to the array library ``xp`` on ``device``, dtype kept: the same draws on any backend.

    >>> import array_api_strict as xs
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=3, database=None)
    ... @given(on_backend(pre_activation_batches(), xs))
    ... def test(z):
    ...     assert type(z).__module__.startswith("array_api_strict")
    >>> test()
    """
    def move(v):
        if isinstance(v, np.ndarray):
            dtype = xp.bool if v.dtype == np.bool_ else getattr(xp, v.dtype.name)
            kw = {} if device is None else {"device": device}
            return xp.asarray(np.array(v, copy=True), dtype=dtype, **kw)
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(move(x) for x in v)
        return v

    return strategy.map(move)
