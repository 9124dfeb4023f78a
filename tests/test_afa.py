"""AFA bounds, quasi-orthogonality, top-AFA and the AFA loss, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from sae_ref.afa import afa_bounds, afa_loss, eps_lbo, f_tilde_norm, quasi_orthogonality, top_afa
from sae_ref.sparse import SparseCode
from sae_ref.validation.oracles import assert_close, torch_grad, torch_leaf


def _unit_rows(rng, h, d):
    W = rng.standard_normal((h, d))
    return W / np.linalg.norm(W, axis=1, keepdims=True)


def _code(backend, f):
    return SparseCode.from_mask(backend.asarray(f), backend.asarray(f != 0))


@given(seed=st.integers(0, 2**31 - 1), h=st.integers(2, 40), d=st.integers(2, 12), block=st.integers(1, 16))
def test_blocked_quasi_orthogonality_equals_the_dense_gram_matrix(backend, seed, h, d, block):
    """quasi_orthogonality, computed in blocks of rows, gives the largest absolute, the largest
    signed and the mean off-diagonal cosine of the dense Gram matrix of the normalised atoms, for
    any block size."""
    W = np.random.default_rng(seed).standard_normal((h, d))
    q = quasi_orthogonality(backend.asarray(W), block=block)
    U = W / np.linalg.norm(W, axis=1, keepdims=True)
    G = U @ U.T
    off = G[~np.eye(h, dtype=bool)]
    assert_close(backend.numpy(q.max_abs), np.abs(off).max(), rtol=1e-12, atol=1e-12)
    assert_close(backend.numpy(q.max_signed), off.max(), rtol=1e-12, atol=1e-12)
    assert_close(backend.numpy(q.mean), off.mean(), rtol=1e-9, atol=1e-12)


@given(seed=st.integers(0, 2**31 - 1), h=st.integers(1, 8))
def test_orthonormal_atoms_give_equal_norms_and_zero_eps_lbo(backend, seed, h):
    """With orthonormal atoms the bound is an equality: the features' norm equals the input's,
    ||f~|| = ||z||, and the smallest consistent epsilon (eps_lbo) is zero."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    W = Q[:h]
    f = np.abs(rng.standard_normal((4, h))) * (rng.random((4, h)) < 0.7) + 1e-3
    z = f @ W
    fn = f_tilde_norm(_code(backend, f), backend.asarray(W), backend.asarray(np.zeros(12)))
    assert_close(backend.numpy(fn), np.linalg.norm(z, axis=1), rtol=1e-12, atol=1e-12)
    if h >= 2:
        lbo = eps_lbo(backend.asarray(np.linalg.norm(z, axis=1)), fn, h)
        assert np.all(backend.numpy(lbo) <= 1e-12)


@given(seed=st.integers(0, 2**31 - 1), h=st.integers(2, 30), d=st.integers(8, 40))
def test_random_unit_atoms_obey_the_bound_and_eps_lbo_is_at_most_eps(backend, seed, h, d):
    """Random unit atoms obey the AFA bound: ||f|| lies within afa_bounds of ||z|| with n = h and
    with n = L0, and eps_lbo never exceeds the measured epsilon."""
    rng = np.random.default_rng(seed)
    W = _unit_rows(rng, h, d)
    f = np.abs(rng.standard_normal((6, h))) * (rng.random((6, h)) < 0.5)
    f[:, 0] += 0.1  # every row nonzero
    z = np.linalg.norm(f @ W, axis=1)
    eps = backend.numpy(quasi_orthogonality(backend.asarray(W)).max_abs)
    for n in (h, np.count_nonzero(f, axis=1)):
        lo, hi = afa_bounds(backend.asarray(z), backend.asarray(eps), backend.asarray(np.asarray(n, dtype=np.float64)))
        fn = np.linalg.norm(f, axis=1)
        assert np.all(backend.numpy(lo) <= fn * (1 + 1e-12)) and np.all(fn <= backend.numpy(hi) * (1 + 1e-12))
    lbo = eps_lbo(backend.asarray(z), f_tilde_norm(_code(backend, f), backend.asarray(W), backend.asarray(np.zeros(d))), h)
    assert np.all(backend.numpy(lbo) <= eps + 1e-12)


