"""The validation checks run on sae-lens (skipped when sae-lens is not installed).

What they find, each pinned here with its minimal example (docs/differences-found.md says
more): the JumpReLU autograd functions, the BatchTopK threshold EMA, the explained variance
and the SAE classes (Standard, TopK with and without decoder-norm rescaling, BatchTopK,
JumpReLU, training and inference) agree with sae-ref; ties at the top-k cut follow
``torch.topk``; AuxK lets dead latents with negative pre-activations into the residual's
reconstruction; ``layer_norm`` maps outputs back with sigma where the input was divided by
sigma + 1e-5; a rescaled TopK SAE with one zero decoder row outputs NaN; Anthropic's
``jumprelu_ste_to_input`` passes a gradient to z through the kernel.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

sae_lens = pytest.importorskip("sae_lens")
torch = pytest.importorskip("torch")

from sae_lens.evals import ExplainedVarianceCalculator  # noqa: E402
from sae_lens.saes.batchtopk_sae import BatchTopK, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig  # noqa: E402
from sae_lens.saes.jumprelu_sae import (  # noqa: E402
    JumpReLU, JumpReLUSAE, JumpReLUSAEConfig, JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, Step,
)
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig  # noqa: E402
from sae_lens.saes.topk_sae import TopK, TopKSAE, TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig  # noqa: E402

from sae_ref.validation import (  # noqa: E402
    check_auxk, check_batch_topk, check_fvu, check_jumprelu, check_sae, check_theta_estimator, check_topk,
)
from sae_ref.validation.adapters import torch_step_vjp, torch_vjp  # noqa: E402
from sae_ref.validation.checks_auxk import ref_auxk  # noqa: E402
from sae_ref.validation.cli import main as validate_main  # noqa: E402

N = 25
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
TIE_DEPENDENT = {"ties_to_lower_column", "ties_to_lower_flat_index", "one_row_is_topk", "matches_reference"}


def randomized(sae, seed=0):
    """The SAE with random parameters (positive thresholds), in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.05)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("b") else 1.0))
    return sae


# --- activations ------------------------------------------------------------------------------
def test_saelens_jumprelu_and_step_autograd_functions_agree_with_sae_ref():
    r = check_jumprelu(lambda z, t: JumpReLU.apply(z, t, 0.05, False),
                       vjp=torch_vjp(lambda z, p, bw: JumpReLU.apply(z, p, bw, False)),
                       step_vjp=torch_step_vjp(lambda z, p, bw: Step.apply(z, p, bw, False)),
                       xp=torch, max_examples=N)
    assert r.ok, str(r)


def test_saelens_ste_to_input_adds_the_kernel_term_to_the_gradient_on_z():
    """Anthropic's convention (jumprelu_ste_to_input=True) is not df/dz = H(z - theta)."""
    r = check_jumprelu(vjp=torch_vjp(lambda z, p, bw: JumpReLU.apply(z, p, bw, True)), max_examples=N)
    assert set(r.failed) == {"jumprelu.grad_pre_is_heaviside"}, str(r)


@pytest.mark.parametrize("check, fn", [
    (check_topk, lambda z, k: TopK(k)(z)),
    (check_batch_topk, lambda z, k: BatchTopK(k)(z)),
])
def test_saelens_top_k_selections_hold_every_invariant_but_the_tie_rule(check, fn):
    """Counts, batch-wide selection, row permutation, nesting in k: all hold. Only at exact
    ties does the choice (torch.topk's) differ from sae-ref's lower-index rule."""
    r = check(fn, xp=torch, max_examples=N)
    broken = {i.split(".", 1)[1] for i in r.failed}
    assert broken <= TIE_DEPENDENT, str(r)
    for invariant in r.failed:
        pre = r[invariant].example["pre"]
        assert np.unique(pre[pre > 0]).size < np.count_nonzero(pre > 0), "a difference without a tie"


def test_saelens_threshold_ema_is_the_saelens_ema_preset():
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=4, d_sae=8, k=2))

    def run(batches):
        sae.topk_threshold = torch.tensor(0.0, dtype=torch.double)
        out = []
        for b in batches:
            sae.update_topk_threshold(b)
            out.append(float(sae.topk_threshold))
        return out

    assert check_theta_estimator(run, kind="saelens_ema", xp=torch, max_examples=N).ok


def test_saelens_explained_variance_is_one_minus_the_pooled_fvu_about_the_mean():
    def fvu(x, x_hat):
        calc = ExplainedVarianceCalculator()
        calc.add_batch(sae_output=x_hat, hidden_acts=x)
        return 1.0 - calc.compute()

    for dtype in ("float32", "float64"):
        r = check_fvu(fvu, xp=torch, dtype=dtype, max_examples=N)
        assert r.ok, str(r)


