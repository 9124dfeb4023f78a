"""A sharded activation store on disk: shard files listed by a ``manifest.json``.

Layout of a store directory::

    manifest.json
    shard-000000.npy          (or .safetensors: one 2-D tensor under a key)
    shard-000001.npy
    ...

The manifest is the truth: a shard file exists in the store only once the manifest lists it::

    {"format_version": 1, "d": 768, "dtype": "float32", "n_rows": 131072,
     "shards": [{"file": "shard-000000.npy", "rows": 65536, "format": "npy", "key": null,
                 "sha256": "..."}, ...],
     "metadata": {"model": "...", "layer": 6, ...}}

:class:`StoreWriter` writes each shard and then the manifest to a temporary name, syncs it to
disk and renames it into place, so an interrupted writer never leaves a half-written file
listed; re-opening the directory continues appending. :class:`ActivationStore` checks every
listed shard on open (present, complete, the shape and dtype the manifest says), checks each
shard's sha256 against the manifest the first time it reads from that shard (a shard with
flipped bytes stops the reader, naming the file, before any of its rows are delivered), and
streams shuffled batches that are a pure function of ``(seed, position)``.

>>> import tempfile, numpy as np
>>> from sae_ref.data.store import write_store
>>> x = np.arange(20, dtype=np.float32).reshape(10, 2)
>>> with tempfile.TemporaryDirectory() as tmp:
...     store = write_store(tmp, x, shard_rows=4)
...     stream = store.stream(5, chunk_rows=2, buffer_chunks=2)
...     batches = [next(stream) for _ in range(2)]
...     print(store.n_rows, len(store.manifest["shards"]), store.read(3, 6)[:, 0].tolist())
10 3 [6.0, 8.0, 10.0]
>>> sorted(np.concatenate(batches)[:, 0].tolist()) == x[:, 0].tolist()   # one epoch, shuffled
True
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict

import numpy as np
from array_api_compat import array_namespace

from sae_ref.data.stream import BatchStream, check_int, finite_rows, on_gpu, resolve_dtype
from sae_ref.io import _atomic

#: The manifest's file name inside a store directory.
MANIFEST = "manifest.json"
#: The manifest layout this module reads and writes.
FORMAT_VERSION = 1
#: Shard file formats.
FORMATS = ("npy", "safetensors")
#: Shard dtypes.
DTYPES = ("float16", "float32", "float64")
#: Suffix of the temporary files a writer renames into place (left over only by a crash).
TMP_SUFFIX = _atomic.TEMP_SUFFIX  # temp files: ".<name>.<random>" + this

_ST_DTYPES = {"F16": "float16", "F32": "float32", "F64": "float64"}
_MANIFEST_KEYS = ("format_version", "d", "dtype", "n_rows", "shards", "metadata")
_SHARD_KEYS = ("file", "rows", "format", "key", "sha256")
_OPEN_SHARDS = 32  # memory maps / safetensors handles kept open at once


def _sha256(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


# --------------------------------------------------------------------------------------------
# manifest


def _read_manifest(op: str, directory: str) -> dict:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{op}: store directory '{directory}' does not exist")
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{op}: no {MANIFEST} in '{directory}' (not an activation store)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{op}: manifest '{path}' is not valid JSON ({e})") from None
    _check_manifest(op, path, manifest)
    return manifest


def _bad(op: str, path: str, what: str):
    return ValueError(f"{op}: manifest '{path}' {what}")


def _is_int(v, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _check_manifest(op: str, path: str, m) -> None:
    if not isinstance(m, dict):
        raise _bad(op, path, f"must hold a JSON object, got {type(m).__name__}")
    missing = [k for k in _MANIFEST_KEYS if k not in m]
    if missing:
        raise _bad(op, path, f"lacks the key(s) {missing}")
    if m["format_version"] != FORMAT_VERSION:
        raise _bad(op, path, f"has format_version {m['format_version']!r}; this reader knows "
                             f"{FORMAT_VERSION}")
    if not _is_int(m["d"], 1):
        raise _bad(op, path, f"key 'd' must be a positive integer, got {m['d']!r}")
    if m["dtype"] not in DTYPES:
        raise _bad(op, path, f"key 'dtype' must be one of {list(DTYPES)}, got {m['dtype']!r}")
    if not _is_int(m["n_rows"], 0):
        raise _bad(op, path, f"key 'n_rows' must be an integer >= 0, got {m['n_rows']!r}")
    if not isinstance(m["metadata"], dict):
        raise _bad(op, path, f"key 'metadata' must be an object, got {m['metadata']!r}")
    if not isinstance(m["shards"], list):
        raise _bad(op, path, f"key 'shards' must be a list, got {type(m['shards']).__name__}")
    for i, s in enumerate(m["shards"]):
        _check_shard_entry(op, path, i, s)
    total = sum(s["rows"] for s in m["shards"])
    if total != m["n_rows"]:
        raise _bad(op, path, f"says n_rows={m['n_rows']} but its shards hold {total} rows")


def _check_shard_entry(op: str, path: str, i: int, s) -> None:
    where = f"shard entry {i}"
    if not isinstance(s, dict) or any(k not in s for k in _SHARD_KEYS):
        raise _bad(op, path, f"{where} must be an object with the keys {list(_SHARD_KEYS)}, "
                             f"got {s!r}")
    f = s["file"]
    if not isinstance(f, str) or not f or os.path.basename(f) != f or f in (".", ".."):
        raise _bad(op, path, f"{where}: 'file' must be a plain file name in the store "
                             f"directory, got {f!r}")
    if not _is_int(s["rows"], 1):
        raise _bad(op, path, f"{where} ('{f}'): 'rows' must be a positive integer, "
                             f"got {s['rows']!r}")
    if s["format"] not in FORMATS:
        raise _bad(op, path, f"{where} ('{f}'): 'format' must be one of {list(FORMATS)}, "
                             f"got {s['format']!r}")
    if s["format"] == "safetensors" and not (isinstance(s["key"], str) and s["key"]):
        raise _bad(op, path, f"{where} ('{f}'): a safetensors shard needs a string 'key', "
                             f"got {s['key']!r}")
    if not isinstance(s["sha256"], str) or len(s["sha256"]) != 64:
        raise _bad(op, path, f"{where} ('{f}'): 'sha256' must be 64 hex digits, "
                             f"got {s['sha256']!r}")


def _write_manifest(directory: str, manifest: dict) -> None:
    text = json.dumps(manifest, indent=2, sort_keys=False).encode("utf-8") + b"\n"
    _atomic.atomic_write(os.path.join(directory, MANIFEST), lambda f: f.write(text))


# --------------------------------------------------------------------------------------------
# shard files


def _npy_layout(op: str, path: str):
    """(shape, dtype, expected file size) from a .npy header, without reading the data."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{op}: shard '{path}' is not a readable .npy file ({e})") from None
    if fortran:
        raise ValueError(f"{op}: shard '{path}' is stored in Fortran order; shards must be "
                         f"row-major (C order)")
    return tuple(shape), np.dtype(dtype), offset + int(np.prod(shape)) * np.dtype(dtype).itemsize


