"""The training step: backends agree, the optimiser matches PyTorch's, the state round-trips,
the decoder constraint and the non-finite policy hold, theta estimators behave as documented."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from sae_ref import optim as O
from sae_ref import theta as T
from sae_ref.arrays import resolve, to_numpy
from sae_ref.sae import SAEParams, encode
from sae_ref.train import (ARCHS, PRESETS, TrainConfig, inference_config, init_state, preset,
                           state_arrays, state_from_arrays, step)
from sae_ref.validation.oracles import assert_close

torch = pytest.importorskip("torch")


def _planted(n, d=48, n_true=192, k=4, seed=0):
    """Rows ``c @ atoms`` with ~k of n_true unit atoms active (exponential magnitudes)."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((n_true, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    rng = np.random.default_rng(seed + 1)
    c = (rng.random((n, n_true)) < k / n_true) * rng.exponential(1.0, size=(n, n_true))
    return c @ atoms, atoms


X_ALL, ATOMS = _planted(256 * 100)  # 64 training batches, 20 for estimating, 16 held out
N_TRAIN_BATCHES = 64


def _small(**kw):
    base = dict(arch="batchtopk", h=384, k=4, k_aux=64, lr=3e-3, dead_after=5, steps=50)
    base.update(kw)
    return TrainConfig(**base)


def _run(backend, config, n_steps, dtype="float32", batch=256):
    xp, dev = resolve(backend)
    dt = getattr(xp, dtype)
    n = min(n_steps, N_TRAIN_BATCHES)
    batches = [xp.asarray(X_ALL[i * batch:(i + 1) * batch], dtype=dt, device=dev) for i in range(n)]
    state = init_state(config, batches[0])
    trace = []
    for i in range(n_steps):
        state, m = step(state, batches[i % n], check=False)
        trace.append({k: float(v) for k, v in m.items()})
    return state, trace


