"""torch fast paths (CPU and CUDA): ``topk``, sorted-segment products, ``index_select``.

On the CPU, float16/32/64 tensors are viewed as NumPy arrays (no copy) for the whole-array
selection, where ``np.partition`` is several times faster than ``torch.kthvalue`` or
``torch.topk``.

On the GPU path (the sync-free mode) every sum of a sparse product is formed without atomic
adds: the entries are sorted by their output row into a CSR matrix, whose product sums each
output row from its own entries (cuSPARSE's SpMM). An atomic scatter-add (``index_add_``
on CUDA) adds in whatever order the threads arrive, so two runs of one step would differ in
the last bits; the sorted form gives the same bits every run. Atomics remain only where
their order cannot change a bit: integer counts (``segment_count``) and rows added into
rows of their own (``add_rows_at``, whose only repeated targets receive zero rows).
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch

from ._standard import CHUNK, PRECISIONS, StandardBackend, _below

_NUMPY_VIEWABLE = (torch.float16, torch.float32, torch.float64)


def _on_cpu(*tensors) -> bool:
    """Whether every tensor is a CPU float32/64 tensor that NumPy can view without a copy,
    outside the sync-free mode (which runs on the CPU exactly the torch calls a GPU runs)."""
    return all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and not t.requires_grad
               for t in tensors) and not _sync_free(tensors[0])


def _viewable(x) -> bool:
    """Whether NumPy's passes may run on a view of ``x`` (a CPU float tensor, outside the
    sync-free mode)."""
    return x.device.type == "cpu" and x.dtype in _NUMPY_VIEWABLE and not x.requires_grad and not _sync_free(x)


#: the value types the keyed selection's fused kernels read
_KEYED = (torch.float32, torch.float16, torch.bfloat16)


def _kernel(name, fused, composed):
    """``fused()``, a fused kernel's call, or ``composed()`` if the kernel fails to compile or
    launch: the kernels are then off for the process, with a warning that names the error
    (:func:`._triton.failed`)."""
    from ._triton import failed

    try:
        return fused()
    except Exception as err:  # a Triton or driver error at its first compile or launch
        failed(name, err)
        return composed()


def _fused(*tensors) -> bool:
    """Whether the fused Triton kernels run on these tensors (:mod:`._triton`)."""
    from ._triton import usable

    return usable(*tensors)


def _sync_free(x) -> bool:
    from . import is_sync_free

    return is_sync_free(x)


@contextlib.contextmanager
def _tf32():
    """CUDA float32 products on the TensorFloat-32 units within this block (the setting is
    process-wide: restored on exit)."""
    flags = torch.backends.cuda.matmul
    if hasattr(flags, "fp32_precision"):
        before, flags.fp32_precision = flags.fp32_precision, "tf32"
        try:
            yield
        finally:
            flags.fp32_precision = before
    else:
        before, flags.allow_tf32 = flags.allow_tf32, True
        try:
            yield
        finally:
            flags.allow_tf32 = before


def _segment_spmm(out_index, in_index, values, dense, n_out):
    """``out[r] = sum of values[i] * dense[in_index[i]] over the entries i with out_index[i] == r``
    as (n_out, d), with no atomic add and no host read: the entries sorted by ``out_index``
    (stably), the row pointers found by ``searchsorted``, and the product of that CSR matrix
    with ``dense`` (cuSPARSE's SpMM on a GPU, which sums each output row from its own
    entries: the same bits every run; measured on an H200 at 0.10 ms where ``embedding_bag``
    took 0.27 ms). The CSR matrix is built from the sorted entries directly, not converted
    (a conversion reads the number of entries back). Places must be unique, as in every code
    sae-ref makes."""
    order = torch.argsort(out_index, stable=True)
    at = out_index.index_select(0, order)
    bounds = torch.arange(n_out + 1, dtype=at.dtype, device=at.device)
    crow = torch.searchsorted(at, bounds)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        m = torch.sparse_csr_tensor(crow, in_index.index_select(0, order),
                                    values.index_select(0, order).to(dense.dtype),
                                    (n_out, dense.shape[0]), check_invariants=False)
        return torch.sparse.mm(m, dense)


def _sampled_dots(a, b, a_index, b_index):
    """``out[i] = a[a_index[i]] . b[b_index[i]]`` in one sampled product
    (``torch.sparse.sampled_addmm``, cuSPARSE's SDDMM on a GPU) with no host read: the places
    sorted row-major, the CSR row pointers found by ``searchsorted``, and the dot products put
    back in the caller's order."""
    key = a_index * b.shape[0] + b_index
    order = torch.argsort(key, stable=True)
    rows = a_index.index_select(0, order)
    bounds = torch.arange(a.shape[0] + 1, dtype=rows.dtype, device=rows.device)
    crow = torch.searchsorted(rows, bounds)
    zeros = torch.zeros(order.shape[0], dtype=a.dtype, device=a.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(crow, b_index.index_select(0, order), zeros,
                                          (a.shape[0], b.shape[0]), check_invariants=False)
        dots = torch.sparse.sampled_addmm(pattern, a, b.T, beta=0.0).values()
    return torch.empty_like(dots).index_copy_(0, order, dots)


_COPY_STREAMS: dict = {}


def _copy_stream(device):
    """The side stream of a CUDA device on which batches are copied in (one per device)."""
    key = torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device()
    if key not in _COPY_STREAMS:
        _COPY_STREAMS[key] = torch.cuda.Stream(device=key)
    return _COPY_STREAMS[key]


def _numpy():
    from . import get_backend

    return get_backend(np)


class TorchBackend(StandardBackend):
    name = "torch"
    precisions = PRECISIONS

    def kth_largest(self, x, n, *, axis=None):
        if axis is None:
            flat = x.reshape(-1)
            if _viewable(flat):
                a = flat.numpy()
                j = a.shape[0] - n
                return torch.as_tensor(np.partition(a, j)[j])
            return torch.topk(flat, n, sorted=False).values.amin()
        return torch.topk(x, n, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)

    def top_n_indices(self, x, n, *, axis=None, maxima=None):
        if _viewable(x):
            # NumPy's passes (compare, nonzero, partition) are 2-3x faster than torch's on the
            # CPU; the view shares memory, so this costs no copy
            m = None if maxima is None else maxima.detach().numpy()
            idx, cut = _numpy().top_n_indices(x.detach().numpy(), n, axis=axis, maxima=m)
            return torch.from_numpy(idx), torch.from_numpy(np.asarray(cut))
        return super().top_n_indices(x, n, axis=axis, maxima=maxima)

    def spmm(self, out_index, in_index, values, dense, n_out, *, out=None, accumulate=False):
        if _on_cpu(values, dense) and (out is None or _on_cpu(out)):
            # the NumPy backend's kernels on NumPy views: no copy
            buf = None if out is None else out.numpy()
            res = _numpy().spmm(out_index.numpy(), in_index.numpy(), values.numpy(), dense.numpy(),
                                n_out, out=buf, accumulate=accumulate)
            return out if buf is not None and res is buf else torch.from_numpy(res)
        if _sync_free(dense):  # sorted segments: no atomics, the same bits every run
            res = _segment_spmm(out_index, in_index, values, dense, n_out)
            # the result as it is, not copied into ``out``: a copy is a pass over [n_out, d],
            # and a GPU's caching allocator reuses the memory anyway
            return out.add_(res) if accumulate else res
        if accumulate:
            return out + self.spmm(out_index, in_index, values, dense, n_out)
        if dense.dtype in (torch.float32, torch.float64) and out_index.shape[0] > 0:
            # a CSR product (torch.sparse, MKL on the CPU) is 1.5-6x faster than index_add_
            idx = torch.stack([out_index, in_index])
            # indices come from our own codes (in range by construction): skip torch's checks
            m = torch.sparse_coo_tensor(idx, values, (n_out, dense.shape[0]),
                                        check_invariants=False, is_coalesced=False)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
                return torch.sparse.mm(m.coalesce().to_sparse_csr(), dense)
        if out is None or tuple(out.shape) != (n_out, dense.shape[1]) or out.dtype != dense.dtype:
            out = torch.zeros((n_out, dense.shape[1]), dtype=dense.dtype, device=dense.device)
        else:
            out.zero_()
        for s in range(0, out_index.shape[0], CHUNK):  # half precision off the GPU path
            contrib = dense.index_select(0, in_index[s : s + CHUNK]).mul_(values[s : s + CHUNK, None])
            out.index_add_(0, out_index[s : s + CHUNK], contrib)
        return out

    def backward_products(self, rows, cols, values, G, W, X, g_code=None, *, padded=False,
                          with_sums=False, out_W=None, out_X=None):
        outs = [o for o in (out_W, out_X) if o is not None]
        extra = () if g_code is None else (g_code,)
        composed = lambda: super(TorchBackend, self).backward_products(
            rows, cols, values, G, W, X, g_code, padded=padded, with_sums=with_sums, out_W=out_W,
            out_X=out_X)
        if (_fused(values, G, W, X, rows, cols, *extra) and W.dtype in (torch.float32, torch.float64)
                and all(a.dtype == W.dtype for a in (values, G, X, *extra))
                and all(a.is_contiguous() for a in (rows, cols, values, G, W, X, *extra))
                and not rows.is_floating_point() and not cols.is_floating_point()):
            from ._triton_sparse import MAX_D, backward_products

            if W.shape[1] <= MAX_D:
                # the three products (and the sums) latent by latent from one sort of the
                # entries, each decoder row read once (composed: ~35 launches, four sorts, a
                # decoder row per entry)
                return _kernel("backward_products", lambda: backward_products(
                    rows, cols, values, G, W, X, g_code, padded=padded, out_W=out_W,
                    out_X=out_X)[:4 if with_sums else 3], composed)
        if not padded and _on_cpu(values, G, W, X, *extra, *outs) and all(a.is_contiguous() for a in (G, W, X, *outs)):
            # the NumPy backend's one-pass kernel on views
            view = lambda o: None if o is None else o.numpy()
            bufs = (None, view(out_W), view(out_X))
            res = _numpy().backward_products(
                rows.numpy(), cols.numpy(), values.numpy(), G.numpy(), W.numpy(), X.numpy(),
                view(g_code), out_W=bufs[1], out_X=bufs[2])
            out = tuple(o if b is not None and r is b else torch.from_numpy(r)
                        for r, b, o in zip(res, bufs, (None, out_W, out_X)))
            return out + (self.segment_sum(cols, out[0], W.shape[0]),) if with_sums else out
        return composed()

    def standardize(self, x, b, eps):
        composed = lambda: super(TorchBackend, self).standardize(x, b, eps)
        if (b is not None and _fused(x, b) and x.dtype in (torch.float32, torch.float64) and b.dtype == x.dtype
                and x.is_contiguous() and b.is_contiguous() and x.ndim == 2 and x.shape[0] > 0):
            from ._triton_standardize import MAX_D, standardize

            if x.shape[1] <= MAX_D:
                # the rows' statistics, the standardised rows and the centred input in one pass
                # (composed: seven launches, four passes over [B, d])
                return _kernel("standardize", lambda: standardize(x, b, eps), composed)
        return composed()

    def gate(self, P, a):
        composed = lambda: super(TorchBackend, self).gate(P, a)
        if (_fused(P, a) and P.dtype in (torch.float32, torch.float64) and a.dtype == P.dtype
                and P.ndim == 2 and P.shape == a.shape and P.is_contiguous() and a.is_contiguous()):
            from ._triton_gate import gate

            # the kept entries' gradient and its column sums in one pass (composed: three)
            return _kernel("gate", lambda: gate(P, a), composed)
        return composed()

    def aux_residual(self, e_hat, residual, scale, on):
        composed = lambda: super(TorchBackend, self).aux_residual(e_hat, residual, scale, on)
        if (_fused(e_hat, residual, on) and e_hat.dtype in (torch.float32, torch.float64)
                and residual.dtype == e_hat.dtype and e_hat.shape == residual.shape
                and e_hat.is_contiguous() and residual.is_contiguous() and on.ndim == 0):
            from ._triton_residual import aux_residual

            # the error, its sum of squares and its masked, scaled gradient in one pass
            # (composed: four passes over [B, d])
            return _kernel("aux_residual", lambda: aux_residual(e_hat, residual, scale, on), composed)
        return composed()

    def decode_residual(self, rows, cols, values, W, b, x, scale, *, out=None):
        composed = lambda: super(TorchBackend, self).decode_residual(rows, cols, values, W, b, x, scale,
                                                                     out=out)
        if (_fused(values, W, b, x, rows, cols) and W.dtype in (torch.float32, torch.float64)
                and all(a.dtype == W.dtype for a in (values, b, x))
                and all(a.is_contiguous() for a in (rows, cols, values, W, b, x))
                and not rows.is_floating_point() and not cols.is_floating_point()):
            from ._triton_decode import decode_residual
            from ._triton_sparse import MAX_D

            if W.shape[1] <= MAX_D:
                # the decoding, the bias, the residual, its scaled copy and the rows' sums of
                # squares in one pass over the rows (composed: a sort of the entries, a CSR
                # build and product, then four passes over [B, d])
                return _kernel("decode_residual", lambda: decode_residual(
                    rows, cols, values, W, b, x, scale, out=out), composed)
        return composed()

    def sddmm(self, a, b, a_index, b_index):
        if _on_cpu(a, b) and a.dtype == b.dtype:
            return torch.from_numpy(_numpy().sddmm(a.numpy(), b.numpy(), a_index.numpy(), b_index.numpy()))
        n = a_index.shape[0]
        if n > 0 and a.dtype in (torch.float32, torch.float64) and a.dtype == b.dtype:
            # only the sampled dot products are computed, not a @ b.T
            return _sampled_dots(a, b, a_index, b_index)
        out = torch.empty(n, dtype=torch.result_type(a, b), device=a.device)
        for s in range(0, n, CHUNK):  # half precision
            ga = a.index_select(0, a_index[s : s + CHUNK])
            gb = b.index_select(0, b_index[s : s + CHUNK])
            out[s : s + CHUNK] = torch.einsum("ij,ij->i", ga, gb)
        return out

    def compact(self, mask, n):
        # a fixed-size nonzero: on CUDA no count is copied back to the host
        flat = mask.reshape(-1)
        return torch.nonzero_static(flat, size=n, fill_value=flat.shape[0]).reshape(-1)

    def segment_sum(self, index, values, n):
        if _sync_free(values) and values.is_floating_point():  # sorted segments: no atomics
            ones = torch.ones((values.shape[0], 1), dtype=values.dtype, device=values.device)
            at = torch.arange(values.shape[0], device=values.device)
            return _segment_spmm(index, at, values, ones, n)[:, 0]
        out = torch.zeros((n,), dtype=values.dtype, device=values.device)
        return out.index_add_(0, index, values)

    def segment_count(self, index, flags, n, dtype):
        if _sync_free(flags) and index.shape[0] < 2**31:
            # integer atomics: a count is the same whatever order the adds arrive in, so no
            # sort is needed (the sorted product costs an argsort and a CSR build)
            counts = torch.zeros((n,), dtype=torch.int32, device=flags.device)
            return counts.index_add_(0, index, flags.to(torch.int32)).to(dtype)
        return super().segment_count(index, flags, n, dtype)

    def contiguous(self, x):
        return x.contiguous()

    def latent_major(self, W_enc):
        return W_enc.T.contiguous().T

    def is_column_major(self, x):
        return x.ndim == 2 and x.shape[0] > 1 and x.T.is_contiguous() and not x.is_contiguous()

    def adam(self, p, g, m, v, *, lr, b1, b2, eps, t, inplace=False):
        if _on_cpu(p, g, m, v) and _numpy().compiled and p.dtype == g.dtype and p.stride() == g.stride():
            # the NumPy backend's compiled pass on views (torch's fused kernel is as fast
            # alone, but its OpenMP workers then spin against the next kernels)
            arrays = [a.numpy() for a in (p, g, m, v)]
            out = _numpy().adam(*arrays, lr=lr, b1=b1, b2=b2, eps=eps, t=t, inplace=inplace)
            return tuple(torch.from_numpy(o) for o in out)  # in place: views of p, m, v
        eager = getattr(torch, "_fused_adam_", None)
        if eager is None or p.dtype not in (torch.float32, torch.float64) or p.stride() != g.stride():
            return super().adam(p, g, m, v, lr=lr, b1=b1, b2=b2, eps=eps, t=t, inplace=inplace)
        if not inplace:
            p, m, v = (a.clone(memory_format=torch.preserve_format) for a in (p, m, v))

        def composed():
            # PyTorch's own fused kernel (vectorised, multi-threaded on the CPU, one launch on
            # a GPU); the step count is a tensor on the parameter's device, so nothing is read
            # back
            step = torch.full((), float(t), dtype=torch.float32, device=p.device)
            eager([p], [g], [m], [v], [], [step], lr=lr, beta1=b1, beta2=b2, weight_decay=0.0,
                  eps=eps, amsgrad=False, maximize=False)
            return p, m, v

        if self._adam_kernel(p, g, m, v):
            from ._triton_adam import adam

            def fused():
                # one elementwise pass over the storage at the copy bandwidth (torch's fused
                # kernel reached about 60% of it on an H200), the latent-major W_enc included
                adam(p, g, m, v, lr=lr, b1=b1, b2=b2, eps=eps, t=t)
                return p, m, v

            return _kernel("adam", fused, composed)
        return composed()

    def _adam_kernel(self, p, g, m, v) -> bool:
        """Whether the fused Adam kernel takes these tensors."""
        return (_fused(p, g, m, v) and p.dtype in (torch.float32, torch.float64)
                and (p.is_contiguous() or self.is_column_major(p))
                and all(a.shape == p.shape and a.dtype == p.dtype and a.device == p.device
                        and a.stride() == p.stride() for a in (g, m, v)))

    def adam_sums(self, p, g, m, v, *, lr, b1, b2, eps, t, inplace=False):
        if self._adam_kernel(p, g, m, v):
            from ._triton_adam import adam

            if not inplace:
                p, m, v = (a.clone(memory_format=torch.preserve_format) for a in (p, m, v))
            # the sum of g^2 from the step's own pass: the gradient is read once, not twice
            fused = lambda: (p, m, v, adam(p, g, m, v, lr=lr, b1=b1, b2=b2, eps=eps, t=t, sums=True))
            composed = lambda: super(TorchBackend, self).adam_sums(p, g, m, v, lr=lr, b1=b1, b2=b2, eps=eps,
                                                                   t=t, inplace=True)
            return _kernel("adam", fused, composed)
        return super().adam_sums(p, g, m, v, lr=lr, b1=b1, b2=b2, eps=eps, t=t, inplace=inplace)

    def decoder_adam(self, W, g, m, v, *, lr, b1, b2, eps, t, order, inplace=False):
        if _on_cpu(W, g, m, v) and all(a.is_contiguous() for a in (W, g, m, v)):
            if not inplace:
                W, m, v = W.clone(), m.clone(), v.clone()
            out = _numpy().decoder_adam(W.numpy(), g.numpy(), m.numpy(), v.numpy(), lr=lr, b1=b1,
                                        b2=b2, eps=eps, t=t, order=order, inplace=True)
            return tuple(torch.from_numpy(a) for a in out)  # views of W, m, v when fused
        if self._decoder_adam_kernel(W, g, m, v):
            return self._decoder_adam_fused(W, g, m, v, lr=lr, b1=b1, b2=b2, eps=eps, t=t, order=order,
                                            inplace=inplace, sums=False)
        return super().decoder_adam(W, g, m, v, lr=lr, b1=b1, b2=b2, eps=eps, t=t, order=order,
                                    inplace=inplace)

    def decoder_adam_sums(self, W, g, m, v, *, lr, b1, b2, eps, t, order, inplace=False):
        if self._decoder_adam_kernel(W, g, m, v):
            return self._decoder_adam_fused(W, g, m, v, lr=lr, b1=b1, b2=b2, eps=eps, t=t, order=order,
                                            inplace=inplace, sums=True)
        return super().decoder_adam_sums(W, g, m, v, lr=lr, b1=b1, b2=b2, eps=eps, t=t, order=order,
                                         inplace=inplace)

    @staticmethod
    def _decoder_adam_kernel(W, g, m, v) -> bool:
        """Whether the fused decoder Adam kernel takes these tensors."""
        return (_fused(W, g, m, v) and W.dtype in (torch.float32, torch.float64)
                and all(a.dtype == W.dtype and a.is_contiguous() for a in (g, m, v)) and W.is_contiguous())

    def _decoder_adam_fused(self, W, g, m, v, *, lr, b1, b2, eps, t, order, inplace, sums):
        from sae_ref.decoder import TINY

        from ._triton_adam import decoder_adam

        if not inplace:
            W, m, v = W.clone(), m.clone(), v.clone()

        def fused():
            # one kernel: each row's norm, projection, Adam step (and renormalisation) in
            # registers, where the composed form makes about ten passes over [h, d]; with
            # ``sums`` the gradient's sum of squares from the same pass
            ss = decoder_adam(W, g, m, v, lr=lr, b1=b1, b2=b2, eps=eps, t=t, order=order, tiny=TINY, sums=sums)
            return (W, m, v, ss) if sums else (W, m, v)

        plain = super().decoder_adam_sums if sums else super().decoder_adam
        composed = lambda: plain(W, g, m, v, lr=lr, b1=b1, b2=b2, eps=eps, t=t, order=order, inplace=True)
        return _kernel("decoder_adam", fused, composed)

    def add_row_vector(self, x, v):
        if _on_cpu(x, v) and x.is_contiguous():  # the NumPy kernel on views, in place
            _numpy().add_row_vector(x.numpy(), v.numpy())
            return x
        return super().add_row_vector(x, v)

    def indices_at_least(self, x, lo, *, maxima=None):
        if _viewable(x):
            # the NumPy backend's compiled passes on views: no [B, h] boolean mask
            m = None if maxima is None else maxima.detach().numpy()
            lo = lo.detach().numpy() if hasattr(lo, "detach") else lo
            return torch.from_numpy(_numpy().indices_at_least(x.detach().numpy(), lo, maxima=m))
        return super().indices_at_least(x, lo, maxima=maxima)

    def group_argmax(self, x, g):
        B, h = x.shape
        m, s = torch.max(x.reshape(B, g, h // g), dim=1)  # the first maximal entry's slab
        return m, s

    def group_keys(self, x, g, *, per_row, runs=None):
        composed = lambda: super(TorchBackend, self).group_keys(x, g, per_row=per_row, runs=runs)
        if _fused(x) and x.dtype in _KEYED and x.is_contiguous() and g <= 64 and (runs or 1) <= 128:
            from ._triton_select import group_keys

            # one pass (and the runs' maxima from the keys in registers)
            return _kernel("group_keys", lambda: group_keys(x, g, per_row=per_row, runs=runs), composed)
        return composed()

    def min_positive(self, values):
        if (_fused(values) and values.dtype in (torch.float32, torch.float64) and values.ndim == 1
                and values.is_contiguous()):
            from ._triton_theta import min_positive

            # integer atomic minima of the positive values' bits (composed: four launches)
            return _kernel("min_positive", lambda: min_positive(values), lambda: super(TorchBackend, self)
                           .min_positive(values))
        return super().min_positive(values)

    def running_mean_step(self, buf, m, slot):
        if (_fused(buf, m) and buf.dtype in (torch.float32, torch.float64) and m.dtype == buf.dtype
                and buf.ndim == 1 and buf.is_contiguous() and m.ndim == 0):
            from ._triton_theta import running_mean_step

            # the ring buffer's slot written and its finite mean taken in one program
            # (composed: about a dozen launches)
            return _kernel("running_mean_step", lambda: running_mean_step(buf, m, slot),
                           lambda: super(TorchBackend, self).running_mean_step(buf, m, slot))
        return super().running_mean_step(buf, m, slot)

    def dead_counters(self, cols, values, since, B, threshold, dtype):
        composed = lambda: super(TorchBackend, self).dead_counters(cols, values, since, B, threshold, dtype)
        if (_fused(cols, values, since) and cols.dtype == torch.int64 and not since.is_floating_point()
                and cols.is_contiguous() and values.is_contiguous() and since.is_contiguous()):
            from ._triton_counters import dead_counters

            # integer atomics into the latents' counts, then one pass over the latents
            # (composed: about fifteen small launches)
            return _kernel("dead_counters", lambda: dead_counters(cols, values, since, B, threshold, dtype),
                           composed)
        return composed()

    def code_at(self, x, idx):
        composed = lambda: super(TorchBackend, self).code_at(x, idx)
        if _fused(x, idx) and x.is_floating_point() and x.is_contiguous() and idx.dtype == torch.int64:
            from ._triton_select import code_at

            # the gather, the rows, the columns and the non-positive values zeroed in one pass
            # (composed: six launches)
            return _kernel("code_at", lambda: code_at(x, idx.contiguous()), composed)
        return composed()

    def subgroup_keys(self, x, top, g, s, *, per_row):
        composed = lambda: super(TorchBackend, self).subgroup_keys(x, top, g, s, per_row=per_row)
        if _fused(x, top) and x.dtype in _KEYED and x.is_contiguous() and g <= 64:
            from ._triton_select import subgroup_keys

            # the chosen groups' entries keyed and their subgroups' maxima taken in registers
            return _kernel("subgroup_keys", lambda: subgroup_keys(x, top, g, s, per_row=per_row), composed)
        return composed()

    def subgroup_entry_keys(self, x, top, g, s, *, per_row):
        composed = lambda: super(TorchBackend, self).subgroup_entry_keys(x, top, g, s, per_row=per_row)
        if _fused(x, top) and x.dtype in _KEYED and x.is_contiguous() and g <= 64:
            from ._triton_select import subgroup_entry_keys

            return _kernel("subgroup_entry_keys", lambda: subgroup_entry_keys(x, top, g, s, per_row=per_row),
                           composed)
        return composed()

    def add_rows_at(self, out, cols, rows):
        if _sync_free(out) and out.dtype == rows.dtype and out.device == rows.device:
            # an atomic add of the n rows into theirs alone: each target row receives one
            # row, or one row and zero rows (padding), and adding +0.0 in any order gives the
            # same bits; the sorted product would write and re-add the whole [h, d]
            return out.index_add_(0, cols, rows)
        return super().add_rows_at(out, cols, rows)

    def row_top_block(self, pre, cols, real, k):
        composed = lambda: super(TorchBackend, self).row_top_block(pre, cols, real, k)
        if _fused(pre, cols) and pre.dtype in _KEYED and pre.is_contiguous():
            from ._triton_select import MAX_ROW_BLOCK, row_top_block

            if cols.shape[0] <= MAX_ROW_BLOCK:  # one pass; no [B, cap] temporaries
                return _kernel("row_top_block", lambda: row_top_block(pre, cols, real, k), composed)
        return composed()

    has_float_bits = True

    def float_bits(self, x):
        return x.view(torch.int32)

    def top_indices(self, keys, k, *, axis=None):
        return torch.topk(keys, k, dim=-1, sorted=False).indices

    def top_values(self, keys, k, *, axis=None):
        return torch.topk(keys, k, dim=-1, sorted=False).values  # top-k gives them: no gather

    def add_and_group_max(self, x, v, g):
        if _on_cpu(x, v) and x.is_contiguous() and v.is_contiguous():  # one pass, on views
            _, maxima = _numpy().add_and_group_max(x.numpy(), v.numpy(), g)
            return x, torch.from_numpy(maxima)
        return super().add_and_group_max(x, v, g)

    def matmul(self, a, b, *, out=None):
        if out is None and _on_cpu(a, b) and a.ndim == b.ndim == 2 and a.dtype == b.dtype:
            # without a buffer (encode, AuxK) the same GEMM as with one, NumPy's: the same
            # bits whether or not the caller holds a workspace
            out = torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
        if (out is not None and _on_cpu(a, b, out) and out.is_contiguous()
                and tuple(out.shape) == (a.shape[0], b.shape[1]) and a.dtype == b.dtype == out.dtype):
            # NumPy's BLAS on views, split over the NumPy backend's threads: torch's OpenMP
            # workers would spin after the product and slow the kernels that follow
            _numpy().matmul(a.numpy(), b.numpy(), out=out.numpy())
            return out
        if (out is not None and tuple(out.shape) == (a.shape[0], b.shape[1]) and out.dtype == a.dtype == b.dtype
                and out.device == a.device and not (a.requires_grad or b.requires_grad)):
            return torch.matmul(a, b, out=out)
        return a @ b

    def matmul_at(self, a, b, precision, *, out=None):
        self.check_precision(precision)
        if precision == "bf16":
            a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
            if a.is_cuda:  # bfloat16 tensor cores, float32 sums and output
                return torch.mm(a16, b16, out_dtype=torch.float32)
            # the CPU has no bf16-in, float32-out product: the same numbers from float32 GEMM
            # of the rounded inputs
            return self.matmul(a16.to(a.dtype), b16.to(b.dtype), out=out)
        if precision == "tf32" and a.is_cuda:
            with _tf32():
                return self.matmul(a, b, out=out)
        return self.matmul(a, b, out=out)

    def matmul_add(self, a, b, v, precision, *, out=None):
        if not _sync_free(a) or precision == "bf16" or a.dtype not in (torch.float32, torch.float64):
            return super().matmul_add(a, b, v, precision, out=out)
        # one GEMM whose epilogue adds the bias (cuBLASLt on a GPU): the [B, n] result is
        # written once, not written, read and written again
        fits = (out is not None and tuple(out.shape) == (a.shape[0], b.shape[1])
                and out.dtype == a.dtype and out.device == a.device)
        with _tf32() if precision == "tf32" and a.is_cuda else contextlib.nullcontext():
            return torch.addmm(v, a, b, out=out) if fits else torch.addmm(v, a, b)

    def sum_squares(self, g):
        return torch.linalg.vector_norm(g).square()

    def to_dense(self, rows, cols, values, shape):
        out = torch.zeros(shape, dtype=values.dtype, device=values.device)
        out[rows, cols] = values
        return out

    def from_host(self, xp, a, *, dtype, device):
        if getattr(device, "type", None) == "cuda":
            # through page-locked memory, queued after the step like a kernel: a copy from
            # pageable memory would hold the host until the step had run
            host = torch.from_numpy(np.ascontiguousarray(a)).pin_memory()
            return host.to(device, non_blocking=True).to(dtype)  # converted on the device
        return super().from_host(xp, a, dtype=dtype, device=device)

    def from_host_async(self, xp, a, *, dtype, device):
        if getattr(device, "type", None) != "cuda":
            return self.from_host(xp, a, dtype=dtype, device=device), None
        # page-locked host memory, copied on a side stream: the copy overlaps the step that
        # the compute stream is running (a thread may call this)
        host = torch.from_numpy(np.ascontiguousarray(a)).pin_memory()  # the store's dtype
        side = _copy_stream(device)
        with torch.cuda.stream(side):
            out = host.to(device, non_blocking=True).to(dtype)  # converted on the device
            done = torch.cuda.Event()
            done.record(side)
        return out, done

    def wait_ready(self, array, ready):
        if ready is None:
            return
        current = torch.cuda.current_stream(array.device)
        current.wait_event(ready)
        array.record_stream(current)  # its memory is not reused before the step has read it

    def to_host_async(self, a):
        if a.device.type != "cuda":
            return a
        # into page-locked memory, behind the queued work, with an event to wait on later
        host = torch.empty(a.shape, dtype=a.dtype, pin_memory=True)
        host.copy_(a, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done

    def can_capture(self, x):
        return isinstance(x, torch.Tensor) and x.is_cuda

    def capture(self, fn, inputs, run):
        # on a side stream warmed up first (as torch recommends), in the run's shared memory
        # pool; other threads may use the GPU meanwhile (a batch copy)
        if run.pool is None:
            run.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=run.pool, stream=side, capture_error_mode="thread_local"):
            outputs = fn(*inputs)
        return graph, list(outputs)

    def same_bits(self, a, b):
        a, b = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
        if a.dtype == torch.bool:
            return bool(torch.equal(a, b))
        return bool(torch.equal(a.view(torch.uint8), b.view(torch.uint8)))

    def uniform(self, xp, seed, shape, *, low, high, dtype, device):
        g = torch.Generator(device=device).manual_seed(seed)
        u = torch.rand(shape, generator=g, dtype=dtype, device=device)
        return _below(xp, u * (high - low) + low, low, high)

    def normal(self, xp, seed, shape, *, dtype, device):
        g = torch.Generator(device=device).manual_seed(seed)
        return torch.randn(shape, generator=g, dtype=dtype, device=device)
