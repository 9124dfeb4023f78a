"""Data sources: the sharded activation store and the synthetic superposition source.

Real files in ``tmp_path``, no mocks. Each test is named after the invariant it checks: what
is written reads back exactly, a stream is a pure function of (seed, position), every row
appears once per epoch, damaged stores fail loudly naming the file, and an interrupted writer
loses and duplicates nothing.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from sae_ref.arrays import to_numpy
from sae_ref.data import (
    ActivationStore,
    StoreWriter,
    SyntheticSource,
    mean_max_cosine,
    write_store,
)
from sae_ref.data.store import MANIFEST, TMP_SUFFIX

SMALL = {"chunk_rows": 8, "buffer_chunks": 3}  # many buffers and epochs in a few batches


def rows_of(n: int, d: int = 4, dtype=np.float32) -> np.ndarray:
    """Row r holds r in its first column (an id) and r + j / 10 after: rows are recognisable."""
    x = np.arange(n, dtype=np.float64)[:, None] + np.arange(d) / 10
    return x.astype(dtype)


def ids(batch) -> np.ndarray:
    return np.rint(to_numpy(batch)[:, 0].astype(np.float64)).astype(np.int64)


def take(stream, n: int) -> list[np.ndarray]:
    return [to_numpy(next(stream)) for _ in range(n)]


@pytest.fixture
def store(tmp_path) -> ActivationStore:
    return write_store(tmp_path / "s", rows_of(100), shard_rows=30)


# --- writing and reading back -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["npy", "safetensors"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_written_store_reads_back_exactly(tmp_path, fmt, dtype):
    x = np.random.default_rng(0).standard_normal((70, 5)).astype(dtype)
    meta = {"model": "toy", "layer": 3}
    s = write_store(tmp_path / "s", x, shard_rows=32, format=fmt, metadata=meta)
    again = ActivationStore(tmp_path / "s", verify=True)
    for st in (s, again):
        assert (st.d, st.n_rows, st.dtype, st.metadata) == (5, 70, np.dtype(dtype), meta)
        got = st.read(0, 70)
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, x)
    assert [e["rows"] for e in again.manifest["shards"]] == [32, 32, 6]
    assert {e["format"] for e in again.manifest["shards"]} == {fmt}


def test_store_converts_appended_rows_to_its_dtype(tmp_path):
    w = StoreWriter(tmp_path / "s", d=3, dtype="float16")
    x = np.random.default_rng(1).standard_normal((10, 3))
    w.append(x)
    s = ActivationStore(tmp_path / "s")
    assert s.dtype == np.float16
    np.testing.assert_array_equal(s.read(0, 10), x.astype(np.float16))


@pytest.mark.parametrize("start,stop", [(0, 100), (29, 31), (30, 60), (10, 95), (59, 61),
                                        (99, 100), (40, 40)])
def test_read_spans_shard_boundaries(store, start, stop):
    np.testing.assert_array_equal(store.read(start, stop), rows_of(100)[start:stop])


def test_read_returns_a_copy_not_a_view_of_the_file(store):
    a = store.read(0, 10)
    assert a.flags.writeable and a.flags.owndata
    a[:] = -1
    np.testing.assert_array_equal(store.read(0, 10), rows_of(100)[:10])


def test_locate_names_the_shard_and_row(store):
    assert store.locate(0) == ("shard-000000.npy", 0)
    assert store.locate(30) == ("shard-000001.npy", 0)
    assert store.locate(99) == ("shard-000003.npy", 9)


def test_mixed_formats_in_one_store_read_back(tmp_path):
    x = rows_of(20)
    StoreWriter(tmp_path / "s", d=4, format="npy").append(x[:7])
    StoreWriter(tmp_path / "s", d=4, format="safetensors").append(x[7:])
    np.testing.assert_array_equal(ActivationStore(tmp_path / "s", verify=True).read(0, 20), x)


def test_write_refuses_bad_input(tmp_path):
    w = StoreWriter(tmp_path / "s", d=4)
    with pytest.raises(ValueError, match=r"StoreWriter.append: argument 'rows' must have shape"):
        w.append(np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="'rows' must have shape"):
        w.append(np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="'rows' must have a floating dtype"):
        w.append(np.zeros((3, 4), np.int64))
    with pytest.raises(ValueError, match="argument 'format'"):
        StoreWriter(tmp_path / "t", d=4, format="csv")
    with pytest.raises(ValueError, match="argument 'dtype'"):
        StoreWriter(tmp_path / "t", d=4, dtype="int8")
    with pytest.raises(ValueError, match=r"d=4, dtype=float32; cannot append with d=5"):
        StoreWriter(tmp_path / "s", d=5)
    w.append(rows_of(3))
    with pytest.raises(FileExistsError, match="already holds a store"):
        write_store(tmp_path / "s", rows_of(3))


def test_nan_rows_may_be_written(tmp_path):
    x = rows_of(10)
    x[4, 2] = np.nan
    s = write_store(tmp_path / "s", x)
    np.testing.assert_array_equal(s.read(0, 10), x)


# --- an interrupted writer ----------------------------------------------------------------------


def test_interrupted_writer_resumes_without_losing_or_duplicating_rows(tmp_path):
    d = tmp_path / "s"
    x = rows_of(50)
    w = StoreWriter(d, d=4, metadata={"run": 1})
    w.append(x[:10])
    w.append(x[10:20])
    # a crash while writing shard 2: a half-written temp file and, worse, a complete shard file
    # renamed into place whose manifest update never happened
    (d / (".shard-000002.npy.0123abcd" + TMP_SUFFIX)).write_bytes(b"\x93NUMPY half written")
    np.save(d / "shard-000002.npy", np.full((7, 4), -1, np.float32))
    assert ActivationStore(d).n_rows == 20  # the manifest is the truth
    w2 = StoreWriter(d, d=4)
    assert w2.n_rows == 20
    assert not [f for f in os.listdir(d) if f.endswith(TMP_SUFFIX)]
    w2.append(x[20:35])
    StoreWriter(d, d=4, metadata={"run": 1}).append(x[35:])
    s = ActivationStore(d, verify=True)
    assert s.n_rows == 50 and s.metadata == {"run": 1}
    np.testing.assert_array_equal(s.read(0, 50), x)


def test_writer_leaves_no_temp_files(tmp_path):
    write_store(tmp_path / "s", rows_of(40), shard_rows=7, format="safetensors")
    names = sorted(os.listdir(tmp_path / "s"))
    assert names == [MANIFEST] + [f"shard-{i:06d}.safetensors" for i in range(6)]


def test_writer_refuses_other_metadata_on_reopen(tmp_path):
    StoreWriter(tmp_path / "s", d=4, metadata={"layer": 1})
    with pytest.raises(ValueError, match="'metadata'.*differs"):
        StoreWriter(tmp_path / "s", d=4, metadata={"layer": 2})


# --- damaged stores fail loudly -----------------------------------------------------------------


def test_missing_directory_and_manifest_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ActivationStore(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no {MANIFEST}"):
        ActivationStore(tmp_path / "empty")


def test_truncated_npy_shard_raises_naming_the_file(store):
    path = os.path.join(store.directory, "shard-000001.npy")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 8)
    with pytest.raises(ValueError, match=r"shard-000001\.npy' is truncated"):
        ActivationStore(store.directory)


def test_truncated_safetensors_shard_raises_naming_the_file(tmp_path):
    write_store(tmp_path / "s", rows_of(20), shard_rows=10, format="safetensors")
    path = tmp_path / "s" / "shard-000001.safetensors"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"shard-000001\.safetensors' is not a complete"):
        ActivationStore(tmp_path / "s")


def test_shard_of_the_wrong_shape_or_dtype_raises(store):
    path = os.path.join(store.directory, "shard-000002.npy")
    np.save(path, rows_of(30, d=5))
    with pytest.raises(ValueError, match=r"shard-000002\.npy' has shape \(30, 5\); the manifest "
                                         r"expects \(30, 4\)"):
        ActivationStore(store.directory)
    np.save(path, rows_of(30, dtype=np.float64))
    with pytest.raises(ValueError, match=r"shard-000002\.npy' has dtype float64; the manifest "
                                         r"expects float32"):
        ActivationStore(store.directory)


def test_missing_shard_raises_naming_it(store):
    os.remove(os.path.join(store.directory, "shard-000003.npy"))
    with pytest.raises(FileNotFoundError, match=r"shard-000003\.npy' listed in the manifest is "
                                                r"missing"):
        ActivationStore(store.directory)


def test_corrupted_manifest_raises(store):
    path = os.path.join(store.directory, MANIFEST)
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"manifest .* is not valid JSON"):
        ActivationStore(store.directory)
    m = json.loads(text)
    for broken, message in [
        ({k: v for k, v in m.items() if k != "d"}, r"lacks the key\(s\) \['d'\]"),
        (dict(m, n_rows=99), "says n_rows=99 but its shards hold 100 rows"),
        (dict(m, format_version=2), "format_version 2"),
        (dict(m, shards=[dict(m["shards"][0], file="../x.npy")] + m["shards"][1:]),
         "plain file name"),
    ]:
        with open(path, "w") as f:
            json.dump(broken, f)
        with pytest.raises(ValueError, match=message):
            ActivationStore(store.directory)


def test_checksum_mismatch_raises_with_verify(store):
    path = os.path.join(store.directory, "shard-000002.npy")
    x = np.load(path)
    x[3, 1] += 1  # same shape, same size: only the checksum can tell
    np.save(path, x)
    ActivationStore(store.directory)  # opens: shape and size are right
    with pytest.raises(ValueError, match=r"shard-000002\.npy' fails its checksum"):
        ActivationStore(store.directory, verify=True)


# --- the store's stream: determinism, coverage, resume -------------------------------------------


@pytest.mark.parametrize("layout", [SMALL, {}], ids=["small-buffers", "one-buffer"])
def test_stream_from_position_equals_tail_of_uninterrupted_stream(store, layout):
    B = 7  # 100 rows: batches straddle buffers (24 rows) and epochs (100 rows)
    full = take(store.stream(B, seed=3, **layout), 45)
    for p in (0, 1, 3, 14, 15, 29, 44):
        tail = take(store.stream(B, seed=3, position=p, **layout), 45 - p)
        for a, b in zip(full[p:], tail):
            assert a.tobytes() == b.tobytes()


def test_stream_position_continues_where_a_stream_left_off(store):
    s = store.stream(9, seed=1, **SMALL)
    first = take(s, 13)
    assert s.position == 13
    rest = take(store.stream(9, seed=1, position=s.position, **SMALL), 5)
    whole = take(store.stream(9, seed=1, **SMALL), 18)
    np.testing.assert_array_equal(np.concatenate(first + rest), np.concatenate(whole))


@pytest.mark.parametrize("B,chunk,buf", [(10, 8, 3), (20, 1024, 64), (25, 7, 1), (5, 1, 100)])
def test_every_row_appears_exactly_once_per_epoch(store, B, chunk, buf):
    s = store.stream(B, seed=5, chunk_rows=chunk, buffer_chunks=buf)
    for epoch in range(3):
        got = np.sort(np.concatenate([ids(b) for b in take(s, 100 // B)]))
        np.testing.assert_array_equal(got, np.arange(100), err_msg=f"epoch {epoch}")


def test_stream_rows_match_the_stored_rows(store):
    x = rows_of(100)
    for b in take(store.stream(16, seed=2, **SMALL), 10):
        np.testing.assert_array_equal(b, x[ids(b)])


@pytest.mark.parametrize("chunk,buf", [(4, 5), (1024, 64), (1, 1)])
def test_stream_is_shuffled_and_epochs_differ(store, chunk, buf):
    # (1024, 64): one chunk, one buffer: only the row permutation shuffles;
    # (1, 1): one-row buffers: only the chunk permutation shuffles
    s = store.stream(100, seed=0, chunk_rows=chunk, buffer_chunks=buf)
    e0, e1, e2 = ids(next(s)), ids(next(s)), ids(next(s))
    assert not np.array_equal(e0, np.arange(100))
    assert not np.array_equal(e0, e1) and not np.array_equal(e1, e2)


def documented_order(start: int, stop: int, seed: int, cr: int, bc: int, epochs: int):
    """The row order ActivationStore.stream documents, written out plainly."""
    n = stop - start
    n_chunks = -(-n // cr)
    out = []
    for e in range(epochs):
        order = np.random.default_rng([seed, e]).permutation(n_chunks)
        for j in range(-(-n_chunks // bc)):
            chunks = sorted(order[j * bc:(j + 1) * bc])
            rows = np.concatenate([np.arange(start + c * cr, min(start + (c + 1) * cr, stop))
                                   for c in chunks])
            out.append(rows[np.random.default_rng([seed, e, j]).permutation(len(rows))])
    return np.concatenate(out)


@pytest.mark.parametrize("rows,B,cr,bc", [(None, 7, 8, 3), ((13, 90), 11, 5, 4),
                                          (None, 64, 1024, 64), ((50, 100), 3, 50, 1)])
def test_stream_follows_the_documented_order(store, rows, B, cr, bc):
    start, stop = rows or (0, 100)
    want = documented_order(start, stop, 9, cr, bc, epochs=4)
    n_batches = len(want) // B
    s = store.stream(B, seed=9, rows=rows, chunk_rows=cr, buffer_chunks=bc)
    got = np.concatenate([ids(b) for b in take(s, n_batches)])
    np.testing.assert_array_equal(got, want[:n_batches * B])


def test_different_seeds_give_different_orders(store):
    a = ids(next(store.stream(50, seed=0, **SMALL)))
    b = ids(next(store.stream(50, seed=1, **SMALL)))
    assert not np.array_equal(a, b)
    assert np.array_equal(a, ids(next(store.stream(50, seed=0, **SMALL))))


@pytest.mark.parametrize("rows", [(0, 80), (80, 100), (25, 62), (99, 100)])
def test_rows_restriction_never_leaves_the_range(store, rows):
    start, stop = rows
    s = store.stream(6, seed=4, rows=rows, **SMALL)
    got = np.concatenate([ids(b) for b in take(s, 30)])
    assert got.min() >= start and got.max() < stop
    assert set(got.tolist()) == set(range(start, stop))  # 180 draws cover the range


def test_stream_refuses_bad_arguments(store):
    with pytest.raises(ValueError, match=r"argument 'rows' \(90, 120\) reaches past n_rows=100"):
        store.stream(4, rows=(90, 120))
    with pytest.raises(ValueError, match=r"argument 'rows\[1\]' must be >= 51"):
        store.stream(4, rows=(50, 50))
    with pytest.raises(ValueError, match="argument 'batch_size' must be >= 1"):
        store.stream(0)
    with pytest.raises(TypeError, match="argument 'position' must be an integer"):
        store.stream(4, position=1.5)
    with pytest.raises(ValueError, match="argument 'nonfinite' must be one of"):
        store.stream(4, nonfinite="ignore")
    with pytest.raises(TypeError, match="argument 'dtype' must be a real floating dtype"):
        store.stream(4, dtype="int32")


def test_batches_arrive_on_the_requested_backend_and_dtype(store, backend):
    for name in ("float32", "float64"):
        dt = backend.dtype(name)
        s = store.stream(8, seed=1, xp=backend.xp, device=backend.device, dtype=dt, **SMALL)
        x = next(s)
        assert type(x) is type(backend.asarray(np.zeros(1)))
        assert x.dtype == dt and tuple(x.shape) == (8, 4)
        assert x.device == backend.device
        ref = take(store.stream(8, seed=1, **SMALL), 1)[0]
        np.testing.assert_array_equal(backend.numpy(x), ref.astype(name))


def test_default_batches_are_numpy_float32(tmp_path):
    s = write_store(tmp_path / "s", rows_of(10, dtype=np.float16))
    x = next(s.stream(5))
    assert isinstance(x, np.ndarray) and x.dtype == np.float32


# --- non-finite rows -----------------------------------------------------------------------------


@pytest.fixture
def nan_store(tmp_path) -> tuple[ActivationStore, ActivationStore]:
    """A store with a NaN at row 33 (shard 1, row 13) and its clean twin (same order)."""
    x = rows_of(40)
    clean = write_store(tmp_path / "clean", x, shard_rows=20)
    x[33, 2] = np.nan
    return write_store(tmp_path / "s", x, shard_rows=20), clean


def _bad_positions(clean: ActivationStore, B: int, n: int, **kw) -> list[int]:
    """Positions among the first ``n`` whose batch holds row 33 (the order ignores values)."""
    return [p for p, b in enumerate(take(clean.stream(B, **kw), n)) if 33 in ids(b)]


def test_nan_batch_raises_naming_position_shard_and_row(nan_store):
    store, clean = nan_store
    p = _bad_positions(clean, 8, 5, seed=0, **SMALL)[0]
    take(s := store.stream(8, seed=0, **SMALL), p)  # the batches before it are delivered
    with pytest.raises(ValueError, match=rf"position {p} contains NaN or infinity: batch row \d+ "
                                         rf"is row 13 of shard '.*shard-000001\.npy' \(store row "
                                         rf"33\)"):
        next(s)
    assert s.position == p  # the bad batch is not consumed
    with pytest.raises(ValueError, match=r"is row 13 of shard .* \(store row 33\)"):
        take(store.stream(5, seed=0, rows=(30, 40), **SMALL), 2)
    with pytest.raises(ValueError, match=rf"position {p} "):
        next(store.stream(8, seed=0, position=p, **SMALL))


def test_nan_batch_skipped_and_counted(nan_store):
    store, clean = nan_store
    B, n = 8, 25  # 5 epochs of 5 batches, row 33 in one batch of each
    bad = _bad_positions(clean, B, n, seed=0, **SMALL)
    assert len(bad) == 5
    s = store.stream(B, seed=0, nonfinite="skip", **SMALL)
    want = take(clean.stream(B, seed=0, **SMALL), n)
    for p in range(n):
        if p not in bad:
            np.testing.assert_array_equal(to_numpy(next(s)), want[p])
            assert s.position == p + 1
    assert s.skipped == sum(p < s.position for p in bad)


def test_skipping_gives_up_when_every_batch_is_bad(nan_store):
    s = nan_store[0].stream(40, nonfinite="skip")
    with pytest.raises(ValueError, match="consecutive batches .* contain NaN"):
        next(s)


def test_infinity_counts_as_nonfinite(tmp_path):
    x = rows_of(10)
    x[2, 0] = np.inf
    s = write_store(tmp_path / "s", x).stream(10)
    with pytest.raises(ValueError, match=r"is row 2 of shard"):
        next(s)


# --- the synthetic source ------------------------------------------------------------------------


def test_synthetic_atoms_are_unit_norm_and_seeded():
    src = SyntheticSource(16, 64, seed=7)
    assert src.atoms.shape == (64, 16) and src.atoms.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(src.atoms, axis=1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(src.atoms, SyntheticSource(16, 64, seed=7).atoms)
    assert not np.array_equal(src.atoms, SyntheticSource(16, 64, seed=8).atoms)


def test_synthetic_stream_reproducible_from_any_position():
    src = SyntheticSource(12, 40, k=3.0, seed=1, noise=0.01)
    full = take(src.stream(32, seed=2), 12)
    assert not np.array_equal(full[0], full[1])
    for p in (0, 5, 11):
        tail = take(src.stream(32, seed=2, position=p), 12 - p)
        for a, b in zip(full[p:], tail):
            assert a.tobytes() == b.tobytes()
    other = to_numpy(next(src.stream(32, seed=3)))
    assert not np.array_equal(full[0], other)


def test_synthetic_samples_are_sparse_mixtures_of_the_atoms():
    src = SyntheticSource(10, 50, k=4.0, seed=0)
    x, codes = src.sample(4000, seed=1)
    np.testing.assert_allclose(x, codes @ src.atoms, atol=1e-12)
    assert (codes >= 0).all()
    active = (codes > 0).sum(axis=1)
    assert abs(active.mean() - 4.0) < 0.15  # Binomial(50, 0.08): sd of the mean ~0.03
    assert abs(codes[codes > 0].mean() - 1.0) < 0.05  # Exp(1) magnitudes


@pytest.mark.parametrize("magnitude", ["uniform", "constant"])
def test_synthetic_magnitudes(magnitude):
    _, codes = SyntheticSource(8, 20, k=2.0, magnitude=magnitude).sample(500)
    vals = codes[codes > 0]
    assert vals.max() <= 1.0
    if magnitude == "constant":
        assert (vals == 1.0).all()


def test_synthetic_batches_on_backend(backend):
    src = SyntheticSource(6, 20, k=2.0, seed=0)
    x = next(src.stream(5, xp=backend.xp, device=backend.device, dtype=backend.dtype("float64")))
    assert x.device == backend.device and x.dtype == backend.dtype("float64")
    ref = next(src.stream(5, dtype="float64"))
    np.testing.assert_array_equal(backend.numpy(x), ref)


def test_synthetic_refuses_rows_and_bad_arguments():
    src = SyntheticSource(4, 8)
    with pytest.raises(ValueError, match="SyntheticSource.stream: argument 'rows' must be None"):
        src.stream(4, rows=(0, 10))
    with pytest.raises(ValueError, match="argument 'k' must be a number in"):
        SyntheticSource(4, 8, k=9)
    with pytest.raises(ValueError, match="argument 'magnitude'"):
        SyntheticSource(4, 8, magnitude="gamma")


def test_mean_max_cosine_of_true_atoms_is_one_and_random_is_lower():
    src = SyntheticSource(32, 128, seed=0)
    assert mean_max_cosine(src.atoms, src.atoms) == pytest.approx(1.0, abs=1e-12)
    # scale and extra rows do not matter; a found atom counts once per true atom
    W = np.concatenate([3.0 * src.atoms[::-1], np.random.default_rng(1).standard_normal((50, 32))])
    assert mean_max_cosine(W, src.atoms) == pytest.approx(1.0, abs=1e-12)
    rand = np.random.default_rng(2).standard_normal((256, 32))
    score = mean_max_cosine(rand, src.atoms)
    assert 0.3 < score < np.sqrt(2 * np.log(256) / 32) + 0.05  # the docstring's estimate
    half = src.atoms.copy()
    half[::2] = rand[:64]
    assert score < mean_max_cosine(half, src.atoms) < 1.0


def test_mean_max_cosine_accepts_backend_arrays(backend):
    src = SyntheticSource(8, 16, seed=0)
    W = backend.asarray(src.atoms, dtype="float64")
    assert mean_max_cosine(W, src.atoms) == pytest.approx(1.0, abs=1e-12)


def test_verify_takes_on_read_true_or_false_only(store):
    with pytest.raises(ValueError, match="argument 'verify' must be 'on-read', True or False, got 'always'"):
        ActivationStore(store.directory, verify="always")
