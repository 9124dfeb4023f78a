"""Atomic file writes: a reader sees the old file or the new one, never a half-written one.

The bytes go to a temporary file in the target's own directory (so the final rename never
crosses a file system), are flushed and fsynced, and the temporary file is renamed onto the
target with :func:`os.replace`; the directory is then fsynced so the rename itself survives a
power cut. If anything fails before the rename, the temporary file is removed and the target is
untouched.

>>> import json, tempfile, pathlib
>>> from sae_ref.io._atomic import atomic_write_json
>>> with tempfile.TemporaryDirectory() as d:
...     p = atomic_write_json(pathlib.Path(d) / "a.json", {"step": 3})
...     print(json.loads(p.read_text())["step"], [x.name for x in pathlib.Path(d).iterdir()])
3 ['a.json']
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def fsync_directory(directory) -> None:
    """Flush a directory's entries (new names, renames, deletions) to disk.

    A no-op where the platform cannot open a directory (Windows).
    """
    try:
        fd = os.open(os.fspath(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably; return the path.

    Parameters
    ----------
    path : str or os.PathLike
        The target file; its directory must exist. An existing file is replaced.
    data : bytes
        The complete new content.

    Returns
    -------
    pathlib.Path
        ``path``.

    Notes
    -----
    The temporary file is named ``.<name>.<random>.tmp`` in the same directory and never
    outlives the call.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write_bytes: argument 'data' must be bytes, got {type(data).__name__}")
    atomic_write(path, lambda f: f.write(data))
    return Path(path)


class _Hashing:
    """A binary file wrapper that hashes what is written through it."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()

    def write(self, b):
        self.sha.update(b)
        return self.f.write(b)


def atomic_write(path, write) -> str:
    """Write ``path`` atomically through ``write(file_like)`` (which may write in many
    blocks, e.g. ``np.lib.format.write_array``); return the sha256 hex digest of the bytes.

    An OSError with an error number (a full disk: ``[Errno 28]``) is raised again naming
    ``path``, the file being written (the operating system names no file, or the temporary
    one, which is gone); ``path`` itself is untouched.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"atomic_write: directory {str(path.parent)!r} does not exist")
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            h = _Hashing(f)
            write(h)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        _remove_quietly(tmp)
        if isinstance(e, OSError) and e.errno is not None:  # e.g. a full disk: name the target
            raise OSError(e.errno, f"{e.strerror} while writing", str(path)) from e
        raise
    fsync_directory(path.parent)
    return h.sha.hexdigest()


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of this module's temporary files."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def temp_name(path: Path) -> Path:
    """A fresh hidden name next to ``path``: ``.<name>.<random>.tmp``."""
    return path.parent / f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}"


def _create_temp(path: Path):
    # os.open with mode 0o666 lets the umask decide the permissions, as for any new file
    # (tempfile.mkstemp would leave the target readable by its owner only)
    for _ in range(100):
        tmp = temp_name(path)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"atomic_write_bytes: could not create a temporary file next to {str(path)!r}")


def atomic_write_json(path, obj, *, indent: int | None = 2) -> Path:
    """Serialise ``obj`` as JSON and write it with :func:`atomic_write_bytes`.

    The object is serialised before anything touches the disk, so an unserialisable object
    raises (TypeError or ValueError) and leaves the target as it was.
    """
    text = json.dumps(obj, indent=indent)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def _remove_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