def _check_shard_file(op: str, directory: str, entry: dict, d: int, dtype: str) -> None:
    path = os.path.join(directory, entry["file"])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{op}: shard '{path}' listed in the manifest is missing")
    want = (entry["rows"], d)
    if entry["format"] == "npy":
        shape, got_dtype, size = _npy_layout(op, path)
        actual = os.path.getsize(path)
        if actual != size:
            raise ValueError(f"{op}: shard '{path}' is truncated or padded: its header promises "
                             f"{shape} {got_dtype} ({size} bytes) but the file has {actual} bytes")
        got_dtype = got_dtype.name
    else:
        from safetensors import SafetensorError, safe_open

        try:
            handle = safe_open(path, framework="np")
        except SafetensorError as e:
            raise ValueError(f"{op}: shard '{path}' is not a complete safetensors file "
                             f"({e})") from None
        if entry["key"] not in handle.keys():  # noqa: SIM118 (a handle, not a dict)
            raise ValueError(f"{op}: shard '{path}' has no tensor '{entry['key']}' "
                             f"(it holds {list(handle.keys())})")
        sl = handle.get_slice(entry["key"])
        shape = tuple(sl.get_shape())
        got_dtype = _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype())
    if shape != want:
        raise ValueError(f"{op}: shard '{path}' has shape {shape}; the manifest expects {want} "
                         f"(rows, d)")
    if got_dtype != dtype:
        raise ValueError(f"{op}: shard '{path}' has dtype {got_dtype}; the manifest expects "
                         f"{dtype}")


