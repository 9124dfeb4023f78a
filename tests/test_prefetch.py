"""The training loop's data path: batches made ahead on a background thread.

Prefetching is a speed-up, never a different experiment: the prefetched stream delivers the
same batches, positions, skips and errors as the plain one, the training run ends on the same
bits, and no thread outlives the loop, whatever stopped it.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from sae_ref.arrays import to_numpy
from sae_ref.data import SyntheticSource, write_store
from sae_ref.data.stream import NonFiniteBatch
from sae_ref.fit import fit
from sae_ref.train import TrainConfig


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name.startswith("sae-ref prefetch")]


def _nan_store(tmp_path, name="s"):
    x = np.random.default_rng(0).standard_normal((400, 6)).astype(np.float32)
    x[137, 2] = np.nan
    return write_store(tmp_path / name, x, shard_rows=90)


def _batches(stream, n):
    out = []
    for _ in range(n):
        try:
            out.append(to_numpy(next(stream)))
        except NonFiniteBatch as e:
            out.append(str(e))
    return out


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
@pytest.mark.parametrize("depth", [1, 3])
def test_prefetched_store_stream_delivers_the_plain_streams_batches_positions_and_errors(tmp_path, backend, nonfinite, depth):
    """Invariant: with a NaN row in the store, a prefetched stream gives the plain stream's
    batches (bit for bit, on the backend), the same NonFiniteBatch message naming the shard
    and row at the same position (``raise``), or the same skips (``skip``), and continues from
    the same position afterwards."""
    store = _nan_store(tmp_path)
    kw = dict(seed=3, xp=backend.xp, device=backend.device, nonfinite=nonfinite)
    plain = store.stream(32, **kw)
    ahead = store.stream(32, **kw).prefetch(depth)
    try:
        for _ in range(3):  # a raise leaves position on the bad batch: try it again
            want, got = _batches(plain, 6), _batches(ahead, 6)
            assert len(want) == len(got)
            for w, g in zip(want, got):
                if isinstance(w, str):
                    assert w == g and "shard" in w
                    if isinstance(g, str):
                        ahead.prefetch(depth)  # the failed stream stopped its thread
                else:
                    np.testing.assert_array_equal(g, w)
            assert (plain.position, plain.skipped) == (ahead.position, ahead.skipped)
    finally:
        ahead.close()
    assert not _prefetch_threads()


def test_prefetched_synthetic_stream_equals_the_plain_one_from_any_position(backend):
    """Invariant: a prefetched synthetic stream started at position p yields the plain
    stream's batches p, p + 1, ... bit for bit."""
    src = SyntheticSource(8, 32, k=3.0, seed=1)
    kw = dict(seed=2, xp=backend.xp, device=backend.device)
    plain = src.stream(16, position=4, **kw)
    with src.stream(16, position=4, **kw).prefetch(2) as ahead:
        for _ in range(5):
            np.testing.assert_array_equal(to_numpy(next(ahead)), to_numpy(next(plain)))
        assert ahead.position == plain.position == 9
    assert not _prefetch_threads()


def test_an_error_of_the_reader_reaches_the_caller_when_its_batch_is_due(tmp_path):
    """Invariant: an exception of the reading thread (here a shard whose bytes changed) is
    raised by ``next`` with its message, naming the shard, and the thread is gone."""
    store = write_store(tmp_path / "s", np.arange(600, dtype=np.float32).reshape(150, 4), shard_rows=50)
    shard = sorted(p for p in (tmp_path / "s").iterdir() if p.suffix == ".npy")[1]
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    from sae_ref.data import ActivationStore

    s = ActivationStore(tmp_path / "s").stream(150, chunk_rows=150, buffer_chunks=1).prefetch(2)
    with pytest.raises(Exception, match=shard.name):
        next(s)
    assert not _prefetch_threads()


def _config(steps):
    return TrainConfig(arch="batchtopk", h=24, k=3, steps=steps, lr=1e-3)


def test_training_with_prefetching_ends_on_the_bits_of_training_without(tmp_path):
    """Invariant: fit() with batches prepared ahead on a thread ends at the same parameters,
    bit for bit on NumPy, as fit() making each batch when due."""
    store = write_store(tmp_path / "s", np.random.default_rng(1).standard_normal((512, 6)).astype(np.float32),
                        shard_rows=100)
    runs = {p: fit(_config(12), store, batch_size=32, prefetch=p, holdout_batches=1, progress=False,
                   log_every=4) for p in (0, 3)}
    for name, a in runs[0].state.params.arrays().items():
        np.testing.assert_array_equal(to_numpy(getattr(runs[3].state.params, name)), to_numpy(a))
    assert not _prefetch_threads()


