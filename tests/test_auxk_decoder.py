"""AuxK (dead-latent auxiliary loss) and the unit-norm decoder constraint.

AuxK is checked against a float64 NumPy oracle written from the spec (selection, e_hat with
no b_dec, value in both conventions) and, pushed through ``sae.backward``, against
torch.autograd on the same graph written in plain torch. The decoder constraint is checked for
its geometric promises (unit rows, orthogonal projected gradient) in both orders on every
backend.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from sae_ref import sae as S
from sae_ref.arrays import to_numpy
from sae_ref.auxk import auxk
from sae_ref.decoder import constrained_step, project_grad, renormalize
from sae_ref.sae import SAEConfig, SAEParams
from sae_ref.sparse import SparseCode
from sae_ref.validation.oracles import assert_close, finite_difference_check, torch_grad, torch_leaf
from sae_ref.validation.strategies import sae_problems, unit_rows

torch = pytest.importorskip("torch")

SEEDS = st.integers(0, 2**32 - 1)
PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
CONVENTIONS = ("authors", "normalized")


# --- helpers ----------------------------------------------------------------------------------
tt = torch_leaf
tgrad = torch_grad


def scalar(a) -> float:
    v = to_numpy(a)
    assert v.shape == (), f"expected a 0-D array, got shape {v.shape}"
    return float(v)


def coords(code: SparseCode):
    return to_numpy(code.rows).astype(np.int64), to_numpy(code.cols).astype(np.int64)


def dense(code: SparseCode) -> np.ndarray:
    rows, cols = coords(code)
    out = np.zeros(code.shape)
    np.add.at(out, (rows, cols), to_numpy(code.values).astype(np.float64))
    return out


fd_check = finite_difference_check


def auxk_oracle(pre, dead, residual, W_dec, k_aux, convention):
    """The spec in plain NumPy: per row, the top min(k_aux, n_dead) positive dead
    pre-activations (ties to the lower index), decoded with W_dec and no b_dec."""
    B, h = pre.shape
    F = np.zeros((B, h))
    n_dead = int(dead.sum())
    if n_dead:
        kp = min(k_aux, n_dead)
        for b in range(B):
            cand = [j for j in range(h) if dead[j] and pre[b, j] > 0]
            cand.sort(key=lambda j: (-pre[b, j], j))
            for j in cand[:kp]:
                F[b, j] = pre[b, j]
    e_hat = F @ W_dec
    r = e_hat - residual
    if n_dead == 0:  # documented: no dead latent, no auxiliary loss
        return F, e_hat, 0.0
    if convention == "authors":
        value = np.mean(r * r)
    else:
        c = residual - residual.mean(axis=0, keepdims=True)
        value = np.sum(r * r) / np.sum(c * c)
    return F, e_hat, value


@st.composite
def auxk_problems(draw, min_batch=1, all_dead=None):
    """(pre, dead, residual, W_dec, k_aux) in float64."""
    B = draw(st.integers(min_batch, 8))
    h = draw(st.integers(1, 24))
    d = draw(st.integers(1, 8))
    rng = np.random.default_rng(draw(SEEDS))
    pre = rng.standard_normal((B, h)) * draw(st.sampled_from([0.1, 1.0, 10.0]))
    frac_neg = draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
    pre = np.where(rng.random((B, h)) < frac_neg, -np.abs(pre), pre)
    if all_dead is None:
        dead = rng.random(h) < draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    else:
        dead = np.full(h, all_dead)
    residual = rng.standard_normal((B, d))
    W_dec = unit_rows(rng, h, d)
    k_aux = draw(st.integers(1, h + 3))  # k_aux may exceed the number of dead latents and h
    return pre, dead, residual, W_dec, k_aux


def run_auxk(backend, pre, dead, residual, W_dec, k_aux, **kw):
    return auxk(backend.asarray(pre), backend.asarray(dead), backend.asarray(residual),
                backend.asarray(W_dec), k_aux, **kw)


# --- AuxK: no dead latent ---------------------------------------------------------------------
@given(sae_problems(), st.sampled_from(CONVENTIONS), st.sampled_from([None, True, False]),
       st.data())
def test_auxk_exactly_zero_without_dead_latents(backend, problem, convention, detach, data):
    """With no dead latent AuxK is exactly zero: value 0, an empty code, all-zero gradients of the
    right shapes (no residual gradient when the residual is detached), and pushed through the
    SAE's backward it changes no gradient, bit for bit."""
    x, p = problem
    B, d = x.shape
    assume(convention != "normalized" or B >= 2)  # one row is refused (tests/test_errors.py)
    h = p["W_enc"].shape[1]
    k = data.draw(st.integers(1, h), label="k")
    k_aux = data.draw(st.integers(1, 2 * h), label="k_aux")
    params = SAEParams(**{n: backend.asarray(p[n]) for n in PARAM_NAMES})
    fwd = S.forward(params, backend.asarray(x), SAEConfig("topk", k=k))
    res = fwd.x - fwd.x_hat
    dead = backend.asarray(np.zeros(h, dtype=bool))
    out = auxk(fwd.pre, dead, res, params.W_dec, k_aux, convention=convention,
               detach_residual=detach)
    assert scalar(out.value) == 0.0
    assert out.code.nnz == 0 and to_numpy(out.g_values).shape == (0,)
    assert np.all(to_numpy(out.g_W_dec) == 0.0) and to_numpy(out.g_W_dec).shape == (h, d)
    detached = (convention == "normalized") if detach is None else detach
    if detached:
        assert out.g_residual is None
    else:
        assert np.all(to_numpy(out.g_residual) == 0.0) and to_numpy(out.g_residual).shape == (B, d)

    # pushed through sae.backward it changes no gradient, bit for bit
    g = backend.asarray(np.random.default_rng(0).standard_normal((B, d)))
    g_total = g if out.g_residual is None else g - out.g_residual
    plain = S.backward(params, fwd, g)
    with_aux = S.backward(params, fwd, g_total, g_pre_extra=out.code.with_values(out.g_values),
                          g_W_dec_extra=out.g_W_dec)
    for name in PARAM_NAMES:
        assert np.array_equal(to_numpy(getattr(plain, name)), to_numpy(getattr(with_aux, name))), name


