"""The GPU ledger's model (benchmarks/bench_gpu_ledger.py) on a small step: the fused kernels
it charges are the ones a CUDA step runs, each one launch, and the composed model is the
same step without them."""

from __future__ import annotations

import os
import sys

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_gpu_ledger as L  # noqa: E402

import sae_ref  # noqa: E402
from sae_ref.backends import sync_free  # noqa: E402
from sae_ref.train import step  # noqa: E402

#: the fused kernels of a BatchTopK step with dead latents, and their launches (Adam: one
#: per parameter other than the decoder, which has its own; the batch of 256 rows is longer
#: than the backward kernel's part, so the partial rows' sum runs)
FUSED = {"triton:group_keys": 1, "triton:subgroup_keys": 1, "triton:subgroup_entry_keys": 1,
         "triton:row_top_block": 1, "triton:code_at": 1,
         "triton:slots": 1, "triton:backward_products": 1, "triton:sum_parts": 1, "triton:decoder_adam": 1,
         "triton:decode_residual": 1, "triton:standardize": 1, "triton:count": 1, "triton:update": 1,
         "triton:aux_residual": 1, "triton:min_positive": 1, "triton:running_mean_step": 1, "triton:gate": 1,
         "triton:adam": 3}


@pytest.fixture
def warmed():
    """A small BatchTopK state with a tenth of its latents dead, and a batch (fresh for each
    test: a recorded step donates the state)."""
    d, h, k, B = 64, 1024, 8, 256
    with sync_free(True):
        _, x0, x1, state = L.setup("torch", d, h, k, B, 1, 0.1, True, "batchtopk", "highest")
        with sae_ref.no_checks():
            for i in range(3):
                state, _ = step(state, (x0, x1)[i % 2], check=False, donate=False)
    return state, x0


def test_fused_model_charges_each_fused_kernel_as_one_launch_at_the_copy_bandwidth(warmed):
    state, x = warmed
    rows = L.record(state, x, fused=True)
    names = [r[1] for r in rows]
    assert {n: names.count(n) for n in names if n.startswith("triton:")} == FUSED
    for phase, name, read, written, flops, seconds in rows:
        if name.startswith("triton:"):
            # the parts' sum writes the rows of this step's long latents alone (maybe none)
            assert read > 0 and (written > 0 or name == "triton:sum_parts")
            assert seconds == pytest.approx(max((read + written) / L.MEASURED["bandwidth"], L.KERNEL_FLOOR))


def test_launch_listing_adds_up_to_the_ledger(warmed, capsys):
    """``--launches``: each phase's launches by name; their counts and times add up to the
    recorded step's."""
    state, x = warmed
    rows = L.record(state, x, fused=True)
    L.launches(rows)
    listed = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert sum(int(f[-2]) for f in listed) == len(rows)
    assert sum(float(f[-1]) for f in listed) == pytest.approx(sum(r[5] for r in rows) * 1e6, rel=1e-3)
    assert any(f[-3] == "triton:backward_products" for f in listed)


def test_composed_model_has_no_fused_kernel_and_more_launches(warmed):
    state, x = warmed
    fused, composed = L.record(state, x, fused=True), L.record(state, x, fused=False)
    assert not any(r[1].startswith("triton:") for r in composed)
    assert len(composed) > len(fused) + 20  # each fused kernel stands for a chain


def test_composed_model_charges_the_sampled_product_at_its_measured_rate(warmed):
    """torch.sparse.sampled_addmm reaches the recorder as ``sparse_sampled_addmm`` with a sparse
    result: it is a launch, charged per gathered element (it once went unrecorded)."""
    state, x = warmed
    rows = [r for r in L.record(state, x, fused=False) if r[1] in L.SAMPLED]
    assert len(rows) >= 1
    d, k, B = 64, 8, 256
    phase, name, read, written, flops, seconds = rows[0]
    assert phase == "backward" and written > 0
    assert seconds >= B * k * d * L.MEASURED["sampled"]


def test_kernel_bench_times_every_fused_kernel_beside_its_composed_form_and_model(capsys):
    """benchmarks/bench_kernels.py (on the CPU a smoke test in Triton's interpreter): a row for
    each fused kernel, with the ledger's bytes and modeled time and both measured times."""
    import bench_kernels

    bench_kernels.main(["--small", "--repeats", "1"])
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[3:]}
    # the primitives, each timed whole: the backward products with their slots and parts'
    # sum, the dead counters' two kernels as one
    want = {name.split(":")[1] for name in FUSED} - {"slots", "sum_parts", "count", "update"} | {"dead_counters"}
    assert set(rows) == want
    for name, (model, fused, composed, ratio, bandwidth) in rows.items():
        assert float(model) > 0 and float(fused) > 0 and float(composed) > 0, name
