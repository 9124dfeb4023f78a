"""The training presets against independent re-implementations of the sources' own code.

Each oracle below is the source's training algorithm written again in plain torch, float64,
dense, with autograd for every gradient and ``torch.optim.Adam`` / ``clip_grad_norm_`` /
``LambdaLR`` for the update -- none of sae-ref's functions computes anything in it. The
oracles start from sae-ref's initial parameters (the sources draw them with a different RNG)
and see the same float64 batches; after every step every parameter and the step's losses
must agree to rounding.

- ``AuthorsOracle``: the BatchTopK authors' public code (Bussmann et al. 2024, class
  ``BatchTopKSAE`` and ``train_sae``): per-row standardisation, no ``b_enc`` in the encoder,
  mean-over-elements loss, AuxK over latents dead for 5 batches (the current one included),
  ``k_aux`` 512, coefficient 1/32, residual not detached; ``clip_grad_norm_(1e5)``, then
  renormalise the decoder rows and project their gradient, then Adam(3e-4, (0.9, 0.99)).
  Their ``.float()`` casts (for half-precision runs) are left out: the oracle is float64.
- ``DictionaryLearningOracle``: dictionary_learning's ``BatchTopKTrainer``: ``b_enc`` used,
  sum-over-d loss, normalised AuxK on the detached residual, project -> clip at 1 -> Adam
  (0.9, 0.999) -> renormalise, lr ``2e-4/sqrt(h/2^14)`` with a linear warm-up.

The initialisation rule (Kaiming-uniform on a (d, h) tensor, decoder = encoder transposed with
unit rows, zero biases) is checked separately, against torch's own ``kaiming_uniform_``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from sae_ref.arrays import to_numpy
from sae_ref.sae import init_params
from sae_ref.train import init_state, preset, step

torch = pytest.importorskip("torch")

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
RTOL, ATOL = 1e-9, 1e-12  # float64 rounding, accumulated over the steps (atol: b_dec starts at 0)


def _leaf(a):
    """A float64 torch leaf tensor holding a copy of ``a``."""
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=True)


# --- the BatchTopK authors' algorithm ---------------------------------------------------------
class AuthorsOracle:
    """The authors' ``BatchTopKSAE`` plus one iteration of their ``train_sae`` loop."""

    def __init__(self, params: dict, *, k: int, top_k_aux: int = 512, n_batches_to_dead: int = 5,
                 aux_penalty: float = 1 / 32, lr: float = 3e-4, betas=(0.9, 0.99),
                 max_grad_norm: float = 100_000.0):
        self.b_dec, self.b_enc = _leaf(params["b_dec"]), _leaf(params["b_enc"])
        self.W_enc, self.W_dec = _leaf(params["W_enc"]), _leaf(params["W_dec"])
        self.params = [self.b_dec, self.b_enc, self.W_enc, self.W_dec]  # their registration order
        self.k, self.top_k_aux, self.n_batches_to_dead = k, top_k_aux, n_batches_to_dead
        self.aux_penalty, self.max_grad_norm = aux_penalty, max_grad_norm
        self.num_batches_not_active = torch.zeros(self.W_enc.shape[1], dtype=torch.float64)
        self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=betas)
        self.dead_history: list[int] = []

    @staticmethod
    def preprocess_input(x):
        x_mean = x.mean(dim=-1, keepdim=True)
        x = x - x_mean
        x_std = x.std(dim=-1, keepdim=True)
        return x / (x_std + 1e-5)

    def forward(self, x):
        x = self.preprocess_input(x)
        x_cent = x - self.b_dec
        acts = torch.relu(x_cent @ self.W_enc)  # b_enc exists but is never read
        top = torch.topk(acts.flatten(), self.k * x.shape[0], dim=-1)
        acts_topk = torch.zeros_like(acts.flatten()).scatter(-1, top.indices, top.values).reshape(acts.shape)
        x_reconstruct = acts_topk @ self.W_dec + self.b_dec
        with torch.no_grad():  # update_inactive_features: before the losses, this batch included
            self.num_batches_not_active += (acts_topk.sum(0) == 0).double()
            self.num_batches_not_active[acts_topk.sum(0) > 0] = 0
        l2_loss = (x_reconstruct - x).pow(2).mean()
        aux_loss = self.auxiliary_loss(x, x_reconstruct, acts)
        return l2_loss + aux_loss, l2_loss, aux_loss

    def auxiliary_loss(self, x, x_reconstruct, acts):
        dead = self.num_batches_not_active >= self.n_batches_to_dead
        self.dead_history.append(int(dead.sum()))
        if dead.sum() == 0:
            return torch.tensor(0.0, dtype=x.dtype)
        residual = x - x_reconstruct  # not detached
        top = torch.topk(acts[:, dead], min(self.top_k_aux, int(dead.sum())), dim=-1)
        acts_aux = torch.zeros_like(acts[:, dead]).scatter(-1, top.indices, top.values)
        x_reconstruct_aux = acts_aux @ self.W_dec[dead]
        return self.aux_penalty * (x_reconstruct_aux - residual).pow(2).mean()

    @torch.no_grad()
    def make_decoder_weights_and_grad_unit_norm(self):
        W_dec_normed = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True)
        proj = (self.W_dec.grad * W_dec_normed).sum(-1, keepdim=True) * W_dec_normed
        self.W_dec.grad -= proj
        self.W_dec.data = W_dec_normed

    def train_step(self, batch: np.ndarray) -> dict:
        loss, l2, aux = self.forward(torch.tensor(batch, dtype=torch.float64))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.make_decoder_weights_and_grad_unit_norm()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return {"loss": loss.item(), "mse": l2.item(), "aux": aux.item()}

    def numpy_params(self) -> dict:
        return {n: getattr(self, n).detach().numpy().copy() for n in PARAMS}


