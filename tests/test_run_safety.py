"""Nothing lost, nothing silently wrong: run directories, store checksums, resumes, the report's
held-out rows and the command line's bad inputs.

Every command runs in a real subprocess, as a user would type it; each test first reproduces
the way data was lost or a result was silently wrong (or a traceback was printed) and then
checks the one-line error, the exit status 2 and that the files are as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sae_ref.data.store import ActivationStore, write_store
from sae_ref.io.checkpoint import latest_checkpoint, load_checkpoint

# a small run: 60 steps of 64 rows, checkpoints at 20, 40, 60
SYN = ["--synthetic", "16,64,3", "--h", "64", "--k", "3", "--batch-size", "64", "--steps", "60",
       "--checkpoint-every", "20", "--log-every", "10", "--holdout-batches", "1",
       "--set", "k_aux=8", "--no-progress"]
# the same on a store of 4096 rows (16 features), two batches of 256 held out
STORE_ARGS = ["--h", "64", "--k", "3", "--batch-size", "256", "--steps", "20",
              "--checkpoint-every", "10", "--log-every", "10", "--holdout-batches", "2",
              "--set", "k_aux=8", "--no-progress"]

# runs the CLI with os.fsync failing (ENOSPC) or the process killed (SIGKILL) while a
# checkpoint's temporary file named like argv[2] is being written
WRAPPER = r"""
import errno, os, signal, sys
from sae_ref.cli import main
mode, target = sys.argv[1], sys.argv[2]
real = os.fsync
def fsync(fd):
    try:
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        name = ""
    if name.startswith("." + target) and name.endswith(".tmp"):
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(fd)
os.fsync = fsync
sys.exit(main(sys.argv[3:]))
"""


def sae_ref(*args, wrap=None, timeout=300) -> subprocess.CompletedProcess:
    """``sae-ref ARGS`` in a fresh interpreter (or under :data:`WRAPPER` with ``wrap``)."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    head = ["-c", WRAPPER, *wrap] if wrap else ["-m", "sae_ref.cli"]
    return subprocess.run([sys.executable, *head, *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(p: subprocess.CompletedProcess, command: str = "train") -> str:
    """The error line of a run that failed cleanly: exit 2, no traceback."""
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith(("sae-ref: error: ", f"sae-ref {command}: error: ")), p.stderr
    return line


def snapshot(run: Path) -> dict[str, str]:
    """Every file under ``run`` and the sha256 of its bytes."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


def temp_files(run: Path) -> list[str]:
    return [str(p) for p in run.rglob(".*.tmp")]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store")
    x = np.random.default_rng(0).standard_normal((4096, 16)).astype(np.float32)
    write_store(root / "store", x, shard_rows=1000)
    return root / "store"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, store) -> Path:
    """A finished run on ``store`` (checkpoints at 10 and 20)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    p = sae_ref("train", "--data", store, "--out", run, *STORE_ARGS)
    assert p.returncode == 0, p.stderr
    return run


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """The uninterrupted synthetic run, the reference of the interrupted ones."""
    run = tmp_path_factory.mktemp("whole") / "run"
    p = sae_ref("train", "--out", run, *SYN)
    assert p.returncode == 0, p.stderr
    return run


def assert_same_final_state(a: Path, b: Path) -> None:
    xa, _, sa = load_checkpoint(a / "checkpoints")
    xb, _, sb = load_checkpoint(b / "checkpoints")
    assert sa == sb and xa.keys() == xb.keys()
    for k in xa:
        np.testing.assert_array_equal(xa[k], xb[k], err_msg=k)


# --- 1. a run directory holding a run is never written over ----------------------------------
def test_train_into_a_run_directory_without_resume_refuses_and_changes_no_file(trained, store):
    before = snapshot(trained)
    p = sae_ref("train", "--data", store, "--out", trained, *STORE_ARGS, "--k", "5")
    line = one_line_error(p)
    assert f"--out '{trained}' already holds a run" in line
    assert "checkpoints/ (newest step 20)" in line and "metrics.jsonl (2 lines)" in line
    assert "--resume" in line and "--overwrite" in line
    assert snapshot(trained) == before


def test_overwrite_deletes_the_old_run_first_and_the_report_reads_the_new_sae(tmp_path, trained, store):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "notes.txt").write_text("mine")  # not a run file: kept
    p = sae_ref("train", "--data", store, "--out", run, *STORE_ARGS, "--k", "5", "--steps", "15",
                "--checkpoint-every", "0", "--overwrite")
    assert p.returncode == 0, p.stderr
    assert sorted(q.name for q in (run / "checkpoints").iterdir()) == [
        "step-000000015.json", "step-000000015.safetensors"]  # the old step 20 is gone
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [10, 15]
    assert json.loads((run / "summary.json").read_text())["config"]["k"] == 5
    assert (run / "notes.txt").read_text() == "mine"
    from sae_ref.fit import load_run

    assert load_run(run).train_config.k == 5


def test_resume_into_a_directory_without_a_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    p = sae_ref("train", "--out", tmp_path / "new", *SYN, "--resume")
    line = one_line_error(p)
    assert "--resume" in line and "no checkpoint to resume from" in line
    assert not (tmp_path / "new").exists()
    # killed before its first checkpoint: only a log; --resume points to --overwrite
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "metrics.jsonl").write_text('{"step": 10}\n')
    line = one_line_error(sae_ref("train", "--out", tmp_path / "early", *SYN, "--resume"))
    assert "metrics.jsonl (1 lines)" in line and "--overwrite" in line
    line = one_line_error(sae_ref("train", "--out", tmp_path / "early", *SYN, "--resume", "--overwrite"))
    assert "--resume and --overwrite exclude each other" in line


