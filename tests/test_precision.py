"""The encoder product's reduced precisions (``SAEConfig.precision``, ``TrainConfig.matmul_precision``).

"bf16" rounds the product's inputs to bfloat16 and keeps float32 sums and pre-activations;
"tf32" uses a CUDA GPU's TensorFloat-32 units and is the float32 product elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sae_ref.sae import SAEConfig, _pre, forward, init_params
from sae_ref.train import TrainConfig, init_state, step
from sae_ref.validation.oracles import assert_close


def _inputs(backend, d=24, h=40, B=16):
    params = init_params(d, h, xp=backend.xp, device=backend.device, seed=3)
    x = backend.asarray(np.random.default_rng(1).standard_normal((B, d)).astype(np.float32))
    return params, x


def _bf16(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (to nearest, ties to even), as float64."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch.bfloat16).double().numpy()


def test_bf16_pre_activations_are_the_float32_sums_of_bfloat16_rounded_inputs(backend):
    """Invariant: with precision "bf16" (torch), the pre-activations equal the exact product
    of the bfloat16-rounded (x - b_dec) and W_enc plus b_enc, to float32 summation error, in
    float32; other backends refuse "bf16" with an error naming it."""
    params, x = _inputs(backend)
    if not backend.name.startswith("torch"):
        with pytest.raises(ValueError, match="'bf16' needs torch"):
            _pre(backend.xp, params, x, precision="bf16")
        return
    pre, _ = _pre(backend.xp, params, x, precision="bf16")
    assert pre.dtype == torch.float32
    x_c = backend.numpy(x - params.b_dec)
    want = _bf16(x_c) @ _bf16(backend.numpy(params.W_enc)) + backend.numpy(params.b_enc)
    assert_close(backend.numpy(pre).astype(np.float64), want, rtol=1e-5, atol=1e-5)
    exact = backend.numpy(_pre(backend.xp, params, x)[0])
    assert np.max(np.abs(backend.numpy(pre) - exact)) > 0  # the rounding shows


def test_tf32_pre_activations_are_the_float32_product_off_cuda_and_close_on_it(backend):
    """Invariant: precision "tf32" gives the float32 pre-activations bit for bit off a CUDA
    device, and within TF32's rounding (10-bit mantissas) on one."""
    params, x = _inputs(backend)
    tf32 = backend.numpy(_pre(backend.xp, params, x, precision="tf32")[0])
    exact = backend.numpy(_pre(backend.xp, params, x)[0])
    if backend.name in ("torch-cuda", "cupy"):
        assert_close(tf32, exact, rtol=0, atol=5e-3 * np.max(np.abs(exact)))
    else:
        np.testing.assert_array_equal(tf32, exact)


def test_bf16_training_step_keeps_float32_state_and_tracks_the_highest_precision_step():
    """Invariant: a torch training step with matmul_precision "bf16" leaves every parameter
    and moment in float32 and its loss within bfloat16's rounding of the full-precision step's."""
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((128, 32)).astype(np.float32))
    losses = {}
    for p in ("highest", "bf16"):
        state = init_state(TrainConfig(h=128, k=4, matmul_precision=p), x)
        state, m = step(state, x)
        losses[p] = float(m["loss"])
        assert all(a.dtype == torch.float32 for a in state.params.arrays().values())
        assert all(a.dtype == torch.float32 for a in state.opt.m.arrays().values())
    assert losses["bf16"] != losses["highest"]
    assert abs(losses["bf16"] - losses["highest"]) < 0.05 * losses["highest"]


def test_unknown_or_unsupported_precision_is_refused_naming_the_argument(backend):
    """Invariant: a precision outside highest/tf32/bf16 is refused by both configs, and bf16
    on a backend without bfloat16 by init_state, each naming the argument."""
    with pytest.raises(ValueError, match="precision"):
        SAEConfig("batchtopk", k=2, precision="fp8")
    with pytest.raises(ValueError, match="matmul_precision"):
        TrainConfig(h=8, k=2, matmul_precision="half")
    _, x = _inputs(backend)
    config = TrainConfig(h=8, k=2, matmul_precision="bf16")
    if backend.name.startswith("torch"):
        assert init_state(config, x).config.matmul_precision == "bf16"
    else:
        with pytest.raises(ValueError, match="config.matmul_precision.*needs torch"):
            init_state(config, x)


def test_forward_with_bf16_selects_from_the_rounded_product(backend):
    """Invariant: forward() with precision "bf16" (torch) encodes from the bf16 product's
    pre-activations: its code's values are entries of those pre-activations."""
    if not backend.name.startswith("torch"):
        pytest.skip("bf16 is a torch precision")
    params, x = _inputs(backend)
    config = SAEConfig("batchtopk", k=3, precision="bf16")
    fwd = forward(params, x, config)
    pre = backend.numpy(_pre(backend.xp, params, x, precision="bf16")[0])
    code = fwd.code
    np.testing.assert_array_equal(backend.numpy(code.values),
                                  pre[backend.numpy(code.rows), backend.numpy(code.cols)])


@pytest.mark.parametrize("sync", [False, True], ids=["cpu_block", "gpu_block"])
def test_bf16_auxk_block_reconstructs_from_bfloat16_rounded_factors(backend, sync):
    """Invariant: training's AuxK on its dense block (the dead columns' block on the CPU path,
    the whole [B, h] block on the GPU path) runs its GEMMs at the step's precision: with
    "bf16" (torch) the loss equals the one computed in float64 from the bfloat16-rounded
    auxiliary activations and decoder rows, and the highest precision gives the float64
    loss of the unrounded factors."""
    if not backend.name.startswith("torch"):
        pytest.skip("bf16 is a torch precision")
    from sae_ref.auxk import _auxk
    from sae_ref.backends import sync_free

    rng = np.random.default_rng(4)
    B, h, d, k_aux = 16, 64, 8, 6
    pre = backend.asarray(rng.standard_normal((B, h)).astype(np.float32))
    dead_np = np.zeros(h, dtype=bool)
    dead_np[:12] = True
    dead = backend.asarray(dead_np)
    res = backend.asarray(rng.standard_normal((B, d)).astype(np.float32))
    W = backend.asarray(rng.standard_normal((h, d)).astype(np.float32))
    with sync_free(sync):
        got = {p: _auxk(backend.xp, pre, dead, res, W, k_aux, "authors", True, allow_block=True,
                        precision=p) for p in ("highest", "bf16")}
    a, _ = got["highest"].block
    cols = backend.numpy(a.cols)
    a_np = backend.numpy(a.values).astype(np.float64)
    W_np = backend.numpy(W)[cols].astype(np.float64)
    r = backend.numpy(res).astype(np.float64)
    for p, (aa, ww) in {"highest": (a_np, W_np), "bf16": (_bf16(a_np), _bf16(W_np))}.items():
        want = np.mean((aa @ ww - r) ** 2)
        assert_close(float(backend.numpy(got[p].value)), want, rtol=1e-5, atol=1e-7)
    assert float(backend.numpy(got["bf16"].value)) != float(backend.numpy(got["highest"].value))