def test_the_log_and_summary_report_tokens_per_second_and_the_data_wait(tmp_path):
    """Invariant: every log line and the summary carry tokens/s (> 0) and the share of the
    loop's time spent waiting for data (in [0, 1])."""
    src = SyntheticSource(6, 20, k=2.0, seed=0)
    res = fit(_config(8), src, batch_size=16, run_dir=tmp_path / "run", log_every=4,
              holdout_batches=1, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for entry in [*lines, res.summary]:
        assert entry["tokens_per_s"] > 0 and 0 <= entry["data_wait"] <= 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data_wait"] == res.summary["data_wait"]


def test_a_run_stopped_by_a_nan_batch_leaves_no_prefetch_thread(tmp_path):
    """Invariant: when training stops on an error (a NaN row with nonfinite "raise"), the
    prefetching thread is stopped before the error reaches the caller."""
    store = _nan_store(tmp_path)
    with pytest.raises(NonFiniteBatch, match="shard"):
        fit(_config(50), store, batch_size=32, prefetch=4, holdout_batches=0, progress=False)
    assert not _prefetch_threads()


# --- synthetic data drawn on the device ------------------------------------------------------------
def test_device_synthetic_stream_is_a_function_of_seed_and_position(backend):
    """Invariant: the device-drawn synthetic stream started at position p gives the batches
    p, p + 1, ... of the stream started at 0, bit for bit, on the backend's device and dtype;
    another seed gives other batches."""
    src = SyntheticSource(12, 48, k=3.0, seed=4, noise=0.01)
    kw = dict(xp=backend.xp, device=backend.device, rng="device")
    whole = [to_numpy(b) for b, _ in zip(src.stream(64, seed=1, **kw), range(4))]
    tail = src.stream(64, seed=1, position=2, **kw)
    first = next(tail)
    assert first.dtype == backend.xp.float32 and backend.numpy(first).shape == (64, 12)
    np.testing.assert_array_equal(to_numpy(first), whole[2])
    np.testing.assert_array_equal(to_numpy(next(tail)), whole[3])
    other = to_numpy(next(src.stream(64, seed=2, **kw)))
    assert not np.array_equal(other, whole[0])


@pytest.mark.parametrize("magnitude", ["exponential", "uniform", "constant"])
def test_device_synthetic_batches_follow_the_host_streams_distribution(magnitude):
    """Invariant: device-drawn batches have the host stream's distribution: the mean squared
    norm of a row (which sums the active magnitudes' second moments and their overlaps) agrees
    within 4%, and every row is a combination of the true atoms (its residual after a least
    squares fit on them is zero)."""
    pytest.importorskip("torch")
    from sae_ref.arrays import resolve

    xp, dev = resolve("torch")
    src = SyntheticSource(24, 40, k=4.0, seed=5, magnitude=magnitude)
    dev_x = np.concatenate([to_numpy(b) for b, _ in zip(src.stream(2048, xp=xp, device=dev, rng="device"), range(4))])
    host_x = np.concatenate([to_numpy(b) for b, _ in zip(src.stream(2048, rng="host"), range(4))])
    dev_m, host_m = np.mean(np.sum(dev_x.astype(np.float64) ** 2, 1)), np.mean(np.sum(host_x ** 2, 1))
    assert abs(dev_m / host_m - 1) < 0.04, (dev_m, host_m)
    coef, *_ = np.linalg.lstsq(src.atoms.T, dev_x.T.astype(np.float64), rcond=None)
    np.testing.assert_allclose(src.atoms.T @ coef, dev_x.T, atol=1e-4)


def test_synthetic_streams_draw_on_the_device_by_default_only_on_a_gpu(backend):
    """Invariant: without ``rng``, a stream to a GPU backend draws on the device and any other
    stream on the host (the host stream: the same batches on every CPU backend); a bad
    ``rng`` is refused naming it."""
    src = SyntheticSource(6, 20, k=2.0, seed=0)
    got = to_numpy(next(src.stream(8, xp=backend.xp, device=backend.device)))
    host = to_numpy(next(src.stream(8, xp=backend.xp, device=backend.device, rng="host")))
    on_device = to_numpy(next(src.stream(8, xp=backend.xp, device=backend.device, rng="device")))
    np.testing.assert_array_equal(got, on_device if backend.name in ("torch-cuda", "cupy") else host)
    with pytest.raises(ValueError, match="'rng'"):
        src.stream(8, rng="gpu")


# --- shuffling on the device -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_batches_gathered_on_the_device_equal_the_host_gathered_batches(tmp_path, backend, dtype):
    """Invariant: with each shuffling buffer moved once and every batch gathered on the
    device (``gather="device"``), the stream delivers the host-gathered batches bit for bit,
    in the training dtype, across buffers and epochs, and from any position."""
    x = np.random.default_rng(2).standard_normal((300, 5)).astype(dtype)
    store = write_store(tmp_path / "s", x, shard_rows=70)
    kw = dict(seed=4, xp=backend.xp, device=backend.device, chunk_rows=16, buffer_chunks=3)
    host = store.stream(24, gather="host", **kw)
    dev = store.stream(24, gather="device", **kw)
    for _ in range(30):  # 720 rows: several buffers and epochs, batches straddling them
        a, b = next(dev), next(host)
        assert a.dtype == backend.xp.float32
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    late = store.stream(24, gather="device", position=17, **kw)
    again = store.stream(24, gather="host", position=17, **kw)
    np.testing.assert_array_equal(to_numpy(next(late)), to_numpy(next(again)))


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_device_gathered_stream_finds_nan_rows_like_the_host_gathered_one(tmp_path, backend, nonfinite):
    """Invariant: a NaN row is found from the buffer's rows (checked once on the host) and
    raises the same message naming the shard and row, or is skipped at the same positions,
    as with host gathering."""
    store = _nan_store(tmp_path)
    kw = dict(seed=3, xp=backend.xp, device=backend.device, nonfinite=nonfinite)
    want = _batches(store.stream(32, gather="host", **kw), 8)
    got = _batches(store.stream(32, gather="device", **kw), 8)
    for w, g in zip(want, got):
        if isinstance(w, str):
            assert g == w
        else:
            np.testing.assert_array_equal(g, w)
