"""The SAELens on-disk format: our files round-trip, and files written as sae-lens writes them
encode as sae-lens encodes (checked against a NumPy oracle of sae-lens's encoder)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import safetensors.numpy

from sae_ref.arrays import to_numpy
from sae_ref.io.saelens import (
    CFG_FILENAME,
    WEIGHTS_FILENAME,
    load_saelens,
    save_saelens,
)
from sae_ref.sae import SAEConfig, SAEParams, decode, encode, init_params

D, H, B = 12, 48, 40


def _params(seed: int = 0, *, theta: bool = False) -> SAEParams:
    """float32 parameters with nonzero biases (and per-latent thresholds)."""
    rng = np.random.default_rng(seed)
    p = init_params(D, H, xp=np, seed=seed)
    return SAEParams(
        p.W_enc, rng.normal(0, 0.1, H).astype(np.float32), p.W_dec,
        rng.normal(0, 0.3, D).astype(np.float32),
        rng.uniform(0.05, 0.4, H).astype(np.float32) if theta else None,
    )


def _x(seed: int = 1, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, D)) + rng.normal(0, 2, (1, D))).astype(dtype)


CONFIGS = {
    "relu": SAEConfig("relu"),
    "topk": SAEConfig("topk", k=5),
    "jumprelu": SAEConfig("jumprelu"),
    "threshold": SAEConfig("threshold", theta=0.2),
    "batchtopk": SAEConfig("batchtopk", k=5, theta=0.2),
}
EXPECTED_ARCHITECTURE = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu",
                         "threshold": "jumprelu", "batchtopk": "jumprelu"}


def _with_standardize(config: SAEConfig, standardize: bool) -> SAEConfig:
    from dataclasses import replace

    return replace(config, standardize=standardize)


def _on(backend, params: SAEParams) -> SAEParams:
    return params.map(lambda a: backend.asarray(a))


def _dense(backend, params, x, config) -> np.ndarray:
    return backend.numpy(encode(params, x, config).to_dense())


# --- our files round-trip ------------------------------------------------------------------------
@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("activation", list(CONFIGS))
def test_save_then_load_encodes_identically(backend, tmp_path, activation, standardize):
    config = _with_standardize(CONFIGS[activation], standardize)
    params = _on(backend, _params(theta=activation == "jumprelu"))
    path = save_saelens(tmp_path / "sae", params, config)
    loaded, cfg2, _ = load_saelens(path, xp=backend.xp, device=backend.device)
    x = backend.asarray(_x())
    # batchtopk is saved as its inference rule: the global threshold
    reference = SAEConfig("threshold", theta=config.theta, standardize=standardize) \
        if activation == "batchtopk" else config
    want = _dense(backend, params, x, reference)
    got = _dense(backend, loaded, x, cfg2)
    assert np.array_equal(got, want)
    assert 0 < np.count_nonzero(want) < want.size  # the comparison means something
    assert cfg2.standardize == standardize
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert np.array_equal(backend.numpy(getattr(loaded, name)), backend.numpy(getattr(params, name)))
        assert getattr(loaded, name).dtype == getattr(params, name).dtype


@pytest.mark.parametrize("activation", list(CONFIGS))
def test_loaded_config_is_what_saelens_would_run(tmp_path, activation):
    config = CONFIGS[activation]
    params = _params(theta=activation == "jumprelu")
    _, cfg2, _ = load_saelens(save_saelens(tmp_path / "sae", params, config))
    p2, _, _ = load_saelens(tmp_path / "sae")
    if activation == "relu":
        assert cfg2.activation == "relu" and p2.theta is None
    elif activation == "topk":
        assert cfg2.activation == "topk" and cfg2.k == 5
    else:
        want = params.theta if activation == "jumprelu" else np.full(H, 0.2, np.float32)
        assert cfg2.activation == "jumprelu" and np.array_equal(p2.theta, want)


def test_dtype_option_writes_that_precision(tmp_path):
    params = _params()
    save_saelens(tmp_path / "sae", params, SAEConfig("relu"), dtype="float16")
    tensors = safetensors.numpy.load_file(tmp_path / "sae" / WEIGHTS_FILENAME)
    assert {a.dtype for a in tensors.values()} == {np.dtype(np.float16)}
    assert json.loads((tmp_path / "sae" / CFG_FILENAME).read_text())["dtype"] == "float16"
    p2, _, _ = load_saelens(tmp_path / "sae")
    assert p2.W_enc.dtype == np.float16
    assert np.array_equal(p2.W_enc, params.W_enc.astype(np.float16))
    p3, _, _ = load_saelens(tmp_path / "sae", dtype="float64")
    assert p3.W_enc.dtype == np.float64


# --- the files are SAELens's layout --------------------------------------------------------------
V6_KEYS = {"d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
           "reshape_activations", "metadata", "architecture"}


def _header(path) -> dict:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n])


@pytest.mark.parametrize("activation", list(CONFIGS))
def test_written_files_have_exactly_the_saelens_tensors_and_cfg_keys(tmp_path, activation):
    config = _with_standardize(CONFIGS[activation], activation == "topk")
    params = _params(theta=activation == "jumprelu")
    path = save_saelens(tmp_path / "sae", params, config,
                        metadata={"model_name": "toy", "hook_name": "blocks.3.hook_resid_post",
                                  "context_size": 128})
    assert sorted(p.name for p in path.iterdir()) == [CFG_FILENAME, WEIGHTS_FILENAME]
    header = _header(path / WEIGHTS_FILENAME)
    assert "__metadata__" not in header
    shapes = {k: tuple(v["shape"]) for k, v in header.items()}
    want = {"W_enc": (D, H), "W_dec": (H, D), "b_enc": (H,), "b_dec": (D,)}
    if EXPECTED_ARCHITECTURE[activation] == "jumprelu":
        want["threshold"] = (H,)
    assert shapes == want
    assert {v["dtype"] for v in header.values()} == {"F32"}
    cfg = json.loads((path / CFG_FILENAME).read_text())
    extra = {"k", "rescale_acts_by_decoder_norm"} if activation == "topk" else set()
    assert set(cfg) == V6_KEYS | extra
    assert cfg["architecture"] == EXPECTED_ARCHITECTURE[activation]
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["device"]) == (D, H, "float32", "cpu")
    assert cfg["apply_b_dec_to_input"] is True and cfg["reshape_activations"] == "none"
    assert cfg["normalize_activations"] == ("layer_norm" if activation == "topk" else "none")
    meta = cfg["metadata"]
    assert int(meta["sae_lens_version"].split(".")[0]) >= 6
    assert (meta["model_name"], meta["hook_name"], meta["context_size"]) == \
        ("toy", "blocks.3.hook_resid_post", 128)
    if activation == "topk":
        assert cfg["k"] == 5 and cfg["rescale_acts_by_decoder_norm"] is False
    if activation == "batchtopk":
        details = meta["training_architecture_details"]
        assert details["architecture"] == "batchtopk" and details["k"] == 5 and details["theta"] == 0.2
        assert details["trained_with"].startswith("sae-ref ")


# --- saving: refusals and atomicity --------------------------------------------------------------
def test_batchtopk_without_theta_is_refused(tmp_path):
    with pytest.raises(ValueError, match="save_saelens: activation 'batchtopk'.*config.theta is None"):
        save_saelens(tmp_path / "sae", _params(), SAEConfig("batchtopk", k=4))
    assert not (tmp_path / "sae").exists()


def test_jumprelu_without_theta_is_refused(tmp_path):
    with pytest.raises(ValueError, match="save_saelens: activation 'jumprelu' needs params.theta"):
        save_saelens(tmp_path / "sae", _params(), SAEConfig("jumprelu"))


def test_non_empty_directory_is_kept_unless_overwrite(tmp_path):
    target = tmp_path / "sae"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        save_saelens(target, _params(), SAEConfig("relu"))
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    save_saelens(target, _params(3), SAEConfig("relu"), overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == [CFG_FILENAME, WEIGHTS_FILENAME]
    assert np.array_equal(load_saelens(target)[0].W_enc, _params(3).W_enc)
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]  # no temporary directories left


def test_empty_existing_directory_is_used(tmp_path):
    (tmp_path / "sae").mkdir()
    save_saelens(tmp_path / "sae", _params(), SAEConfig("relu"))
    assert load_saelens(tmp_path / "sae")[1].activation == "relu"


def test_failed_save_leaves_the_old_directory_and_no_temporaries(tmp_path, monkeypatch):
    target = save_saelens(tmp_path / "sae", _params(0), SAEConfig("relu"))
    import sae_ref.io.saelens as S

    def boom(tmp, directory):
        raise OSError("rename failed (simulated)")

    monkeypatch.setattr(S, "_swap_into_place", boom)
    with pytest.raises(OSError, match="simulated"):
        save_saelens(target, _params(5), SAEConfig("relu"), overwrite=True)
    monkeypatch.undo()
    assert np.array_equal(load_saelens(target)[0].W_enc, _params(0).W_enc)
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]


def test_unserialisable_metadata_is_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match="'metadata' must be JSON-serialisable"):
        save_saelens(tmp_path / "sae", _params(), SAEConfig("relu"), metadata={"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_params_of_any_backend_are_saved(all_backends, tmp_path):
    params = _params(theta=True)
    for be in all_backends:
        save_saelens(tmp_path / be.name, _on(be, params), SAEConfig("jumprelu"))
        got = safetensors.numpy.load_file(tmp_path / be.name / WEIGHTS_FILENAME)
        assert np.array_equal(got["threshold"], params.theta)
        assert np.array_equal(got["W_dec"], params.W_dec)


# --- files written by others: an independent oracle of SAELens's encoder -------------------------
def saelens_encode(t: dict, cfg: dict, x: np.ndarray) -> np.ndarray:
    """SAELens's ``SAE.encode`` (v6) in NumPy, from its source: process_sae_in, then the
    architecture's activation."""
    x = x.astype(np.float64)
    if cfg.get("normalize_activations") == "layer_norm":
        x = x - x.mean(-1, keepdims=True)
        x = x / (x.std(-1, ddof=1, keepdims=True) + 1e-5)
    if cfg.get("apply_b_dec_to_input", True):
        x = x - t["b_dec"]
    pre = x @ t["W_enc"] + t["b_enc"]
    arch = cfg["architecture"]
    if arch == "standard":
        return np.maximum(pre, 0)
    if arch == "jumprelu":
        return np.maximum(pre, 0) * (pre > t["threshold"])
    if cfg.get("rescale_acts_by_decoder_norm"):
        pre = pre * np.linalg.norm(t["W_dec"], axis=1)
    k = cfg["k"]
    idx = np.argsort(-pre, axis=1, kind="stable")[:, :k]  # torch.topk, then relu
    out = np.zeros_like(pre)
    rows = np.arange(pre.shape[0])[:, None]
    out[rows, idx] = np.maximum(pre[rows, idx], 0)
    return out


