"""The training step's pass over the batch, captured once as a CUDA graph and replayed.

On a GPU a step's pass (forward, selection, losses, AuxK, backward: about 250 kernels) costs
the host a launch each, about a millisecond a step, as long as the device needs for the work
itself at sae-ref's shapes. The pass is sync-free with shapes fixed for a run, so it can be
recorded once (``torch.cuda.CUDAGraph``) and replayed with one launch. The update after it
(Adam, the decoder constraint, the theta estimate: a few dozen kernels) depends on the step
number and stays eager.

A graph reads and writes fixed memory. So :class:`StepGraphs` keeps, per key (the batch's
shape and dtype, AuxK's block width, the sparsity coefficient: every host value the pass
reads), the arrays it was captured on; before a replay, an input that is not the captured
array (a new batch, counters the last step returned) is copied into it, and the outputs are
the graph's own arrays, overwritten by the next replay.

**Exact or not at all.** A key is captured the second time it is seen (the first time runs
eagerly and warms the libraries up), and the captured graph's first replay is compared bit
for bit with the eager pass on the same inputs. If the capture fails or any bit differs,
graphs are turned off for the run with a warning naming the reason, and every step runs
eagerly; a run never takes a step the eager code would not take.

``TrainConfig.cuda_graphs``: None (default) captures on CUDA (torch); False never
(``--set cuda_graphs=false`` on the command line); True asks for it (on CUDA; elsewhere
there is nothing to capture). Steps that
:func:`sae_ref.profile.phases` times run eagerly (a replay has no phases to time). CuPy's stream capture is not
used yet. :func:`stand_in` makes CPU tensors go through the same bookkeeping with the pass
re-run instead of replayed (the tests check the bookkeeping with it; only a GPU checks the
capture).
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings

_STAND_IN = contextvars.ContextVar("sae_ref_graph_stand_in", default=False)


@contextlib.contextmanager
def stand_in():
    """Within this block, torch CPU steps use :class:`StepGraphs` with a stand-in for the
    graph (the pass re-run on the captured arrays, its results copied into the captured
    outputs): every copy in and out happens as on a GPU."""
    token = _STAND_IN.set(True)
    try:
        yield
    finally:
        _STAND_IN.reset(token)


def wanted(setting, x) -> bool:
    """Whether a step on the batch ``x`` goes through :class:`StepGraphs` (``setting``:
    ``TrainConfig.cuda_graphs``)."""
    if setting is False:
        return False
    try:
        import torch
    except ImportError:
        return False
    if not isinstance(x, torch.Tensor):
        return False
    return x.is_cuda or _STAND_IN.get()


class _Entry:
    """One captured pass: its input and output arrays and the graph (None: the stand-in)."""

    def __init__(self, fn, inputs, outputs, graph):
        self.fn, self.inputs, self.outputs, self.graph = fn, inputs, outputs, graph

    def load(self, inputs) -> None:
        """Copy each input that is not the captured array into it."""
        for mine, given in zip(self.inputs, inputs):
            if given is not mine:
                mine.copy_(given)

    def replay(self) -> list:
        if self.graph is not None:
            self.graph.replay()
        else:
            for mine, fresh in zip(self.outputs, self.fn(*self.inputs)):
                mine.copy_(fresh)
        return self.outputs


class StepGraphs:
    """The captured passes of one run, by key; :meth:`run` replays or runs eagerly."""

    def __init__(self):
        self.entries: dict = {}
        self.seen: set = set()
        self.off: str | None = None  # why graphs were turned off, when they were
        self.pool = None
        self.captures = 0
        self.replays = 0

    def __getstate__(self):  # captured graphs stay with their process: a copy starts without
        return {}

    def __setstate__(self, state):
        self.__init__()

    def run(self, key, fn, inputs: list, keep: int = 0) -> list:
        """``fn(*inputs)`` (a list of arrays), by the graph of ``key`` where there is one.
        ``fn`` must read nothing but ``inputs`` and the host values in ``key``. The graph
        reads the first ``keep`` inputs where they are (arrays the caller updates in place,
        such as parameters under Adam) and copies of the others (a batch, which the caller
        drops)."""
        if self.off is not None:
            return fn(*inputs)
        entry = self.entries.get(key)
        if entry is None:
            if key not in self.seen:  # the first time: eager, and the libraries warm up
                self.seen.add(key)
                return fn(*inputs)
            entry = self._capture(key, fn, inputs, keep)
            if entry is None:
                return fn(*inputs)
            return entry.outputs
        entry.load(inputs)
        self.replays += 1
        return entry.replay()

    def _capture(self, key, fn, inputs, keep=0):
        import torch

        own = list(inputs[:keep]) + [a.clone() for a in inputs[keep:]]  # the arrays the graph reads
        try:
            if own[0].is_cuda:
                graph, outputs = _cuda_capture(self, fn, own)
            else:
                graph, outputs = None, [a.clone() for a in fn(*own)]
            entry = _Entry(fn, own, outputs, graph)
            got = entry.replay()
            want = fn(*own)
            for i, (a, b) in enumerate(zip(got, want)):
                if a.shape != b.shape or a.dtype != b.dtype or not _same_bits(torch, a, b):
                    raise ValueError(f"output {i} of the replayed pass differs from the eager pass")
        except Exception as e:  # noqa: BLE001: any failure means eager steps, said once
            self.off = f"{type(e).__name__}: {e}"
            self.entries.clear()
            warnings.warn(f"sae_ref: the training step's CUDA graph is off for this run ({self.off}); "
                          "steps run eagerly", RuntimeWarning, stacklevel=4)
            return None
        self.entries[key] = entry
        self.captures += 1
        return entry


def _cuda_capture(graphs: StepGraphs, fn, inputs):
    """Capture ``fn(*inputs)`` on a side stream warmed up first (as torch recommends), in
    the run's shared memory pool; other threads may use the GPU meanwhile (a batch copy)."""
    import torch

    if graphs.pool is None:
        graphs.pool = torch.cuda.graph_pool_handle()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=graphs.pool, stream=side, capture_error_mode="thread_local"):
        outputs = fn(*inputs)
    return graph, list(outputs)


def _same_bits(torch, a, b) -> bool:
    """Whether two tensors hold the same bytes (NaNs with equal bits compare equal)."""
    a, b = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    if a.dtype == torch.bool:
        return bool(torch.equal(a, b))
    return bool(torch.equal(a.view(torch.uint8), b.view(torch.uint8)))