# --- AuxK: selection, e_hat and value against the oracle --------------------------------------
@given(auxk_problems(), st.sampled_from(CONVENTIONS))
def test_auxk_matches_numpy_oracle(backend, problem, convention):
    """AuxK equals a float64 NumPy oracle in both conventions: it selects only dead latents, per row
    the min(k_aux, n_dead, positive dead) largest, its value matches, live latents' decoder rows
    get exactly zero gradient, and the gradients are those of the reconstruction e_hat (no b_dec)
    of the residual."""
    pre, dead, residual, W_dec, k_aux = problem
    B, h = pre.shape
    d = residual.shape[1]
    if convention == "normalized":
        c = residual - residual.mean(axis=0, keepdims=True)
        assume(np.sum(c * c) > 1e-6)  # the normalised loss needs a residual that varies
    out = run_auxk(backend, pre, dead, residual, W_dec, k_aux, convention=convention,
                   detach_residual=False)
    F, e_hat, value = auxk_oracle(pre, dead, residual, W_dec, k_aux, convention)
    rows, cols = coords(out.code)
    n_dead = int(dead.sum())

    # touches only dead latents
    assert np.all(dead[cols]), "the aux code has a live latent"
    g_W = to_numpy(out.g_W_dec)
    assert np.all(g_W[~dead] == 0.0), "g_W_dec rows of live latents are not exactly zero"
    # per row: min(k_aux, n_dead, #positive dead in the row) entries, the largest ones
    pos_dead = ((pre > 0) & dead[None, :]).sum(axis=1)
    counts = np.bincount(rows, minlength=B)
    assert np.array_equal(counts, np.minimum(np.minimum(k_aux, n_dead), pos_dead))
    assert np.array_equal(dense(out.code), F), "aux code differs from the oracle's selection"

    assert_close(scalar(out.value), value, what=f"{convention} value")
    if n_dead == 0:
        assert np.all(to_numpy(out.g_residual) == 0.0) and np.all(g_W == 0.0)
        return
    # e_hat (no b_dec) recovered from the library's residual gradient
    g_res = to_numpy(out.g_residual)
    if convention == "authors":
        r_lib = -g_res * (B * d) / 2.0
        g_ehat = 2.0 * (e_hat - residual) / (B * d)
    else:
        c = residual - residual.mean(axis=0, keepdims=True)
        den = np.sum(c * c)
        r_lib = -(g_res + c * (2.0 * value / den)) * den / 2.0
        g_ehat = 2.0 * (e_hat - residual) / den
    assert_close(r_lib + residual, e_hat, rtol=1e-7, atol=1e-9, what="e_hat (no b_dec)")
    assert_close(g_W, F.T @ g_ehat, what="g_W_dec")
    assert_close(to_numpy(out.g_values), (g_ehat @ W_dec.T)[rows, cols], what="g_values")