def saelens_decode(t: dict, cfg: dict, f: np.ndarray) -> np.ndarray:
    """SAELens's decode before the output normalisation is undone."""
    if cfg.get("rescale_acts_by_decoder_norm"):
        f = f / np.linalg.norm(t["W_dec"], axis=1)
    return f @ t["W_dec"] + t["b_dec"]


def _foreign_tensors(arch: str, seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = {
        "W_enc": rng.normal(0, 0.4, (D, H)), "W_dec": rng.normal(0, 0.4, (H, D)) * rng.uniform(0.2, 3, (H, 1)),
        "b_enc": rng.normal(0, 0.3, H), "b_dec": rng.normal(0, 0.5, D),
    }
    if arch == "jumprelu":
        t["threshold"] = rng.uniform(0.1, 0.6, H)
    return {k: v.astype(np.float32) for k, v in t.items()}


def _v6_cfg(arch: str, **extra) -> dict:
    cfg = {"d_in": D, "d_sae": H, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.54.0", "sae_lens_training_version": "6.54.0",
                        "model_name": "gpt2", "hook_name": "blocks.6.hook_resid_pre",
                        "context_size": 1024, "prepend_bos": True, "dataset_path": "x/y"},
           "architecture": arch}
    if arch == "topk":
        cfg |= {"k": 6, "rescale_acts_by_decoder_norm": False}
    return cfg | extra


