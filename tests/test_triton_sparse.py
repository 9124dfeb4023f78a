"""The backward pass's three sparse products as fused Triton kernels (``_triton_sparse``).

- float64: ``g_f``, ``g_W``, ``g_X`` and the latents' sums of ``g_f`` equal their definitions
  (the sampled product, the two transposed products and the column sums, in float64 by NumPy) to float64 rounding, with ``g_code``,
  padded entries, latents without entries, codes without entries, and latents cut into parts
  of one, two or three entries (so the partial rows and their sum run);
- float32: they equal the float64 definitions to float32 rounding;
- the results do not depend on the cut into parts beyond rounding, and are the same bits on
  a second run;
- the one-program kernel that cuts the latents into slots equals its composed form;
- the torch backend on the GPU path runs them and gives what its composed form gives, into
  the caller's buffers when they fit.

Runs on CPU tensors under Triton's interpreter and, with a GPU, on CUDA.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from sae_ref.backends import StandardBackend, get_backend, sync_free, triton_kernels  # noqa: E402
from sae_ref.backends import _triton_sparse as S  # noqa: E402
from triton_devices import DEVICES, counting  # noqa: E402


@st.composite
def codes(draw):
    """A code's ``(rows, cols, values)`` (unique places, row-major as codes are) with ``G``,
    ``W``, ``X`` and maybe ``g_code``, float64 NumPy; some values 0 (a padded code's unkept
    entries), some latents without entries, maybe no entries at all."""
    B, h, d = draw(st.integers(1, 24)), draw(st.integers(1, 20)), draw(st.integers(1, 40))
    r = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    mask = r.random((B, h)) < density * r.random(h)[None, :] * 2  # some latents fire often
    rows, cols = (np.ascontiguousarray(a) for a in np.nonzero(mask))
    n = rows.shape[0]
    values = r.standard_normal(n)
    values[r.random(n) < 0.2] = 0.0
    G, W, X = r.standard_normal((B, d)), r.standard_normal((h, d)), r.standard_normal((B, d))
    g_code = r.standard_normal(n) if draw(st.booleans()) else None
    return rows, cols, values, G, W, X, g_code


def _definitions(rows, cols, values, G, W, X, g_code, padded):
    """``(g_f, g_W, g_X, g_sums)`` by their definitions, in float64."""
    g_f = np.sum(G[rows] * W[cols], axis=1) + (0.0 if g_code is None else g_code)
    if padded:
        g_f = np.where(values != 0, g_f, 0.0)
    g_W, g_X = np.zeros(W.shape), np.zeros(W.shape)
    np.add.at(g_W, cols, values[:, None] * G[rows])
    np.add.at(g_X, cols, g_f[:, None] * X[rows])
    g_sums = np.zeros(W.shape[0])
    np.add.at(g_sums, cols, g_f)
    return g_f, g_W, g_X, g_sums


def _fused(problem, dtype, device, padded, part=None):
    rows, cols, values, G, W, X, g_code = problem
    t = lambda a, dt=dtype: None if a is None else torch.as_tensor(a).to(device=device, dtype=dt)
    out = S.backward_products(t(rows, torch.int64), t(cols, torch.int64), t(values), t(G), t(W), t(X),
                              t(g_code), padded=padded, part=part)
    return [o.cpu().double().numpy() for o in out]


@DEVICES
@given(problem=codes(), padded=st.booleans(), part=st.sampled_from([None, 1, 2, 3]))
@settings(max_examples=25)
def test_fused_backward_products_equal_their_definitions_float64(device, problem, padded, part):
    got = _fused(problem, torch.float64, device, padded, part)
    for name, a, b in zip(("g_f", "g_W", "g_X", "g_sums"), got, _definitions(*problem, padded)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=name)


@DEVICES
@given(problem=codes(), padded=st.booleans())
@settings(max_examples=15)
def test_fused_backward_products_float32_match_float64_definitions_to_float32_rounding(device, problem, padded):
    problem = [None if a is None else (a.astype(np.float32).astype(np.float64) if a.dtype.kind == "f" else a)
               for a in problem]  # inputs both see
    got = _fused(problem, torch.float32, device, padded, part=2)
    rows, cols, values, G, W, X, g_code = problem
    # float32 sums of at most d + B terms: within (d + B) ulps of the sums of the magnitudes
    magnitudes = _definitions(rows, cols, np.abs(values), np.abs(G), np.abs(W), np.abs(X),
                              None if g_code is None else np.abs(g_code), False)
    ulp = float(np.finfo(np.float32).eps)
    for name, a, b, m in zip(("g_f", "g_W", "g_X", "g_sums"), got, _definitions(*problem, padded), magnitudes):
        assert np.all(np.abs(a - b) <= 2 * (W.shape[1] + G.shape[0]) * ulp * m), name


@DEVICES
@given(problem=codes())
@settings(max_examples=10)
def test_fused_backward_products_do_not_depend_on_the_cut_into_parts_and_repeat_bit_for_bit(device, problem):
    whole = _fused(problem, torch.float64, device, False)
    for part in (1, 3):
        cut = _fused(problem, torch.float64, device, False, part)
        again = _fused(problem, torch.float64, device, False, part)
        for a, b, c in zip(whole, cut, again):
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)
            np.testing.assert_array_equal(b, c)


@DEVICES
@given(counts=st.lists(st.integers(0, 40), min_size=1, max_size=300), part=st.integers(1, 9),
       sparse=st.booleans())
@settings(max_examples=25)
def test_fused_slots_equal_the_composed_slots(device, counts, part, sparse):
    """Each latent's first slot and first partial row, and each slot's latent (h past the
    last), from the one-program kernel and from torch's composed kernels."""
    counts = torch.as_tensor(counts, dtype=torch.int64, device=device)
    if sparse:
        counts[::2] = 0
    crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    n_slots = counts.shape[0] + int(crow[-1]) // part + 1
    want = S.slots_composed(crow, n_slots, part)
    for chunk in (None, 8):  # one chunk, or many with the running sums carried
        for got, w in zip(S.slots(crow, n_slots, part, chunk=chunk), want):
            assert torch.equal(got, w)