@given(auxk_problems(min_batch=2), st.sampled_from(CONVENTIONS), st.booleans(), SEEDS)
def test_auxk_direct_grads_vs_autograd_and_fd(backend, problem, convention, detach, seed):
    """AuxK's own gradients (on the aux values = pre at the kept places, on W_dec and on the
    residual) against torch.autograd and central differences."""
    pre, dead, residual, W_dec, k_aux = problem
    B, h = pre.shape
    assume(dead.any())  # with no dead latent the loss is 0 by definition (tested above)
    c = residual - residual.mean(axis=0, keepdims=True)
    assume(np.sum(c * c) > 1e-3)
    kw = dict(convention=convention, detach_residual=detach)
    out = run_auxk(backend, pre, dead, residual, W_dec, k_aux, **kw)
    rows, cols = coords(out.code)
    mask = np.zeros((B, h))
    mask[rows, cols] = 1.0

    P, E, W = tt(pre), tt(residual), tt(W_dec)
    Ed = E.detach() if detach else E
    r = (P * torch.tensor(mask)) @ W - Ed
    L = (r ** 2).mean() if convention == "authors" else (r ** 2).sum() / ((Ed - Ed.mean(0)) ** 2).sum()
    L.backward()
    assert_close(scalar(out.value), L.item(), what="value")
    assert_close(to_numpy(out.g_values), tgrad(P)[rows, cols], what="g_values")
    assert np.all(tgrad(P)[mask == 0] == 0.0)
    assert_close(to_numpy(out.g_W_dec), tgrad(W), what="g_W_dec")
    if detach:
        assert out.g_residual is None
    else:
        assert_close(to_numpy(out.g_residual), tgrad(E), what="g_residual")

    base = (rows, cols)

    def value_at(pre_=pre, res_=residual, W_=W_dec):
        o = run_auxk(backend, pre_, dead, res_, W_, k_aux, **kw)
        rc = coords(o.code)
        if not (np.array_equal(rc[0], base[0]) and np.array_equal(rc[1], base[1])):
            return None
        return scalar(o.value)

    fd_check(lambda a: value_at(W_=a), W_dec, to_numpy(out.g_W_dec), seed, what="FD W_dec")
    if not detach:
        fd_check(lambda a: value_at(res_=a), residual, to_numpy(out.g_residual), seed + 1,
                 what="FD residual")
    if rows.size:
        g_pre = np.zeros((B, h))
        g_pre[rows, cols] = to_numpy(out.g_values)
        kept = np.flatnonzero(mask.reshape(-1))
        i = int(np.random.default_rng(seed).choice(kept))

        def at_entry(a):
            q = pre.copy()
            q.flat[i] = a[0]
            return value_at(pre_=q)

        fd_check(at_entry, pre.reshape(-1)[i:i + 1], g_pre.reshape(-1)[i:i + 1], seed,
                 n=1, what="FD pre")


def test_auxk_detach_default(backend):
    """By default the 'authors' convention passes a gradient to the residual and 'normalized'
    detaches it; detach_residual overrides either."""
    rng = np.random.default_rng(0)
    B, h, d = 4, 6, 3
    pre = rng.standard_normal((B, h))
    dead = np.array([True, False, True, True, False, True])
    residual = rng.standard_normal((B, d))
    W_dec = unit_rows(rng, h, d)
    authors = run_auxk(backend, pre, dead, residual, W_dec, 2, convention="authors")
    normalized = run_auxk(backend, pre, dead, residual, W_dec, 2, convention="normalized")
    assert authors.g_residual is not None, "'authors' must not detach the residual by default"
    assert to_numpy(authors.g_residual).shape == (B, d)
    assert normalized.g_residual is None, "'normalized' must detach the residual by default"
    # and both can be overridden
    assert run_auxk(backend, pre, dead, residual, W_dec, 2, convention="authors",
                    detach_residual=True).g_residual is None
    assert run_auxk(backend, pre, dead, residual, W_dec, 2, convention="normalized",
                    detach_residual=False).g_residual is not None


