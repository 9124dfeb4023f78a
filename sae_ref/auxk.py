r"""AuxK: the auxiliary loss that gives dead latents a gradient (Gao et al. 2024).

A latent is *dead* when it has not fired for a window (counting it is the training loop's
job; here ``dead`` is a boolean array of shape [h]). Per sample, take the top
:math:`k' = \min(k_{aux}, n_{dead})` of the ReLU pre-activations restricted to dead latents,
decode them with the dead rows of ``W_dec`` and **no** ``b_dec``, and fit the residual
:math:`e = x - \hat x`:

.. math:: \hat e = \mathrm{TopK}_{k'}\!\left(\mathrm{relu}(z) \odot \mathbb{1}_{dead}\right) W_{dec}.

Two conventions (``convention=``):

- ``"authors"`` (BatchTopK authors): :math:`L = \frac{1}{Bd}\sum (\hat e - e)^2`; the
  residual is not detached in their original code (``detach_residual=False``).
- ``"normalized"`` (OpenAI / dictionary_learning): :math:`L = \sum (\hat e - e)^2 / \sum
  (e - \bar e)^2` with :math:`\bar e` the batch mean of the residual; residual detached.

With no dead latent the loss is 0 and every gradient is zero. The "normalized" convention
needs a batch of at least two rows (a single row has no variance about the batch mean). The
coefficient (1/32 in both sources) is the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from array_api_compat import device as device_of

from sae_ref import _checks as C
from sae_ref.backends import get_backend, is_sync_free, take, top_n_fixed
from sae_ref.sparse import ColumnBlock, SparseCode, empty_code
from sae_ref.activations import _padded_code_at, _topk
from sae_ref.sae import matmul_at

CONVENTIONS = ("authors", "normalized")
#: The share of the [B, n_dead] block that the k' kept entries per row must fill for
#: training to compute AuxK on the dense block (GEMMs) instead of on the entries: a GEMM
#: runs 10-20x more multiply-adds per second than the sparse products.
BLOCK_MIN_FILL = 1 / 8


@dataclass(frozen=True)
class AuxKResult:
    """The AuxK loss and its gradients.

    Attributes
    ----------
    value : 0-D array
    code : SparseCode
        The auxiliary activations (dead latents only); their gradient on the pre-activation
        is ``code.with_values(g_values)`` (pass-through, as every selection).
    g_values : array, shape [nnz_aux]
    g_W_dec : array, shape [h, d]; rows of live latents are zero (None when not asked for:
        it is ``code``'s transpose times ``g_ehat``, and training adds that product straight
        into the decoder's gradient).
    g_residual : array, shape [B, d], or None when the residual is detached (or, with
        ``g_residual_is_neg_ehat``, when it is ``-g_ehat``).
    g_ehat : array, shape [B, d], the gradient on the auxiliary reconstruction.
    block : (ColumnBlock, ColumnBlock) or None: when training asked for the block form
        (``_auxk(..., allow_block=True)``) and the dead columns were few enough, the auxiliary
        activations and their gradient on the dead columns' dense block; ``code`` and
        ``g_values`` are then None.
    g_residual_is_neg_ehat : True when training asked not to form ``g_residual`` because it
        is ``-g_ehat`` (the "authors" convention, residual not detached): the caller adds
        ``g_ehat`` into its own gradient in place.

    Training asks ``_auxk`` for the gradients of ``scale`` times the loss (its coefficient),
    so that no array is scaled afterwards; ``value`` is the loss itself.
    """

    value: Any
    code: SparseCode
    g_values: Any
    g_W_dec: Any
    g_residual: Any
    g_ehat: Any = None
    block: Any = None
    g_residual_is_neg_ehat: bool = False


def auxk(pre, dead, residual, W_dec, k_aux: int, *, convention: str = "authors",
         detach_residual: bool | None = None) -> AuxKResult:
    """AuxK loss over the dead latents and its gradients.

    Parameters
    ----------
    pre : array, shape [B, h]
        Encoder pre-activations (before ReLU and selection).
    dead : bool array, shape [h]
    residual : array, shape [B, d]
        :math:`e = x - \\hat x` in the loss space.
    W_dec : array, shape [h, d]
    k_aux : int >= 1
    convention : "authors" or "normalized"
    detach_residual : bool, default False for "authors" and True for "normalized"
    """
    op = "auxk"
    xp = C.namespace(op, pre=pre, dead=dead, residual=residual, W_dec=W_dec)
    C.floating(op, xp, "pre", pre, ndim=2)
    B, h = pre.shape
    C.nonempty_batch(op, "pre", pre)
    C.floating(op, xp, "residual", residual, ndim=2, shape=(B, None))
    C.floating(op, xp, "W_dec", W_dec, ndim=2, shape=(h, residual.shape[1]))
    C.same_dtype(op, pre=pre, residual=residual, W_dec=W_dec)
    if dead.dtype != xp.bool or tuple(dead.shape) != (h,):
        raise TypeError(f"{op}: argument 'dead' must be a bool array of shape ({h},), got {dead.dtype} {tuple(dead.shape)}")
    k_aux = C.integer_in(op, "k_aux", k_aux, 1, 2**62)
    C.choice(op, "convention", convention, CONVENTIONS)
    C.finite(op, xp, "pre", pre)
    C.finite(op, xp, "residual", residual)
    if convention == "normalized" and B < 2:
        raise ValueError(
            f"{op}: convention 'normalized' divides by the residual's variance about its batch "
            f"mean, which needs at least 2 rows; argument 'residual' has shape {tuple(residual.shape)}"
        )
    if detach_residual is None:
        detach_residual = convention == "normalized"
    return _exact(_auxk(xp, pre, dead, residual, W_dec, k_aux, convention, detach_residual))


def _exact(res: AuxKResult) -> AuxKResult:
    """``res`` with its code and the code's gradient without the padding entries of the
    sync-free form (public results list kept entries only, on every device)."""
    if res.code is None or not res.code.padded:
        return res
    kept = res.code.values != 0
    return replace(res, code=res.code.exact(), g_values=res.g_values[kept])


def _auxk(xp, pre, dead, residual, W_dec, k_aux, convention, detach_residual,
          want_g_W_dec=True, allow_block=False, scale=1.0, lazy_residual=False, ws=None,
          negated_residual=False, precision="highest", capacity=None) -> AuxKResult:
    """:func:`auxk` without the checks. Training's options: ``allow_block`` (the dense-block
    form, whose GEMMs run at ``precision``, the step's matmul precision), gradients of
    ``scale`` times the loss, ``lazy_residual`` (see :class:`AuxKResult`), ``ws``, a
    workspace for the [B, d] reconstruction, ``negated_residual``: ``residual`` holds
    x_hat - x instead (the same results), and ``capacity`` (the sync-free mode, with
    ``allow_block``): a number of columns known to be at least the dead count
    (:mod:`sae_ref.dead_bound`), the width of the dense block."""
    B, h = pre.shape
    be = get_backend(xp)
    loss = _Loss(xp, residual, convention, detach_residual, scale, lazy_residual, negated_residual)
    buf = None if ws is None else ws.array("aux_e_hat", xp, tuple(residual.shape), residual.dtype,
                                           device_of(residual))
    if is_sync_free(pre):
        if allow_block and capacity is not None:
            return _auxk_capacity(xp, be, pre, dead, W_dec, k_aux, loss, capacity, precision, buf)
        return _auxk_fixed(xp, be, pre, dead, W_dec, k_aux, loss, want_g_W_dec, buf,
                           precision if allow_block else None)
    n_dead = int(xp.count_nonzero(dead))
    if n_dead == 0:
        zero = xp.zeros((), dtype=pre.dtype, device=device_of(pre))
        code = empty_code(xp, (B, h), pre.dtype, device_of(pre))
        g_res = None if detach_residual or loss.lazy else xp.zeros_like(residual)
        g_W = xp.zeros_like(W_dec) if want_g_W_dec else None
        return AuxKResult(zero, code, code.values, g_W, g_res, xp.zeros_like(residual))
    # select among the dead columns only ([B, n_dead], not a masked copy of [B, h]); dead_idx
    # is ascending, so the lower-index tie rule in the subset is the rule in the full matrix
    (dead_idx,) = xp.nonzero(dead)
    dead_idx = xp.astype(dead_idx, xp.int64)
    sub = take(pre, dead_idx, axis=1)
    k = min(k_aux, n_dead)
    if allow_block and k >= BLOCK_MIN_FILL * n_dead:
        return _auxk_block(xp, be, sub, dead_idx, k, W_dec, loss, buf, precision)
    top = _topk(sub, k)
    code = SparseCode(top.rows, take(dead_idx, top.cols), top.values, (B, h))
    value, g_ehat, g_res = loss(be.spmm(code.rows, code.cols, code.values, W_dec, B, out=buf))
    g_values = be.sddmm(g_ehat, W_dec, code.rows, code.cols)
    g_W_dec = be.spmm(code.cols, code.rows, code.values, g_ehat, h) if want_g_W_dec else None
    return loss.result(value, code, g_values, g_W_dec, g_res, g_ehat)


class _Loss:
    """The loss of an auxiliary reconstruction against the residual, with its convention."""

    def __init__(self, xp, residual, convention, detach_residual, scale=1.0, lazy_residual=False,
                 negated=False):
        self.xp, self.residual, self.convention = xp, residual, convention
        self.detach, self.scale = detach_residual, scale
        # ``residual`` holds x_hat - x (training's reconstruction buffer, turned in place)
        self.negated = negated
        # "authors", not detached: the residual's gradient is -g_ehat, left to the caller
        self.lazy = lazy_residual and convention == "authors" and not detach_residual

    def __call__(self, e_hat):
        """(value, gradient of scale * loss on ``e_hat``, on the residual or None). ``e_hat``
        is consumed: the gradient is computed in its memory (no fresh [B, d] arrays)."""
        xp, residual = self.xp, self.residual
        r = e_hat
        if self.negated:  # the same bits: negation is exact
            r += residual
        else:
            r -= residual
        flat = xp.reshape(r, (-1,))
        num = xp.vecdot(flat, flat)
        if self.convention == "authors":
            n = r.shape[0] * r.shape[1]
            r *= 2.0 * self.scale / n
            return num / n, r, None if self.detach or self.lazy else -r
        centred = residual - xp.mean(residual, axis=0, keepdims=True)  # negated when negated
        den = xp.sum(centred * centred)
        g_ehat = r
        g_ehat *= 2.0 * self.scale / den
        if self.detach:
            return num / den, g_ehat, None
        term = centred * (2.0 * self.scale * num / (den * den))
        return num / den, g_ehat, (term - g_ehat) if self.negated else (-g_ehat - term)

    def masked(self, be, e_hat, on, zero):
        """``(value, g_ehat, g_res)`` of ``self(e_hat)``, all ``zero`` (0-D) where the 0-D
        boolean ``on`` is false (no dead latent), chosen on the device. The "authors" loss against a negated
        residual whose gradient is not formed is one backend call
        (:meth:`~sae_ref.backends.StandardBackend.aux_residual`: one pass on a GPU)."""
        xp = self.xp
        if self.convention == "authors" and self.negated and (self.detach or self.lazy):
            n = e_hat.shape[0] * e_hat.shape[1]
            num, g_ehat = be.aux_residual(e_hat, self.residual, 2.0 * self.scale / n, on)
            return xp.where(on, num / n, zero), g_ehat, None
        value, g_ehat, g_res = self(e_hat)
        g_res = None if g_res is None else xp.where(on, g_res, zero)
        return xp.where(on, value, zero), xp.where(on, g_ehat, zero), g_res

    def result(self, value, code, g_values, g_W_dec, g_res, g_ehat, block=None) -> AuxKResult:
        return AuxKResult(value, code, g_values, g_W_dec, g_res, g_ehat, block, self.lazy)


def _auxk_block(xp, be, sub, dead_idx, k, W_dec, loss, buf=None, precision="highest"):
    """AuxK on the dense [B, n_dead] block ``sub`` of the dead columns: the same selection
    (each row's top ``k`` under the tie rule, positive entries only) as a mask, and every
    product a GEMM with the dead rows of the decoder."""
    B, n = sub.shape
    dev = device_of(sub)
    positive = sub > 0
    if k == n:  # every dead latent of a row is a candidate: the ReLU alone decides
        kept = positive
    else:
        idx, _ = be.top_n_indices(sub, k, axis=-1)
        ones = xp.ones(idx.shape, dtype=sub.dtype, device=dev)
        kept = (be.to_dense(idx // n, idx % n, ones, (B, n)) > 0) & positive
    zero = xp.zeros((), dtype=sub.dtype, device=dev)
    a = xp.where(kept, sub, zero)
    W_d = take(W_dec, dead_idx, axis=0)
    value, g_ehat, g_res = loss(matmul_at(be, a, W_d, precision, out=buf))
    g_a = xp.where(kept, matmul_at(be, g_ehat, xp.matrix_transpose(W_d), precision), zero)
    shape = (B, W_dec.shape[0])
    every = dead_idx.shape[0] == W_dec.shape[0]  # every latent dead: the columns are 0 .. h-1
    block = (ColumnBlock(dead_idx, a, shape, precision, every), ColumnBlock(dead_idx, g_a, shape, precision, every))
    return loss.result(value, None, None, None, g_res, g_ehat, block)


def _auxk_fixed(xp, be, pre, dead, W_dec, k_aux, loss, want_g_W_dec, buf=None, block_precision=None):
    """AuxK with shapes known in advance (the sync-free mode): each row's top
    ``min(k_aux, h)`` of the pre-activations with the live columns set to -inf. The dead
    columns come first, so the kept positive entries are those of the exact selection; the
    rest (live columns, or dead ones with a non-positive value) are zeros of a padded code,
    with no gradient. With no dead latent at all the loss and its gradients are zero, chosen
    on the device.

    ``block_precision`` (training; None otherwise): the products run as GEMMs at that
    precision on the whole [B, h] block (the auxiliary activations written into a zero
    matrix), since the number of dead columns is not known without a host read. Four GEMMs
    of the encoder's size cost less on a GPU than the sparse products over the ``B k_aux``
    entries (2M at B = 4096, k_aux = 512)."""
    B, h = pre.shape
    dev = device_of(pre)
    k = min(k_aux, h)
    masked = xp.where(dead, pre, xp.full((), -xp.inf, dtype=pre.dtype, device=dev))
    code = _padded_code_at(masked, top_n_fixed(masked, k, axis=-1, backend=be, with_cut=False)[0])
    any_dead = xp.any(dead)
    zero = xp.zeros((), dtype=pre.dtype, device=dev)
    if block_precision is not None:
        a = be.to_dense(code.rows, code.cols, code.values, (B, h))
        e_hat = matmul_at(be, a, W_dec, block_precision, out=buf)
    else:
        e_hat = be.spmm(code.rows, code.cols, code.values, W_dec, B, out=buf)
    value, g_ehat, g_res = loss(e_hat)
    value = xp.where(any_dead, value, zero)
    g_ehat = xp.where(any_dead, g_ehat, zero)
    g_res = None if g_res is None else xp.where(any_dead, g_res, zero)
    if block_precision is not None:
        g_a = xp.where(a > 0, matmul_at(be, g_ehat, xp.matrix_transpose(W_dec), block_precision), zero)
        cols = xp.arange(h, dtype=xp.int64, device=dev)
        block = (ColumnBlock(cols, a, (B, h), block_precision, every=True),
                 ColumnBlock(cols, g_a, (B, h), block_precision, every=True))
        g_W_dec = matmul_at(be, xp.matrix_transpose(a), g_ehat, block_precision) if want_g_W_dec else None
        return AuxKResult(value, None, None, g_W_dec, g_res, g_ehat, block, loss.lazy)
    g_values = be.sddmm(g_ehat, W_dec, code.rows, code.cols)
    g_values = xp.where(code.values != 0, g_values, zero)
    g_W_dec = be.spmm(code.cols, code.rows, code.values, g_ehat, h) if want_g_W_dec else None
    return loss.result(value, code, g_values, g_W_dec, g_res, g_ehat)


def _auxk_capacity(xp, be, pre, dead, W_dec, k_aux, loss, cap, precision, buf=None):
    """AuxK with shapes known in advance on a dense block of ``cap`` columns (the sync-free
    mode in training): the dead columns, ascending, then padding columns that repeat column
    0 with zero activations and zero gradient (harmless in the sums they enter). ``cap``
    must be at least the dead count (:mod:`sae_ref.dead_bound` bounds it without a host
    read). Each row's top ``min(k_aux, cap)`` of the block, positive entries only, is the
    exact selection (the dead columns ascend, so the tie rule is the full matrix's; padding
    is -inf and never kept), and every product is a GEMM of the block's width: at 10% dead
    latents a tenth of the work of the whole [B, h] block."""
    B, h = pre.shape
    dev = device_of(pre)
    zero = xp.zeros((), dtype=pre.dtype, device=dev)  # a fill: no host copy (a graph captures it)
    cols = be.compact(dead, cap)  # the dead columns, then h
    real = cols < h
    cols = xp.where(real, cols, xp.zeros_like(cols))
    W_d = take(W_dec, cols, axis=0)
    k = min(k_aux, cap)
    if k < cap:
        a = be.row_top_block(pre, cols, real, k)
    else:
        sub = take(pre, cols, axis=1)
        a = xp.where(real[None, :] & (sub > 0), sub, zero)
    # no dead latent: the loss and its gradients are zero, chosen on the device
    value, g_ehat, g_res = loss.masked(be, matmul_at(be, a, W_d, precision, out=buf), xp.any(dead), zero)
    # the gradient at the kept entries, with its column sums (the encoder bias's share)
    g_a, g_sums = be.gate(matmul_at(be, g_ehat, xp.matrix_transpose(W_d), precision), a)
    shape = (B, h)
    block = (ColumnBlock(cols, a, shape, precision), ColumnBlock(cols, g_a, shape, precision, sums=g_sums))
    return AuxKResult(value, None, None, None, g_res, g_ehat, block, loss.lazy)
