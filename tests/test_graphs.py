"""The step's pass replayed as a captured graph (:mod:`sae_ref.graphs`).

On the CPU the capture is a stand-in (the pass re-run on the captured arrays, its results
copied into the captured outputs), so these tests check the bookkeeping a CUDA graph needs:
inputs copied into the arrays the graph reads, outputs copied out before the next replay
overwrites them, one graph per host value the pass reads, the fall-back to eager steps. The
capture itself is checked on a GPU (the last test), where it runs whenever one is present.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sae_ref import graphs as G  # noqa: E402
from sae_ref.backends import get_backend, sync_free  # noqa: E402
from sae_ref.train import TrainConfig, init_state, state_arrays, state_from_arrays, step  # noqa: E402


BE = get_backend(torch)


def _train(config, xs, steps, *, graphed, device="cpu", donate=True):
    state = init_state(config, xs[0].to(device))
    metrics = []
    ctx = G.stand_in() if graphed and device == "cpu" else _nothing()
    with sync_free(True), ctx:
        for i in range(steps):
            state, m = step(state, xs[i % len(xs)].to(device), check=False, donate=donate)
            metrics.append({k: float(v) for k, v in m.items()})
    return state, metrics


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _batches(dtype, n=3, B=32, d=12):
    rng = np.random.default_rng(11)
    return [torch.from_numpy(rng.standard_normal((B, d)) * rng.uniform(0.3, 3, d)).to(dtype) for _ in range(n)]


def _assert_same_state(a, b):
    arrays_a, meta_a = state_arrays(a)
    arrays_b, meta_b = state_arrays(b)
    for meta in (meta_a, meta_b):
        meta["config"].pop("cuda_graphs")  # a speed setting
    assert meta_a == meta_b
    for name in arrays_a:
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("arch,extra", [
    ("batchtopk", {}),
    ("topk", {}),
    ("relu-l1", {"sparsity_coeff": 0.05, "sparsity_warmup_steps": 3}),
    ("jumprelu", {"sparsity_coeff": 0.01}),
])
def test_replayed_passes_take_the_eager_steps_bit_for_bit(arch, extra, dtype):
    """Invariant: training through the graph bookkeeping (capture on a key's second step,
    replays after) ends at the same state, bit for bit, with the same metrics at every step,
    as eager training; some passes were replayed (AuxK's block width and the warming-up
    sparsity coefficient change keys on the way)."""
    config = TrainConfig(arch=arch, h=96, k=4, k_aux=16, lr=3e-3, dead_after=3, dead_unit="batches",
                         **extra)
    xs = _batches(dtype)
    eager, m_eager = _train(config, xs, 12, graphed=False)
    graphed, m_graphed = _train(config, xs, 12, graphed=True)
    assert graphed.graphs.off is None
    assert graphed.graphs.captures >= 1 and graphed.graphs.replays >= 5
    assert eager.graphs.captures == 0
    _assert_same_state(graphed, eager)
    assert m_graphed == m_eager


def test_graphs_are_not_used_when_turned_off_or_when_the_state_is_not_donated():
    """Invariant: ``cuda_graphs=False`` and non-donated steps run eagerly (no capture) and
    take the same steps."""
    xs = _batches(torch.float32)
    on, _ = _train(TrainConfig(h=64, k=4, k_aux=8), xs, 6, graphed=True)
    off, _ = _train(TrainConfig(h=64, k=4, k_aux=8, cuda_graphs=False), xs, 6, graphed=True)
    kept, _ = _train(TrainConfig(h=64, k=4, k_aux=8), xs, 6, graphed=True, donate=False)
    assert on.graphs.captures >= 1
    assert off.graphs.captures == 0 and kept.graphs.captures == 0
    _assert_same_state(off, on)
    _assert_same_state(kept, on)


def test_a_pass_that_replays_differently_turns_graphs_off_with_a_warning():
    """Invariant: when the replayed pass does not give the eager pass's bits (here a pass
    that draws random numbers), graphs are turned off for the run with a RuntimeWarning
    naming the reason, and the result is the eager pass's."""
    graphs = G.StepGraphs()
    x = torch.ones(4)

    def noisy(a):
        return [a + torch.rand(4)]

    assert len(graphs.run(BE, "k", noisy, [x])) == 1  # first sight: eager
    with pytest.warns(RuntimeWarning, match="differs from the eager pass"):
        out = graphs.run(BE, "k", noisy, [x])
    assert graphs.off is not None and "output 0" in graphs.off and not graphs.entries
    assert out[0].shape == (4,)
    graphs.run(BE, "k", noisy, [x])  # eager from now on, with no second warning
    assert graphs.captures == 0