def _write_foreign(directory, tensors: dict, cfg: dict):
    directory.mkdir()
    safetensors.numpy.save_file(tensors, directory / WEIGHTS_FILENAME)
    (directory / CFG_FILENAME).write_text(json.dumps(cfg))
    return directory


FOREIGN = {
    "v6 standard, layer_norm": ("standard", {"normalize_activations": "layer_norm"}),
    "v6 jumprelu, no b_dec on input": ("jumprelu", {"apply_b_dec_to_input": False}),
    "v6 jumprelu, layer_norm, extra keys": ("jumprelu", {"normalize_activations": "layer_norm",
                                                         "some_future_key": [1, 2], "hook_z": None}),
    "v6 topk": ("topk", {}),
    "v6 topk, rescaled by decoder norm, no b_dec on input": (
        "topk", {"rescale_acts_by_decoder_norm": True, "apply_b_dec_to_input": False}),
    "v6 topk, rescaled, layer_norm": ("topk", {"rescale_acts_by_decoder_norm": True,
                                               "normalize_activations": "layer_norm"}),
}


def _assert_encodes_like_saelens(directory, tensors, cfg, x, *, rtol=1e-5):
    params, config, raw = load_saelens(directory, dtype="float64")
    want = saelens_encode(tensors, cfg, x)
    code = encode(params, x.astype(np.float64), config)
    got = code.to_dense()
    assert np.array_equal(got != 0, want != 0)  # the same latents fire
    assert 0 < np.count_nonzero(want) < want.size
    np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(decode(params, code), saelens_decode(tensors, cfg, want), rtol=rtol, atol=1e-5)
    return params, config, raw


