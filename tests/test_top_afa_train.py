"""Training with top-AFA and the AFA loss against an independent re-implementation.

``AfaOracle`` is the top-AFA authors' training algorithm (Lee et al. 2025, their public code,
which extends the BatchTopK authors' ``train_sae``) written again in plain torch, float64,
dense, with autograd for every gradient and ``torch.optim.Adam`` / ``clip_grad_norm_`` for the
update; none of sae-ref's functions computes anything in it. Their ``TopAFASAE``:

- per-row standardisation, pre-activations ``relu((x - b_dec) @ W_enc)`` (no ``b_enc``);
- scores ``(a_i ||W_dec_i||)^2`` sorted descending, cumulative sums with the last one
  overwritten by 1e8, square roots, ``k = 1 + argmin |c_j - ||x - b_dec|| |``, keep the top k;
- loss: mean-over-elements MSE + AuxK (5 batches, 512, 1/32, residual not detached)
  + ``afa_coeff * mean_b (||f_b|| - ||x_b||)^2``;
- ``clip_grad_norm_(1e5)``, renormalise the decoder rows and project their gradient, Adam.

Options of the oracle cover sae-ref's consistent variant (``b_enc`` read and trained, AFA
target ``||x - b_dec||`` so its gradient reaches ``b_dec``, no sentinel, no clipping) and the
AFA loss on TopK. Each run compares every parameter and the step's losses after every step.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from sae_ref.arrays import to_numpy
from sae_ref.afa import top_afa
from sae_ref.sae import SAEConfig, _pre, encode, init_params
from sae_ref.train import TrainConfig, init_state, preset, step

torch = pytest.importorskip("torch")

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
RTOL, ATOL = 1e-9, 1e-12


def _leaf(a):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=True)


class AfaOracle:
    """One iteration of the authors' loop for a top-AFA (or TopK) SAE with the AFA loss."""

    def __init__(self, params: dict, *, afa_coeff: float, select: str = "top-afa", k: int = 0,
                 use_b_enc: bool = False, afa_target: str = "x", sentinel: bool = True,
                 max_grad_norm: float | None = 100_000.0, top_k_aux: int = 512,
                 n_batches_to_dead: int = 5, aux_penalty: float = 1 / 32):
        self.b_dec, self.b_enc = _leaf(params["b_dec"]), _leaf(params["b_enc"])
        self.W_enc, self.W_dec = _leaf(params["W_enc"]), _leaf(params["W_dec"])
        self.params = [self.b_dec, self.b_enc, self.W_enc, self.W_dec]
        self.afa_coeff, self.select, self.k = afa_coeff, select, k
        self.use_b_enc, self.afa_target, self.sentinel = use_b_enc, afa_target, sentinel
        self.max_grad_norm, self.top_k_aux = max_grad_norm, top_k_aux
        self.n_batches_to_dead, self.aux_penalty = n_batches_to_dead, aux_penalty
        self.not_active = torch.zeros(self.W_enc.shape[1], dtype=torch.float64)
        self.optimizer = torch.optim.Adam(self.params, lr=3e-4, betas=(0.9, 0.99))
        self.k_history: list[np.ndarray] = []
        self.dead_history: list[int] = []

    @staticmethod
    def standardise(x):
        x = x - x.mean(dim=-1, keepdim=True)
        return x / (x.std(dim=-1, keepdim=True) + 1e-5)

    def keep_mask(self, acts, x_cent):
        if self.select == "topk":
            idx = torch.topk(acts, self.k, dim=-1).indices
            return torch.zeros_like(acts, dtype=torch.bool).scatter(-1, idx, True)
        with torch.no_grad():  # the selection carries no gradient
            scores = (acts * self.W_dec.norm(dim=-1)) ** 2
            order = torch.argsort(scores, dim=-1, descending=True)
            csum = torch.cumsum(torch.gather(scores, -1, order), dim=-1)
            if self.sentinel:
                csum[:, -1] = 1e8
            target = x_cent.norm(dim=-1, keepdim=True)
            k = (csum.sqrt() - target).abs().argmin(dim=-1) + 1
            self.k_history.append(k.numpy().copy())
            rank = torch.arange(acts.shape[1])[None, :] < k[:, None]
            return torch.zeros_like(acts, dtype=torch.bool).scatter(-1, order, rank)

    def forward(self, x):
        x = self.standardise(x)
        x_cent = x - self.b_dec
        pre = x_cent @ self.W_enc + (self.b_enc if self.use_b_enc else 0.0)
        acts = torch.relu(pre)
        f = acts * self.keep_mask(acts, x_cent)
        x_rec = f @ self.W_dec + self.b_dec
        with torch.no_grad():
            self.not_active += (f.sum(0) == 0).double()
            self.not_active[f.sum(0) > 0] = 0
        l2 = (x_rec - x).pow(2).mean()
        aux = self.auxiliary(x, x_rec, acts)
        target = x_cent.norm(dim=-1) if self.afa_target == "x_minus_b_dec" else x.norm(dim=-1)
        afa = self.afa_coeff * (f.norm(dim=-1) - target).pow(2).mean()
        return l2 + aux + afa, l2, aux, afa

    def auxiliary(self, x, x_rec, acts):
        dead = self.not_active >= self.n_batches_to_dead
        self.dead_history.append(int(dead.sum()))
        if dead.sum() == 0:
            return torch.tensor(0.0, dtype=x.dtype)
        top = torch.topk(acts[:, dead], min(self.top_k_aux, int(dead.sum())), dim=-1)
        acts_aux = torch.zeros_like(acts[:, dead]).scatter(-1, top.indices, top.values)
        return self.aux_penalty * (acts_aux @ self.W_dec[dead] - (x - x_rec)).pow(2).mean()

    def train_step(self, batch: np.ndarray) -> dict:
        loss, l2, aux, afa = self.forward(torch.tensor(batch, dtype=torch.float64))
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        with torch.no_grad():
            W = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True)
            self.W_dec.grad -= (self.W_dec.grad * W).sum(-1, keepdim=True) * W
            self.W_dec.data = W
        if not self.use_b_enc:
            self.b_enc.grad = None  # never read: no gradient, Adam leaves it alone
        self.optimizer.step()
        self.optimizer.zero_grad()
        return {"loss": loss.item(), "mse": l2.item(), "aux": aux.item(), "afa": afa.item()}

    def numpy_params(self) -> dict:
        return {n: getattr(self, n).detach().numpy().copy() for n in PARAMS}