def test_replay_copies_new_inputs_into_the_captured_arrays_and_overwrites_its_outputs():
    """Invariant: a replay reads inputs given as other arrays (copied into the captured
    ones) and returns the captured output arrays, refreshed."""
    graphs = G.StepGraphs()

    def double(a):
        return [a * 2]

    with G.stand_in():
        graphs.run(BE, "k", double, [torch.tensor([1.0, 2.0])])
        first = graphs.run(BE, "k", double, [torch.tensor([1.0, 2.0])])
        second = graphs.run(BE, "k", double, [torch.tensor([5.0, 7.0])])
    assert second[0] is first[0]  # the graph's own output array
    assert second[0].tolist() == [10.0, 14.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["batchtopk", "topk"])
def test_cuda_graph_steps_equal_eager_cuda_steps_bit_for_bit(arch):
    """Invariant: on CUDA, training with the step captured as a CUDA graph (the default)
    gives the eager CUDA steps' bits and metrics; the capture succeeded and was replayed."""
    config = TrainConfig(arch=arch, h=512, k=8, k_aux=32, dead_after=3, dead_unit="batches",
                         matmul_precision="tf32")
    xs = [x.float() for x in _batches(torch.float32, B=256, d=64)]
    graphed, m_graphed = _train(config, xs, 10, graphed=True, device="cuda")
    eager, m_eager = _train(TrainConfig(**{**config.to_dict(), "betas": config.betas, "cuda_graphs": False}),
                            xs, 10, graphed=False, device="cuda")
    assert graphed.graphs.off is None, graphed.graphs.off
    assert graphed.graphs.captures >= 1 and graphed.graphs.replays >= 5
    _assert_same_state(graphed, eager)
    assert m_graphed == m_eager


def test_a_pickled_or_saved_state_steps_on_to_the_same_bits():
    """Invariant: a state pickled (to another process, say) or saved as arrays (a checkpoint)
    and loaded steps on to the bits of the original: the dead-count bounds in flight are read
    and kept (they set AuxK's block width, which changes the order of a GEMM's sums), the
    captured graphs, which belong to this process's device, are left behind."""
    import pickle

    xs = _batches(torch.float32)
    config = TrainConfig(h=64, k=4, k_aux=8, dead_after=2)
    with sync_free(True), G.stand_in():
        state = init_state(config, xs[0])
        for i in range(4):
            state, _ = step(state, xs[i % 3], check=False, donate=True)
        copy = pickle.loads(pickle.dumps(state))
        arrays, meta = state_arrays(state)  # views of the state's CPU memory: copied, as a file would
        loaded = state_from_arrays({k: v.copy() for k, v in arrays.items()}, meta, xp=torch)
        assert state.dead_counts and state.graphs.captures >= 1
        for other in (copy, loaded):
            _assert_same_state(other, state)
            assert [(c.t, c.through) for c in other.dead_counts] == [(c.t, c.through) for c in state.dead_counts]
            assert other.graphs.captures == 0
        runs = []
        for s in (copy, loaded, state):
            for i in range(3):
                s, _ = step(s, xs[i], check=False, donate=True)
            runs.append(s)
    _assert_same_state(runs[0], runs[2])
    _assert_same_state(runs[1], runs[2])
