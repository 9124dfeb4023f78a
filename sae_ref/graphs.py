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

from array_api_compat import array_namespace

_STAND_IN = contextvars.ContextVar("sae_ref_graph_stand_in", default=False)


@contextlib.contextmanager
def stand_in():
    """Within this block, steps on any device use :class:`StepGraphs`, with a stand-in for the
    graph (the pass re-run on the captured arrays, its results copied into the captured
    outputs): every copy in and out happens as on a GPU."""
    token = _STAND_IN.set(True)
    try:
        yield
    finally:
        _STAND_IN.reset(token)


def wanted(setting, be, x) -> bool:
    """Whether a step on the batch ``x`` goes through :class:`StepGraphs` (``setting``:
    ``TrainConfig.cuda_graphs``; ``be``: the batch's backend)."""
    return setting is not False and (be.can_capture(x) or _STAND_IN.get())


class _Entry:
    """One captured pass: its input and output arrays and the graph (None: the stand-in)."""

    def __init__(self, fn, inputs, outputs, graph):
        self.fn, self.inputs, self.outputs, self.graph = fn, inputs, outputs, graph

    def load(self, inputs) -> None:
        """Copy each input that is not the captured array into it."""
        for mine, given in zip(self.inputs, inputs):
            if given is not mine:
                mine[...] = given

    def replay(self) -> list:
        if self.graph is not None:
            self.graph.replay()
        else:
            for mine, fresh in zip(self.outputs, self.fn(*self.inputs)):
                mine[...] = fresh
        return self.outputs


class StepGraphs:
    """The captured passes of one run, by key; :meth:`run` replays or runs eagerly."""

    def __init__(self):
        self.entries: dict = {}
        self.seen: set = set()
        self.off: str | None = None  # why graphs were turned off, when they were
        self.pool = None  # the backend's memory pool shared by the run's graphs
        self.captures = 0
        self.replays = 0

    def __getstate__(self):  # captured graphs stay with their process: a copy starts without
        return {}

    def __setstate__(self, state):
        self.__init__()

    def run(self, be, key, fn, inputs: list, keep: int = 0) -> list:
        """``fn(*inputs)`` (a list of arrays of the backend ``be``), by the graph of ``key``
        where there is one.
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
            entry = self._capture(be, fn, inputs, keep)
            if entry is None:
                return fn(*inputs)
            self.entries[key] = entry
            return entry.outputs
        entry.load(inputs)
        self.replays += 1
        return entry.replay()

    def _capture(self, be, fn, inputs, keep=0):
        own = list(inputs[:keep]) + [_copy(a) for a in inputs[keep:]]  # the arrays the graph reads
        try:
            if be.can_capture(own[-1]):
                graph, outputs = be.capture(fn, own, self)
            else:  # the stand-in
                graph, outputs = None, [_copy(a) for a in fn(*own)]
            entry = _Entry(fn, own, outputs, graph)
            got = entry.replay()
            want = fn(*own)
            for i, (a, b) in enumerate(zip(got, want)):
                if a.shape != b.shape or a.dtype != b.dtype or not be.same_bits(a, b):
                    raise ValueError(f"output {i} of the replayed pass differs from the eager pass")
        except Exception as e:  # noqa: BLE001: any failure means eager steps, said once
            self.off = f"{type(e).__name__}: {e}"
            self.entries.clear()
            warnings.warn(f"sae_ref: the training step's CUDA graph is off for this run ({self.off}); "
                          "steps run eagerly", RuntimeWarning, stacklevel=4)
            return None
        self.captures += 1
        return entry


def _copy(a):
    return array_namespace(a).asarray(a, copy=True)