# --- dictionary_learning's BatchTopKTrainer ---------------------------------------------------
class DictionaryLearningOracle:
    """dictionary_learning's ``BatchTopKTrainer.update`` (geometric-median start sidestepped:
    the oracle starts from the given ``b_dec``). ``lr_lambda`` maps LambdaLR's step counter
    (0 at the first update) to the lr factor. Their code divides by ``norm + 1e-6`` in the
    gradient projection and by ``norm + finfo.eps`` when renormalising (``proj_eps``,
    ``norm_eps``); 0 gives the exact algorithm, which sae-ref implements."""

    def __init__(self, params: dict, *, k: int, lr: float, lr_lambda, top_k_aux: int,
                 dead_feature_threshold: int = 10_000_000, auxk_alpha: float = 1 / 32,
                 proj_eps: float = 0.0, norm_eps: float = 0.0):
        self.W_enc, self.b_enc = _leaf(params["W_enc"]), _leaf(params["b_enc"])
        self.W_dec, self.b_dec = _leaf(params["W_dec"]), _leaf(params["b_dec"])
        self.params = [self.W_enc, self.b_enc, self.W_dec, self.b_dec]
        self.k, self.top_k_aux, self.auxk_alpha = k, top_k_aux, auxk_alpha
        self.dead_feature_threshold = dead_feature_threshold
        self.proj_eps, self.norm_eps = proj_eps, norm_eps
        self.num_tokens_since_fired = torch.zeros(self.W_enc.shape[1], dtype=torch.long)
        self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=(0.9, 0.999))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=lr_lambda)
        self.dead_history: list[int] = []

    def loss(self, x):
        post_relu = torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        top = post_relu.flatten().topk(self.k * x.shape[0], sorted=False, dim=-1)
        f = torch.zeros_like(post_relu.flatten()).scatter_(-1, top.indices, top.values).reshape(post_relu.shape)
        x_hat = f @ self.W_dec + self.b_dec
        e = x - x_hat
        with torch.no_grad():
            did_fire = f.sum(0) > 0
            self.num_tokens_since_fired += x.shape[0]
            self.num_tokens_since_fired[did_fire] = 0
        l2_loss = e.pow(2).sum(dim=-1).mean()
        aux = self.auxiliary_loss(e.detach(), post_relu)
        return l2_loss + self.auxk_alpha * aux, l2_loss, self.auxk_alpha * aux

    def auxiliary_loss(self, residual, post_relu):
        dead = self.num_tokens_since_fired >= self.dead_feature_threshold
        self.dead_history.append(int(dead.sum()))
        if dead.sum() == 0:
            return torch.tensor(0.0, dtype=residual.dtype)
        k_aux = min(self.top_k_aux, int(dead.sum()))
        latents = torch.where(dead[None], post_relu, -torch.inf)
        acts, idx = latents.topk(k_aux, sorted=False)
        acts_BF = torch.zeros_like(post_relu).scatter_(-1, idx, acts)
        e_hat = acts_BF @ self.W_dec  # no b_dec
        l2_aux = (residual - e_hat).pow(2).sum(dim=-1).mean()
        denom = (residual - residual.mean(dim=0, keepdim=True)).pow(2).sum(dim=-1).mean()
        return (l2_aux / denom).nan_to_num(0.0)

    def train_step(self, batch: np.ndarray) -> dict:
        loss, l2, aux = self.loss(torch.tensor(batch, dtype=torch.float64))
        loss.backward()
        with torch.no_grad():  # remove_gradient_parallel_to_decoder_directions (rows here)
            normed = self.W_dec / (self.W_dec.norm(dim=-1, keepdim=True) + self.proj_eps)
            self.W_dec.grad -= (self.W_dec.grad * normed).sum(-1, keepdim=True) * normed
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        with torch.no_grad():  # set_decoder_norm_to_unit_norm
            self.W_dec.data = self.W_dec / (self.W_dec.norm(dim=-1, keepdim=True) + self.norm_eps)
        return {"loss": loss.item(), "mse": l2.item(), "aux": aux.item()}

    def numpy_params(self) -> dict:
        return {n: getattr(self, n).detach().numpy().copy() for n in PARAMS}