def _top_afa_oracle(pre, scale, t, sentinel=True):
    """Per row, written from the paper's description with NumPy loops."""
    B, h = pre.shape
    out = np.zeros_like(pre)
    ks = []
    for b in range(B):
        a = np.maximum(pre[b], 0)
        s = (a * scale) ** 2
        order = sorted(range(h), key=lambda i: (-s[i], i))
        c = np.sqrt(np.cumsum(s[order]))
        if sentinel:
            c[-1] = 1e9
        k = int(np.argmin(np.abs(c - t[b]))) + 1
        ks.append(k)
        for i in order[:k]:
            if s[i] > 0:
                out[b, i] = pre[b, i]
    return out, ks


@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 6), h=st.integers(2, 24))
def test_top_afa_keeps_the_prefix_whose_norm_is_nearest_the_target(backend, seed, B, h):
    """top-AFA keeps, per row, the prefix of scores in decreasing order whose norm is nearest the
    target (ties in the scores and in the distance included), exactly as a float64 NumPy oracle."""
    rng = np.random.default_rng(seed)
    pre = np.round(rng.standard_normal((B, h)), 1)  # ties in the scores
    scale = rng.choice([0.5, 1.0, 2.0], size=h)
    t = np.abs(rng.standard_normal(B)) * 3
    want, _ = _top_afa_oracle(pre, scale, t)
    got = top_afa(backend.asarray(pre), backend.asarray(scale), backend.asarray(t))
    np.testing.assert_array_equal(backend.numpy(got.to_dense()), want)


def test_top_afa_k_is_monotone_in_the_target_and_varies_across_rows(backend):
    """For one row of pre-activations, top-AFA's k never decreases as the target grows, and rows
    with different targets get different k."""
    rng = np.random.default_rng(1)
    pre = rng.standard_normal((1, 50))
    pre = np.repeat(pre, 30, axis=0)
    t = np.linspace(0.1, 6.0, 30)
    code = top_afa(backend.asarray(pre), backend.asarray(np.ones(50)), backend.asarray(t))
    l0 = backend.numpy(code.l0())
    assert np.all(np.diff(l0) >= 0) and len(set(l0.tolist())) > 3


def test_top_afa_rows_are_independent_and_invariant_to_atom_rescaling(backend):
    """top-AFA treats rows independently (permuting the rows permutes the output) and selects the
    same latents when each atom's activation is divided by the factor its decoder norm is
    multiplied by."""
    rng = np.random.default_rng(2)
    pre, scale, t = rng.standard_normal((8, 20)), np.abs(rng.standard_normal(20)) + 0.2, np.abs(rng.standard_normal(8)) * 2
    base = backend.numpy(top_afa(backend.asarray(pre), backend.asarray(scale), backend.asarray(t)).to_dense())
    perm = rng.permutation(8)
    permuted = backend.numpy(top_afa(backend.asarray(pre[perm]), backend.asarray(scale), backend.asarray(t[perm])).to_dense())
    np.testing.assert_array_equal(permuted, base[perm])
    c = 2.0 ** rng.integers(-3, 4, size=20)  # powers of two: the rescaling is exact
    rescaled = top_afa(backend.asarray(pre / c), backend.asarray(scale * c), backend.asarray(t))
    np.testing.assert_array_equal(backend.numpy(rescaled.to_dense()) != 0, base != 0)


@given(seed=st.integers(0, 2**31 - 1))
def test_afa_loss_is_nonnegative_zero_iff_norms_match_and_its_gradient_matches_autograd(backend, seed):
    """The AFA loss is non-negative, zero when each row's norm equals its target, and its gradients
    on the code's values and on the target equal torch.autograd's (an empty row included)."""
    rng = np.random.default_rng(seed)
    f = np.abs(rng.standard_normal((5, 9))) * (rng.random((5, 9)) < 0.6)
    f[0] = 0.0  # an empty row
    t = np.abs(rng.standard_normal(5))
    code = _code(backend, f)
    value, g_values, g_t = afa_loss(code, backend.asarray(t))
    assert float(value) >= 0
    exact = afa_loss(code, backend.asarray(np.linalg.norm(f, axis=1)))[0]
    assert float(exact) <= 1e-24
    torch = pytest.importorskip("torch")
    tf, tt = torch_leaf(f), torch_leaf(t)
    loss = ((torch.linalg.vector_norm(tf, dim=1) - tt) ** 2).mean()
    loss.backward()
    gf, gt = torch_grad(tf), torch_grad(tt)
    dense = np.zeros_like(f)
    rows, cols = backend.numpy(code.rows), backend.numpy(code.cols)
    dense[rows, cols] = backend.numpy(g_values)
    assert_close(dense, np.where(f != 0, gf, 0), rtol=1e-10, atol=1e-12)
    assert_close(backend.numpy(g_t), gt, rtol=1e-10, atol=1e-12)