@pytest.mark.parametrize("case", list(FOREIGN))
def test_saelens_v6_files_encode_like_saelens(tmp_path, case):
    arch, extra = FOREIGN[case]
    tensors = _foreign_tensors(arch)
    cfg = _v6_cfg(arch, **extra)
    directory = _write_foreign(tmp_path / "sae", tensors, cfg)
    x = _x(3, np.float64)
    _, config, raw = _assert_encodes_like_saelens(directory, tensors, cfg, x)
    assert raw == cfg
    assert config.activation == {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}[arch]
    assert config.standardize == (cfg["normalize_activations"] == "layer_norm")


def test_folded_parameters_keep_saelens_values_where_nothing_is_folded(tmp_path):
    tensors = _foreign_tensors("jumprelu")
    directory = _write_foreign(tmp_path / "sae", tensors, _v6_cfg("jumprelu"))
    params, _, _ = load_saelens(directory)
    for name, key in [("W_enc", "W_enc"), ("b_enc", "b_enc"), ("W_dec", "W_dec"), ("b_dec", "b_dec"),
                      ("theta", "threshold")]:
        assert np.array_equal(getattr(params, name), tensors[key])


PRE_6 = {
    "relu, hook_point, bool normalisation": (
        "standard", {"activation_fn_str": "relu", "normalize_activations": False}),
    "topk through activation_fn_kwargs": (
        "topk", {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": 6}}),
    "jumprelu with a 5.x version": (
        "jumprelu", {"architecture": "jumprelu", "sae_lens_version": "5.9.1",
                     "apply_b_dec_to_input": False}),
}


def _pre6_cfg(extra: dict) -> dict:
    cfg = {"model_name": "gpt2-small", "hook_point": "blocks.8.hook_resid_pre", "hook_point_layer": 8,
           "hook_point_head_index": None, "d_in": D, "d_sae": H, "dtype": "torch.float32",
           "device": "cuda", "context_size": 128, "lr": 4e-4, "l1_coefficient": 8e-5,
           "apply_b_dec_to_input": True, "finetuning_scaling_factor": False}
    return cfg | extra


@pytest.mark.parametrize("case", list(PRE_6))
def test_pre_6_flat_files_encode_like_saelens(tmp_path, case):
    arch, extra = PRE_6[case]
    tensors = _foreign_tensors(arch)
    cfg = _pre6_cfg(extra)
    directory = _write_foreign(tmp_path / "sae", tensors, cfg)
    oracle_cfg = {"architecture": arch, "apply_b_dec_to_input": cfg["apply_b_dec_to_input"],
                  "k": 6, "normalize_activations": "none"}
    _, config, _ = _assert_encodes_like_saelens(directory, tensors, oracle_cfg, _x(4, np.float64))
    if arch == "topk":
        assert config.k == 6


def test_bfloat16_weights_load_as_their_float32_values(tmp_path):
    torch = pytest.importorskip("torch")
    import safetensors.torch

    tensors = _foreign_tensors("jumprelu")
    bf = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in tensors.items()}
    (tmp_path / "sae").mkdir()
    safetensors.torch.save_file(bf, tmp_path / "sae" / WEIGHTS_FILENAME)
    (tmp_path / "sae" / CFG_FILENAME).write_text(json.dumps(_v6_cfg("jumprelu", dtype="bfloat16")))
    params, _, _ = load_saelens(tmp_path / "sae")
    assert params.W_enc.dtype == np.float32
    assert np.array_equal(params.W_enc, bf["W_enc"].float().numpy())
    assert np.array_equal(params.theta, bf["threshold"].float().numpy())


def test_uniform_non_positive_threshold_loads_as_the_threshold_activation(tmp_path):
    tensors = _foreign_tensors("jumprelu")
    tensors["threshold"] = np.full(H, -0.25, np.float32)
    cfg = _v6_cfg("jumprelu")
    directory = _write_foreign(tmp_path / "sae", tensors, cfg)
    _, config, _ = _assert_encodes_like_saelens(directory, tensors, cfg, _x(5, np.float64))
    assert config.activation == "threshold" and config.theta == -0.25


def test_loads_onto_every_backend(backend, tmp_path):
    tensors = _foreign_tensors("topk")
    cfg = _v6_cfg("topk", rescale_acts_by_decoder_norm=True)
    directory = _write_foreign(tmp_path / "sae", tensors, cfg)
    params, config, _ = load_saelens(directory, xp=backend.xp, device=backend.device)
    x = _x(6, np.float32)
    got = backend.numpy(encode(params, backend.asarray(x), config).to_dense())
    np.testing.assert_allclose(got, saelens_encode(tensors, cfg, x), rtol=1e-4, atol=1e-5)


# --- what cannot be read is refused clearly ------------------------------------------------------
def _good(tmp_path, arch="jumprelu", **cfg_extra):
    tensors = _foreign_tensors(arch)
    return _write_foreign(tmp_path / "sae", tensors, _v6_cfg(arch, **cfg_extra)), tensors


def test_truncated_weights_raise_naming_the_file(tmp_path):
    d, _ = _good(tmp_path)
    w = d / WEIGHTS_FILENAME
    w.write_bytes(w.read_bytes()[:-10])
    with pytest.raises(ValueError, match=f"{WEIGHTS_FILENAME} is not a readable safetensors file"):
        load_saelens(d)


def test_missing_files_raise_naming_the_file(tmp_path):
    d, _ = _good(tmp_path)
    (d / WEIGHTS_FILENAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILENAME):
        load_saelens(d)
    (d / CFG_FILENAME).unlink()
    with pytest.raises(FileNotFoundError, match=CFG_FILENAME):
        load_saelens(d)


def test_corrupt_cfg_raises_naming_the_file(tmp_path):
    d, _ = _good(tmp_path)
    (d / CFG_FILENAME).write_text('{"d_in": 12, "d_sae"')
    with pytest.raises(ValueError, match=f"{CFG_FILENAME} is not valid JSON"):
        load_saelens(d)


def _rewrite_tensors(d, fn):
    t = dict(safetensors.numpy.load_file(d / WEIGHTS_FILENAME))
    fn(t)
    safetensors.numpy.save_file(t, d / WEIGHTS_FILENAME)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda t: t.pop("threshold"), r"missing \['threshold'\]"),
    (lambda t: t.update(extra=np.ones(3, np.float32)), r"unexpected \['extra'\]"),
    (lambda t: t.update(W_enc=np.ones((H, D), np.float32)), r"'W_enc' has shape \(48, 12\), expected \(12, 48\)"),
    (lambda t: t.update(b_dec=np.ones(D, np.int32)), "'b_dec' has dtype I32"),
    (lambda t: t["W_dec"].__setitem__((0, 0), np.nan), "'W_dec' contains NaN"),
    (lambda t: t.update(scaling_factor=np.full(H, 2.0, np.float32)), "scaling_factor"),
])
def test_bad_tensors_raise_naming_the_file(tmp_path, edit, match):
    d, _ = _good(tmp_path)

    def fn(t):
        t["W_dec"] = t["W_dec"].copy()
        edit(t)

    _rewrite_tensors(d, fn)
    with pytest.raises((ValueError, NotImplementedError), match=match) as info:
        load_saelens(d)
    assert WEIGHTS_FILENAME in str(info.value)