class _NpyRows:
    """An ``.npy`` shard read by rows: ``read_into(dst, a, b)`` copies rows ``[a, b)`` into
    the C-contiguous ``dst`` with positioned reads (``os.preadv``), one system call a range.
    A memory map's copy takes a page fault per 4 KiB page, several times slower."""

    def __init__(self, path: str):
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = header(f)
            self.offset = f.tell()
        self.shape, self.dtype, self.fortran = shape, dtype, fortran
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self.fd = os.open(path, os.O_RDONLY)
        self._map = None

    def read_into(self, dst: np.ndarray, a: int, b: int) -> None:
        view = memoryview(dst.reshape(-1).view(np.uint8))
        pos, want = self.offset + a * self.row_bytes, (b - a) * self.row_bytes
        done = 0
        while done < want:
            n = os.preadv(self.fd, [view[done:want]], pos + done)
            if n <= 0:
                raise OSError(f"unexpected end of file reading rows {a}:{b} of a shard")
            done += n

    def __getitem__(self, rows: slice) -> np.ndarray:
        a, b, _ = rows.indices(self.shape[0])
        out = np.empty((max(b - a, 0), *self.shape[1:]), dtype=self.dtype)
        self.read_into(out, a, max(a, b))
        return out

    def __len__(self) -> int:
        return self.shape[0]

    def __del__(self):
        try:
            os.close(self.fd)
        except (OSError, AttributeError):
            pass


def _open_shard(directory: str, entry: dict):
    """A row-sliceable view of one shard: an ``.npy`` read by rows (:class:`_NpyRows`; a
    memory map for a Fortran-ordered file) or a safetensors slice."""
    path = os.path.join(directory, entry["file"])
    if entry["format"] == "npy":
        rows = _NpyRows(path)
        return np.load(path, mmap_mode="r") if rows.fortran or not hasattr(os, "preadv") else rows
    from safetensors import safe_open

    return safe_open(path, framework="np").get_slice(entry["key"])


# --------------------------------------------------------------------------------------------
# writing


