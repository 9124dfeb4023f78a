"""Sharded selections across real processes equal the single-device selections bit for bit.

Two Gloo ranks on the CPU (one :func:`sae_ref.dist.spawn` runs every healthy case; spawning
is slow). The cases are drawn here with NumPy: heavy ties (a few integers, all-equal arrays,
rows of one value), fewer positive values than the selection size, ``k = h``, uneven splits
of the rows and of the latents, float32 and float64, and pivot counts that force several
narrowing rounds. Each rank's result is compared with its block of
:func:`sae_ref.activations.batch_topk` / ``topk`` / ``threshold`` on the whole array: the same
places in the same order, the same values, the same dtype, the same cut.

Also: decoding with a split dictionary, the byte ledger against the naive gather, argument
errors raised on every rank, a rank killed by SIGKILL and a rank that raises. Without a
process group, :class:`~sae_ref.dist.LocalComm` runs the same code on every backend.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from sae_ref.backends import top_n_mask

from sae_ref import activations as A
from sae_ref.sae import SAEParams, decode
from sae_ref.sparse import SparseCode

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with Gloo is not available", allow_module_level=True)

from sae_ref.dist import (
    LocalComm,
    RankError,
    TorchComm,
    batch_topk_sharded,
    comm_from_env,
    decode_sharded,
    is_torchrun,
    spawn,
    threshold_sharded,
    topk_sharded,
)

R = 2
BIG = {"B": 1024, "h": 4096, "k": 32, "rows": [0, 400, 1024], "cols": [0, 1500, 4096], "seed": 7}


# --- cases ------------------------------------------------------------------------------------
def _values(rng, kind, B, h):
    if kind == "ints":  # a few integers: ties everywhere
        return rng.integers(-3, 4, (B, h)).astype(np.float64)
    if kind == "binary":
        return rng.integers(0, 2, (B, h)).astype(np.float64)
    if kind == "all_equal":
        return np.full((B, h), float(rng.integers(-1, 3)))
    if kind == "equal_rows":  # each row one value
        return np.repeat(rng.integers(-1, 3, (B, 1)).astype(np.float64), h, axis=1)
    if kind == "few_positive":  # fewer positive values than B k (for most k)
        return np.where(rng.random((B, h)) < 0.1, rng.random((B, h)) + 0.5, -rng.random((B, h)))
    if kind == "rounded":
        return np.round(rng.standard_normal((B, h)), 1)
    return rng.standard_normal((B, h))


KINDS = ("ints", "binary", "all_equal", "equal_rows", "few_positive", "rounded", "gauss")


def _split(rng, n):
    """Two nonempty blocks, uneven where the size allows."""
    cut = int(rng.integers(1, n))
    if n > 2 and 2 * cut == n:
        cut += 1
    return [0, cut, n]


def make_cases(seed=0):
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(336):
        kind = KINDS[i % len(KINDS)]
        layout = ("rows", "cols")[(i // len(KINDS)) % 2]
        dtype = (np.float32, np.float64)[(i // (2 * len(KINDS))) % 2]
        big = i % 24 == 0  # some larger arrays: the narrowing rounds with the default pivots
        B, h = (int(rng.integers(32, 80)), int(rng.integers(64, 160))) if big else (
            int(rng.integers(2, 10)), int(rng.integers(2, 14)))
        z = _values(rng, kind, B, h).astype(dtype)
        k = h if i % 5 == 0 else int(rng.integers(1, h + 1))
        theta = rng.choice(z.reshape(-1)) if i % 3 else rng.choice(z.reshape(-1), h).astype(dtype)
        cases.append({"z": z, "k": k, "layout": layout, "split": _split(rng, B if layout == "rows" else h),
                      "pivots": 256 if big else (2, 3, 256)[i % 3], "theta": theta})
    return cases


def _block(a, case, rank):
    """This rank's block of a global [B, h] (or [h]) array."""
    lo, hi = case["split"][rank : rank + 2]
    if a.ndim == 1:
        return a if case["layout"] == "rows" else a[lo:hi]
    return a[lo:hi] if case["layout"] == "rows" else a[:, lo:hi]