def test_train_with_nproc_checks_the_run_directory_before_starting_ranks(trained, store):
    pytest.importorskip("torch")
    before = snapshot(trained)
    p = sae_ref("train", "--data", store, "--out", trained, *STORE_ARGS, "--nproc", "2")
    assert "already holds a run" in one_line_error(p)
    assert snapshot(trained) == before


# --- 2. a shard whose bytes changed stops the run, naming it ---------------------------------
def _flip_a_mantissa_bit(path: Path, row: int, col: int) -> None:
    """Change one value of a .npy shard in place (same size; still finite)."""
    x = np.load(path, mmap_mode="r+")
    x.view(np.uint32)[row, col] ^= 1
    x.flush()
    del x


def test_a_shard_with_flipped_bytes_stops_training_before_its_rows_train_anything(tmp_path, store):
    bad = tmp_path / "store"
    shutil.copytree(store, bad)
    _flip_a_mantissa_bit(bad / "shard-000002.npy", 5, 3)
    assert os.path.getsize(bad / "shard-000002.npy") == os.path.getsize(store / "shard-000002.npy")
    p = sae_ref("train", "--data", bad, "--out", tmp_path / "run", *STORE_ARGS)
    line = one_line_error(p)
    assert f"shard '{bad / 'shard-000002.npy'}' fails its checksum" in line
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_store_verifies_each_shard_on_its_first_read_only(tmp_path, store, monkeypatch):
    from sae_ref.data import store as S

    bad = tmp_path / "store"
    shutil.copytree(store, bad)
    _flip_a_mantissa_bit(bad / "shard-000001.npy", 0, 0)
    s = ActivationStore(bad)  # opens: sizes and shapes are right
    np.testing.assert_array_equal(s.read(0, 1000), ActivationStore(store).read(0, 1000))
    with pytest.raises(ValueError, match=r"shard-000001\.npy' fails its checksum"):
        s.read(999, 1001)  # one row of the damaged shard is enough
    hashed = []
    monkeypatch.setattr(S, "_sha256", lambda path: hashed.append(path) or S.hashlib.sha256(
        Path(path).read_bytes()).hexdigest())
    good = ActivationStore(store)
    next(good.stream(512, chunk_rows=100, buffer_chunks=4))
    stream = good.stream(512, chunk_rows=100, buffer_chunks=4)
    for _ in range(20):  # two and a half epochs
        next(stream)
    assert sorted(hashed) == sorted(str(store / f"shard-00000{i}.npy") for i in range(5))
    assert ActivationStore(bad, verify=False).read(999, 1001).shape == (2, 16)  # trusted


# --- 3. a resume is the same run ---------------------------------------------------------------
@pytest.mark.parametrize(("flag", "value", "recorded"), [
    ("--batch-size", "128", "256"),
    ("--data-seed", "3", "0"),
    ("--holdout-batches", "1", "2"),
    ("--steps", "30", "20"),
    ("--dtype", "float64", "float32"),
    ("--k", "5", "3"),
])
def test_resume_refuses_what_would_change_the_batches_naming_the_flag_and_both_values(
        tmp_path, trained, store, flag, value, recorded):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = snapshot(run)
    args = list(STORE_ARGS)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    line = one_line_error(sae_ref("train", "--data", store, "--out", run, *args, "--resume"))
    assert f"{flag} is {value} but the run was trained with {recorded}" in line
    assert snapshot(run) == before


def test_resume_refuses_another_store_and_accepts_a_copy_of_the_same_one(tmp_path, trained, store):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    other = tmp_path / "other"
    write_store(other, np.ones((4096, 16), np.float32), shard_rows=1000)
    line = one_line_error(sae_ref("train", "--data", other, "--out", run, *STORE_ARGS, "--steps",
                                  "20", "--resume"))
    assert f"--data gives store '{other}'" in line and f"trained on store '{store}'" in line
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)  # the same shards elsewhere: the same data
    p = sae_ref("train", "--data", copy, "--out", run, *STORE_ARGS, "--resume", "--nonfinite", "skip")
    assert p.returncode == 0, p.stderr


# --- 4. the report evaluates held-out rows only ------------------------------------------------
def test_report_refuses_eval_rows_the_run_trained_on_and_says_its_rows_are_held_out(tmp_path, trained, store):
    p = sae_ref("report", trained, "--data", store, "--out", tmp_path / "rep", "--eval-rows", "1024",
                "--downstream", "none")
    line = one_line_error(p, "report")
    assert "--eval-rows 1,024 reaches into rows that runs trained on" in line
    assert f"'{trained}' held out only the last 512" in line and "--eval-rows 512 or less" in line
    assert not (tmp_path / "rep").exists()
    p = sae_ref("report", trained, "--data", store, "--out", tmp_path / "rep", "--eval-rows", "512",
                "--ref-rows", "1024", "--downstream", "none")
    assert p.returncode == 0, p.stderr
    page = (tmp_path / "rep" / "report.md").read_text()
    assert "held-out rows 3,584–4,096" in page and "No run trained on these rows" in page


