"""The sync-free mode (the GPU path): fixed-size selections, padded codes, no host reads.

A GPU step that reads a count or a boolean back to the host waits for the device at that
point. In the sync-free mode (default on GPU arrays, forced here with
``backends.sync_free()`` so every backend runs it) the selections have a size known in
advance and the codes carry explicit zeros. Each test checks that the mode computes what the
default mode computes, and on torch that the step makes no host read at all.
"""

from __future__ import annotations

import traceback

import numpy as np
import pytest
from array_api_compat import device as device_of
from hypothesis import given, strategies as st

try:
    import torch
    from torch.overrides import TorchFunctionMode
except ImportError:  # the recorder's test skips; everything else runs on the other backends
    torch, TorchFunctionMode = None, object

from sae_ref import auxk as K
from sae_ref.activations import batch_topk, topk
from sae_ref.arrays import to_numpy
from sae_ref.backends import get_backend, is_sync_free, sync_free, top_n_fixed
from sae_ref.train import TrainConfig, init_state, step
from sae_ref.validation.oracles import assert_close, top_n_mask_oracle


@st.composite
def tied_or_continuous(draw):
    """(B, h): values from a small integer set (ties at the cut, non-positive entries) or
    continuous."""
    B = draw(st.integers(1, 8), label="B")
    h = draw(st.integers(1, 40), label="h")
    dt = draw(st.sampled_from([np.float32, np.float64]), label="dtype")
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
    if draw(st.booleans(), label="ties"):
        z = rng.integers(-2, 3, size=(B, h)).astype(dt)
        return z * np.where(z == 0, rng.choice([-1.0, 1.0], size=(B, h)), 1.0).astype(dt)  # -0.0 ties +0.0
    return rng.standard_normal((B, h)).astype(dt)


def _mask(shape, idx):
    got = np.zeros(int(np.prod(shape)), dtype=bool)
    got[idx] = True
    return got.reshape(shape)


@pytest.mark.parametrize("native", [True, False], ids=["native", "standard"])
@pytest.mark.parametrize("axis", [None, -1], ids=["whole", "per_row"])
@given(z=tied_or_continuous(), data=st.data())
def test_top_n_fixed_keeps_the_tie_rule_set_in_ascending_order_with_its_fixed_size(backend, native, axis, z, data):
    """Invariant: the fixed-size selection returns exactly n (B n per row) ascending flat
    indices, the oracle's places under the lower-index tie rule, and the n-th largest value
    as its cut, on the native and the pure-standard backends."""
    hi = z.size if axis is None else z.shape[1]
    n = data.draw(st.integers(1, hi), label="n")
    x = backend.asarray(z)
    idx, cut = top_n_fixed(x, n, axis=axis, backend=get_backend(backend.xp, native=native))
    assert device_of(idx) == backend.device
    idx = backend.numpy(idx).astype(np.int64)
    assert idx.shape == ((n,) if axis is None else (z.shape[0] * n,))
    assert np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(_mask(z.shape, idx), top_n_mask_oracle(z, n, axis))
    kth = np.sort(z.astype(np.float64), axis=None if axis is None else -1)
    kth = kth[-n] if axis is None else kth[:, [-n]]
    np.testing.assert_array_equal(backend.numpy(cut).astype(np.float64), kth)
    # without the cut: the same indices, and the cut None or the same
    alone, cut2 = top_n_fixed(x, n, axis=axis, backend=get_backend(backend.xp, native=native), with_cut=False)
    np.testing.assert_array_equal(backend.numpy(alone).astype(np.int64), idx)
    assert cut2 is None or np.array_equal(backend.numpy(cut2).astype(np.float64), kth)


@pytest.mark.parametrize("axis", [None, -1], ids=["whole", "per_row"])
@given(z=tied_or_continuous(), data=st.data())
def test_top_n_fixed_mask_is_the_tie_rule_mask(backend, axis, z, data):
    """Invariant: the fixed-size selection's mask (formed directly where the keyed form does
    not apply) is the oracle's mask under the lower-index tie rule."""
    from sae_ref.backends import top_n_fixed_mask

    hi = z.size if axis is None else z.shape[1]
    n = data.draw(st.integers(1, hi), label="n")
    got = backend.numpy(top_n_fixed_mask(backend.asarray(z), n, axis=axis))
    np.testing.assert_array_equal(got, top_n_mask_oracle(z, n, axis))


