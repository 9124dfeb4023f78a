"""The keyed selection's fused Triton kernels against their composed forms (the oracle).

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by the
conftest); with one, on CUDA as well. The keys must be the composed form's bit for bit, and
a selection through the kernels must be the tie rule's.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from sae_ref.backends import StandardBackend, get_backend, sync_free, top_n_fixed, triton_kernels  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _composed(name, *args, **kw):
    """The composed form of a keyed primitive, on torch's own bit reinterpretation."""
    return getattr(StandardBackend, name)(get_backend(torch), *args, **kw)


def _fused(name, *args, **kw):
    with sync_free(True), triton_kernels(True):
        return getattr(get_backend(torch), name)(*args, **kw)


@st.composite
def tied_matrices(draw):
    """(x as float64 NumPy, g): few distinct values, so groups and rows hold many ties,
    signed zeros among them."""
    g = draw(st.sampled_from([4, 8, 16]))
    w = draw(st.integers(1, 12))
    B = draw(st.integers(1, 6))
    pool = draw(st.lists(st.sampled_from([-2.0, -0.5, -0.0, 0.0, 0.25, 1.0, 3.0, -1e-30, 7e4]),
                         min_size=1, max_size=5))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.choice(np.asarray(pool), size=(B, g * w))
    if draw(st.booleans()):
        x = x + rng.normal(size=x.shape)  # distinct values too
    return x, g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@given(data=tied_matrices(), per_row=st.booleans())