# --- AuxK through sae.backward against autograd -----------------------------------------------
@given(sae_problems(), st.sampled_from(CONVENTIONS), st.sampled_from([None, True, False]),
       st.sampled_from([1 / 32, 1.0]), st.data())
def test_auxk_through_sae_backward_matches_autograd(backend, problem, convention, detach,
                                                    alpha, data):
    """AuxK's gradients added into the SAE's backward with a coefficient alpha give torch.autograd's
    gradients of the main loss plus alpha times the AuxK loss, in both conventions, with the
    residual detached or not; the AuxK code touches only dead latents."""
    x, p = problem
    B, d = x.shape
    h = p["W_enc"].shape[1]
    k = data.draw(st.integers(1, h), label="k")
    k_aux = data.draw(st.integers(1, h), label="k_aux")
    seed = data.draw(SEEDS, label="seed")
    rng = np.random.default_rng(seed)
    dead_np = rng.random(h) < data.draw(st.sampled_from([0.3, 0.7, 1.0]), label="dead fraction")
    dead_np[rng.integers(h)] = True  # at least one (no dead latent: tested above)
    g = rng.standard_normal((B, d))
    detached = (convention == "normalized") if detach is None else detach

    params = SAEParams(**{n: backend.asarray(p[n]) for n in PARAM_NAMES})
    fwd = S.forward(params, backend.asarray(x), SAEConfig("topk", k=k))
    res = fwd.x - fwd.x_hat
    res_np = to_numpy(res)
    if convention == "normalized":
        c = res_np - res_np.mean(axis=0, keepdims=True)
        assume(np.sum(c * c) > 1e-3)
    out = auxk(fwd.pre, backend.asarray(dead_np), res, params.W_dec, k_aux,
               convention=convention, detach_residual=detach)
    assert (out.g_residual is None) == detached
    g_xhat = backend.asarray(g)
    if out.g_residual is not None:
        g_xhat = g_xhat - alpha * out.g_residual  # residual = x - x_hat
    grads = S.backward(params, fwd, g_xhat,
                       g_pre_extra=out.code.with_values(alpha * out.g_values),
                       g_W_dec_extra=alpha * out.g_W_dec)

    main_mask = np.zeros((B, h))
    main_mask[coords(fwd.code)] = 1.0
    aux_mask = np.zeros((B, h))
    aux_mask[coords(out.code)] = 1.0
    assert np.all(aux_mask[:, ~dead_np] == 0.0)

    P = {n: tt(p[n]) for n in PARAM_NAMES}
    X = tt(x, grad=False)
    Z = (X - P["b_dec"]) @ P["W_enc"] + P["b_enc"]
    Xh = (Z * torch.tensor(main_mask)) @ P["W_dec"] + P["b_dec"]
    E = X - Xh
    if detached:
        E = E.detach()
    E_hat = (Z * torch.tensor(aux_mask)) @ P["W_dec"]  # no b_dec
    r = E_hat - E
    aux_loss = (r ** 2).mean() if convention == "authors" else \
        (r ** 2).sum() / ((E - E.mean(dim=0)) ** 2).sum()
    ((torch.tensor(g) * Xh).sum() + alpha * aux_loss).backward()

    assert_close(scalar(out.value), aux_loss.item(), what="aux value")
    for name in PARAM_NAMES:
        assert_close(to_numpy(getattr(grads, name)), tgrad(P[name]),
                     what=f"{convention} detach={detached}: grad {name}")


# --- the decoder constraint -------------------------------------------------------------------
@st.composite
def decoders(draw):
    """(W with rows of widely varied norm, gradient, seed) in float64."""
    h = draw(st.integers(1, 20))
    d = draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(SEEDS))
    W = rng.standard_normal((h, d)) * 10.0 ** rng.uniform(-3, 3, size=(h, 1))
    g = rng.standard_normal((h, d)) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    return W, g