def test_report_names_the_run_the_store_and_both_d_when_they_differ(tmp_path, trained):
    write_store(tmp_path / "narrow", np.ones((2048, 8), np.float32), shard_rows=1000)
    p = sae_ref("report", trained, "--data", tmp_path / "narrow", "--out", tmp_path / "rep",
                "--eval-rows", "256", "--downstream", "none")
    line = one_line_error(p, "report")
    assert f"run '{trained}' has d=16" in line and f"store '{tmp_path / 'narrow'}' has d=8" in line


# --- the command line's bad inputs: one line naming the flag, exit 2 ---------------------------
@pytest.mark.parametrize(("args", "says"), [
    (["--log-every", "0"], "--log-every must be >= 1, got 0"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0"),
    (["--holdout-batches", "-1"], "--holdout-batches must be >= 0, got -1"),
    (["--keep", "0"], "--keep must be >= 1, got 0"),
    (["--arch", "jumprelu", "--k", "16"], "--k does not apply to --arch jumprelu"),
    (["--arch", "jump-relu"], "--arch must be one of ["),
])
def test_bad_flags_get_one_line_naming_the_flag_and_leave_no_run_directory(tmp_path, args, says):
    line = one_line_error(sae_ref("train", "--out", tmp_path / "run", *SYN, *args))
    assert says in line
    assert not (tmp_path / "run").exists()


def test_backend_cupy_without_cupy_says_how_to_install_it(tmp_path):
    try:
        import cupy  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("CuPy is installed")
    line = one_line_error(sae_ref("train", "--out", tmp_path / "run", *SYN, "--backend", "cupy"))
    assert "backend 'cupy' needs CuPy" in line and "pip install 'sae-ref[cupy]'" in line


def test_a_nan_row_names_the_command_line_option_in_train_and_report(tmp_path, trained):
    x = np.random.default_rng(0).standard_normal((4096, 16)).astype(np.float32)
    x[3900, 2] = np.nan  # in the held-out tail
    x[100, 1] = np.inf  # in the training rows
    write_store(tmp_path / "nan", x, shard_rows=1000)
    line = one_line_error(sae_ref("train", "--data", tmp_path / "nan", "--out", tmp_path / "r", *STORE_ARGS))
    assert "store row 100" in line and "shard-000000.npy" in line
    assert "pass --nonfinite skip" in line and "nonfinite='skip'" not in line
    rep = ["report", trained, "--data", tmp_path / "nan", "--out", tmp_path / "rep", "--eval-rows",
           "512", "--ref-rows", "1024", "--batch-size", "128", "--downstream", "none"]
    line = one_line_error(sae_ref(*rep), "report")
    assert "store row 3900" in line and "pass --nonfinite skip" in line
    p = sae_ref(*rep, "--nonfinite", "skip")
    assert p.returncode == 0, p.stderr
    results = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert results["runs"][0]["metrics"]["n_tokens"] == 512 - 128  # the batch with the NaN left out


# --- writes that fail: a full disk, a kill inside a checkpoint write ---------------------------
needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")


@needs_proc
def test_a_full_disk_names_the_file_keeps_every_checkpoint_and_the_resume_ends_bit_for_bit(tmp_path, whole):
    run = tmp_path / "run"
    p = sae_ref("train", "--out", run, *SYN, wrap=["enospc", "step-000000040.safetensors"])
    line = one_line_error(p)
    target = run / "checkpoints" / "step-000000040.safetensors"
    assert f"[Errno 28] No space left on device while writing: '{target}'" in line
    assert "no checkpoint was lost: the newest, step 20" in line and "--resume" in line
    assert temp_files(run) == []
    assert load_checkpoint(run / "checkpoints")[2] == 20
    p = sae_ref("train", "--out", run, *SYN, "--resume")
    assert p.returncode == 0, p.stderr
    assert_same_final_state(run, whole)


@needs_proc
def test_a_kill_inside_a_checkpoint_write_leaves_a_temp_file_that_the_next_start_removes(tmp_path, whole):
    run = tmp_path / "run"
    p = sae_ref("train", "--out", run, *SYN, wrap=["kill", "step-000000040.json"])
    assert p.returncode == -signal.SIGKILL
    left = temp_files(run)
    assert len(left) == 1 and ".step-000000040.json." in left[0]
    # the tensors of step 40 were renamed into place, its record was not: step 20 is the newest
    assert latest_checkpoint(run / "checkpoints").name == "step-000000020.json"
    p = sae_ref("train", "--out", run, *SYN, "--resume")
    assert p.returncode == 0, p.stderr
    assert temp_files(run) == []
    assert_same_final_state(run, whole)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(10, 61, 10))
