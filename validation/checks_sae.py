r"""End-to-end check of an SAE module against sae-ref: encode, decode, forward, gradients.

The model is an adapter (:class:`~sae_ref.validation.adapters.TorchSAE`, or any object with
``config``, ``reference_params()``, ``encode``, ``decode``, ``forward`` on NumPy arrays and,
optionally, ``gradients(x, g)`` and ``pullback(ref_grads)``), or a torch ``nn.Module``, which
is wrapped in a ``TorchSAE`` with the keyword arguments given. With sae-ref's parameters
:math:`P` and config for the same function:

- ``encode(x)`` equals :func:`sae_ref.sae.encode` (the same kept latents, the same values);
- ``decode(f)`` equals :math:`f W_{dec} + b_{dec}`;
- ``forward(x)`` equals :func:`sae_ref.sae.reconstruct` and ``decode(encode(x))``;
- the autograd gradients of :math:`\sum G \odot \mathrm{forward}(x)` on the module's own
  parameters equal sae-ref's hand-written :func:`sae_ref.sae.backward`, carried onto them.

Inputs are float64 (the adapter casts a copy of the module by default). A latent whose
selection rounding could decide (a pre-activation within rounding of the cut, of
:math:`\theta` or of 0) is not held against the module.

>>> import torch
>>> from sae_ref.validation.checks_sae import check_sae
>>> class Tiny(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         g = torch.Generator().manual_seed(0)
...         self.W_enc = torch.nn.Parameter(torch.randn(4, 6, generator=g))
...         self.b_enc = torch.nn.Parameter(torch.zeros(6))
...         self.W_dec = torch.nn.Parameter(torch.randn(6, 4, generator=g))
...         self.b_dec = torch.nn.Parameter(torch.zeros(4))
...     def encode(self, x):
...         return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
...     def decode(self, f):
...         return f @ self.W_dec + self.b_dec
...     def forward(self, x):
...         return self.decode(self.encode(x))
>>> check_sae(Tiny(), max_examples=3).ok
True
"""

from __future__ import annotations

#: Modules the docstring examples need (the tests skip them where one is not installed).
__doctest_requires__ = {"*": ("torch",)}

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sae_ref.sae import backward, encode, forward
from sae_ref.validation._common import as_float64, describe_difference
from sae_ref.validation.report import Report
from sae_ref.validation.runner import Finding, Invariant, call_user, run_invariants

#: Dimensions up to which inputs are drawn entry by entry (larger ones from a drawn seed).
ELEMENTWISE_MAX_D = 16


@st.composite
def _inputs(draw, d: int, h: int, max_batch: int):
    B = draw(st.integers(1, max_batch), label="B")
    if d <= ELEMENTWISE_MAX_D:
        x = draw(hnp.arrays(np.float64, (B, d), elements=st.floats(-4, 4, width=16)), label="x")
        g = draw(hnp.arrays(np.float64, (B, d), elements=st.floats(-1, 1, width=16)), label="g")
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
        x = rng.standard_normal((B, d)) * draw(st.sampled_from([1.0, 4.0, 0.25]), label="scale")
        g = rng.standard_normal((B, d))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="code seed"))
    f = np.where(rng.random((B, h)) < min(1.0, 4.0 / h), rng.uniform(0.1, 4.0, (B, h)), 0.0)
    return {"x": x, "g": g, "f": f}


def _pre(P, x, config):
    x = as_float64(x)
    if config.standardize:
        x = (x - x.mean(axis=1, keepdims=True)) / (x.std(axis=1, ddof=1, keepdims=True) + 1e-5)
    return (x - P.b_dec) @ P.W_enc + P.b_enc


def _near_boundary(P, x, config, tol, *, zero: bool = True):
    """Entries [B, h] whose kept / dropped status rounding could decide. ``zero=False``
    leaves out the entries near 0, whose status cannot move an output by more than rounding
    (their value is about 0 either way)."""
    z = _pre(P, x, config)
    a = np.maximum(z, 0)
    scale = tol * (1.0 + np.abs(z).max())
    near = (np.abs(z) <= scale) if zero else np.zeros(z.shape, dtype=bool)
    act = config.activation
    if act == "jumprelu":
        near |= np.abs(z - P.theta) <= scale
    elif act == "threshold":
        near |= np.abs(z - config.theta) <= scale
    elif act == "topk":
        near |= _near_cut(a, config.k, scale)
    elif act == "batchtopk":
        near |= _near_cut(a.reshape(1, -1), config.k * z.shape[0], scale).reshape(a.shape)
    return near


def _near_cut(a, n, scale):
    """Per row of ``a``, the entries within ``scale`` of the n-th largest when the n-th and the
    (n+1)-th largest are that close (only then can rounding swap them); a cut at 0 keeps every
    positive entry and decides nothing."""
    if n >= a.shape[1]:
        return np.zeros(a.shape, dtype=bool)
    srt = -np.sort(-a, axis=1)
    cut, nxt = srt[:, n - 1:n], srt[:, n:n + 1]
    close = (cut - nxt <= scale) & (cut > scale)
    return close & (np.abs(a - cut) <= scale)


def _close(got, want, tol):
    return np.abs(got - want) <= tol * (1.0 + np.abs(want).max(initial=0.0))


