"""torch's GPU-path primitives for another library's arrays, on zero-copy DLPack views.

Triton launches on torch tensors: its launcher reads torch's current stream, and the fused
kernels' wrappers allocate their outputs with torch. So a backend whose arrays torch can view
(CuPy's, through DLPack) runs the fused kernels by handing torch views of its arrays to the
torch backend's primitive and taking the results back as views: no copy either way, the same
kernels and the same bits as a torch step, queued on the calling library's current stream.

:class:`TorchBridge` is that mixin. A backend using it says when the bridge applies
(:meth:`~TorchBridge.bridge_on`), on which stream and device torch must launch
(:meth:`~TorchBridge.bridge_context`) and how a tensor comes back (:meth:`~TorchBridge.from_torch`);
:func:`through_torch` wraps its primitives in :data:`BRIDGED`. Where the bridge does not apply
(torch or Triton missing, the kernels off, arrays not on a GPU), the backend's own method runs.

Only code that has checked that torch imports calls into the bridge.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np

#: the primitives that run through torch: its fused Triton kernels, and its sync-free
#: products and selections (the kernels a torch step launches)
BRIDGED = (
    # the fused kernels
    "standardize", "group_keys", "subgroup_keys", "subgroup_entry_keys", "code_at", "decode_residual",
    "dead_counters", "row_top_block", "aux_residual", "gate", "backward_products", "min_positive",
    "running_mean_step", "adam", "adam_sums", "decoder_adam", "decoder_adam_sums",
    # torch's GPU path: top-k, fixed-size nonzero, sorted-segment and sampled products, atomics
    # only where their order cannot change a bit
    "top_indices", "top_values", "compact", "spmm", "sddmm", "segment_sum", "segment_count", "add_rows_at",
)


def _torch_backend():
    from . import _native

    return _native("torch")


@functools.cache
def _torch_dtype(dtype):
    """The torch dtype of a NumPy (or CuPy) dtype."""
    import torch

    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


class TorchBridge:
    """Mixin: the :data:`BRIDGED` primitives of a backend run as the torch backend's, on
    DLPack views of the arrays (see :func:`through_torch`)."""

    def bridge_on(self, arrays: list) -> bool:
        """Whether these arrays (a call's array arguments) go through torch."""
        raise NotImplementedError

    def bridge_context(self, arrays: list):
        """The context in which torch launches on the arrays' device and the library's current
        stream."""
        return contextlib.nullcontext()

    def from_torch(self, t):
        """The library's array viewing the torch tensor ``t`` (no copy)."""
        raise NotImplementedError

    def through_torch(self, name: str, own, args: tuple, kwargs: dict):
        """``own(self, *args, **kwargs)``, or the torch backend's ``name`` on views of the
        array arguments when :meth:`bridge_on` allows, its tensors taken back as views (an
        output that is an input tensor comes back as that input array, in place)."""
        arrays = [a for a in (*args, *kwargs.values()) if _is_array(a)]
        if not arrays or not self.bridge_on(arrays):
            return own(self, *args, **kwargs)
        import torch

        with self.bridge_context(arrays):
            views = {}  # id of a view -> (the view, kept alive; the array it views)

            def to_torch(a):
                if _is_array(a):
                    # booleans as bytes: not every library's DLPack carries its bool type
                    t = (torch.from_dlpack(a.view(np.uint8)).view(torch.bool) if a.dtype == np.bool_
                         else torch.from_dlpack(a))
                    views[id(t)] = (t, a)
                    return t
                if isinstance(a, np.dtype) or (isinstance(a, type) and issubclass(a, np.generic)):
                    return _torch_dtype(np.dtype(a))
                if isinstance(a, np.generic):  # a NumPy scalar (a 0-D result on the host)
                    return torch.from_numpy(np.asarray(a))
                return a

            def back(out):
                if isinstance(out, torch.Tensor):
                    if id(out) in views:
                        return views[id(out)][1]
                    if out.dtype == torch.bool:
                        return self.from_torch(out.view(torch.uint8)).view(np.bool_)
                    return self.from_torch(out)
                if isinstance(out, (tuple, list)):
                    return type(out)(back(o) for o in out)
                return out

            out = getattr(_torch_backend(), name)(*map(to_torch, args),
                                                  **{k: to_torch(v) for k, v in kwargs.items()})
            return back(out)


def _is_array(a) -> bool:
    """Whether ``a`` is an array that torch views through DLPack (not a tensor already)."""
    return hasattr(a, "__dlpack__") and type(a).__module__.split(".")[0] != "torch"


def through_torch(cls):
    """Class decorator: each :data:`BRIDGED` primitive of ``cls`` (a :class:`TorchBridge`)
    runs through torch where :meth:`~TorchBridge.bridge_on` allows, its own form elsewhere."""
    for name in BRIDGED:
        own = getattr(cls, name)

        def method(self, *args, _name=name, _own=own, **kwargs):
            return self.through_torch(_name, _own, args, kwargs)

        method.__name__, method.__qualname__ = name, f"{cls.__name__}.{name}"
        method.__doc__ = own.__doc__
        setattr(cls, name, method)
    return cls