@settings(max_examples=15)
def test_fused_group_keys_equal_composed_keys_bit_for_bit(device, dtype, data, per_row):
    x_np, g = data
    x = torch.as_tensor(x_np).to(DTYPES[dtype]).to(device)
    want = _composed("group_keys", x, g, per_row=per_row)
    got = _fused("group_keys", x, g, per_row=per_row)
    assert got.dtype == torch.int64 and torch.equal(got.cpu(), want.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@given(data=tied_matrices(), per_row=st.booleans(), runs=st.sampled_from([2, 4, 8]))
@settings(max_examples=15)
def test_fused_group_keys_with_run_maxima_equal_composed_bit_for_bit(device, dtype, data, per_row, runs):
    """The keys and each run's maximum (runs of a row's keys, or of all keys in order)."""
    x_np, g = data
    x = torch.as_tensor(x_np).to(DTYPES[dtype]).to(device)
    B, h = x.shape
    if (h // g if per_row else B * h // g) % runs:  # the kernel's wrapper refuses, naming the argument
        from sae_ref.backends import _triton_select

        with pytest.raises(ValueError, match="'runs'"):
            _triton_select.group_keys(x, g, per_row=per_row, runs=runs)
        return
    want = _composed("group_keys", x, g, per_row=per_row, runs=runs)
    got = _fused("group_keys", x, g, per_row=per_row, runs=runs)
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.equal(a.cpu(), b.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@given(data=tied_matrices(), per_row=st.booleans(), seed=st.integers(0, 2**16), s=st.sampled_from([1, 2, 4]))
@settings(max_examples=15)
def test_fused_subgroup_keys_and_their_entries_keys_equal_composed_bit_for_bit(device, dtype, data, per_row,
                                                                               seed, s):
    """The chosen groups' subgroup keys, then the keys of the entries of some of those
    subgroups (named by their keys), from the kernels and from the composed forms."""
    x_np, g = data
    x = torch.as_tensor(x_np).to(DTYPES[dtype]).to(device)
    B, h = x.shape
    w = h // g
    gen = torch.Generator().manual_seed(seed)
    keys = _composed("group_keys", x, g, per_row=per_row)  # the chosen groups, named by their keys
    if per_row:
        n = int(torch.randint(1, w + 1, (1,), generator=gen))
        pick = torch.stack([torch.randperm(w, generator=gen)[:n] for _ in range(B)]).to(device)
        q = torch.gather(keys, 1, pick)
    else:
        n = int(torch.randint(1, B * w + 1, (1,), generator=gen))
        q = keys.reshape(-1)[torch.randperm(B * w, generator=gen)[:n].to(device)]
    want = _composed("subgroup_keys", x, q, g, s, per_row=per_row)
    got = _fused("subgroup_keys", x, q, g, s, per_row=per_row)
    # each group's largest subgroup key is the group's own key
    assert torch.equal(want.reshape(*q.shape, g // s).amax(-1).cpu(), q.cpu())
    assert got.shape == (B, n * g // s) if per_row else (n * g // s,)
    assert torch.equal(got.cpu(), want.cpu())
    m = int(torch.randint(1, n * g // s + 1, (1,), generator=gen))  # some subgroups, in any order
    pick = torch.stack([torch.randperm(n * g // s, generator=gen)[:m] for _ in range(B)]) if per_row else \
        torch.randperm(n * g // s, generator=gen)[:m]
    top = torch.gather(want, 1, pick.to(device)) if per_row else want[pick.to(device)]
    want = _composed("subgroup_entry_keys", x, top, g, s, per_row=per_row)
    got = _fused("subgroup_entry_keys", x, top, g, s, per_row=per_row)
    assert torch.equal(got.cpu(), want.cpu())
    # each subgroup's largest entry key is the key that named it
    assert torch.equal(want.reshape(*top.shape, s).amax(-1).cpu(), top.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@given(data=tied_matrices(), seed=st.integers(0, 2**16))
@settings(max_examples=15)
def test_fused_code_at_equals_composed_bit_for_bit(device, dtype, data, seed):
    """The padded code at flat indices: rows, columns and the values, the non-positive ones
    (signed zeros among them) 0."""
    x_np, _ = data
    x = torch.as_tensor(x_np).to(DTYPES[dtype]).to(device)
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(0, x.numel() + 1, (1,), generator=gen))
    idx = torch.sort(torch.randperm(x.numel(), generator=gen)[:n]).values.to(device)
    want = _composed("code_at", x, idx)
    got = _fused("code_at", x, idx)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
        assert torch.equal(torch.signbit(a.cpu()), torch.signbit(b.cpu()))


def _oracle(x, n, per_row):
    """The tie rule by a stable sort: largest first, the lower index first among equals."""
    a = x.astype(np.float64)
    if per_row:
        cols = np.argsort(-a, axis=1, kind="stable")[:, :n]
        return np.sort((np.arange(a.shape[0])[:, None] * a.shape[1] + cols), axis=1).ravel()
    return np.sort(np.argsort(-a.ravel(), kind="stable")[:n])


@pytest.mark.parametrize("device", DEVICES)
@given(data=tied_matrices(), per_row=st.booleans(), frac=st.floats(0.01, 0.12))
@settings(max_examples=20)
def test_selection_through_fused_kernels_is_the_tie_rule_and_its_cut_the_last_kept_value(device, data, per_row, frac):
    x_np, g = data
    x = torch.as_tensor(x_np, dtype=torch.float32, device=device)
    B, h = x.shape
    n = max(1, int(frac * (h if per_row else B * h)))
    with sync_free(True), triton_kernels(True):
        idx, cut = top_n_fixed(x, n, axis=-1 if per_row else None)
        alone, no_cut = top_n_fixed(x, n, axis=-1 if per_row else None, with_cut=False)
    x32 = x.cpu().numpy()
    assert np.array_equal(idx.cpu().numpy(), _oracle(x32, n, per_row))
    assert torch.equal(alone, idx) and (no_cut is None or torch.equal(no_cut, cut))
    kept = x32.ravel()[idx.cpu().numpy()]
    if per_row:
        assert np.array_equal(cut.cpu().numpy()[:, 0], kept.reshape(B, n).min(axis=1))
    else:
        assert float(cut) == kept.min()


def test_kernels_stay_off_outside_the_switch_and_on_cpu_without_the_sync_free_mode():
    from sae_ref.backends._triton import usable

    x = torch.zeros(2, 8)
    assert not usable(x)  # the default: CUDA tensors only
    with triton_kernels(True):
        assert not usable(x)  # the CPU's default path has no fused kernels
        with sync_free(True):
            assert usable(x)
            with triton_kernels(False):
                assert not usable(x)


def test_switch_rejects_a_non_boolean():
    with pytest.raises(TypeError, match="enabled"):
        with triton_kernels("yes"):
            pass


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@given(data=tied_matrices(), dead_share=st.floats(0.0, 1.0), seed=st.integers(0, 2**16),
       k_frac=st.floats(0.0, 0.99))
@settings(max_examples=15)
def test_fused_auxk_block_equals_composed_block_bit_for_bit(device, dtype, data, dead_share, seed, k_frac):
    x_np, _ = data
    pre = torch.as_tensor(x_np).to(DTYPES[dtype]).to(device)
    B, h = pre.shape
    gen = torch.Generator().manual_seed(seed)
    dead = torch.rand(h, generator=gen) < dead_share
    cap = int(torch.randint(2, h + 2, (1,), generator=gen))  # padding columns past the dead
    k = max(1, min(cap - 1, int(k_frac * cap)))
    be = get_backend(torch)
    cols = be.compact(dead.to(device), cap)
    real = cols < h
    cols = torch.where(real, cols, 0)
    want = StandardBackend.row_top_block(be, pre, cols, real, k)
    got = _fused("row_top_block", pre, cols, real, k)
    assert torch.equal(got.cpu(), want.cpu())
    assert int((got > 0).sum(dim=1).max()) <= k  # at most k kept in a row


_COMPILE = r"""
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sae_ref.backends import _triton_adam as A, _triton_decode as D, _triton_select as S, _triton_sparse as P
from sae_ref.backends import _triton_counters as C, _triton_residual as R, _triton_standardize as Z
from sae_ref.backends import _triton_gate as GT, _triton_theta as T

target = GPUTarget("cuda", 90, 32)  # an H100/H200's architecture


def build(fn, signature, constexprs):
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    ptx = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target).asm["ptx"]
    # the interpreter divides and takes roots as IEEE does; Triton's float32 / and sqrt
    # approximate on a GPU unless written correctly rounded (div_rn, sqrt_rn)
    approx = sorted(set(re.findall(r"(?:div\.full|div\.approx|sqrt\.approx|rcp\.approx)[a-z0-9.]*", ptx)))
    assert not approx, f"{fn.__name__} {signature}: approximate instructions {approx}"


for per_row in (True, False):
    for x in ("*fp32", "*fp16", "*bf16"):
        for runs in (1, 8):
            build(S._group_keys_kernel, {"x_ptr": x, "out_ptr": "*i64", "runs_ptr": "*i64", "total": "i64",
                                         "h": "i32", "w": "i32"}, {"per_row": per_row, "G": 16, "R": runs, "BLOCK": 128})
for block in (256, 8192):
    build(S._row_top_block_kernel, {"pre_ptr": "*fp32", "cols_ptr": "*i64", "out_ptr": "*fp32", "B": "i32",
                                    "h": "i32", "cap": "i32", "n": "i32"}, {"ROWS": 1, "BLOCK": block})
for w in ("*fp32", "*fp64"):
    signature = {name: w for name in ("W_ptr", "g_ptr", "m_ptr", "v_ptr", "ss_ptr")}
    signature.update(h="i32", d="i32")
    signature.update({name: "fp64" for name in ("lr_t", "b1", "one_minus_b1", "b2", "one_minus_b2", "eps",
                                                "bc2_sqrt", "tiny")})
    for after in (True, False):
        for sums in (True, False):
            build(A._decoder_adam_rows, signature, {"AFTER": after, "SUMS": sums, "BLOCK_H": 4, "BLOCK_D": 1024})
    flat = {name: w for name in ("p_ptr", "g_ptr", "m_ptr", "v_ptr", "ss_ptr")}
    flat.update(n="i64", **{name: "fp64" for name in ("lr_t", "b1", "one_minus_b1", "b2", "one_minus_b2",
                                                      "eps", "bc2_sqrt")})
    for sums in (True, False):
        build(A._adam_flat, flat, {"SUMS": sums, "BLOCK": 4096})
    products = {name: w for name in ("G_ptr", "W_ptr", "X_ptr", "values_ptr", "code_ptr", "g_f_ptr",
                                     "out_W_ptr", "out_X_ptr", "out_s_ptr", "part_W_ptr", "part_X_ptr",
                                     "part_s_ptr")}
    products.update({name: "*i64" for name in ("rows_ptr", "pos_ptr", "crow_ptr", "first_ptr",
                                                "multi_first_ptr", "slot_latent_ptr")})
    products.update(h="i32", d="i32", n_slots="i32", part="i32")
    for flags in ((True, True), (False, False)):
        for d in (1024, 4096):  # d = 768, 2304
            build(P._latent_products_kernel, products,
                  {"HAS_CODE": flags[0], "PADDED": flags[1], "BLOCK_L": 1, "BLOCK_E": 8192 // d, "BLOCK_D": d})
    sums = {name: w for name in ("part_W_ptr", "part_X_ptr", "part_s_ptr", "out_W_ptr", "out_X_ptr", "out_s_ptr")}
    sums.update(crow_ptr="*i64", multi_first_ptr="*i64", h="i32", d="i32", part="i32")
    build(P._sum_parts_kernel, sums, {"BLOCK_L": 1, "BLOCK_D": 1024})
    decode = {name: w for name in ("values_ptr", "W_ptr", "b_ptr", "x_ptr", "r_ptr", "g_ptr", "sums_ptr")}
    decode.update(rows_ptr="*i64", cols_ptr="*i64", n="i32", B="i32", d="i32", scale="fp64")
    for d in (1024, 4096):
        build(D._decode_residual_kernel, decode,
              {"STEPS": 18, "BLOCK_R": 1, "BLOCK_E": max(1, 4096 // d), "BLOCK_D": d})
    build(S._code_at_kernel, {"x_ptr": w, "idx_ptr": "*i64", "rows_ptr": "*i64", "cols_ptr": "*i64",
                              "values_ptr": w, "n": "i32", "h": "i32"}, {"BLOCK": 1024})
    build(C._count_kernel, {"cols_ptr": "*i64", "values_ptr": w, "counts_ptr": "*i32", "n": "i32"}, {"BLOCK": 1024})
    build(R._aux_residual_kernel, {"e_ptr": w, "res_ptr": w, "on_ptr": "*i1", "ss_ptr": w, "n": "i32",
                                   "scale": "fp64"}, {"BLOCK": 4096})
    build(T._min_positive_kernel, {"values_ptr": w, "out_ptr": "*i32" if w == "*fp32" else "*i64", "n": "i32"},
          {"BLOCK": 1024})
    build(T._running_mean_kernel, {"buf_ptr": w, "m_ptr": w, "new_ptr": w, "mean_ptr": w, "window": "i32",
                                   "slot": "i32"}, {"CHUNK": 1024})
    build(GT._gate_kernel, {"p_ptr": w, "a_ptr": w, "out_ptr": w, "parts_ptr": w, "B": "i32", "n": "i32"},
          {"BLOCK_B": 64, "BLOCK_C": 64})
    rows = {name: w for name in ("x_ptr", "b_ptr", "s_ptr", "c_ptr", "mean_ptr", "scale_ptr")}
    for x in ("*fp32", "*bf16"):
        common = {"x_ptr": x, "out_ptr": "*i64", "total": "i64", "n": "i32", "h": "i32", "w": "i32"}
        for per_row in (True, False):
            build(S._subgroup_keys_kernel, {**common, "top_ptr": "*i64"}, {"per_row": per_row, "G": 16, "S": 4, "BLOCK": 128})
            build(S._subgroup_entry_keys_kernel, {**common, "top_ptr": "*i64"}, {"per_row": per_row, "S": 4, "BLOCK": 128})
    rows.update(B="i32", d="i32", eps="fp64")
    build(Z._standardize_kernel, rows, {"BLOCK_R": 1, "BLOCK_D": 1024})
build(P._slots_kernel, {"crow_ptr": "*i64", "first_ptr": "*i64", "multi_first_ptr": "*i64",
                        "slot_latent_ptr": "*i64", "h": "i32", "n_slots": "i32", "part": "i32"}, {"CHUNK": 1024})
build(C._update_kernel, {"counts_ptr": "*i32", "since_ptr": "*i64", "new_ptr": "*i64", "dead_ptr": "*i1",
                         "totals_ptr": "*fp32", "h": "i32", "B": "i32", "threshold": "i32"}, {"CHUNK": 1024})
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels compile and run in the tests above")
def test_fused_kernels_compile_to_gpu_code_for_an_h200_class_target():
    """The interpreter runs the kernels' Python; this compiles each for sm_90 (as a GPU
    would at first use), so a type error only the compiler sees fails here too, and so does a
    float32 division or square root that the GPU would approximate (the interpreter's are
    correctly rounded, so only the compiled code shows it)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]


def test_a_kernel_that_fails_to_compile_turns_the_kernels_off_with_a_warning_and_the_composed_result(monkeypatch):
    from sae_ref.backends import _triton, _triton_select

    def broken(*args, **kwargs):
        raise RuntimeError("no such instruction on this GPU")

    monkeypatch.setattr(_triton_select, "group_keys", broken)
    monkeypatch.setattr(_triton, "FAILURE", None)
    x = torch.randn(4, 64)
    with pytest.warns(RuntimeWarning, match="group_keys: RuntimeError: no such instruction"):
        got = _fused("group_keys", x, 8, per_row=False)
    assert torch.equal(got, _composed("group_keys", x, 8, per_row=False))
    with sync_free(True), triton_kernels(True):
        assert not _triton.usable(x)  # off for the process from then on