@pytest.mark.parametrize("native", [True, False], ids=["native", "standard"])
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 16), h=st.sampled_from([64, 128, 256]),
       ties=st.booleans(), data=st.data())
def test_bracketed_fixed_selection_equals_the_tie_rule_oracle(backend, native, seed, B, h, ties, data):
    """Invariant: the whole-array fixed-size selection through column-group maxima (the GPU's
    BatchTopK cut: the n groups with the largest maxima, the cut among their entries, the
    ties from one pass over all entries) keeps exactly the oracle's places under the
    lower-index tie rule, ascending, with the n-th largest value as its cut, also when the
    ties at the cut lie in groups it did not choose."""
    from sae_ref.backends._select import _fixed_group

    rng = np.random.default_rng(seed)
    z = (rng.integers(-2, 4, size=(B, h)) if ties else rng.standard_normal((B, h))).astype(np.float32)
    n = data.draw(st.integers(1, max(1, B * h // 32)), label="n")
    assert _fixed_group(h, B, n) > 1  # the bracket is taken
    idx, cut = top_n_fixed(backend.asarray(z), n, backend=get_backend(backend.xp, native=native))
    idx = backend.numpy(idx).astype(np.int64)
    assert idx.shape == (n,) and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(_mask(z.shape, idx), top_n_mask_oracle(z, n, None))
    assert float(backend.numpy(cut)) == np.sort(z, axis=None)[-n]


@given(seed=st.integers(0, 2**32 - 1), rows=st.sampled_from([0, 1, 3]), m=st.sampled_from([8, 40, 64, 256]),
       data=st.data())
def test_top_keys_through_run_maxima_are_the_n_largest_keys(backend, seed, rows, m, data):
    """Invariant: the keys that the run-maximum bracket returns are the n largest distinct
    keys (of the whole 1-D array, or of each row), whichever runs hold them, also when one
    run holds all of them."""
    from sae_ref.backends._select import _top_keys

    rng = np.random.default_rng(seed)
    n = data.draw(st.integers(1, m), label="n")
    shape = (rows, m) if rows else (m,)
    keys = rng.permutation(np.arange(-m * max(rows, 1), m * max(rows, 1), 2, dtype=np.int64))
    keys = keys.reshape(shape)
    if data.draw(st.booleans(), label="clustered"):  # the largest keys in one run
        flat = np.sort(keys.reshape(-1, m), axis=1)
        keys = flat.reshape(shape)
    got = backend.numpy(_top_keys(backend.xp, get_backend(backend.xp), backend.asarray(keys), n))
    want = -np.sort(-keys, axis=-1)[..., :n]
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.sort(got, axis=-1), np.sort(want, axis=-1))


@pytest.mark.parametrize("native", [True, False], ids=["native", "standard"])
@given(seed=st.integers(0, 2**32 - 1), rows=st.sampled_from([0, 1, 3]), m=st.sampled_from([1, 9, 64]),
       data=st.data())
def test_top_values_are_the_keys_at_the_top_indices(backend, native, seed, rows, m, data):
    """Invariant: ``top_values`` gives the k largest distinct keys themselves (of the 1-D
    array, or of each row), the same set as the keys at ``top_indices``, on the native
    backend (its top-k's values, no gather) and the standard one."""
    be = get_backend(backend.xp, native=native)
    rng = np.random.default_rng(seed)
    k = data.draw(st.integers(1, m), label="k")
    keys = rng.permutation(np.arange(-m * max(rows, 1), m * max(rows, 1), 2, dtype=np.int64))
    keys = keys.reshape((rows, m) if rows else (m,))
    axis = -1 if rows else None
    got = backend.numpy(be.top_values(backend.asarray(keys), k, axis=axis))
    at = np.take_along_axis(keys, backend.numpy(be.top_indices(backend.asarray(keys), k, axis=axis)), axis=-1)
    want = -np.sort(-keys, axis=-1)[..., :k]
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.sort(got, axis=-1), np.sort(want, axis=-1))
    np.testing.assert_array_equal(np.sort(at, axis=-1), np.sort(want, axis=-1))


@pytest.mark.parametrize("select", ["batchtopk", "topk"])
@given(z=tied_or_continuous(), data=st.data())
def test_public_selection_is_one_code_in_both_modes_and_the_padded_form_adds_only_zeros(backend, select, z, data):
    """Invariant: the public ``batch_topk`` / ``topk`` return the same code (rows, columns and
    values, bit for bit, no padding) in the sync-free mode as in the default mode; the step's
    internal padded form has exactly B k (BatchTopK) or k per row (TopK) entries, equals the
    exact code as a dense matrix, and its zeros are the only places the exact code leaves
    out."""
    from sae_ref.activations import _batch_topk, _topk

    public, internal = {"batchtopk": (batch_topk, _batch_topk), "topk": (topk, _topk)}[select]
    k = data.draw(st.integers(1, z.shape[1]), label="k")
    x = backend.asarray(z)
    with sync_free(False):
        exact = public(x, k)
    with sync_free(True):
        fixed = public(x, k)
        padded = internal(x, k)
    assert not exact.padded and not fixed.padded and padded.padded
    for name in ("rows", "cols", "values"):
        np.testing.assert_array_equal(backend.numpy(getattr(fixed, name)), backend.numpy(getattr(exact, name)))
    assert padded.nnz == z.shape[0] * k
    np.testing.assert_array_equal(backend.numpy(padded.to_dense()), backend.numpy(exact.to_dense()))
    assert np.count_nonzero(backend.numpy(padded.values)) == exact.nnz
    np.testing.assert_array_equal(backend.numpy(padded.l0()), backend.numpy(exact.l0()))


@pytest.mark.parametrize("n_dead", [0, 3, 40], ids=["none_dead", "fewer_dead_than_k_aux", "many_dead"])
@pytest.mark.parametrize("convention", ["authors", "normalized"])
def test_sync_free_auxk_has_the_exact_loss_and_gradients(backend, n_dead, convention):
    """Invariant: AuxK with fixed shapes (live columns at -inf, no count of the dead ones read
    back) gives the exact AuxK's loss, gradient on W_dec, on the residual and on the
    pre-activations, with no dead latent, fewer than k_aux and more; its internal code lists
    k_aux places per row, and the public ``auxk`` returns only the kept ones (dead latents
    with a positive pre-activation), the same code as the default mode."""
    rng = np.random.default_rng(n_dead)
    B, h, d, k_aux = 16, 64, 8, 6
    pre_np = rng.integers(-3, 4, size=(B, h)).astype(np.float64) + 0.0
    pre = backend.asarray(pre_np)
    dead_np = np.zeros(h, dtype=bool)
    dead_np[rng.permutation(h)[:n_dead]] = True
    dead = backend.asarray(dead_np)
    res = backend.asarray(rng.standard_normal((B, d)))
    W = backend.asarray(rng.standard_normal((h, d)))
    with sync_free(False):
        exact = K.auxk(pre, dead, res, W, k_aux, convention=convention, detach_residual=False)
    with sync_free(True):
        fixed = K.auxk(pre, dead, res, W, k_aux, convention=convention, detach_residual=False)
        internal = K._auxk(backend.xp, pre, dead, res, W, k_aux, convention, False)
    assert internal.code.padded and internal.code.nnz == B * k_aux
    assert not fixed.code.padded
    kept_cols = backend.numpy(fixed.code.cols)
    assert dead_np[kept_cols].all()
    assert np.all(pre_np[backend.numpy(fixed.code.rows), kept_cols] > 0)
    for name in ("rows", "cols", "values"):
        np.testing.assert_array_equal(backend.numpy(getattr(fixed.code, name)), backend.numpy(getattr(exact.code, name)))
    for name in ("value", "g_W_dec", "g_residual"):
        assert_close(backend.numpy(getattr(fixed, name)), backend.numpy(getattr(exact, name)),
                     rtol=1e-12, atol=1e-12)
    assert_close(backend.numpy(fixed.g_values), backend.numpy(exact.g_values), rtol=1e-12, atol=1e-12)
    assert_close(backend.numpy(internal.code.with_values(internal.g_values).to_dense()),
                 backend.numpy(exact.code.with_values(exact.g_values).to_dense()), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_dead,cap", [(0, 4), (3, 4), (3, 16), (20, 32), (40, 64)],
                         ids=["none_dead", "block_full", "padded", "padded_wide", "every_column"])
@pytest.mark.parametrize("convention", ["authors", "normalized"])
def test_auxk_block_sized_by_a_bound_gives_the_exact_products(backend, n_dead, cap, convention):
    """Invariant: AuxK on a block of ``cap`` columns (the dead ones, column 0 among them, then
    padding that repeats column 0 with zero values) gives the exact AuxK's loss and the same
    (B, h) activations and gradient as a dense matrix, and the same decoder gradient, encoder
    gradient and column sums through the backward pass's block products."""
    from sae_ref.sae import _add_column_sums, _add_transposed_product
    from sae_ref.sparse import ColumnBlock

    rng = np.random.default_rng(n_dead + cap)
    B, h, d, k_aux = 16, 64, 8, 6
    pre_np = rng.integers(-3, 4, size=(B, h)).astype(np.float64) + rng.uniform(0, 0.5, (B, h))
    dead_np = np.zeros(h, dtype=bool)
    dead_np[rng.permutation(np.arange(1, h))[:max(n_dead - 1, 0)]] = True
    dead_np[0] = n_dead > 0
    xp, be = backend.xp, get_backend(backend.xp)
    pre, dead = backend.asarray(pre_np), backend.asarray(dead_np)
    res = backend.asarray(rng.standard_normal((B, d)))
    W, X = backend.asarray(rng.standard_normal((h, d))), backend.asarray(rng.standard_normal((B, d)))
    with sync_free(False):
        exact = K.auxk(pre, dead, res, W, k_aux, convention=convention, detach_residual=False)
    with sync_free(True):
        got = K._auxk(xp, pre, dead, res, W, k_aux, convention, False, allow_block=True, capacity=cap)
    a, g_a = got.block
    assert isinstance(a, ColumnBlock) and a.cols.shape[0] == cap
    assert_close(backend.numpy(got.value), backend.numpy(exact.value), rtol=1e-12, atol=1e-12)
    g_pre = exact.code.with_values(exact.g_values)

    def dense(block):  # the (B, h) matrix of a block: its columns added at their places
        out = np.zeros((B, h))
        np.add.at(out.T, backend.numpy(block.cols), backend.numpy(block.values).T)
        return out

    assert_close(dense(a), backend.numpy(exact.code.to_dense()), rtol=1e-12, atol=1e-12)
    assert_close(dense(g_a), backend.numpy(g_pre.to_dense()), rtol=1e-12, atol=1e-12)
    zeros = lambda *shape: xp.zeros(shape or (h, d), dtype=W.dtype, device=backend.device)
    with sync_free(True):
        products = [_add_transposed_product(xp, be, a, got.g_ehat, zeros()),
                    _add_transposed_product(xp, be, g_a, X, zeros()), _add_column_sums(xp, be, g_a, zeros(h))]
    with sync_free(False):
        wanted = [_add_transposed_product(xp, be, exact.code, exact.g_ehat, zeros()),
                  _add_transposed_product(xp, be, g_pre, X, zeros()), _add_column_sums(xp, be, g_pre, zeros(h))]
    for p, w in zip(products, wanted):
        assert_close(backend.numpy(p), backend.numpy(w), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ["batchtopk", "topk"])
def test_backward_through_a_padded_code_equals_backward_through_the_exact_code(backend, activation):
    """Invariant: where the step's selection lists non-positive pre-activations (k larger than
    the positive entries of some rows), the padded code's zeros get no gradient: every
    parameter gradient, sparse penalty gradient included, equals the exact code's; the public
    ``forward`` returns the exact code in both modes."""
    from sae_ref.sae import SAEConfig, _forward, backward, forward, init_params

    rng = np.random.default_rng(5)
    d, h, B = 6, 10, 12
    params = init_params(d, h, xp=backend.xp, dtype=backend.dtype("float64"), device=backend.device, seed=1)
    x = backend.asarray(rng.standard_normal((B, d)))
    g_xhat = backend.asarray(rng.standard_normal((B, d)))
    config = SAEConfig(activation, k=8)
    with sync_free(False):
        exact = forward(params, x, config)
    with sync_free(True):
        public = forward(params, x, config)
        fixed = _forward(backend.xp, params, x, config, exact=False)
    assert not public.code.padded and public.code.nnz == exact.code.nnz
    assert fixed.code.padded and exact.code.nnz < fixed.code.nnz  # zeros were listed
    g_exact = backward(params, exact, g_xhat, g_code=exact.code.values * 0.5)
    g_fixed = backward(params, fixed, g_xhat, g_code=fixed.code.values * 0.5)
    for name, a in g_exact.arrays().items():
        assert_close(backend.numpy(getattr(g_fixed, name)), backend.numpy(a), rtol=1e-12, atol=1e-12)


def _steps(backend, arch, n_steps, forced, dead_after=1):
    config = TrainConfig(arch=arch, h=96, k=3, k_aux=16, lr=3e-3, dead_after=dead_after,
                         dead_unit="batches", steps=n_steps)
    rng = np.random.default_rng(7)
    xs = [backend.asarray(rng.standard_normal((32, 12)) * rng.uniform(0.5, 2, 12)) for _ in range(2)]
    with sync_free(forced):
        state, trace = init_state(config, xs[0]), []
        for i in range(n_steps):
            state, m = step(state, xs[i % 2], check=False)
            trace.append([float(m[name]) for name in ("loss", "aux", "l0", "dead_fraction", "theta" if arch == "batchtopk" else "mse")])
    return state, np.array(trace)


@pytest.mark.parametrize("dead_after", [1, 3])
@pytest.mark.parametrize("arch", ["batchtopk", "topk"])
def test_sync_free_training_takes_the_default_steps(backend, arch, dead_after):
    """Invariant: six float64 training steps with AuxK on dead latents end at the same
    parameters and report the same losses, L0, dead fraction and theta in the sync-free mode
    as in the default mode (AuxK's block as wide as every column, dead_after=1, or narrower
    than h, dead_after=3)."""
    (fixed, t_fixed), (exact, t_exact) = (_steps(backend, arch, 6, f, dead_after) for f in (True, False))
    assert t_exact[:, 3].max() > 0.1  # AuxK had dead latents to work on
    np.testing.assert_allclose(t_fixed, t_exact, rtol=1e-9, atol=1e-12)
    for name, a in exact.params.arrays().items():
        assert_close(to_numpy(getattr(fixed.params, name)), to_numpy(a), rtol=1e-9, atol=1e-12)


#: torch calls that copy data from the device to the host (or need a count on the host): a
#: CUDA step that makes one waits there for the GPU
_HOST_READS = {"__bool__", "item", "__int__", "__float__", "__index__", "tolist", "numpy", "cpu",
               "nonzero", "unique", "unique_consecutive", "masked_select", "bincount", "coalesce",
               "repeat_interleave", "__array__"}


#: torch calls that make an array from host data (a Python number, a list)
_HOST_COPIES = {"asarray", "tensor", "as_tensor", "from_numpy"}


class _HostReadRecorder(TorchFunctionMode):
    """Records every torch call that reads back to the host, makes an array from host data,
    or indexes with a boolean mask."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        read = name in _HOST_READS
        if name in _HOST_COPIES and args and not isinstance(args[0], torch.Tensor):
            read = True  # host data copied to the device: on CUDA a copy a graph cannot capture
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            read = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        if read:
            self.reads.append((name, "".join(traceback.format_stack(limit=4)[:-1])))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["batchtopk", "topk"])
def test_sync_free_torch_step_reads_nothing_back_to_the_host(arch):
    """Invariant: a torch training step in the sync-free mode (AuxK on, dead latents present)
    calls no torch function that copies a value to the host or makes an array from host data
    (on CUDA a copy that a captured graph cannot hold), except the one read of the
    dead-count bound issued ``LAG + 1`` steps earlier (work the device finished while it ran
    the steps after it: no wait); the default CPU step does read (its NumPy views and
    counts), which shows the recorder sees them."""
    pytest.importorskip("torch")
    from sae_ref import dead_bound

    x = torch.from_numpy(np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32))
    config = TrainConfig(arch=arch, h=128, k=4, k_aux=8, dead_after=3, dead_unit="batches")
    for forced in (True, False):
        with sync_free(forced):
            state = init_state(config, x)
            for _ in range(4):
                state, _ = step(state, x, check=False)
            with _HostReadRecorder() as rec:
                new, metrics = step(state, x, check=False)
        if forced:
            lagged = [r for r in rec.reads if "in read_host" in r[1]]
            others = [r for r in rec.reads if r not in lagged]
            assert not others, "host reads in the sync-free step:\n" + "\n".join(f"{n}\n{s}" for n, s in others)
            assert len(lagged) == 1
            oldest = min(c.t for c in state.dead_counts)
            assert oldest == state.t - dead_bound.LAG  # read at step state.t + 1
            assert float(metrics["dead_fraction"]) > 0 and float(metrics["l0"]) == 4.0
        else:
            assert rec.reads


def test_sync_free_is_the_default_on_gpu_arrays_only(backend):
    """Invariant: without the context, the mode is on for GPU arrays and off for CPU ones;
    the context forces it either way and restores the default (the ``torch-gpu-path``
    backend runs its tests inside ``sync_free(True)``)."""
    x = backend.asarray(np.zeros((2, 2), dtype=np.float32))
    on_gpu = backend.name in ("torch-cuda", "cupy")
    assert is_sync_free(x) == backend.gpu_path
    with sync_free(not on_gpu):
        assert is_sync_free(x) == (not on_gpu)
        with sync_free(None):
            assert is_sync_free(x) == on_gpu
    assert is_sync_free(x) == backend.gpu_path
    with pytest.raises(TypeError, match="enabled"):
        with sync_free("yes"):
            pass


def test_heldout_l0_counts_the_kept_entries_not_the_listed_ones(backend):
    """Invariant: the held-out L0 of a training run (the training selection and inference)
    is the same in the sync-free mode, where the selection lists k places per row with zeros
    where fewer pre-activations are positive, as in the default mode."""
    from sae_ref.fit import heldout_l0

    x = backend.asarray(np.random.default_rng(2).standard_normal((24, 6)))
    config = TrainConfig(arch="topk", h=10, k=8, steps=3)
    state = init_state(config, x)
    for _ in range(2):
        state, _ = step(state, x)
    exact = heldout_l0(state, [x])
    with sync_free():
        fixed = heldout_l0(state, [x])
    assert exact["l0_training_selection"] < 8  # some rows keep fewer than k
    assert fixed == exact


def test_batches_reach_the_device_equal_to_the_host_batch(backend):
    """Invariant: ``from_host`` (how the training loop moves each batch; on CUDA through
    page-locked memory without a wait) gives the host values on the backend's device, in the
    asked dtype."""
    from sae_ref.arrays import from_host

    host = np.random.default_rng(4).standard_normal((5, 3))
    a = from_host(backend.xp, host, dtype=backend.dtype("float32"), device=backend.device)
    assert device_of(a) == backend.device and a.dtype == backend.dtype("float32")
    np.testing.assert_array_equal(backend.numpy(a), host.astype(np.float32))


class _CallCounter(TorchFunctionMode):
    """Counts every torch function and tensor method a block calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _step_calls(arch, B, h, dead_after):
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((B, 16)).astype(np.float32))
    # k_aux = 1: below the narrowest AuxK block (h / 64 columns), so every dead share takes
    # the block's selection branch (k_aux >= the block's width keeps the whole block instead);
    # h / 64 >= 8 columns at h = 4096 (with no dead latent): wide enough for column groups
    config = TrainConfig(arch=arch, h=h, k=4, k_aux=1, dead_after=dead_after, dead_unit="batches")
    with sync_free(True):
        state = init_state(config, x)
        for _ in range(2):
            state, _ = step(state, x, check=False)
        with _CallCounter() as counter:
            state, metrics = step(state, x, check=False)
    return counter.calls, float(metrics["dead_fraction"])