class StoreWriter:
    """Append shards to a store directory; resumable, each shard written atomically.

    Parameters
    ----------
    directory : str or path
        Created if missing. If it already holds a store, appending continues after its last
        complete shard (the manifest is the truth; leftover temporary files are removed).
    d : int
        Features per row.
    dtype : {"float16", "float32", "float64"}
        The store's dtype; appended rows are converted to it.
    format : {"npy", "safetensors"}
        Format of the shards this writer appends.
    key : str
        The tensor name inside a safetensors shard.
    metadata : dict, optional
        Free-form JSON-serialisable description (model, layer, tokenizer, ...). When re-opening
        a store, must be ``None`` or equal to the stored metadata.

    Attributes
    ----------
    n_rows : int
        Rows in the store's complete shards.
    """

    def __init__(self, directory, *, d: int, dtype: str = "float32", format: str = "npy",
                 key: str = "activations", metadata: dict | None = None):
        op = "StoreWriter"
        self.directory = os.fspath(directory)
        d = check_int(op, "d", d, 1)
        try:
            dtype = np.dtype(dtype).name
        except TypeError:
            pass
        if dtype not in DTYPES:
            raise ValueError(f"{op}: argument 'dtype' must be one of {list(DTYPES)}, got {dtype!r}")
        if format not in FORMATS:
            raise ValueError(f"{op}: argument 'format' must be one of {list(FORMATS)}, "
                             f"got {format!r}")
        if not isinstance(key, str) or not key:
            raise ValueError(f"{op}: argument 'key' must be a non-empty string, got {key!r}")
        if metadata is not None:
            if not isinstance(metadata, dict):
                raise TypeError(f"{op}: argument 'metadata' must be a dict, got "
                                f"{type(metadata).__name__}")
            try:
                metadata = json.loads(json.dumps(metadata))
            except (TypeError, ValueError) as e:
                raise TypeError(f"{op}: argument 'metadata' must be JSON-serialisable ({e})") from None
        self.format, self.key = format, key
        os.makedirs(self.directory, exist_ok=True)
        self._remove_temp_files()
        if os.path.exists(os.path.join(self.directory, MANIFEST)):
            self.manifest = self._reopen(d, dtype, metadata)
        else:
            self.manifest = {"format_version": FORMAT_VERSION, "d": d, "dtype": dtype, "n_rows": 0,
                             "shards": [], "metadata": metadata or {}}
            _write_manifest(self.directory, self.manifest)

    def _remove_temp_files(self) -> None:
        for name in os.listdir(self.directory):
            if _atomic.is_temp_name(name):
                os.remove(os.path.join(self.directory, name))

    def _reopen(self, d: int, dtype: str, metadata) -> dict:
        op = "StoreWriter"
        m = _read_manifest(op, self.directory)
        if m["d"] != d or m["dtype"] != dtype:
            raise ValueError(f"{op}: the store in '{self.directory}' has d={m['d']}, dtype="
                             f"{m['dtype']}; cannot append with d={d}, dtype={dtype}")
        if metadata is not None and m["metadata"] and metadata != m["metadata"]:
            raise ValueError(f"{op}: argument 'metadata' {metadata!r} differs from the metadata "
                             f"of the store in '{self.directory}': {m['metadata']!r}")
        if metadata is not None and not m["metadata"]:
            m["metadata"] = metadata
        return m

    @property
    def d(self) -> int:
        return self.manifest["d"]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    @property
    def n_rows(self) -> int:
        return self.manifest["n_rows"]

    def append(self, rows: np.ndarray) -> None:
        """Write ``rows`` ([n, d], floating; NaN allowed) as one new shard, then the manifest."""
        op = "StoreWriter.append"
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.d or rows.shape[0] == 0:
            raise ValueError(f"{op}: argument 'rows' must have shape (n >= 1, {self.d}), "
                             f"got {rows.shape}")
        if not np.issubdtype(rows.dtype, np.floating):
            raise TypeError(f"{op}: argument 'rows' must have a floating dtype, got {rows.dtype}")
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        index = len(self.manifest["shards"])
        name = f"shard-{index:06d}.{self.format}"
        path = os.path.join(self.directory, name)
        if self.format == "npy":
            sha = _atomic.atomic_write(path, lambda f: np.lib.format.write_array(f, rows,
                                                                          allow_pickle=False))
        else:
            import safetensors.numpy

            data = safetensors.numpy.save({self.key: rows})
            sha = _atomic.atomic_write(path, lambda f: f.write(data))
        entry = {"file": name, "rows": int(rows.shape[0]), "format": self.format,
                 "key": self.key if self.format == "safetensors" else None, "sha256": sha}
        manifest = dict(self.manifest, shards=self.manifest["shards"] + [entry],
                        n_rows=self.n_rows + entry["rows"])
        _write_manifest(self.directory, manifest)
        self.manifest = manifest

    def __repr__(self) -> str:
        return (f"StoreWriter('{self.directory}', d={self.d}, dtype={self.dtype.name}, "
                f"n_rows={self.n_rows})")