def _code_block(code: SparseCode, case, rank):
    """The entries of a global code inside this rank's block, in local indices."""
    lo, hi = case["split"][rank : rank + 2]
    pos = code.rows if case["layout"] == "rows" else code.cols
    inside = (pos >= lo) & (pos < hi)
    rows, cols = code.rows[inside], code.cols[inside]
    if case["layout"] == "rows":
        rows = rows - lo
    else:
        cols = cols - lo
    return rows, cols, code.values[inside]


def _np(code):
    return tuple(a.numpy() for a in (code.rows, code.cols, code.values))


# --- the workers (module level: each rank imports this module) --------------------------------
def healthy_worker(rank, size, cases, decode_cases):
    torch.set_num_threads(1)
    comm = comm_from_env()  # spawn sets the torchrun variables and initialises the group
    out = {"rank": (type(comm).__name__, is_torchrun(), comm.rank, comm.size, size), "select": [], "decode": [],
           "errors": []}
    for case in cases:
        pre = torch.asarray(_block(case["z"], case, rank))
        theta = case["theta"]
        theta = torch.asarray(_block(theta, case, rank)) if np.ndim(theta) else float(theta)
        code, v = batch_topk_sharded(pre, case["k"], comm, layout=case["layout"], return_cut=True,
                                     pivots=case["pivots"])
        tk, tv = topk_sharded(pre, case["k"], comm, layout=case["layout"], return_cut=True)
        out["select"].append({"batch": _np(code), "cut": v.numpy(), "topk": _np(tk), "topk_cut": tv.numpy(),
                              "threshold": _np(threshold_sharded(pre, theta, comm))})
    for p, f, split in decode_cases:
        lo, hi = split[rank : rank + 2]
        params = SAEParams(*(torch.asarray(a) for a in (p["W_enc"][:, lo:hi], p["b_enc"][lo:hi],
                                                         p["W_dec"][lo:hi], p["b_dec"])))
        f_local = torch.asarray(f[:, lo:hi])
        out["decode"].append(decode_sharded(params, SparseCode.from_mask(f_local, f_local != 0), comm).numpy())
    out["big"] = _big_run(comm, rank)
    out["errors"] = _error_runs(comm, rank)
    return out


def _big_run(comm, rank):
    """A realistic shape: the selections' codes and the bytes each took."""
    z = np.random.default_rng(BIG["seed"]).standard_normal((BIG["B"], BIG["h"]), dtype=np.float32)
    result = {}
    for name, layout, fn in (("batch_rows", "rows", batch_topk_sharded), ("batch_cols", "cols", batch_topk_sharded),
                             ("topk_cols", "cols", topk_sharded)):
        lo, hi = BIG[layout][rank : rank + 2]
        pre = torch.asarray(z[lo:hi] if layout == "rows" else z[:, lo:hi])
        comm.reset_ledger()
        code = fn(pre, BIG["k"], comm, layout=layout)
        result[name] = {"code": _np(code), "bytes": comm.total_bytes, "ledger": comm.ledger()}
    return result


def _error_runs(comm, rank):
    """Each call is wrong on one rank or on both; every rank must raise (and stay in step)."""
    good = torch.zeros((4, 6), dtype=torch.float64)
    calls = [
        lambda: batch_topk_sharded(torch.zeros((4, 6 + rank)), 2, comm, layout="rows"),  # h differs
        lambda: batch_topk_sharded(torch.zeros((4 + rank, 6)), 2, comm, layout="cols"),  # B differs
        lambda: batch_topk_sharded(good, 13, comm, layout="cols"),  # k > global h = 12
        lambda: topk_sharded(good, 7, comm, layout="rows"),  # k > h = 6
        lambda: batch_topk_sharded(torch.full((4, 6), float("nan")) if rank else good, 2, comm, layout="rows"),
        lambda: batch_topk_sharded(good, 2, comm, layout="diagonal"),
        lambda: batch_topk_sharded(good, 2 + rank, comm, layout="rows"),  # k differs
        lambda: batch_topk_sharded(good.float() if rank else good, 2, comm, layout="rows"),  # dtypes differ
        lambda: batch_topk_sharded(good, 2, comm, layout="rows", pivots=8 + rank),  # pivots differ
        lambda: topk_sharded(good[0] if rank else good, 2, comm, layout="cols"),  # 1-D on rank 1 only
    ]
    messages = []
    for call in calls:
        try:
            call()
            messages.append(None)
        except (TypeError, ValueError) as e:
            messages.append(f"{type(e).__name__}: {e}")
    return messages