def row_norms(W):
    return np.linalg.norm(np.asarray(W, dtype=np.float64), axis=1)


def assert_orthogonal(g, W, what, tol=1e-6):
    dots = np.abs(np.sum(g * W, axis=1))
    bound = tol * row_norms(g) * row_norms(W)
    assert np.all(dots <= bound), f"{what}: |<g_j, w_j>| = {dots.max():.3g} not <= {tol} |g_j||w_j|"


def np_unit(W):
    return W / np.linalg.norm(W, axis=1, keepdims=True)


def np_project(W, g):
    u = np_unit(W)
    return g - np.sum(g * u, axis=1, keepdims=True) * u


@given(decoders(), st.sampled_from(["float64", "float32"]))
def test_renormalize_gives_unit_rows(backend, data, dtype):
    """renormalize gives unit-norm decoder rows (1e-12 in float64, 1e-6 in float32) in the input's
    dtype, equal to w / ||w||; a zero row stays zero, with no NaN."""
    W, _ = data
    out = to_numpy(renormalize(backend.asarray(W, dtype)))
    assert out.dtype == np.dtype(dtype)
    tol = 1e-12 if dtype == "float64" else 1e-6
    assert np.all(np.abs(row_norms(out) - 1.0) <= tol)
    if dtype == "float64":
        assert_close(out, np_unit(W), what="renormalize")
    # a zero row is left alone (no NaN)
    Wz = W.copy()
    Wz[0] = 0.0
    outz = to_numpy(renormalize(backend.asarray(Wz, dtype)))
    assert np.all(np.isfinite(outz)) and np.all(outz[0] == 0.0)


@given(decoders())
def test_project_grad_orthogonal(backend, data):
    """project_grad removes from each row's gradient exactly its component along the row: the result
    is orthogonal to the row and the removed part is parallel to it."""
    W, g = data
    out = to_numpy(project_grad(backend.asarray(W), backend.asarray(g)))
    assert_orthogonal(out, W, "project_grad")
    assert_close(out, np_project(W, g), what="project_grad")
    # only the component along each row is removed: g - out is parallel to w_j
    diff = g - out
    cross = np.abs(np.sum(diff * np_unit(W), axis=1)) - row_norms(diff)
    assert np.all(np.abs(cross) <= 1e-9 * (1 + row_norms(g)))


def recording_sgd(lr):
    """An SGD step that records the decoder and gradient it was given."""
    seen = {}

    def sgd(Wi, gi):
        seen["W"], seen["g"] = to_numpy(Wi), to_numpy(gi)
        return Wi - lr * gi

    return seen, sgd


@given(decoders(), st.sampled_from([1e-3, 0.1, 10.0]))
def test_constrained_step_after_gives_unit_rows(backend, data, lr):
    """order='after': the optimiser's step sees the raw rows and the projected gradient, and the
    rows are renormalised to unit norm after it."""
    W, g = data
    seen, sgd = recording_sgd(lr)
    out = to_numpy(constrained_step(backend.asarray(W), backend.asarray(g), sgd, order="after"))
    # the step sees the raw rows and the projected gradient
    assert_close(seen["W"], W, what="step input W")
    assert_orthogonal(seen["g"], W, "projected gradient")
    assert np.all(np.abs(row_norms(out) - 1.0) <= 1e-12), "rows not unit after the step"
    assert_close(out, np_unit(W - lr * np_project(W, g)), what="order='after' result")


@given(decoders(), st.sampled_from([1e-4, 1e-3]))
def test_constrained_step_before_renormalises_then_steps(backend, data, lr):
    """order='before': the rows are renormalised first and the step sees unit rows and a gradient
    orthogonal to them; the rows leave the unit sphere only by the second order of the step, |w +
    s|^2 = 1 + |s|^2."""
    W, g = data
    seen, sgd = recording_sgd(lr)
    out = to_numpy(constrained_step(backend.asarray(W), backend.asarray(g), sgd, order="before"))
    assert np.all(np.abs(row_norms(seen["W"]) - 1.0) <= 1e-12), "rows not unit before the step"
    assert_orthogonal(seen["g"], seen["W"], "projected gradient vs renormalised rows")
    assert_close(out, np_unit(W) - lr * np_project(np_unit(W), g), what="order='before' result")
    # after a small step the rows are close to unit: |w + s|^2 = 1 + |s|^2 for s orthogonal
    step_norm = lr * row_norms(seen["g"])
    assert np.all(np.abs(row_norms(out) - 1.0) <= 0.5 * step_norm ** 2 + 1e-12)