# --- AuxK -------------------------------------------------------------------------------------
def saelens_auxk(pre, dead, residual, W_dec, b_dec, k_aux):
    """TopKTrainingSAE.calculate_topk_aux_loss, unscaled: coefficient 1 and its
    min(n_dead / k_aux, 1) factor divided out; its k_aux is d // 2."""
    d, h = residual.shape[1], pre.shape[1]
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=h, k=1, aux_loss_coefficient=1.0,
                                                rescale_acts_by_decoder_norm=False,
                                                dtype=str(pre.dtype).removeprefix("torch.")))
    with torch.no_grad():
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(b_dec)
    sae_out = torch.zeros_like(residual) + b_dec
    loss = sae.calculate_topk_aux_loss(sae_in=residual + sae_out, sae_out=sae_out, hidden_pre=pre,
                                       dead_neuron_mask=dead)
    n_dead = int(dead.sum())
    return float(loss) / (min(n_dead / (d // 2), 1.0) if n_dead else 1.0)


def test_saelens_auxk_lets_negative_pre_activations_of_dead_latents_in():
    """The residual is fitted with the top-k of z (not relu(z)) over dead latents: with fewer
    positive dead pre-activations than k_aux, negative ones enter the reconstruction."""
    r = check_auxk(saelens_auxk, convention="sample", k_aux=lambda d, h: d // 2, xp=torch, max_examples=N)
    assert "auxk.dead_latents_enter_through_relu" in r.failed, str(r)
    for ok in ("auxk.excludes_b_dec", "auxk.zero_without_dead_latents", "auxk.ignores_live_latents"):
        assert r[ok].status == "passed", str(r)
    # the minimal example, by hand: one dead latent at z = -0.5, a zero residual
    ex = {"pre": np.array([[-0.5]], np.float32), "dead": np.array([True]), "residual": np.zeros((1, 2), np.float32),
          "W_dec": np.array([[1.0, 0.0]], np.float32), "b_dec": np.zeros(2, np.float32), "k_aux": 1}
    got = saelens_auxk(*(torch.as_tensor(ex[n]) for n in ("pre", "dead", "residual", "W_dec", "b_dec")), 1)
    assert got == pytest.approx(0.25) and ref_auxk(ex, "sample") == 0.0


# --- SAE modules end to end -------------------------------------------------------------------
D, H = 6, 16
MODULES = {
    "standard": lambda: StandardSAE(StandardSAEConfig(d_in=D, d_sae=H)),
    "standard, b_dec not applied to the input": lambda: StandardSAE(
        StandardSAEConfig(d_in=D, d_sae=H, apply_b_dec_to_input=False)),
    "topk": lambda: TopKSAE(TopKSAEConfig(d_in=D, d_sae=H, k=3)),
    "topk, rescaled by decoder norms": lambda: TopKSAE(
        TopKSAEConfig(d_in=D, d_sae=H, k=3, rescale_acts_by_decoder_norm=True)),
    "topk training": lambda: TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=H, k=3)),
    "batchtopk training": lambda: BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D, d_sae=H, k=2)),
    "jumprelu": lambda: JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=H)),
    "jumprelu training": lambda: JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=D, d_sae=H, jumprelu_bandwidth=0.5)),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_saelens_modules_match_sae_ref_end_to_end(name):
    """encode, decode, forward and every autograd gradient (the JumpReLU threshold's
    pseudo-gradient included) agree with sae-ref on the module's parameters."""
    r = check_sae(randomized(MODULES[name]()), max_examples=15)
    assert r.ok, str(r)


def test_saelens_layer_norm_maps_back_with_sigma_not_sigma_plus_eps():
    """Inputs are divided by std + 1e-5 but outputs multiplied by std (as in the BatchTopK
    authors' code); sae-ref's exact inverse multiplies by std + 1e-5."""
    sae = randomized(StandardSAE(StandardSAEConfig(d_in=D, d_sae=H, normalize_activations="layer_norm")))
    r = check_sae(sae, max_examples=15)
    assert "sae.forward_matches_reference" in r.failed and r["sae.encode_matches_reference"].status == "passed"
    x = torch.randn(3, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s64 = sae.to(torch.float64)
    with torch.no_grad():
        mu, sd = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
        x_hat_std = s64.encode(x) @ s64.W_dec + s64.b_dec
        out = s64(x)
    torch.testing.assert_close(out, x_hat_std * sd + mu)
    assert not torch.allclose(out, x_hat_std * (sd + 1e-5) + mu, rtol=0, atol=1e-9)


def test_saelens_rescaled_topk_with_a_zero_decoder_row_outputs_nan():
    """act_times_W_dec multiplies the dense activations by 1 / |W_dec_j|: one zero row makes
    0 * inf = NaN in every output."""
    sae = TopKSAE(TopKSAEConfig(d_in=2, d_sae=3, k=1, rescale_acts_by_decoder_norm=True))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    with torch.no_grad():
        assert torch.isnan(sae(torch.tensor([[1.0, 0.5]]))).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = check_sae(sae, max_examples=5)
    assert "sae.forward_matches_reference" in r.failed
    assert np.isnan(r["sae.forward_matches_reference"].got).all()


# --- saved files through the command line -----------------------------------------------------
def test_cli_checks_saelens_inference_files_against_sae_ref_reading_them(tmp_path):
    """BatchTopK saved as JumpReLU with its EMA threshold, and a rescaled TopK saved with the
    norms folded: the module sae-lens loads and sae-ref's reading of the files are one
    function, and that function matches sae-ref."""
    btk = randomized(BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D, d_sae=H, k=2)))
    for i in range(20):
        btk.update_topk_threshold(btk.encode(torch.randn(16, D, generator=torch.Generator().manual_seed(i))))
    btk.save_inference_model(tmp_path / "btk")
    randomized(TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=H, k=3))).save_inference_model(tmp_path / "tk")
    for d in ("btk", "tk"):
        out = tmp_path / f"{d}.json"
        assert validate_main([str(tmp_path / d), "--max-examples", "10", "--json", str(out), "--quiet"]) == 0
        ids = {o["id"]: o["status"] for o in json.loads(out.read_text())["outcomes"]}
        assert ids["files.same_function"] == "passed" and ids["sae.gradients_match_reference"] == "passed"
