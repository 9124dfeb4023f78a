"""Training checkpoints and atomic writes, on real files in a temporary directory."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from sae_ref.io import _atomic
from sae_ref.io.checkpoint import (
    CheckpointError,
    checkpoint_files,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f32 = rng.standard_normal((5, 7)).astype(np.float32)
    f32[0, :4] = [np.nan, np.inf, -np.inf, -0.0]
    return {
        "f16": rng.standard_normal((3, 4)).astype(np.float16),
        "f32": f32,
        "f64": rng.standard_normal(11),
        "f64_transposed": rng.standard_normal((4, 6)).T,  # not contiguous
        "i64": np.array([np.iinfo(np.int64).min, -1, 0, 1, np.iinfo(np.int64).max]),
        "u8": np.arange(256, dtype=np.uint8),
        "mask": rng.random((6, 2)) > 0.5,
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


META = {"config": {"activation": "batchtopk", "k": 32}, "tokens_seen": 123456789, "lr": 3e-4,
        "data_position": [4, 17], "note": "résumé"}


def _names(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _assert_same_bits(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, a in want.items():
        b = got[name]
        assert b.dtype == a.dtype, name
        assert b.shape == a.shape, name
        assert b.tobytes() == np.ascontiguousarray(a).tobytes(), name


# --- round trip ----------------------------------------------------------------------------------
def test_checkpoint_round_trip_is_bit_for_bit(tmp_path):
    arrays = _arrays()
    path = save_checkpoint(tmp_path, 42, arrays, META)
    got, meta, step = load_checkpoint(path)
    _assert_same_bits(got, arrays)
    assert meta == META and step == 42
    got2, _, _ = load_checkpoint(tmp_path)  # the directory means its latest checkpoint
    _assert_same_bits(got2, arrays)


def test_loaded_arrays_are_writable_copies(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": np.zeros(3)}, {})
    got, _, _ = load_checkpoint(tmp_path)
    got["w"][0] = 1.0
    assert load_checkpoint(tmp_path)[0]["w"][0] == 0.0


def test_record_describes_every_tensor_and_its_digest(tmp_path):
    path = save_checkpoint(tmp_path, 3, {"a": np.ones((2, 3), np.float32), "m": np.ones(4, bool)}, {"x": 1})
    record = json.loads(path.read_text())
    assert record["format"] == "sae-ref-checkpoint" and record["format_version"] == 1
    assert record["step"] == 3 and record["tensors_file"] == "step-000000003.safetensors"
    assert record["tensors"] == {"a": {"shape": [2, 3], "dtype": "float32"},
                                 "m": {"shape": [4], "dtype": "bool"}}
    import hashlib

    assert record["sha256"] == hashlib.sha256((tmp_path / record["tensors_file"]).read_bytes()).hexdigest()


def test_arrays_of_other_backends_are_saved_as_numpy(tmp_path):
    torch = pytest.importorskip("torch")
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    save_checkpoint(tmp_path, 0, {"t": t}, {})
    got, _, _ = load_checkpoint(tmp_path)
    assert got["t"].dtype == np.float32 and np.array_equal(got["t"], t.numpy())


# --- which checkpoint is the latest ----------------------------------------------------------------
def test_latest_checkpoint_is_the_highest_committed_step_numerically(tmp_path):
    for step in (9, 1_000_000_000, 10, 999_999_999):
        save_checkpoint(tmp_path, step, {"s": np.array([step])}, {})
    # a tensors file of a higher step without its record: an interrupted save
    (tmp_path / "step-2000000000.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "step-1000000000.json"
    _, _, step = load_checkpoint(tmp_path)
    assert step == 1_000_000_000


def test_safetensors_file_without_its_record_is_not_a_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 5, {"w": np.ones(2)}, {})
    checkpoint_files(tmp_path, 5)[0].unlink()
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        load_checkpoint(tmp_path)


def test_missing_directory_has_no_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path / "nope") is None
    with pytest.raises(CheckpointError, match="nope"):
        load_checkpoint(tmp_path / "nope")


# --- damage is reported, naming the file ------------------------------------------------------------
def _truncate(record, tensors):
    tensors.write_bytes(tensors.read_bytes()[:-9])


def _flip_one_byte(record, tensors):
    data = bytearray(tensors.read_bytes())
    data[len(data) // 2] ^= 0x01
    tensors.write_bytes(bytes(data))


def _delete_tensors(record, tensors):
    tensors.unlink()


def _truncate_record(record, tensors):
    record.write_text(record.read_text()[:40])


def _edit_record(fn):
    def edit(record, tensors):
        r = json.loads(record.read_text())
        fn(r, tensors)
        record.write_text(json.dumps(r))
    return edit


def _wrong_shape(r, tensors):
    r["tensors"]["w"]["shape"] = [3, 2]


def _wrong_dtype(r, tensors):
    r["tensors"]["w"]["dtype"] = "float64"


def _missing_tensor(r, tensors):
    r["tensors"]["ghost"] = {"shape": [1], "dtype": "float32"}


def _missing_key(r, tensors):
    del r["sha256"]


def _escaping_tensors_file(r, tensors):
    r["tensors_file"] = "../elsewhere.safetensors"


def _garbage_with_matching_digest(r, tensors):
    import hashlib

    tensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    r["sha256"] = hashlib.sha256(tensors.read_bytes()).hexdigest()


DAMAGE = {
    "truncated tensors": (_truncate, "safetensors", "sha256 mismatch"),
    "one flipped byte": (_flip_one_byte, "safetensors", "sha256 mismatch"),
    "deleted tensors": (_delete_tensors, "safetensors", "missing"),
    "truncated record": (_truncate_record, "json", "not valid JSON"),
    "wrong shape recorded": (_edit_record(_wrong_shape), "safetensors", "record says float32"),
    "wrong dtype recorded": (_edit_record(_wrong_dtype), "safetensors", "record says float64"),
    "tensor missing from file": (_edit_record(_missing_tensor), "safetensors", "missing \\['ghost'\\]"),
    "record key missing": (_edit_record(_missing_key), "json", "missing keys \\['sha256'\\]"),
    "tensors file outside": (_edit_record(_escaping_tensors_file), "json", "plain file name"),
    "garbage tensors": (_edit_record(_garbage_with_matching_digest), "safetensors", "not a readable"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_raises_naming_the_file(tmp_path, damage):
    fn, which, what = DAMAGE[damage]
    save_checkpoint(tmp_path, 1, {"w": np.ones((2, 3), np.float32)}, {})
    save_checkpoint(tmp_path, 2, {"w": np.full((2, 3), 2, np.float32)}, {})
    record, tensors = checkpoint_files(tmp_path, 2)
    fn(record, tensors)
    named = f"step-000000002.{which}"
    for target in (record, tmp_path):  # the directory does not fall back to step 1
        with pytest.raises(CheckpointError, match=what) as info:
            load_checkpoint(target)
        assert named in str(info.value)
    _, _, step = load_checkpoint(checkpoint_files(tmp_path, 1)[0])  # the older one still loads
    assert step == 1


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


# --- keep --------------------------------------------------------------------------------------------
def test_keep_prunes_all_but_the_newest_checkpoints(tmp_path):
    (tmp_path / "step-000000002.safetensors").write_bytes(b"left by an interrupted save")
    for step in (1, 3, 4, 5):
        save_checkpoint(tmp_path, step, {"w": np.array([step])}, {}, keep=2)
    assert _names(tmp_path) == ["step-000000004.json", "step-000000004.safetensors",
                                "step-000000005.json", "step-000000005.safetensors"]
    assert load_checkpoint(checkpoint_files(tmp_path, 4)[0])[0]["w"][0] == 4


def test_without_keep_nothing_is_deleted(tmp_path):
    for step in range(4):
        save_checkpoint(tmp_path, step, {"w": np.array([step])}, {})
    assert len(_names(tmp_path)) == 8


# --- atomicity ---------------------------------------------------------------------------------------
def test_saving_leaves_no_temporary_files(tmp_path):
    save_checkpoint(tmp_path, 1, _arrays(), META)
    save_checkpoint(tmp_path, 1, _arrays(1), META)  # replacing a step
    assert _names(tmp_path) == ["step-000000001.json", "step-000000001.safetensors"]
    _assert_same_bits(load_checkpoint(tmp_path)[0], _arrays(1))


def test_unserialisable_meta_raises_before_anything_is_written(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": np.ones(3)}, {"ok": True})
    before = _names(tmp_path)
    with pytest.raises(TypeError, match="save_checkpoint: argument 'meta' must be JSON-serialisable"):
        save_checkpoint(tmp_path, 2, {"w": np.zeros(3)}, {"bad": object()})
    assert _names(tmp_path) == before
    arrays, meta, step = load_checkpoint(tmp_path)
    assert step == 1 and meta == {"ok": True} and np.array_equal(arrays["w"], np.ones(3))


def _failing_replace(real, suffix):
    def replace(src, dst):
        if str(dst).endswith(suffix):
            raise OSError("disk full (simulated)")
        return real(src, dst)
    return replace


@pytest.mark.parametrize("fails", [".json", ".safetensors"])
def test_crash_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch, fails):
    save_checkpoint(tmp_path, 1, {"w": np.ones(3)}, {"n": 1})
    monkeypatch.setattr(os, "replace", _failing_replace(os.replace, fails))
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, 2, {"w": np.zeros(3)}, {"n": 2})
    monkeypatch.undo()
    assert not any(n.startswith(".") for n in _names(tmp_path))  # no temporary files
    arrays, meta, step = load_checkpoint(tmp_path)
    assert step == 1 and meta == {"n": 1} and np.array_equal(arrays["w"], np.ones(3))


def test_crash_while_replacing_a_step_uncommits_it_rather_than_mixing_files(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"w": np.ones(3)}, {})
    save_checkpoint(tmp_path, 2, {"w": np.full(3, 2.0)}, {})
    monkeypatch.setattr(os, "replace", _failing_replace(os.replace, ".json"))
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, {"w": np.full(3, 9.0)}, {})
    monkeypatch.undo()
    _, _, step = load_checkpoint(tmp_path)
    assert step == 1


def test_atomic_write_failure_keeps_the_old_content(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    _atomic.atomic_write_bytes(target, b"old")

    def failing_fsync(fd):
        raise OSError("I/O error (simulated)")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="simulated"):
        _atomic.atomic_write_bytes(target, b"new content")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["f.bin"]


def test_atomic_write_gives_new_files_the_usual_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    p = _atomic.atomic_write_bytes(tmp_path / "f.bin", b"x")
    if os.name == "posix":
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask


def test_atomic_write_json_refuses_unserialisable_objects_without_touching_the_file(tmp_path):
    target = _atomic.atomic_write_json(tmp_path / "a.json", {"v": 1})
    with pytest.raises(TypeError):
        _atomic.atomic_write_json(target, {"v": {1, 2}})
    assert json.loads(target.read_text()) == {"v": 1}
    assert _names(tmp_path) == ["a.json"]


# --- arguments ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"step": -1}, ValueError, "'step'"),
    ({"step": 1.5}, TypeError, "'step'"),
    ({"arrays": [np.ones(2)]}, TypeError, "'arrays'"),
    ({"arrays": {"o": np.array([object()])}}, TypeError, "'o' has dtype object"),
    ({"arrays": {"": np.ones(2)}}, ValueError, "invalid name"),
    ({"meta": [1]}, TypeError, "'meta' must be a dict"),
    ({"keep": 0}, ValueError, "'keep'"),
])
def test_bad_arguments_are_refused_before_writing(tmp_path, kwargs, error, match):
    args = {"step": 1, "arrays": {"w": np.ones(2)}, "meta": {}} | kwargs
    keep = args.pop("keep", None)
    with pytest.raises(error, match=match):
        save_checkpoint(tmp_path / "ck", args["step"], args["arrays"], args["meta"], keep=keep)
    assert not (tmp_path / "ck").exists()


def test_a_full_disk_error_names_the_file_being_written_and_keeps_the_old_one(tmp_path, monkeypatch):
    """The operating system's ENOSPC names no file; the error names the target (not the
    temporary file, which is gone), and the target keeps its old content."""
    import errno

    target = _atomic.atomic_write_bytes(tmp_path / "f.bin", b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as info:
        save_checkpoint(tmp_path / "ck", 3, {"w": np.ones(2)}, {})
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(tmp_path / "ck" / "step-000000003.safetensors")
    assert "No space left on device while writing" in str(info.value)
    with pytest.raises(OSError, match="f.bin"):
        _atomic.atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["ck", "f.bin"] and _names(tmp_path / "ck") == []
