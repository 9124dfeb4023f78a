"""The training step's fast paths equal their definitions on every backend.

- ``decoder_adam`` (NumPy: one fused pass per row; torch-CPU through it) equals the
  composition renormalise / project / Adam (/ renormalise) of :mod:`sae_ref.decoder` and
  :func:`sae_ref.optim.adam_update`, in float64, for both orders, rows of zero norm included;
- the compiled Adam gives the same bits as NumPy's own passes;
- ``group_max``, ``indices_at_least``, ``add_row_vector`` and ``matmul(out=)`` are exact;
- ``spmm(out=)`` overwrites whatever the buffer held;
- ``backward_products`` (a fused pass over the latents) equals the sampled and transposed products;
- a step with its :class:`~sae_ref.workspace.Workspace` gives the bits of a step without one,
  and nothing it returns shares memory with the workspace.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from array_api_compat import is_numpy_namespace
from hypothesis import given
from hypothesis import strategies as st

from sae_ref.arrays import to_numpy
from sae_ref.backends import get_backend
from sae_ref.decoder import TINY
from sae_ref.train import TrainConfig, init_state, step

NATIVE = pytest.mark.parametrize("native", [True, False], ids=["native", "standard"])


def _decoder_adam_oracle(W, g, m, v, *, lr, b1, b2, eps, t, order):
    """The definition in float64 NumPy: unit rows (rows of norm <= TINY kept), projected
    gradient, PyTorch's Adam, and for "after" the step on the raw rows then renormalised."""
    W, g, m, v = (np.asarray(a, dtype=np.float64) for a in (W, g, m, v))

    def unit(A):
        n = np.sqrt(np.sum(A * A, axis=1, keepdims=True))
        return A / np.where(n > TINY, n, 1.0)

    u = unit(W)
    g = g - np.sum(g * u, axis=1, keepdims=True) * u
    p = u if order == "before" else W
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr / (1 - b1**t) * m / (np.sqrt(v) / np.sqrt(1 - b2**t) + eps)
    return (p if order == "before" else unit(p)), m, v


@st.composite
def decoder_problems(draw):
    h = draw(st.integers(1, 9))
    d = draw(st.integers(1, 40))
    r = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    W = r.standard_normal((h, d))
    if draw(st.booleans()):
        W[r.integers(0, h)] = 0.0  # a row of zero norm: neither divided nor projected against
    g = r.standard_normal((h, d))
    m = 0.1 * r.standard_normal((h, d))
    v = 0.1 * r.random((h, d))
    return W, g, m, v, draw(st.sampled_from(["before", "after"])), draw(st.integers(1, 50))