def test_unit_scaling_factor_is_ignored(tmp_path):
    d, tensors = _good(tmp_path)
    _rewrite_tensors(d, lambda t: t.update(scaling_factor=np.ones(H, np.float32)))
    assert np.array_equal(load_saelens(d)[0].W_enc, tensors["W_enc"])


@pytest.mark.parametrize(("cfg_extra", "error", "match"), [
    ({"architecture": "gated"}, NotImplementedError, "architecture 'gated'"),
    ({"architecture": "matryoshka_batchtopk"}, NotImplementedError, "architecture 'matryoshka_batchtopk'"),
    ({"normalize_activations": "expected_average_only_in"}, NotImplementedError, "'expected_average_only_in'"),
    ({"normalize_activations": "constant_norm_rescale"}, NotImplementedError, "'constant_norm_rescale'"),
    ({"normalize_activations": "bogus"}, ValueError, "unknown normalize_activations 'bogus'"),
    ({"d_sae": "48"}, ValueError, "'d_sae' must be an integer"),
    ({"apply_b_dec_to_input": "yes"}, ValueError, "'apply_b_dec_to_input' must be true or false"),
    ({"d_in": 13}, ValueError, r"'W_enc' has shape \(12, 48\), expected \(13, 48\)"),
])
def test_unsupported_or_bad_cfg_raises_naming_the_value(tmp_path, cfg_extra, error, match):
    d, _ = _good(tmp_path, **cfg_extra)
    with pytest.raises(error, match=match):
        load_saelens(d)