@pytest.mark.parametrize("arch", ["batchtopk", "topk"])
def test_gpu_path_step_makes_the_same_calls_whatever_the_batch_width_or_dead_share(arch):
    """Invariant: a torch step on the GPU path makes the same number of torch calls (each a
    kernel launch or less) for any batch size, dictionary width and share of dead latents:
    no product or selection loops over chunks of its data, so on a GPU the launches do not
    grow with the work."""
    pytest.importorskip("torch")
    base, dead = _step_calls(arch, 64, 128, 1)
    assert dead > 0  # AuxK has dead latents to work on
    for B, h, dead_after in ((2048, 128, 1), (64, 4096, 1), (64, 4096, 1000)):
        calls, _ = _step_calls(arch, B, h, dead_after)
        assert calls == base, f"B={B} h={h} dead_after={dead_after}: {calls} torch calls, {base} at B=64 h=128"


@pytest.mark.parametrize("unit", ["batches", "tokens"])
@pytest.mark.parametrize("arch", ["batchtopk", "topk"])
def test_aux_block_capacity_is_at_least_every_steps_dead_count(backend, arch, unit):
    """Invariant: on the GPU path each step's AuxK block (the capacity from the dead-count
    bound it reads, issued a step or more earlier) has at least as many columns as the step
    has dead latents, and some steps use a block narrower than h (the bound is useful)."""
    from sae_ref import dead_bound as DB
    from sae_ref.backends import get_backend

    rng = np.random.default_rng(3)
    config = TrainConfig(arch=arch, h=128, k=8, k_aux=8, lr=3e-3, dead_after=4 if unit == "batches" else 64,
                         dead_unit=unit)
    # batches of 16 rows, and of 48 in a stretch of steps (a bound issued at one batch size
    # is not used at another: counters grow faster with bigger batches)
    sizes = [16] * 6 + [48, 48, 16, 48] + [16] * 6
    xs = [backend.asarray(rng.standard_normal((B, 8)) * rng.uniform(0.2, 3, 8)) for B in sizes]
    be = get_backend(backend.xp)
    narrower = 0
    with sync_free(True):
        state = init_state(config, xs[0])
        for i, B in enumerate(sizes):
            T = 4 * B if unit == "batches" else 64
            bound, _ = DB.read(be, state.dead_counts, state.since_fired, state.t + 1, B, T)
            cap = DB.capacity(bound, config.h)
            state, m = step(state, xs[i], check=False)
            dead = int(round(float(m["dead_fraction"]) * config.h))
            assert dead <= bound <= cap <= config.h
            narrower += cap < config.h and dead > 0
    assert narrower > 0


@given(h=st.integers(1, 5000), data=st.data())
def test_dead_bound_capacity_is_at_least_the_bound_in_few_widths(h, data):
    """Invariant: the block width is at least the bound and at most h, the smallest power of
    two from h // 64 up to h // 8 and then the smallest multiple of h // 8; a run sees at most
    a dozen widths (one CUDA graph each)."""
    from sae_ref.dead_bound import capacity

    bound = data.draw(st.integers(0, h), label="bound")
    cap = capacity(bound, h)
    step = max(1, h // 8)
    assert bound <= cap <= h
    if bound > step:
        assert cap == min(h, -(-bound // step) * step)
    else:
        assert cap <= step and (cap == max(1, h // 64) or cap < 2 * bound or cap == step)
    widths = {capacity(b, h) for b in range(0, h + 1, max(1, h // 997))}
    assert len(widths) <= 16