@DEVICES
def test_fused_backward_products_of_an_empty_code_are_zero(device):
    z = torch.zeros(0, dtype=torch.int64, device=device)
    G, W, X = (torch.randn(s, dtype=torch.float64, device=device) for s in ((5, 3), (7, 3), (5, 3)))
    g_f, g_W, g_X, g_s = S.backward_products(z, z, torch.zeros(0, dtype=torch.float64, device=device), G, W, X)
    assert g_f.shape == (0,) and torch.equal(g_W, torch.zeros_like(W)) and torch.equal(g_X, torch.zeros_like(W))
    assert torch.equal(g_s, torch.zeros(7, dtype=torch.float64, device=device))


@pytest.mark.parametrize("padded", [False, True], ids=["exact", "padded"])
def test_torch_backend_on_the_gpu_path_runs_the_kernels_into_the_buffers_and_equals_composed(padded, monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors need Triton's interpreter")
    r = np.random.default_rng(3)
    B, h, d = 12, 9, 5
    mask = r.random((B, h)) < 0.4
    rows, cols = (torch.as_tensor(np.ascontiguousarray(a)) for a in np.nonzero(mask))
    values = torch.as_tensor(r.standard_normal(rows.shape[0]))
    values[::4] = 0.0
    G, W, X = (torch.as_tensor(r.standard_normal(s)) for s in ((B, d), (h, d), (B, d)))
    g_code = torch.as_tensor(r.standard_normal(rows.shape[0]))
    calls = counting(monkeypatch, S, "products")
    be = get_backend(torch)
    bufs = {"out_W": torch.full((h, d), float("nan"), dtype=torch.float64),
            "out_X": torch.full((h, d), float("nan"), dtype=torch.float64)}
    with sync_free(True), triton_kernels(True):
        got = be.backward_products(rows, cols, values, G, W, X, g_code, padded=padded, with_sums=True, **bufs)
        want = StandardBackend.backward_products(be, rows, cols, values, G, W, X, g_code, padded=padded,
                                                 with_sums=True)
    assert calls == ["products"]
    assert got[1] is bufs["out_W"] and got[2] is bufs["out_X"]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