@given(decoders())
def test_constrained_step_orders_differ_only_by_where_renormalisation_happens(backend, data):
    """Both orders on one input: with a zero step both return the unit rows; with SGD,
    'before' steps from the unit rows and 'after' steps from the raw rows and renormalises
    (the projected gradient is the same: projection ignores each row's scale)."""
    W, g = data
    Wb, gb = backend.asarray(W), backend.asarray(g)
    lr = 0.05
    before = to_numpy(constrained_step(Wb, gb, lambda Wi, gi: Wi - lr * gi, order="before"))
    after = to_numpy(constrained_step(Wb, gb, lambda Wi, gi: Wi - lr * gi, order="after"))
    ident_b = to_numpy(constrained_step(Wb, gb, lambda Wi, gi: Wi, order="before"))
    ident_a = to_numpy(constrained_step(Wb, gb, lambda Wi, gi: Wi, order="after"))
    assert_close(ident_b, np_unit(W), what="before, zero step")
    assert_close(ident_a, np_unit(W), what="after, zero step")
    assert np.all(np.abs(row_norms(after) - 1.0) <= 1e-12)
    assert_close(after, np_unit(W - lr * np_project(W, g)), what="after")
    assert_close(before, np_unit(W) - lr * np_project(W, g), what="before")


@pytest.mark.parametrize("convention", ["authors", "normalized"])
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("block", [False, True], ids=["entries", "block"])
def test_training_forms_of_auxk_give_the_bits_of_auxk(backend, convention, detach, block):
    """Invariant: the forms training asks for (the residual given as x_hat - x and turned in
    the reconstruction's buffer, gradients of the loss scaled by a power of two, the residual
    gradient left as -g_ehat) give the plain AuxK's value and gradients bit for bit, on the
    entries and on the dead columns' block (in the sync-free mode, the whole [B, h] block)."""
    from sae_ref.auxk import _auxk

    rng = np.random.default_rng(11)
    B, h, d = 12, 40, 6
    pre = backend.asarray(rng.standard_normal((B, h)))
    dead = backend.asarray(rng.random(h) < 0.3)
    x = backend.asarray(rng.standard_normal((B, d)))
    x_hat = backend.asarray(rng.standard_normal((B, d)))
    W = backend.asarray(rng.standard_normal((h, d)))
    want = _auxk(backend.xp, pre, dead, x - x_hat, W, 5, convention, detach, want_g_W_dec=False,
                 allow_block=block)
    c = 1 / 32
    got = _auxk(backend.xp, pre, dead, x_hat - x, W, 5, convention, detach, want_g_W_dec=False,
                allow_block=block, scale=c, lazy_residual=True, negated_residual=True)
    n = backend.numpy
    assert n(got.value) == n(want.value)
    np.testing.assert_array_equal(n(got.g_ehat), c * n(want.g_ehat))
    if detach:
        assert got.g_residual is None and not got.g_residual_is_neg_ehat
    elif got.g_residual_is_neg_ehat:
        np.testing.assert_array_equal(-n(got.g_ehat), c * n(want.g_residual))
    else:
        np.testing.assert_array_equal(n(got.g_residual), c * n(want.g_residual))
    assert (got.block is None) == (want.block is None) == (not block)
    if block:
        for mine, theirs, scale in zip(got.block, want.block, (1, c)):
            np.testing.assert_array_equal(n(mine.cols), n(theirs.cols))
            np.testing.assert_array_equal(n(mine.values), scale * n(theirs.values))
    else:
        np.testing.assert_array_equal(n(got.code.to_dense()), n(want.code.to_dense()))
        np.testing.assert_array_equal(n(got.g_values), c * n(want.g_values))