def check_sae(model, *, max_examples: int = 25, seed: int = 0, shrink: bool = True, max_batch: int = 6,
              rtol: float | None = None, **adapter_kwargs) -> Report:
    """Check an SAE module end to end against sae-ref (module docstring).

    Parameters
    ----------
    model : adapter or torch.nn.Module
    max_examples, seed, shrink : as in the other checks (fewer examples by default: each
        runs the whole SAE)
    max_batch : largest batch drawn
    rtol : tolerance of value comparisons, relative to the largest expected value (default
        1e-9 for a float64 module, 1e-4 otherwise)
    **adapter_kwargs : passed to :class:`~sae_ref.validation.adapters.TorchSAE`
    """
    from sae_ref.validation.adapters import as_adapter

    m = as_adapter(model, **adapter_kwargs)
    P = m.reference_params()
    config = m.config
    d, h = P.W_enc.shape
    probe = call_user(m.forward, np.zeros((1, d)), what="forward")
    if rtol is None:
        rtol = 1e-9 if np.asarray(probe).dtype == np.float64 and _module_is_float64(m) else 1e-4
    examples = _inputs(d, h, max_batch)
    name = getattr(m, "name", type(m).__name__)

    def ref_code(x):
        return as_float64(encode(P, as_float64(x), config).to_dense())

    def shaped(out, shape, what):
        out = as_float64(out)
        if out.shape != shape:
            return Finding(f"{what} returned shape {out.shape}, expected {shape}", got=out)
        return out

    def enc(ex):
        got = shaped(call_user(m.encode, ex["x"], what="encode"), (ex["x"].shape[0], h), "encode")
        if isinstance(got, Finding):
            return got
        want = ref_code(ex["x"])
        near = _near_boundary(P, ex["x"], config, rtol)
        kept_differs = ((got != 0) != (want != 0)) & ~near
        if np.any(kept_differs):
            return Finding(f"encode keeps other latents than sae-ref ({config.activation}) at "
                           f"{[tuple(int(i) for i in p) for p in np.argwhere(kept_differs)][:8]}",
                           got=got, expected=want)
        both = (got != 0) & (want != 0)
        bad = both & ~_close(got, want, rtol)
        if np.any(bad):
            return Finding("encode's values differ from sae-ref's", got=got, expected=want,
                           difference=describe_difference(got, want, atol=rtol * (1 + np.abs(want).max(initial=0))))
        return None

    def dec(ex):
        got = shaped(call_user(m.decode, ex["f"], what="decode"), (ex["f"].shape[0], d), "decode")
        if isinstance(got, Finding):
            return got
        want = ex["f"] @ P.W_dec + P.b_dec
        if not np.all(_close(got, want, rtol)):  # NaN never compares close
            return Finding("decode(f) differs from f @ W_dec + b_dec", got=got, expected=want)
        return None

    def fwd(ex):
        got = shaped(call_user(m.forward, ex["x"], what="forward"), ex["x"].shape, "forward")
        if isinstance(got, Finding):
            return got
        if np.any(_near_boundary(P, ex["x"], config, rtol, zero=False)):
            return None
        want = as_float64(forward(P, as_float64(ex["x"]), config).output())
        if not np.all(_close(got, want, rtol)):
            return Finding("forward(x) differs from sae-ref's reconstruction", got=got, expected=want)
        return None

    def composed(ex):
        got = shaped(call_user(m.forward, ex["x"], what="forward"), ex["x"].shape, "forward")
        if isinstance(got, Finding):
            return got
        f = call_user(m.encode, ex["x"], what="encode")
        want = as_float64(call_user(m.decode, as_float64(f), what="decode"))
        if want.shape != got.shape or not np.all(_close(got, want, rtol)):
            return Finding("forward(x) is not decode(encode(x))", got=got, expected=want)
        return None

    def grads(ex):
        if np.any(_near_boundary(P, ex["x"], config, rtol)):
            return None
        got = call_user(m.gradients, ex["x"], ex["g"], what="autograd of forward")
        fw = forward(P, as_float64(ex["x"]), config)
        g = as_float64(ex["g"])
        if fw.stats is not None:  # the loss space is standardised: x_hat_out = x_hat * scale + mean
            g = g * fw.stats.scale
        ref = backward(P, fw, g)
        want = call_user(m.pullback, ref, what="pullback")
        for key in sorted(got):
            if key not in want:
                continue
            a, b = as_float64(got[key]), as_float64(want[key])
            if a.shape != b.shape or not np.all(_close(a, b, rtol * 10)):
                return Finding(f"the gradient on {key} differs from sae-ref's backward", got=a, expected=b,
                               difference=describe_difference(a, b))
        return None

    std_skip = ("decode alone cannot undo a per-row standardisation (it needs the statistics of the input)"
                if config.standardize else None)
    grad_skip = None if hasattr(m, "gradients") and hasattr(m, "pullback") else "the adapter gives no gradients"
    s = "sae"
    invariants = [
        Invariant(f"{s}.encode_matches_reference", f"encode(x) keeps the latents sae-ref's {config.activation} "
                  "encode keeps, with the same values.", examples, enc),
        Invariant(f"{s}.decode_matches_reference", "decode(f) = f @ W_dec + b_dec.", examples, dec, std_skip),
        Invariant(f"{s}.forward_matches_reference", "forward(x) equals sae-ref's reconstruction.", examples, fwd),
        Invariant(f"{s}.forward_is_decode_of_encode", "forward(x) = decode(encode(x)).", examples, composed, std_skip),
        Invariant(f"{s}.gradients_match_reference", "The autograd gradients of sum(G * forward(x)) on every "
                  "parameter equal sae-ref's hand-written backward.", examples, grads, grad_skip),
    ]
    report = run_invariants(s, invariants, max_examples=max_examples, seed=seed, shrink=shrink)
    report.subject = f"sae ({name}, {config.activation})"
    return report


def _module_is_float64(m) -> bool:
    P = getattr(m, "module", None)
    if P is None:
        return True
    try:
        return all(str(p.dtype) == "torch.float64" for n, p in P.named_parameters() if "threshold" not in n)
    except AttributeError:
        return True