def write_store(directory, x: np.ndarray, *, shard_rows: int = 65536, format: str = "npy",
                key: str = "activations", dtype: str | None = None,
                metadata: dict | None = None) -> ActivationStore:
    """Write ``x`` ([n, d]) as a new store of shards of ``shard_rows`` rows; returns it opened.

    ``dtype`` defaults to ``x``'s dtype. Raises FileExistsError if ``directory`` already
    holds a store with rows (use :class:`StoreWriter` to append).
    """
    op = "write_store"
    x = np.asarray(x)
    shard_rows = check_int(op, "shard_rows", shard_rows, 1)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{op}: argument 'x' must have shape (n >= 1, d), got {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{op}: argument 'x' must have a floating dtype, got {x.dtype}")
    path = os.path.join(os.fspath(directory), MANIFEST)
    if os.path.exists(path) and _read_manifest(op, os.fspath(directory))["n_rows"] > 0:
        raise FileExistsError(f"{op}: '{directory}' already holds a store; append to it with "
                              f"StoreWriter")
    writer = StoreWriter(directory, d=x.shape[1], dtype=dtype or x.dtype.name, format=format,
                         key=key, metadata=metadata)
    for start in range(0, x.shape[0], shard_rows):
        writer.append(x[start:start + shard_rows])
    return ActivationStore(directory)


# --------------------------------------------------------------------------------------------
# reading


class ActivationStore:
    """A store directory opened for reading; every listed shard is checked on open.

    Parameters
    ----------
    directory : str or path
        A directory written by :class:`StoreWriter`.
    verify : {"on-read", True, False}
        When to check a shard's sha256 against the manifest. ``"on-read"`` (default): the
        first time this store reads from the shard, before any of its rows are returned
        (one extra pass over the file, hashed at a few hundred MB/s to about 1 GB/s; each
        shard once per opened store). ``True``: every shard now, on open. ``False``: never
        (the files are trusted; only their size, shape and dtype are checked).

    Attributes
    ----------
    d, n_rows : int
    dtype : numpy.dtype
        The shards' dtype (batches are converted to the dtype the stream asks for).
    manifest : dict
    metadata : dict

    Raises
    ------
    FileNotFoundError
        The directory, its manifest or a listed shard is missing.
    ValueError
        The manifest is not valid JSON or lacks a key; a shard is truncated, unreadable, or
        has another shape or dtype than the manifest says; a checksum differs (on open with
        ``verify=True``; otherwise when the shard is first read, from :meth:`read` and the
        streams).
    """

    def __init__(self, directory, *, verify: bool | str = "on-read"):
        self.directory = os.fspath(directory)
        self._op = f"ActivationStore('{self.directory}')"
        if verify not in (True, False, "on-read"):
            raise ValueError(f"{self._op}: argument 'verify' must be 'on-read', True or False, "
                             f"got {verify!r}")
        self.manifest = _read_manifest(self._op, self.directory)
        for entry in self.manifest["shards"]:
            _check_shard_file(self._op, self.directory, entry, self.d, self.manifest["dtype"])
        self._starts = np.cumsum([0] + [s["rows"] for s in self.manifest["shards"]])
        self._open: OrderedDict[int, object] = OrderedDict()
        self._verify = verify
        self._verified: set[int] = set()
        if verify is True:
            self.verify()

    d = property(lambda self: self.manifest["d"])
    n_rows = property(lambda self: self.manifest["n_rows"])
    dtype = property(lambda self: np.dtype(self.manifest["dtype"]))
    metadata = property(lambda self: self.manifest["metadata"])

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return (f"ActivationStore('{self.directory}', d={self.d}, n_rows={self.n_rows}, "
                f"dtype={self.dtype.name}, shards={len(self.manifest['shards'])})")

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest; ValueError naming the first mismatch."""
        for i in range(len(self.manifest["shards"])):
            self._verify_shard(i)

    def _verify_shard(self, i: int) -> None:
        entry = self.manifest["shards"][i]
        path = os.path.join(self.directory, entry["file"])
        got = _sha256(path)
        if got != entry["sha256"]:
            raise ValueError(f"{self._op}: shard '{path}' fails its checksum: sha256 "
                             f"{got}, the manifest says {entry['sha256']} (the file changed "
                             f"after it was written: rewrite the shard or harvest it again)")
        self._verified.add(i)

    def fingerprint(self) -> str:
        """The sha256 of the shards' listed sha256s in order: the store's content, wherever it lies."""
        sha = hashlib.sha256()
        for entry in self.manifest["shards"]:
            sha.update(entry["sha256"].encode("ascii"))
        return sha.hexdigest()

    def locate(self, row: int) -> tuple[str, int]:
        """The shard file name and the row within it that hold store row ``row``."""
        i = int(np.searchsorted(self._starts, row, side="right")) - 1
        return self.manifest["shards"][i]["file"], int(row - self._starts[i])

    def _shard(self, i: int):
        if i in self._open:
            self._open.move_to_end(i)
        else:
            if self._verify == "on-read" and i not in self._verified:
                self._verify_shard(i)  # before any of its rows leave the store
            self._open[i] = _open_shard(self.directory, self.manifest["shards"][i])
            if len(self._open) > _OPEN_SHARDS:
                self._open.popitem(last=False)
        return self._open[i]

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` across shard boundaries, a fresh array in the store dtype.

        ``out`` ([stop - start, d], store dtype) receives the rows instead of a new array.
        """
        op = f"{self._op}.read"
        start = check_int(op, "start", start, 0)
        stop = check_int(op, "stop", stop, start)
        if stop > self.n_rows:
            raise ValueError(f"{op}: argument 'stop' must be <= n_rows={self.n_rows}, got {stop}")
        if out is None:
            out = np.empty((stop - start, self.d), dtype=self.dtype)
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        i, pos = first, start
        while pos < stop:
            s0, s1 = int(self._starts[i]), int(self._starts[i + 1])
            end = min(stop, s1)
            shard = self._shard(i)
            if isinstance(shard, _NpyRows) and out.flags.c_contiguous:
                shard.read_into(out[pos - start:end - start], pos - s0, end - s0)
            else:
                out[pos - start:end - start] = shard[pos - s0:end - s0]
            pos, i = end, i + 1
        return out

    def stream(self, batch_size: int, *, seed: int = 0, position: int = 0, xp=None, device=None,
               dtype=None, nonfinite: str = "raise", rows: tuple[int, int] | None = None,
               chunk_rows: int = 1024, buffer_chunks: int = 64,
               gather: str | None = None) -> BatchStream:
        """Shuffled batches of ``batch_size`` rows, endlessly, a pure function of (seed, position).

        The rows (all, or ``rows=(start, stop)``) are cut into chunks of ``chunk_rows``
        contiguous rows. Epoch ``e`` permutes the chunk order with
        ``default_rng([seed, e])``; each run of ``buffer_chunks`` consecutive chunks of that
        order forms shuffling buffer ``j``: its chunks are read in file order and its rows
        permuted with ``default_rng([seed, e, j])``. The stream is these buffers one after
        another, epoch after epoch; batch ``i`` is its rows ``[i B, (i + 1) B)`` (a batch may
        straddle buffers and epochs). Every row appears exactly once per epoch.

        Only the current buffer is held in memory (``chunk_rows * buffer_chunks`` rows in the
        store dtype), as a cache: the stream's state is ``position`` alone, and
        ``stream(..., position=p)`` yields bit for bit the batches ``p, p + 1, ...`` of an
        uninterrupted stream. See :class:`~sae_ref.data.stream.BatchStream` for ``xp``,
        ``device``, ``dtype`` and ``nonfinite``; a non-finite batch's error names the shard
        file and row.

        ``gather``: where a batch's rows are gathered from its buffer. ``"host"`` gathers them
        in NumPy and moves the batch; ``"device"`` moves each buffer to the device once
        (converted there to ``dtype``) and gathers every batch on the device with the
        buffer's permutation indices, so only the indices cross per batch. The batches are the
        same; NaN/inf is found from the buffer's rows, checked once on the host. Default:
        ``"device"`` on a GPU (torch CUDA, CuPy), ``"host"`` elsewhere.
        """
        op = f"{self._op}.stream"
        B = check_int(op, "batch_size", batch_size, 1)
        seed = check_int(op, "seed", seed, 0)
        chunk_rows = check_int(op, "chunk_rows", chunk_rows, 1)
        buffer_chunks = check_int(op, "buffer_chunks", buffer_chunks, 1)
        start, stop = self._row_range(op, rows)
        order = _ShuffleOrder(self, start, stop, seed, chunk_rows, buffer_chunks)
        if gather is None:
            gather = "device" if on_gpu(xp, device) else "host"
        if gather not in ("host", "device"):
            raise ValueError(f"{op}: argument 'gather' must be 'host' or 'device', got {gather!r}")
        make = lambda i: order.batch(i, B)  # noqa: E731
        if gather == "device":
            xp_ = array_namespace(np.zeros(0)) if xp is None else xp
            target = (xp_, resolve_dtype(op, xp_, dtype), device)
            make = lambda i: order.batch_on_device(i, B, target)  # noqa: E731
        s = BatchStream(self._op, make, self._where, position=position,
                        xp=xp, device=device, dtype=dtype, nonfinite=nonfinite,
                        max_skips=-(-(stop - start) // B) + 1)
        s.batch_size, s.seed, s.rows = B, seed, (start, stop)
        return s

    def _row_range(self, op: str, rows) -> tuple[int, int]:
        if self.n_rows == 0:
            raise ValueError(f"{op}: the store holds no rows")
        if rows is None:
            return 0, self.n_rows
        if not isinstance(rows, (tuple, list)) or len(rows) != 2:
            raise ValueError(f"{op}: argument 'rows' must be a pair (start, stop), got {rows!r}")
        start = check_int(op, "rows[0]", rows[0], 0)
        stop = check_int(op, "rows[1]", rows[1], start + 1)
        if stop > self.n_rows:
            raise ValueError(f"{op}: argument 'rows' {tuple(rows)} reaches past n_rows="
                             f"{self.n_rows}")
        return start, stop

    def _where(self, batch: np.ndarray, gidx: np.ndarray) -> str:
        r = int(np.flatnonzero(~np.isfinite(batch).all(axis=1))[0])
        name, local = self.locate(int(gidx[r]))
        return (f": batch row {r} is row {local} of shard '{os.path.join(self.directory, name)}' "
                f"(store row {int(gidx[r])})")


class _ShuffleOrder:
    """The deterministic order of a store stream: which rows batch ``i`` holds, and their data.

    Caches the current epoch's layout and the current buffer's rows; both are pure functions
    of the arguments, so the cache never changes what is delivered.
    """

    def __init__(self, store: ActivationStore, start: int, stop: int, seed: int,
                 chunk_rows: int, buffer_chunks: int):
        self.store, self.start, self.n, self.seed = store, start, stop - start, seed
        self.cr, self.bc = chunk_rows, buffer_chunks
        self.n_chunks = -(-self.n // chunk_rows)
        self._epoch = None  # (e, chunk order, buffer start offsets)
        self._buffer = None  # (e, j, rows in file order, their store rows, permutation)
        self._device = None  # (e, j, the buffer on the device, its rows' finite flags)

    def _layout(self, e: int):
        if self._epoch is None or self._epoch[0] != e:
            order = np.random.default_rng([self.seed, e]).permutation(self.n_chunks)
            sizes = np.full(self.n_chunks, self.cr, dtype=np.int64)
            sizes[order == self.n_chunks - 1] = self.n - (self.n_chunks - 1) * self.cr
            starts = np.concatenate([[0], np.cumsum(sizes)])[::self.bc]
            starts = np.append(starts, self.n) if starts[-1] != self.n else starts
            self._epoch = (e, order, starts)
        return self._epoch

    def _load(self, e: int, j: int):
        if self._buffer is None or self._buffer[:2] != (e, j):
            _, order, starts = self._layout(e)
            chunks = np.sort(order[j * self.bc:(j + 1) * self.bc])
            size = int(starts[j + 1] - starts[j])
            data = np.empty((size, self.store.d), dtype=self.store.dtype)
            gidx = np.empty(size, dtype=np.int64)
            pos = 0
            for c in chunks:  # adjacent chunks could merge; reads stay contiguous either way
                a = self.start + int(c) * self.cr
                b = min(a + self.cr, self.start + self.n)
                self.store.read(a, b, out=data[pos:pos + b - a])
                gidx[pos:pos + b - a] = np.arange(a, b)
                pos += b - a
            perm = np.random.default_rng([self.seed, e, j]).permutation(size)
            self._buffer = (e, j, data, gidx, perm)
        return self._buffer

    def _segments(self, i: int, B: int):
        """Batch ``i`` as pieces ``(e, j, sel)``: rows ``sel`` of buffer ``j`` of epoch ``e``."""
        g, filled = i * B, 0
        while filled < B:
            e, o = divmod(g, self.n)
            starts = self._layout(e)[2]
            j = int(np.searchsorted(starts, o, side="right")) - 1
            perm = self._load(e, j)[4]
            a = o - int(starts[j])
            take = min(B - filled, len(perm) - a)
            yield e, j, perm[a:a + take]
            filled, g = filled + take, g + take

    def _on_device(self, e: int, j: int, target):
        """Buffer ``j`` of epoch ``e`` on the device, converted there, and its rows' finite
        flags (host): moved once, gathered by every batch that reads it."""
        if self._device is None or self._device[:2] != (e, j):
            from sae_ref.backends import get_backend

            xp, dtype, device = target
            data = self._load(e, j)[2]
            be = get_backend(xp)
            buf, ready = be.from_host_async(xp, data, dtype=dtype, device=device)
            be.wait_ready(buf, ready)
            self._device = (e, j, buf, finite_rows(data))
        return self._device

    def batch_on_device(self, i: int, B: int, target):
        """Batch ``i`` gathered on the device from its buffers (see ``gather`` of
        :meth:`ActivationStore.stream`); a batch with a NaN/inf row is made on the host
        instead, for the stream's check to find and name it."""
        from sae_ref.backends import get_backend

        xp, _, device = target
        be = get_backend(xp)
        parts = []
        for e, j, sel in self._segments(i, B):
            _, _, buf, ok = self._on_device(e, j, target)
            if not ok[sel].all():
                return self.batch(i, B)
            idx, ready = be.from_host_async(xp, sel, dtype=xp.int64, device=device)
            be.wait_ready(idx, ready)
            parts.append(xp.take(buf, idx, axis=0))
        return (parts[0] if len(parts) == 1 else xp.concat(parts)), None

    def batch(self, i: int, B: int) -> tuple[np.ndarray, np.ndarray]:
        out = np.empty((B, self.store.d), dtype=self.store.dtype)
        gidx = np.empty(B, dtype=np.int64)
        g, filled = i * B, 0
        while filled < B:
            e, o = divmod(g, self.n)
            starts = self._layout(e)[2]
            j = int(np.searchsorted(starts, o, side="right")) - 1
            _, _, data, rows, perm = self._load(e, j)
            a = o - int(starts[j])
            take = min(B - filled, len(perm) - a)
            sel = perm[a:a + take]
            np.take(data, sel, axis=0, out=out[filled:filled + take])
            gidx[filled:filled + take] = rows[sel]
            filled, g = filled + take, g + take
        return out, gidx