# --- helpers ----------------------------------------------------------------------------------
def gaussian_batches(n, B, d, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((B, d)) for _ in range(n)]


def low_rank_batches(n, B, d, seed, rank=4):
    """Batches near a rank-4 subspace: many latents never win the selection (dead quickly)."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((rank, d))
    return [rng.standard_normal((B, rank)) @ A + 0.05 * rng.standard_normal((B, d)) for _ in range(n)]


def run_both(backend, config, batches, make_oracle):
    """Step sae-ref (on ``backend``) and the oracle side by side; compare after every step."""
    xs = [backend.asarray(b, dtype="float64") for b in batches]
    state = init_state(config, xs[0])
    start = {n: to_numpy(getattr(state.params, n)) for n in PARAMS}
    oracle = make_oracle(start)
    for t, (x, batch) in enumerate(zip(xs, batches), start=1):
        state, metrics = step(state, x)
        want = oracle.train_step(batch)
        for name, expected in oracle.numpy_params().items():
            np.testing.assert_allclose(to_numpy(getattr(state.params, name)), expected, rtol=RTOL,
                                       atol=ATOL, err_msg=f"{name} after step {t} ({backend})")
        for name in ("loss", "mse", "aux"):
            np.testing.assert_allclose(float(to_numpy(metrics[name])), want[name], rtol=RTOL, atol=ATOL,
                                       err_msg=f"{name} at step {t} ({backend})")
        dead = round(float(to_numpy(metrics["dead_fraction"])) * config.h)
        assert dead == oracle.dead_history[-1], f"dead latents at step {t} ({backend})"
    return state, oracle


# --- the authors' preset ----------------------------------------------------------------------
def test_authors_preset_names_the_published_hyperparameters():
    """The 'authors' preset sets the BatchTopK authors' published hyperparameters: standardised
    inputs, MSE per element, b_enc frozen, renormalisation before the step, AuxK with k_aux 512,
    coefficient 1/32 and a window of 5 batches, the residual not detached, Adam at 3e-4 with
    betas (0.9, 0.99), no schedule, clipping at 1e5, b_dec from zeros."""
    c = preset("authors", h=64, k=2)
    assert (c.standardize, c.loss_unit, c.freeze_b_enc, c.decoder_order) == (True, "element", True, "before")
    assert (c.aux_convention, c.k_aux, c.aux_coeff, c.dead_after, c.dead_unit) == ("authors", 512, 1 / 32, 5, "batches")
    assert c.detach_residual is False
    assert (c.lr, c.betas, c.lr_warmup_steps, c.lr_decay_steps, c.max_grad_norm) == (3e-4, (0.9, 0.99), 0, 0, 1e5)
    assert c.b_dec_init == "zeros"


def test_authors_preset_step_equals_published_algorithm(backend):
    """12 steps of ``step`` under preset("authors") equal the authors' code step by step,
    AuxK included: latents go dead after 5 batches without firing."""
    d, h, k, B, n = 16, 64, 2, 32, 12
    config = preset("authors", h=h, k=k, steps=n)
    state, oracle = run_both(backend, config, gaussian_batches(n, B, d, seed=0),
                             lambda p: AuthorsOracle(p, k=k))
    assert max(oracle.dead_history) > 0, "the data left no latent dead: AuxK was not exercised"
    assert oracle.dead_history[:4] == [0, 0, 0, 0]  # nobody is dead before 5 batches
    np.testing.assert_array_equal(to_numpy(state.params.b_enc), 0.0)


def test_authors_preset_with_small_k_aux_selects_the_top_dead_latents_per_row(backend):
    """k_aux = 4 below the number of dead latents: the per-row top-k among dead latents."""
    d, h, k, B, n = 16, 64, 2, 32, 10
    config = preset("authors", h=h, k=k, steps=n, k_aux=4)
    _, oracle = run_both(backend, config, low_rank_batches(n, B, d, seed=1),
                         lambda p: AuthorsOracle(p, k=k, top_k_aux=4))
    assert max(oracle.dead_history) > 4, "need more dead latents than k_aux"


def test_authors_preset_step_equals_published_algorithm_in_float32():
    """The same comparison in float32 on NumPy holds to float32 rounding for a few steps."""
    d, h, k, B, n = 16, 64, 2, 32, 3
    batches = gaussian_batches(n, B, d, seed=2)
    config = preset("authors", h=h, k=k, steps=n)
    state = init_state(config, batches[0].astype(np.float32))
    oracle = AuthorsOracle({n_: to_numpy(getattr(state.params, n_)) for n_ in PARAMS}, k=k)
    for batch in batches:
        state, _ = step(state, batch.astype(np.float32))
        oracle.train_step(batch.astype(np.float32).astype(np.float64))
    for name, expected in oracle.numpy_params().items():
        np.testing.assert_allclose(to_numpy(getattr(state.params, name)), expected, rtol=2e-4, atol=2e-6,
                                   err_msg=name)


def test_authors_preset_with_engaged_clipping_equals_published_algorithm(all_backends):
    """With gradient clipping engaged (max norm 0.01), the 'authors' steps equal an independent
    torch re-implementation of the published training step."""
    d, h, k, B, n = 16, 64, 2, 32, 2
    config = preset("authors", h=h, k=k, steps=n, max_grad_norm=0.01)
    numpy_backend = next(be for be in all_backends if be.name == "numpy")
    run_both(numpy_backend, config, gaussian_batches(n, B, d, seed=0),
             lambda p: AuthorsOracle(p, k=k, max_grad_norm=0.01))


# --- the initialisation -----------------------------------------------------------------------
def test_init_params_follows_kaiming_uniform_on_a_d_by_h_tensor():
    d, h = 64, 4096
    bound = math.sqrt(6 / h)
    # torch's own rule on a (d, h) tensor gives the same bound: fan-in is size(1) = h, gain sqrt(2)
    torch.manual_seed(0)
    ref = torch.nn.init.kaiming_uniform_(torch.empty(d, h, dtype=torch.float64)).numpy()
    assert np.abs(ref).max() <= bound and np.abs(ref).max() > 0.999 * bound

    p = init_params(d, h, xp=np, dtype=np.float64, seed=3)
    W_enc, W_dec = to_numpy(p.W_enc), to_numpy(p.W_dec)
    assert W_enc.shape == (d, h) and W_dec.shape == (h, d)
    assert np.abs(W_enc).max() <= bound and np.abs(W_enc).max() > 0.999 * bound
    n = W_enc.size
    # U(-a, a): mean 0, variance a^2/3 = 2/h; 5 standard errors
    assert abs(W_enc.mean()) < 5 * bound / math.sqrt(3 * n)
    var_se = (bound**4 / 5 - bound**4 / 9) ** 0.5 / math.sqrt(n)
    assert abs(W_enc.var() - 2 / h) < 5 * var_se
    # a uniform distribution: each tenth of [-a, a] holds about a tenth of the entries
    counts = np.histogram(W_enc, bins=10, range=(-bound, bound))[0]
    assert np.all(np.abs(counts / n - 0.1) < 5 * math.sqrt(0.09 / n))
    # decoder: the encoder transposed, rows normalised
    np.testing.assert_allclose(np.linalg.norm(W_dec, axis=1), 1.0, rtol=1e-14)
    np.testing.assert_allclose(W_dec, W_enc.T / np.linalg.norm(W_enc, axis=0)[:, None], rtol=1e-14, atol=0)
    np.testing.assert_array_equal(to_numpy(p.b_enc), np.zeros(h))
    np.testing.assert_array_equal(to_numpy(p.b_dec), np.zeros(d))


def test_init_params_is_the_same_sae_on_every_backend(all_backends):
    ref = init_params(8, 32, xp=np, dtype=np.float64, seed=5)
    for be in all_backends:
        p = init_params(8, 32, xp=be.xp, dtype=be.dtype("float64"), device=be.device, seed=5)
        for name in PARAMS:
            np.testing.assert_array_equal(to_numpy(getattr(p, name)), to_numpy(getattr(ref, name)),
                                          err_msg=f"{name} on {be}")


# --- dictionary_learning's preset -------------------------------------------------------------
def published_warmup(warmup):
    """dictionary_learning's ``get_lr_schedule`` under LambdaLR: factor s / warmup at the
    (s+1)-th update (0 for the very first one)."""
    return lambda s: s / warmup if s < warmup else 1.0


def test_dictionary_learning_preset_step_equals_published_algorithm(backend):
    """preset("dictionary_learning") equals its trainer's update: b_enc trained, sum-over-d
    loss, project -> clip(1) -> Adam(0.9, 0.999) -> renormalise, warmed-up lr (LambdaLR's
    0-based convention, which sae-ref follows), no AuxK within 10M tokens."""
    d, h, k, B, n = 16, 64, 2, 32, 6
    config = preset("dictionary_learning", h=h, k=k, steps=n)
    assert config.lr_warmup_steps == 1000 and config.learning_rate() == pytest.approx(2e-4 / math.sqrt(h / 2**14))
    batches = [b + 0.5 for b in gaussian_batches(n, B, d, seed=4)]  # an offset for b_dec to learn
    state, oracle = run_both(backend, config, batches, lambda p: DictionaryLearningOracle(
        p, k=k, lr=config.learning_rate(), lr_lambda=published_warmup(1000), top_k_aux=d // 2))
    assert max(oracle.dead_history) == 0
    assert float(np.abs(to_numpy(state.params.b_enc)).max()) > 0  # b_enc is trained here


def test_dictionary_learning_preset_normalized_auxk_equals_published_algorithm(backend):
    """The same with latents dead after 3 batches' tokens and a short warm-up, so the
    normalised AuxK on the detached residual (k_aux = d/2) and the full lr both run."""
    d, h, k, B, n = 16, 64, 2, 32, 9
    config = preset("dictionary_learning", h=h, k=k, steps=n, dead_after=3 * B, lr_warmup_steps=3)
    _, oracle = run_both(backend, config, low_rank_batches(n, B, d, seed=6), lambda p: DictionaryLearningOracle(
        p, k=k, lr=config.learning_rate(), lr_lambda=published_warmup(3), top_k_aux=d // 2,
        dead_feature_threshold=3 * B))
    assert max(oracle.dead_history) > d // 2, "need more dead latents than k_aux = d/2"


def test_dictionary_learning_preset_differs_from_published_code_only_by_its_norm_epsilons():
    """With the published epsilons in the projection (1e-6) and the renormalisation
    (machine epsilon) the runs separate at the epsilon's scale, not more."""
    d, h, k, B, n = 16, 64, 2, 32, 9
    config = preset("dictionary_learning", h=h, k=k, steps=n, dead_after=3 * B, lr_warmup_steps=3)
    batches = low_rank_batches(n, B, d, seed=6)
    state = init_state(config, batches[0])
    oracle = DictionaryLearningOracle(
        {n_: to_numpy(getattr(state.params, n_)) for n_ in PARAMS}, k=k, lr=config.learning_rate(),
        lr_lambda=published_warmup(3), top_k_aux=d // 2, dead_feature_threshold=3 * B,
        proj_eps=1e-6, norm_eps=float(np.finfo(np.float64).eps))
    for batch in batches:
        state, _ = step(state, batch)
        oracle.train_step(batch)
    for name, expected in oracle.numpy_params().items():
        got = to_numpy(getattr(state.params, name))
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max(), err_msg=name)


def test_dictionary_learning_preset_warmup_equals_lambdalr_schedule(all_backends):
    """The 'dictionary_learning' steps, warm-up included, equal an independent torch re-
    implementation of that library's step with its LambdaLR warm-up schedule."""
    d, h, k, B, n = 16, 64, 2, 32, 3
    config = preset("dictionary_learning", h=h, k=k, steps=n)
    batches = [b + 0.5 for b in gaussian_batches(n, B, d, seed=4)]
    numpy_backend = next(be for be in all_backends if be.name == "numpy")
    run_both(numpy_backend, config, batches, lambda p: DictionaryLearningOracle(
        p, k=k, lr=config.learning_rate(), lr_lambda=published_warmup(1000), top_k_aux=d // 2))