# --- backends agree ----------------------------------------------------------------------------
def test_numpy_and_torch_follow_the_same_trajectory_for_50_steps():
    """Same seed, same batches, float64: parameters and losses agree to 1e-9 after 50 steps
    and L0 matches at every step (the two backends run the same algorithm)."""
    config = _small()
    s_np, tr_np = _run("numpy", config, 50, dtype="float64")
    s_t, tr_t = _run("torch", config, 50, dtype="float64")
    for name, a in s_np.params.arrays().items():
        assert_close(to_numpy(getattr(s_t.params, name)), to_numpy(a), rtol=1e-9, atol=1e-10)
    for a, b in zip(tr_np, tr_t, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-9 * max(1.0, abs(a["loss"]))
        assert a["l0"] == b["l0"]
    # the run really moved (a test that the comparison is not between two untrained SAEs)
    assert tr_np[-1]["mse"] < 0.8 * tr_np[0]["mse"]


def test_numpy_and_torch_agree_in_float32_until_the_first_near_tie():
    """float32: the backends round differently (BLAS blocking, fused kernels), and once a
    selection meets two pre-activations closer than that rounding, the runs part (training
    is chaotic; the float64 test above shows the algorithm is the same). The first 10 steps
    of this data have no such tie: parameters agree at float32 tolerance."""
    config = _small(steps=10)
    s_np, tr_np = _run("numpy", config, 10)
    s_t, tr_t = _run("torch", config, 10)
    for name, a in s_np.params.arrays().items():
        assert_close(to_numpy(getattr(s_t.params, name)), to_numpy(a), rtol=1e-4, atol=1e-4)
    for a, b in zip(tr_np, tr_t, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * max(1.0, abs(a["loss"]))


def test_strict_backend_follows_the_numpy_trajectory():
    """array-api-strict (the pure-standard fallbacks) trains the same SAE as NumPy."""
    config = _small(steps=15)
    s_np, _ = _run("numpy", config, 15, dtype="float64")
    s_st, _ = _run("strict", config, 15, dtype="float64")
    for name, a in s_np.params.arrays().items():
        assert_close(to_numpy(getattr(s_st.params, name)), to_numpy(a), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_trains_on_every_backend(arch, backend):
    """A few steps of each architecture on each backend: finite, L0 > 0, loss goes down."""
    extra = {"k": None, "sparsity_coeff": 0.01} if arch in ("jumprelu", "relu-l1", "sqrt-l1") else {}
    if arch == "jumprelu":
        extra.update(theta_init=0.05, bandwidth=0.05)
    config = _small(arch=arch, steps=20, **extra)
    x = backend.asarray(X_ALL[:128], dtype="float32")
    state = init_state(config, x)
    first = None
    for _ in range(20):
        state, m = step(state, x, check=False)
        first = float(m["mse"]) if first is None else first
    assert math.isfinite(float(m["loss"])) and float(m["l0"]) > 0
    assert float(m["mse"]) < first
    if arch == "jumprelu":
        assert bool(backend.xp.all(state.params.theta > 0))


@pytest.mark.parametrize("k_aux", [8, 1024], ids=["top-k'-of-dead", "every-dead"])
def test_auxk_on_the_dead_columns_block_equals_auxk_on_the_entries(backend, k_aux, monkeypatch):
    """Invariant: training's AuxK on the dense block of the dead columns (GEMMs) gives the
    parameters and losses of AuxK on the sparse entries, when each row keeps some of the dead
    latents and when it keeps all of them."""
    from sae_ref import auxk as K

    config = _small(steps=6, k_aux=k_aux, dead_after=1)
    x = [backend.asarray(X_ALL[i * 128:(i + 1) * 128], dtype="float64") for i in range(2)]
    runs = []
    for fill in (0.0, math.inf):  # always the block, never the block
        monkeypatch.setattr(K, "BLOCK_MIN_FILL", fill)
        state, trace = init_state(config, x[0]), []
        for i in range(6):
            state, m = step(state, x[i % 2], check=False)
            trace.append((float(m["aux"]), float(m["dead_fraction"])))
        runs.append((state, trace))
    (block, t_block), (entries, t_entries) = runs
    assert max(dead for _, dead in t_block) > 0.1  # AuxK had dead latents to work on
    np.testing.assert_allclose(t_block, t_entries, rtol=1e-9)
    for name, a in entries.params.arrays().items():
        assert_close(to_numpy(getattr(block.params, name)), to_numpy(a), rtol=1e-9, atol=1e-12)


# --- the optimiser -----------------------------------------------------------------------------
def _params64(rng, d=5, h=7, theta=False):
    arr = lambda *s: rng.standard_normal(s)
    return SAEParams(arr(d, h), arr(h), arr(h, d), arr(d), np.abs(arr(h)) if theta else None)


def test_adam_update_equals_torch_adam_over_several_steps():
    """sae_ref's Adam and torch.optim.Adam take the same steps (float64), frozen params too."""
    rng = np.random.default_rng(3)
    p = _params64(rng)
    leaves = {n: torch.tensor(a, requires_grad=True) for n, a in p.arrays().items()}
    opt = torch.optim.Adam([leaves[n] for n in ("W_enc", "W_dec", "b_dec")], lr=0.01, betas=(0.9, 0.99))
    state = O.adam_init(p)
    for t in range(1, 6):
        g = _params64(rng)
        for n in ("W_enc", "W_dec", "b_dec"):
            leaves[n].grad = torch.tensor(getattr(g, n))
        opt.step()
        p, state = O.adam_update(p, g, state, lr=0.01, t=t, betas=(0.9, 0.99), frozen=("b_enc",))
    for n, a in p.arrays().items():
        assert_close(a, leaves[n].detach().numpy(), rtol=1e-12, atol=1e-14)


def test_clip_by_global_norm_equals_torch_clip_grad_norm():
    """Clipping by the global norm of all gradients returns the norm and the clipped gradients of
    torch.nn.utils.clip_grad_norm_ to 1e-12, whether the clip engages or not."""
    rng = np.random.default_rng(4)
    g = _params64(rng)
    for max_norm in (0.5, 1e6):
        ts = [torch.tensor(a) for a in g.arrays().values()]
        for t in ts:
            t.grad = t.clone()
        norm_t = torch.nn.utils.clip_grad_norm_(ts, max_norm)
        clipped, norm = O.clip_by_global_norm(g, max_norm)
        assert math.isclose(float(norm), float(norm_t), rel_tol=1e-12)
        for a, t in zip(clipped.arrays().values(), ts, strict=True):
            assert_close(a, t.grad.numpy(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kw", [{}, {"max_grad_norm": 1e9, "clip_first": True}, {"freeze_b_enc": True},
                                {"decoder_order": "none"},
                                {"arch": "jumprelu", "log_theta": True}],
                         ids=["unclipped", "clipped", "frozen-b_enc", "no-constraint", "log-theta"])
def test_step_grad_norm_metric_is_the_global_norm_of_the_step_gradients(backend, kw):
    """The step's ``grad_norm`` is the global norm of the pass's gradients, whether the update
    takes it before Adam (clipping the raw gradients, log-theta) or from Adam's own passes over
    the gradients."""
    from sae_ref.train import _grads, _sparsity_coeff

    config = _small(**kw)
    x = backend.asarray(X_ALL[:256], dtype="float64")
    state = init_state(config, x)
    for _ in range(2):
        state, _ = step(state, x, check=False)
    xp = backend.xp
    out = _grads(xp, config, state.params, state.since_fired, state.k_aux, x, _sparsity_coeff(config, state.t + 1))
    grads = out.grads
    if config.freeze_b_enc:
        grads = replace(grads, b_enc=xp.zeros_like(grads.b_enc))
    want = float(O.global_norm(grads))
    _, m = step(state, x, check=False)
    assert math.isclose(float(m["grad_norm"]), want, rel_tol=1e-12)


@pytest.mark.parametrize("kw", [{}, {"arch": "topk", "aux_convention": None}, {"arch": "jumprelu", "sparsity_coeff": 0.1},
                                {"arch": "relu-l1", "sparsity_coeff": 0.1}, {"arch": "top-afa", "afa_coeff": 0.1}],
                         ids=["batchtopk-auxk", "topk-no-auxk", "jumprelu", "relu-l1", "top-afa"])
def test_step_loss_is_the_sum_of_its_terms_bit_for_bit(backend, kw):
    """``loss`` is ``mse + sparsity + aux + afa`` to the bit, absent terms (exact zeros,
    which the step leaves out of the sum) included."""
    config = _small(**kw)
    x = backend.asarray(X_ALL[:256], dtype="float32")
    state = init_state(config, x)
    for _ in range(3):
        state, m = step(state, x, check=False)
        total = m["mse"] + m["sparsity"] + m["aux"] + m["afa"]
        assert backend.numpy(m["loss"]).tobytes() == backend.numpy(total).tobytes()


# --- state, constraint, non-finite batches -----------------------------------------------------
def test_state_round_trips_through_arrays_bit_for_bit(backend):
    """A training state saved as plain arrays and metadata and read back is the same state, bit for
    bit: the same arrays, the same metadata, and the same next step."""
    config = _small(steps=3)
    x = backend.asarray(X_ALL[:64], dtype="float32")
    state = init_state(config, x)
    for _ in range(3):
        state, _ = step(state, x, check=False)
    arrays, meta = state_arrays(state)
    back = state_from_arrays(arrays, meta, xp=backend.xp, device=backend.device)
    arrays2, meta2 = state_arrays(back)
    assert meta2 == meta
    assert arrays2.keys() == arrays.keys()
    for k in arrays:
        np.testing.assert_array_equal(arrays2[k], arrays[k])
    s1, _ = step(state, x, check=False)
    s2, _ = step(back, x, check=False)
    np.testing.assert_array_equal(to_numpy(s1.params.W_enc), to_numpy(s2.params.W_enc))


@pytest.mark.parametrize("order", ["before", "after"])
def test_decoder_rows_are_unit_norm_where_the_order_promises(order):
    """"after": unit rows after every step; "before": unit rows entering every step (the
    rows the forward pass used are renormalised before the optimiser moves them)."""
    config = _small(decoder_order=order, steps=5)
    xp, dev = resolve("numpy")
    x = xp.asarray(X_ALL[:128], dtype=xp.float64)
    state = init_state(config, x)
    for _ in range(5):
        state, _ = step(state, x, check=False)
        norms = np.linalg.norm(to_numpy(state.params.W_dec), axis=1)
        if order == "after":
            np.testing.assert_allclose(norms, 1.0, atol=1e-12)
        else:
            assert np.max(np.abs(norms - 1)) < 0.05  # moved off the sphere by one Adam step only
            assert np.max(np.abs(norms - 1)) > 0


def test_nonfinite_batch_is_rejected_or_skipped_and_counted(backend):
    """A batch holding NaN or infinity is refused by default; with nonfinite='skip' the step leaves
    the parameters and the step count unchanged and counts the skipped batch."""
    x = np.array(X_ALL[:32])
    x[3, 5] = np.nan
    bad = backend.asarray(x, dtype="float32")
    state = init_state(_small(steps=5), backend.asarray(X_ALL[:32], dtype="float32"))
    with pytest.raises(ValueError, match="batch.*NaN or inf"):
        step(state, bad)
    skip = init_state(_small(steps=5, nonfinite="skip"), backend.asarray(X_ALL[:32], dtype="float32"))
    after, metrics = step(skip, bad)
    assert after.skipped == 1 and after.t == 0 and metrics["skipped"] == 1
    np.testing.assert_array_equal(to_numpy(after.params.W_enc), to_numpy(skip.params.W_enc))


def test_step_rejects_a_batch_of_the_wrong_width_or_dtype():
    """A batch whose width or dtype differs from the state's is refused with an error naming the
    batch."""
    state = init_state(_small(), np.zeros((4, 48), dtype=np.float32) + 1)
    with pytest.raises(ValueError, match="batch"):
        step(state, np.ones((4, 47), dtype=np.float32))
    with pytest.raises((TypeError, ValueError), match="batch"):
        step(state, np.ones((4, 48), dtype=np.float64))


def test_each_preset_is_one_name_and_overrides_apply():
    """Every preset is one name whose keyword overrides apply; 'authors' and 'dictionary_learning'
    set their sources' published conventions (AuxK, dead-latent window and unit, decoder order,
    learning rate, loss unit); an unknown name or k > h is refused."""
    for name in PRESETS:
        cfg = preset(name, h=64, k=4)
        assert cfg.preset == name and cfg.h == 64
    a = preset("authors", h=64, k=4)
    assert (a.freeze_b_enc, a.k_aux, a.aux_coeff, a.dead_after, a.dead_unit, a.decoder_order,
            a.lr, a.betas, a.standardize, a.loss_unit) == (
        True, 512, 1 / 32, 5, "batches", "before", 3e-4, (0.9, 0.99), True, "element")
    dl = preset("dictionary_learning", h=2**16, k=4)
    assert (dl.aux_convention, dl.dead_after, dl.dead_unit, dl.decoder_order) == (
        "normalized", 10_000_000, "tokens", "after")
    assert math.isclose(dl.learning_rate(), 1e-4)
    with pytest.raises(ValueError, match="name"):
        preset("no-such-preset")
    with pytest.raises(ValueError, match="k"):
        TrainConfig(arch="topk", h=8, k=9)


def test_authors_preset_never_moves_b_enc():
    """Under the 'authors' preset b_enc stays exactly zero through training, as in the authors'
    code, where it is never read."""
    state = init_state(preset("authors", h=384, k=4, k_aux=64), np.asarray(X_ALL[:128], dtype=np.float32))
    for i in range(5):
        state, _ = step(state, np.asarray(X_ALL[i * 128:(i + 1) * 128], dtype=np.float32))
    assert not np.any(to_numpy(state.params.b_enc))


# --- theta -------------------------------------------------------------------------------------
def _trained_batchtopk(estimator, steps):
    config = _small(theta_estimator=estimator, steps=steps, theta_window=100)
    s, _ = _run("numpy", config, steps)
    return s


def _heldout_l0(state, theta_state=None):
    x = np.asarray(X_ALL[-4096:], dtype=np.float32)
    if theta_state is not None:
        state = replace(state, theta=theta_state)
    return encode(state.params, x, inference_config(state)).nnz / x.shape[0]


@pytest.fixture(scope="module")
def frozen_sae():
    """A BatchTopK SAE (k = 4) trained for 200 steps, then frozen: a fixed distribution of
    activations on which to run the estimators."""
    return _trained_batchtopk("running_mean", 200)


def _estimate(state, kind, n_batches):
    est = T.theta_init(kind, xp=np, dtype=np.float32, window=1000)
    cfg = state.config.sae_config()
    for i in range(n_batches):
        x = np.asarray(X_ALL[(64 + i % 20) * 256:(65 + i % 20) * 256], dtype=np.float32)
        est = T.theta_update(est, T.batch_min_kept(encode(state.params, x, cfg).values))
    return est


def test_running_mean_theta_gives_heldout_inference_l0_within_5_percent_of_k(frozen_sae):
    """On a fixed distribution, the mean of the per-batch smallest kept value (20 batches of
    256) gives a held-out inference L0 within 5% of k = 4."""
    l0 = _heldout_l0(frozen_sae, _estimate(frozen_sae, "running_mean", 20))
    assert abs(l0 - 4) <= 0.05 * 4, l0


def test_saelens_ema_from_zero_is_biased_low_on_a_short_run(frozen_sae):
    """The documented failure: an EMA with rate 0.01 from 0 holds 1 - 0.99^60 = 45% of the
    typical minimum after 60 batches, so inference keeps far more than k latents per sample;
    the running mean on the same batches does not share it."""
    ema = _estimate(frozen_sae, "saelens_ema", 60)
    mean = _estimate(frozen_sae, "running_mean", 60)
    ratio = float(T.theta_value(ema)) / float(T.theta_value(mean))
    assert ratio == pytest.approx(1 - 0.99**60, rel=0.05)
    assert _heldout_l0(frozen_sae, ema) > 2 * 4 > 1.05 * _heldout_l0(frozen_sae, mean)


def test_theta_estimated_during_training_gives_inference_l0_near_k():
    """The estimate kept by the training loop itself (window 100 steps of a 300-step run; the
    SAE still moves, so the tolerance is wider): held-out inference L0 within 15% of k."""
    l0 = _heldout_l0(_trained_batchtopk("running_mean", 300))
    assert abs(l0 - 4) <= 0.15 * 4, l0


def test_dictionary_learning_theta_keeps_every_positive_before_its_start_step():
    """Before its start step dictionary_learning's theta stays at -1, so inference keeps every
    positive pre-activation."""
    state = _trained_batchtopk("dictionary_learning", 20)
    assert float(T.theta_value(state.theta)) == -1.0
    x = np.asarray(X_ALL[-512:], dtype=np.float32)
    xs = (x - x.mean(1, keepdims=True)) / (x.std(1, ddof=1, keepdims=True) + 1e-5)  # standardised
    pre = (xs - to_numpy(state.params.b_dec)) @ to_numpy(state.params.W_enc) + to_numpy(state.params.b_enc)
    assert encode(state.params, x, inference_config(state)).nnz == int(np.count_nonzero(pre > 0))


def test_theta_estimators_follow_their_update_rules():
    """Each theta estimator follows its update rule on a known sequence of batch minima: the running
    mean of the last window, SAELens's EMA with decay 0.99 from 0, dictionary_learning's EMA with
    rate 0.001 from its start step."""
    ms = [2.0, 4.0, 8.0, 16.0]
    s = {k: T.theta_init(k, xp=np, dtype=np.float64, window=3, start=1) for k in T.KINDS}
    for i, m in enumerate(ms, 1):
        s = {k: T.theta_update(v, np.asarray(m), step=i) for k, v in s.items()}
    assert float(T.theta_value(s["running_mean"])) == pytest.approx((4 + 8 + 16) / 3)
    ema = 0.0
    for m in ms:
        ema = 0.99 * ema + 0.01 * m
    assert float(T.theta_value(s["saelens_ema"])) == pytest.approx(ema)
    # dictionary_learning, start 1: steps 1 and 2 (0-based 0, 1) wait, step 3 takes m, step 4 averages
    assert float(T.theta_value(s["dictionary_learning"])) == pytest.approx(0.999 * 8 + 0.001 * 16)


def test_theta_ignores_a_batch_with_no_positive_activation():
    """A batch in which no activation was kept leaves theta unchanged."""
    s = T.theta_init("running_mean", xp=np, dtype=np.float64, window=4)
    s = T.theta_update(s, np.asarray(3.0))
    s = T.theta_update(s, T.batch_min_kept(np.zeros((5,))))
    assert float(T.theta_value(s)) == 3.0