def cone_batches(n, B, d, seed, rank=2):
    """Rows near a convex cone of 2 directions: latents pointing away never fire (AuxK runs
    after 5 batches) and the row norms after standardisation vary (k varies)."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((rank, d))
    return [rng.uniform(0.2, 2.0, (B, rank)) @ A + 0.05 * rng.standard_normal((B, d)) for _ in range(n)]


def run_both(backend, config, batches, make_oracle):
    xs = [backend.asarray(b, dtype="float64") for b in batches]
    state = init_state(config, xs[0])
    oracle = make_oracle({n: to_numpy(getattr(state.params, n)) for n in PARAMS})
    l0s = []
    for t, (x, batch) in enumerate(zip(xs, batches, strict=True), start=1):
        state, metrics = step(state, x)
        want = oracle.train_step(batch)
        for name, expected in oracle.numpy_params().items():
            np.testing.assert_allclose(to_numpy(getattr(state.params, name)), expected, rtol=RTOL,
                                       atol=ATOL, err_msg=f"{name} after step {t} ({backend})")
        for name in ("loss", "mse", "aux", "afa"):
            np.testing.assert_allclose(float(to_numpy(metrics[name])), want[name], rtol=RTOL, atol=ATOL,
                                       err_msg=f"{name} at step {t} ({backend})")
        l0s.append(float(to_numpy(metrics["l0"])))
    return state, oracle, l0s


def test_afa_authors_preset_names_the_published_configuration():
    c = preset("afa-authors", h=64)
    assert (c.arch, c.afa_target, c.afa_rule, c.afa_sentinel) == ("top-afa", "x", "nearest", True)
    assert (c.freeze_b_enc, c.standardize, c.loss_unit, c.max_grad_norm, c.clip_first) == (
        True, True, "element", 1e5, True)
    assert c.afa_coeff == 1 / 32 and c.sae_config().activation == "top_afa"
    assert TrainConfig(arch="top-afa").afa_target == "x_minus_b_dec"


def test_afa_authors_preset_step_equals_published_top_afa_training(backend):
    """10 steps of preset("afa-authors") equal the authors' top-AFA loop step by step: the
    per-row k, the AFA loss against ||x||, AuxK once latents are dead for 5 batches."""
    d, h, B, n = 12, 48, 24, 10
    config = preset("afa-authors", h=h, steps=n, afa_coeff=0.05)
    state, oracle, l0s = run_both(backend, config, cone_batches(n, B, d, seed=0),
                                  lambda p: AfaOracle(p, afa_coeff=0.05))
    ks = np.concatenate(oracle.k_history)
    assert ks.min() < ks.max(), "k did not vary across rows"
    assert max(oracle.dead_history) > 0, "AuxK never ran"
    np.testing.assert_array_equal(to_numpy(state.params.b_enc), 0.0)


def test_consistent_afa_target_sends_its_gradient_to_b_dec(backend):
    """sae-ref's default for top-AFA: b_enc read and trained, AFA target ||x - b_dec|| (its
    gradient reaches b_dec), no sentinel, no clipping; equal to autograd of that loss."""
    d, h, B, n = 12, 48, 24, 6
    config = TrainConfig(arch="top-afa", h=h, k=None, steps=n, afa_coeff=0.1)
    batches = [b + 0.7 for b in cone_batches(n, B, d, seed=1)]
    run_both(backend, config, batches, lambda p: AfaOracle(
        p, afa_coeff=0.1, use_b_enc=True, afa_target="x_minus_b_dec", sentinel=False, max_grad_norm=None))


@pytest.mark.parametrize("target", ["x", "x_minus_b_dec"])
def test_afa_loss_on_topk_equals_autograd_for_each_target(target, all_backends):
    """The AFA loss added to a TopK SAE (as the authors' TopKSAE has it), both targets."""
    d, h, B, n, k = 12, 48, 24, 5, 3
    config = preset("authors", arch="topk", h=h, k=k, steps=n, afa_coeff=0.2, afa_target=target)
    numpy_backend = next(be for be in all_backends if be.name == "numpy")
    run_both(numpy_backend, config, cone_batches(n, B, d, seed=2), lambda p: AfaOracle(
        p, afa_coeff=0.2, select="topk", k=k, afa_target=target))


def test_top_afa_encode_selects_what_the_activation_does_on_every_backend(backend):
    """encode(..., "top_afa") = top_afa(pre, ||W_dec rows||, ||x - b_dec||) with the config's
    rule and sentinel; rows with different norms get different k."""
    rng = np.random.default_rng(3)
    d, h, B = 10, 40, 16
    p = init_params(d, h, xp=backend.xp, dtype=backend.dtype("float64"), device=backend.device, seed=1)
    x_np = rng.standard_normal((B, d)) * rng.uniform(0.2, 3.0, (B, 1))
    x = backend.asarray(x_np)
    for rule in ("nearest", "first_exceeding"):
        for sentinel in (False, True):
            cfg = SAEConfig("top_afa", afa_rule=rule, afa_sentinel=sentinel)
            got = encode(p, x, cfg)
            xp = backend.xp
            pre, _ = _pre(xp, p, x)  # the encoder's own product (a backend's GEMM, not `@`)
            want = top_afa(pre, xp.linalg.vector_norm(p.W_dec, axis=1),
                           xp.linalg.vector_norm(x - p.b_dec, axis=1), rule=rule, sentinel=sentinel)
            for a in ("rows", "cols", "values"):
                np.testing.assert_array_equal(to_numpy(getattr(got, a)), to_numpy(getattr(want, a)))
            l0 = np.bincount(to_numpy(got.rows), minlength=B)
            assert l0.min() < l0.max()


def test_top_afa_is_not_written_as_saelens_and_the_run_loads_from_its_checkpoint(tmp_path):
    from sae_ref.fit import load_run
    from sae_ref.io.saelens import save_saelens

    p = init_params(6, 12, xp=np, seed=0)
    with pytest.raises(NotImplementedError, match="top_afa"):
        save_saelens(tmp_path / "sae", p, SAEConfig("top_afa"))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "sae_ref.cli", "train", "--arch", "top-afa",
                        "--afa-coeff", "0.03", "--synthetic", "16,64,3", "--h", "48", "--steps", "6",
                        "--batch-size", "32", "--out", str(out), "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["arch"] == "top-afa" and summary["config"]["afa_coeff"] == 0.03
    assert "none" in summary["sae_export"] and not (out / "sae").exists()
    loaded = load_run(out)
    assert loaded.config.activation == "top_afa" and loaded.train_config.afa_coeff == 0.03
    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    code = encode(loaded.params, x, loaded.config)
    assert code.nnz > 0


def test_load_run_names_the_path_when_nothing_is_there(tmp_path):
    from sae_ref.fit import load_run

    with pytest.raises(FileNotFoundError, match="neither checkpoints"):
        load_run(tmp_path)