def killed_worker(rank, size):
    comm = TorchComm()
    x = torch.ones(4)
    for i in range(100_000):
        comm.all_reduce_sum(x)
        if rank == 1 and i == 20:
            os.kill(os.getpid(), signal.SIGKILL)
    return "finished"


def exiting_worker(rank, size):
    if rank == 0:
        os._exit(3)
    time.sleep(600)


def sleeping_worker(rank, size):
    time.sleep(600)


def raising_worker(rank, size):
    comm = TorchComm()
    comm.all_reduce_sum(torch.ones(1))
    if rank == 0:
        raise ValueError("planted failure on rank 0")
    for _ in range(100_000):
        comm.all_reduce_sum(torch.ones(1))
    return "finished"


# --- the healthy run, shared by the tests below -----------------------------------------------
@pytest.fixture(scope="module")
def cases():
    return make_cases()


@pytest.fixture(scope="module")
def decode_cases():
    rng = np.random.default_rng(3)
    out = []
    for dtype in (np.float32, np.float64):
        d, h, B = 5, 11, 7
        p = {"W_enc": rng.standard_normal((d, h)), "b_enc": rng.standard_normal(h),
             "W_dec": rng.standard_normal((h, d)), "b_dec": rng.standard_normal(d)}
        p = {name: a.astype(dtype) for name, a in p.items()}
        f = np.where(rng.random((B, h)) < 0.3, rng.random((B, h)) + 0.1, 0.0).astype(dtype)
        out.append((p, f, [0, 3, h]))
    return out


@pytest.fixture(scope="module")
def healthy(cases, decode_cases):
    start = time.monotonic()
    results = spawn(healthy_worker, R, cases, decode_cases, timeout_s=60, deadline_s=300)
    return results, time.monotonic() - start


def test_spawn_returns_every_rank_result_in_rank_order(healthy):
    results, _ = healthy
    assert [r["rank"] for r in results] == [("TorchComm", True, 0, 2, 2), ("TorchComm", True, 1, 2, 2)]


def test_batch_topk_sharded_equals_single_device_bit_for_bit_including_ties(healthy, cases):
    results, _ = healthy
    for i, case in enumerate(cases):
        z, k = case["z"], case["k"]
        want = A._batch_topk(z, k)
        _, cut = top_n_mask(z, z.shape[0] * k, return_cut=True)
        for rank in range(R):
            got = results[rank]["select"][i]
            for g, w in zip(got["batch"], _code_block(want, case, rank)):
                assert g.dtype == w.dtype and np.array_equal(g, w), (i, rank, case)
            assert got["cut"] == cut and got["cut"].dtype == z.dtype, (i, rank)


def test_topk_sharded_equals_single_device_per_row_bit_for_bit_including_ties(healthy, cases):
    results, _ = healthy
    for i, case in enumerate(cases):
        z, k = case["z"], case["k"]
        want = A._topk(z, k)
        _, cuts = top_n_mask(z, k, axis=-1, return_cut=True)
        for rank in range(R):
            got = results[rank]["select"][i]
            for g, w in zip(got["topk"], _code_block(want, case, rank)):
                assert g.dtype == w.dtype and np.array_equal(g, w), (i, rank, case)
            lo, hi = case["split"][rank : rank + 2]
            assert np.array_equal(got["topk_cut"], cuts[lo:hi] if case["layout"] == "rows" else cuts), (i, rank)


def test_threshold_sharded_is_the_single_device_threshold_on_each_block(healthy, cases):
    results, _ = healthy
    for i, case in enumerate(cases):
        want = A.threshold(case["z"], case["theta"])
        for rank in range(R):
            for g, w in zip(results[rank]["select"][i]["threshold"], _code_block(want, case, rank)):
                assert np.array_equal(g, w), (i, rank)