@NATIVE
@pytest.mark.parametrize("inplace", [False, True])
@given(problem=decoder_problems())
def test_decoder_adam_equals_project_then_adam_definition(backend, native, inplace, problem):
    W, g, m, v, order, t = problem
    be = get_backend(backend.xp, native=native)
    args = [backend.asarray(a.copy()) for a in (W, g, m, v)]  # copies: in place may write them
    kw = dict(lr=1e-2, b1=0.9, b2=0.99, eps=1e-8, t=t)
    got = be.decoder_adam(*args, order=order, inplace=inplace, **kw)
    want = _decoder_adam_oracle(W, g, m, v, order=order, **kw)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(to_numpy(a), b, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(to_numpy(args[1]), g)  # the gradient is read only
    if not inplace:  # the inputs are left as they were
        for a, b in zip((args[0], args[2], args[3]), (W, m, v)):
            np.testing.assert_array_equal(to_numpy(a), b)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", ["C", "F"])
def test_compiled_adam_gives_the_bits_of_numpys_passes(dtype, layout):
    from sae_ref.backends._numpy import NumpyBackend

    fast, plain = NumpyBackend(), NumpyBackend(compiled=False)
    if not fast.compiled:
        pytest.skip("numba is not installed")
    r = np.random.default_rng(3)
    arrays = [np.asarray(r.standard_normal((70, 1000)), dtype=dtype, order=layout) for _ in range(4)]
    arrays[3] = np.abs(arrays[3])
    kw = dict(lr=3e-4, b1=0.9, b2=0.999, eps=1e-8, t=7)
    for a, b in zip(fast.adam(*arrays, **kw), plain.adam(*arrays, **kw), strict=True):
        np.testing.assert_array_equal(a, b)


@NATIVE
@given(data=st.data())
def test_group_max_add_and_group_max_and_indices_at_least_are_exact(backend, native, data):
    be = get_backend(backend.xp, native=native)
    B, w, g = data.draw(st.integers(1, 7)), data.draw(st.integers(1, 9)), data.draw(st.sampled_from([1, 2, 4, 8]))
    dtype = data.draw(st.sampled_from(["float32", "float64"]))
    r = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x = np.round(r.standard_normal((B, g * w)), 1).astype(dtype)  # rounded: ties at the bound
    maxima = None
    if g > 1:
        maxima = be.group_max(backend.asarray(x), g)
        np.testing.assert_array_equal(to_numpy(maxima), x.reshape(B, g, w).max(axis=1))
        v = np.round(r.standard_normal(g * w), 1).astype(dtype)
        summed, m2 = be.add_and_group_max(backend.asarray(x.copy()), backend.asarray(v), g)
        np.testing.assert_array_equal(to_numpy(summed), x + v)
        np.testing.assert_array_equal(to_numpy(m2), (x + v).reshape(B, g, w).max(axis=1))
    lo = x.dtype.type(np.median(x))
    per_row = np.median(x, axis=1, keepdims=True).astype(dtype)
    for bound in (lo, per_row):
        for m in (None, maxima):  # reading only the groups that reach the bound: the same
            idx = to_numpy(be.indices_at_least(backend.asarray(x), backend.asarray(bound), maxima=m))
            np.testing.assert_array_equal(idx, np.flatnonzero(x >= bound))


@NATIVE
@pytest.mark.parametrize("m, q, n", [(300, 7, 11), (600, 400, 300), (300, 400, 600)],
                         ids=["small", "split-rows", "split-columns"])
def test_matmul_out_and_add_row_vector_are_exact(backend, native, m, q, n):
    """The big products (>= 2**26 multiply-adds) are split over threads by rows or by
    columns; every split writes the whole buffer."""
    be = get_backend(backend.xp, native=native)
    r = np.random.default_rng(5)
    a, b, v = r.standard_normal((m, q)), r.standard_normal((q, n)), r.standard_normal(n)
    # integer-valued floats: every product and sum is exact, whatever the blocking
    a, b, v = np.round(4 * a), np.round(4 * b), np.round(4 * v)
    buf = backend.asarray(np.full((m, n), np.nan))
    got = be.add_row_vector(be.matmul(backend.asarray(a), backend.asarray(b), out=buf), backend.asarray(v))
    np.testing.assert_array_equal(to_numpy(got), a @ b + v)


@NATIVE
@pytest.mark.parametrize("n_out", [3, 40])
def test_spmm_into_a_buffer_overwrites_it(backend, native, n_out):
    be = get_backend(backend.xp, native=native)
    r = np.random.default_rng(n_out)
    out_index, in_index = r.integers(0, n_out, 50), r.integers(0, 6, 50)
    values, dense = r.standard_normal(50), r.standard_normal((6, 4))
    buf = backend.asarray(np.full((n_out, 4), np.nan))
    got = be.spmm(backend.asarray(out_index), backend.asarray(in_index), backend.asarray(values),
                  backend.asarray(dense), n_out, out=buf)
    want = np.zeros((n_out, 4))
    np.add.at(want, out_index, values[:, None] * dense[in_index])
    np.testing.assert_allclose(to_numpy(got), want, rtol=1e-12, atol=1e-12)


@NATIVE
@pytest.mark.parametrize("with_code_grad", [False, True], ids=["plain", "g_code"])
@pytest.mark.parametrize("into_buffers", [False, True], ids=["new", "buffers"])
def test_backward_products_equal_their_definitions(backend, native, with_code_grad, into_buffers):
    """The backward pass's three products (fused passes over the latents on NumPy and torch-CPU)
    equal the sampled product and the two transposed products, duplicates and empty latents
    included, whatever the buffers held; with_sums adds each latent's sum of the first."""
    be = get_backend(backend.xp, native=native)
    r = np.random.default_rng(7)
    B, h, d, nnz = 9, 13, 6, 40
    rows, cols = np.sort(r.integers(0, B, nnz)), r.integers(0, h - 2, nnz)  # 2 latents never used
    values, G, W, X = r.standard_normal(nnz), r.standard_normal((B, d)), r.standard_normal((h, d)), r.standard_normal((B, d))
    g_code = r.standard_normal(nnz) if with_code_grad else None
    bufs = {n: backend.asarray(np.full((h, d), np.nan)) for n in ("out_W", "out_X")} if into_buffers else {}
    a = backend.asarray
    g_f, g_W, g_X = be.backward_products(a(rows), a(cols), a(values), a(G), a(W), a(X),
                                         None if g_code is None else a(g_code), **bufs)
    want_f = np.sum(G[rows] * W[cols], axis=1) + (0 if g_code is None else g_code)
    want_W, want_X = np.zeros((h, d)), np.zeros((h, d))
    np.add.at(want_W, cols, values[:, None] * G[rows])
    np.add.at(want_X, cols, want_f[:, None] * X[rows])
    for got, want in ((g_f, want_f), (g_W, want_W), (g_X, want_X)):
        np.testing.assert_allclose(to_numpy(got), want, rtol=1e-12, atol=1e-12)
    *_, sums = be.backward_products(a(rows), a(cols), a(values), a(G), a(W), a(X),
                                    None if g_code is None else a(g_code), with_sums=True)
    want_sums = np.zeros(h)
    np.add.at(want_sums, cols, want_f)
    np.testing.assert_allclose(to_numpy(sums), want_sums, rtol=1e-12, atol=1e-12)


def _steps(backend, n, *, hold_workspace):
    cfg = TrainConfig(h=96, k=3, k_aux=16, dead_after=1, lr=1e-2)
    r = np.random.default_rng(0)
    batches = [backend.asarray(r.standard_normal((64, 12))) for _ in range(n)]
    state = init_state(cfg, batches[0])
    for x in batches:
        if hold_workspace:  # claimed elsewhere: the step allocates its own arrays
            with state.scratch.claim():
                state, metrics = step(state, x)
        else:
            state, metrics = step(state, x)
    return state, metrics


def test_a_step_with_its_workspace_gives_the_bits_of_one_without(backend):
    with_ws, m1 = _steps(backend, 4, hold_workspace=False)
    without, m2 = _steps(backend, 4, hold_workspace=True)
    for name, a in with_ws.params.arrays().items():
        np.testing.assert_array_equal(to_numpy(a), to_numpy(getattr(without.params, name)), err_msg=name)
    assert float(m1["loss"]) == float(m2["loss"])
    if is_numpy_namespace(backend.xp):  # nothing returned lives in the workspace
        kept = list(with_ws.scratch._arrays.values())
        assert kept, "the NumPy step keeps its temporaries"
        for a in (*with_ws.params.arrays().values(), *with_ws.opt.m.arrays().values(),
                  *with_ws.opt.v.arrays().values()):
            assert not any(np.shares_memory(a, k) for k in kept)


def test_a_pickled_state_carries_an_empty_workspace():
    x = np.random.default_rng(1).standard_normal((64, 12))
    state, _ = step(init_state(TrainConfig(h=96, k=3, k_aux=16), x), x)
    assert state.scratch._arrays
    again = pickle.loads(pickle.dumps(state))
    assert not again.scratch._arrays
    np.testing.assert_array_equal(again.params.W_dec, state.params.W_dec)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("duplicates", [False, True])
def test_products_over_a_dense_block_equal_the_sparse_definition(dtype, duplicates):
    """AuxK with few dead latents: every row picks among the same few columns, so the entries
    fill their block and NumPy multiplies it densely (above ``DENSE_MIN_NNZ`` entries)."""
    from sae_ref.backends._numpy import DENSE_MIN_NNZ, NumpyBackend

    r = np.random.default_rng(7)
    B, h, d, cols = 2048, 1000, 3, np.sort(r.choice(1000, 160, replace=False))
    rows = np.repeat(np.arange(B), cols.shape[0])
    cols_all = np.tile(cols, B)
    if duplicates:  # a repeated place is summed
        rows, cols_all = np.concatenate([rows, rows[:50]]), np.concatenate([cols_all, cols_all[:50]])
    assert rows.shape[0] >= DENSE_MIN_NNZ
    values = r.standard_normal(rows.shape[0]).astype(dtype)
    G, W = r.standard_normal((B, d)).astype(dtype), r.standard_normal((h, d)).astype(dtype)
    tol = 1e-4 if dtype == "float32" else 1e-11
    for be in (get_backend(np), NumpyBackend(compiled=False)):
        want = np.zeros((B, d))
        np.add.at(want, rows, values[:, None].astype(np.float64) * W[cols_all])
        np.testing.assert_allclose(be.spmm(rows, cols_all, values, W, B), want, rtol=tol, atol=tol)
        want = np.zeros((h, d))
        np.add.at(want, cols_all, values[:, None].astype(np.float64) * G[rows])
        buf = np.ones((h, d), dtype=dtype)
        got = be.spmm(cols_all, rows, values, G, h, out=buf, accumulate=True)
        np.testing.assert_allclose(got, want + 1, rtol=tol, atol=tol)
        want = np.einsum("ij,ij->i", G[rows].astype(np.float64), W[cols_all])
        np.testing.assert_allclose(be.sddmm(G, W, rows, cols_all), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("unit", ["element", "sample"])
def test_step_nmse_metric_equals_its_definition(backend, unit):
    """The step derives NMSE from the loss's sum of squares; it must equal
    sum((x_hat - x)^2) / sum(x^2) of the same forward pass, in either loss unit."""
    from sae_ref.sae import forward

    x = backend.asarray(np.random.default_rng(2).standard_normal((64, 12)))
    state = init_state(TrainConfig(h=96, k=3, k_aux=16, loss_unit=unit), x)
    fwd = forward(state.params, x, state.config.sae_config())
    xs, xh = to_numpy(fwd.x), to_numpy(fwd.x_hat)
    _, metrics = step(state, x)
    want = np.sum((xh - xs) ** 2) / np.sum(xs**2)
    np.testing.assert_allclose(float(metrics["nmse"]), want, rtol=1e-10)


def test_is_column_major_tells_the_latent_major_layout(backend):
    """The encoder's latent-major layout is seen as column-major where the library has
    layouts (NumPy, torch, CuPy), a row-major array never is, and the pure-standard backend
    (no layouts) says False."""
    be = get_backend(backend.xp)
    W = backend.asarray(np.random.default_rng(0).standard_normal((5, 7)))
    assert not be.is_column_major(W)
    has_layouts = backend.name != "strict"
    assert be.is_column_major(be.latent_major(W)) == has_layouts


def test_openmp_threads_wait_passively_unless_the_user_chose():
    """Invariant: importing sae_ref sets OMP_WAIT_POLICY to passive (spinning OpenMP workers
    took the cores from the products after each compiled kernel), and keeps a value the user
    set before."""
    import os
    import subprocess
    import sys

    code = "import os, sae_ref; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "passive"
    env["OMP_WAIT_POLICY"] = "active"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "active"