def test_jumprelu_with_some_non_positive_thresholds_is_refused(tmp_path):
    d, _ = _good(tmp_path)

    def fn(t):
        t["threshold"] = t["threshold"].copy()
        t["threshold"][:3] = [0.0, -1.0, -0.5]

    _rewrite_tensors(d, fn)
    with pytest.raises(ValueError, match="threshold is <= 0 for 3 of 48 latents"):
        load_saelens(d)


def test_pre_6_unknown_activation_function_is_refused(tmp_path):
    tensors = _foreign_tensors("standard")
    d = _write_foreign(tmp_path / "sae", tensors, _pre6_cfg({"activation_fn_str": "tanh-relu"}))
    with pytest.raises(NotImplementedError, match="activation function 'tanh-relu'"):
        load_saelens(d)


# --- sae-lens itself reads our files --------------------------------------------------------------
@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu", "batchtopk"])
def test_saelens_loads_our_files_and_encodes_like_us(tmp_path, activation):
    sae_lens = pytest.importorskip("sae_lens")
    import torch

    config = _with_standardize(CONFIGS[activation], activation == "jumprelu")
    params = _params(theta=activation == "jumprelu")
    path = save_saelens(tmp_path / "sae", params, config)
    sae = sae_lens.SAE.load_from_disk(str(path))
    x = _x()
    theirs = sae.encode(torch.from_numpy(x)).detach().numpy()
    loaded, cfg2, _ = load_saelens(path)
    ours = to_numpy(encode(loaded, x, cfg2).to_dense())
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert np.array_equal(ours != 0, theirs != 0)