def test_cases_cover_ties_few_positives_k_equal_h_and_uneven_splits(cases):
    """The generated cases reach every situation the selection must handle."""
    tied = few = k_is_h = uneven_rows = uneven_cols = 0
    for c in cases:
        z, k = c["z"], c["k"]
        _, cut = top_n_mask(z, z.shape[0] * k, return_cut=True)
        tied += int(np.count_nonzero(z >= cut) > z.shape[0] * k and cut > 0)
        few += int(np.count_nonzero(z > 0) < z.shape[0] * k)
        k_is_h += int(k == z.shape[1])
        sizes = np.diff(c["split"])
        uneven_rows += int(c["layout"] == "rows" and sizes[0] != sizes[1])
        uneven_cols += int(c["layout"] == "cols" and sizes[0] != sizes[1])
    assert min(tied, few, k_is_h, uneven_rows, uneven_cols) >= 20
    assert {c["z"].dtype for c in cases} == {np.dtype(np.float32), np.dtype(np.float64)}


def test_decode_sharded_equals_single_device_decode(healthy, decode_cases):
    results, _ = healthy
    for i, (p, f, _) in enumerate(decode_cases):
        want = decode(SAEParams(p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"]), SparseCode.from_mask(f, f != 0))
        tol = 1e-5 if f.dtype == np.float32 else 1e-12
        for rank in range(R):
            got = results[rank]["decode"][i]
            assert got.dtype == want.dtype
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_realistic_shape_selections_equal_single_device(healthy):
    results, _ = healthy
    z = np.random.default_rng(BIG["seed"]).standard_normal((BIG["B"], BIG["h"]), dtype=np.float32)
    for name, layout, fn in (("batch_rows", "rows", A._batch_topk), ("batch_cols", "cols", A._batch_topk),
                             ("topk_cols", "cols", A._topk)):
        want = fn(z, BIG["k"])
        for rank in range(R):
            case = {"layout": layout, "split": BIG[layout]}
            for g, w in zip(results[rank]["big"][name]["code"], _code_block(want, case, rank)):
                assert np.array_equal(g, w), (name, rank)


def test_ledger_bytes_are_far_below_the_naive_gather_of_pre_activations(healthy):
    """Naive: each rank receives the other ranks' blocks of the B x h pre-activations."""
    results, _ = healthy
    for rank in range(R):
        for name, layout in (("batch_rows", "rows"), ("batch_cols", "cols"), ("topk_cols", "cols")):
            lo, hi = BIG[layout][rank : rank + 2]
            others = (BIG["B"] - (hi - lo)) * BIG["h"] if layout == "rows" else BIG["B"] * (BIG["h"] - (hi - lo))
            naive = others * 4
            got = results[rank]["big"][name]["bytes"]
            assert 0 < got * 20 < naive, (name, rank, got, naive, results[rank]["big"][name]["ledger"])


def test_mismatched_arguments_raise_on_every_rank(healthy):
    results, _ = healthy
    expected = ["same number of latents h", "same number of rows B", "'k' must be in [1, 12]",
                "'k' must be in [1, 6]", "NaN or infinity on rank(s) [1]", "'layout' must be one of",
                "argument 'k' must be the same on every rank",
                "the dtype of argument 'pre_local' must be the same on every rank", "argument 'pivots' must be the same",
                ("arguments of rank(s) [1] were rejected there", "'pre_local' must have 2 dimension(s)")]
    for rank in range(R):
        messages = results[rank]["errors"]
        assert len(messages) == len(expected)
        for got, want in zip(messages, expected):
            want = want[rank] if isinstance(want, tuple) else want
            assert got is not None and want in got, (rank, got, want)


# --- failures ---------------------------------------------------------------------------------
def test_killed_rank_raises_naming_the_rank_and_the_signal_promptly():
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        spawn(killed_worker, R, timeout_s=60, deadline_s=120)
    elapsed = time.monotonic() - start
    assert isinstance(info.value, RuntimeError)
    first = str(info.value).splitlines()[0]
    assert "rank 1" in first and "SIGKILL" in first, str(info.value)
    assert next(iter(info.value.failures)) == 1
    assert elapsed < 30, elapsed


def test_exception_in_a_rank_surfaces_with_its_traceback():
    with pytest.raises(RankError) as info:
        spawn(raising_worker, R, timeout_s=60, deadline_s=120)
    text = str(info.value)
    assert "rank 0 raised" in text and "Traceback" in text and "planted failure on rank 0" in text, text
    assert next(iter(info.value.failures)) == 0


def test_nonzero_exit_is_reported_and_the_sleeping_peer_is_stopped():
    start = time.monotonic()
    with pytest.raises(RankError, match="rank 0 exited with code 3"):
        spawn(exiting_worker, R, timeout_s=60, deadline_s=120)
    assert time.monotonic() - start < 30


def test_deadline_stops_a_rank_that_never_returns():
    start = time.monotonic()
    with pytest.raises(RankError, match=r"rank 0 did not finish within deadline_s = 4"):
        spawn(sleeping_worker, 1, deadline_s=4)
    assert time.monotonic() - start < 20


def test_comm_from_env_is_local_outside_a_launcher(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not is_torchrun()
    assert isinstance(comm_from_env(), LocalComm)


def test_spawn_rejects_a_function_that_cannot_be_pickled():
    with pytest.raises(TypeError, match="'fn' must be picklable"):
        spawn(lambda rank, size: rank, R)


# --- one rank, any backend --------------------------------------------------------------------
def test_local_comm_selections_equal_single_device_on_every_backend(backend, cases):
    comm = LocalComm()
    for case in cases[::7]:
        z = backend.asarray(case["z"])
        k = case["k"]
        for layout in ("rows", "cols"):
            code, cut = batch_topk_sharded(z, k, comm, layout=layout, return_cut=True, pivots=case["pivots"])
            want = A.batch_topk(case["z"], k)
            _, want_cut = top_n_mask(case["z"], case["z"].shape[0] * k, return_cut=True)
            for g, w in zip((code.rows, code.cols, code.values), (want.rows, want.cols, want.values)):
                assert np.array_equal(backend.numpy(g), w)
            assert backend.numpy(cut) == want_cut
            tk = topk_sharded(z, k, comm, layout=layout)
            assert np.array_equal(backend.numpy(tk.to_dense()), A._topk(case["z"], k).to_dense())
    assert comm.total_bytes == 0 and comm.calls["all_gather"] > 0


def test_local_comm_collectives_are_the_identity():
    comm = LocalComm()
    x = np.arange(6.0).reshape(2, 3)
    for y in (comm.all_reduce_sum(x), comm.all_reduce_max(x), comm.all_reduce_min(x), comm.broadcast(x)):
        assert np.array_equal(y, x)
    assert np.array_equal(comm.all_gather(x), x[None])
    assert [a.tolist() for a in comm.all_gather_varlen(np.arange(3.0))] == [[0.0, 1.0, 2.0]]
    comm.barrier()
    assert comm.total_bytes == 0 and sum(comm.calls.values()) == 7


def test_local_errors_name_the_argument():
    comm = LocalComm()
    z = np.ones((2, 3))
    with pytest.raises(ValueError, match="'layout' must be one of"):
        batch_topk_sharded(z, 1, comm, layout="both")
    with pytest.raises(ValueError, match=r"'k' must be in \[1, 3\]"):
        batch_topk_sharded(z, 4, comm, layout="cols")
    with pytest.raises(TypeError, match="'k' must be an integer"):
        batch_topk_sharded(z, 1.5, comm, layout="rows")
    with pytest.raises(TypeError, match="'comm' must be"):
        batch_topk_sharded(z, 1, None, layout="rows")
    with pytest.raises(ValueError, match="'pre_local' must have 2 dimension"):
        topk_sharded(np.ones(3), 1, comm)
    with pytest.raises(ValueError, match="'pivots' must be in"):
        batch_topk_sharded(z, 1, comm, layout="rows", pivots=1)
    with pytest.raises(ValueError, match="NaN or infinity"):
        batch_topk_sharded(np.array([[1.0, np.inf]]), 1, comm, layout="rows")
    with pytest.raises(ValueError, match="'x' must be 1-D"):
        comm.all_gather_varlen(z)
    with pytest.raises(ValueError, match="'src' must be a rank"):
        comm.broadcast(z, src=1)
    with pytest.raises(TypeError, match="'comm' must be"):
        threshold_sharded(z, 0.5, "comm")


def test_torch_comm_needs_an_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="no initialised process group"):
        TorchComm()
