r"""BatchTopK's :math:`\theta` of the trained SAE: estimated on its final weights.

The paper's inference threshold is the expected smallest value the batch selection keeps,

.. math:: \theta = \mathbb E_X\!\left[m(X)\right], \qquad
          m(X) = \min\{ f_{bj}(X) : f_{bj}(X) > 0 \},

of the SAE one ships. The training-time estimators of :mod:`sae_ref.theta` average
:math:`m_t` over past steps, i.e. over earlier weights: on a short run, or one still moving,
they describe a model that no longer exists and the inference L0 misses k. Here :math:`\theta`
is estimated on the final weights from :math:`n` calibration batches :math:`X_1..X_n` of the
training batch size (the selection keeps :math:`B k` values of a batch of :math:`B` rows, so
:math:`m` depends on :math:`B`) that training did not use:

.. math:: \hat\theta = \frac1n \sum_{i=1}^n m(X_i), \qquad
          \mathrm{se}(\hat\theta) = \frac{s_m}{\sqrt n}, \quad
          s_m^2 = \frac{1}{n-1}\sum_i \left(m(X_i) - \hat\theta\right)^2.

:func:`calibrate_theta` is the operation (any Array API namespace; one host read at the
end). :func:`calibrate_fit` runs it after :func:`sae_ref.fit.fit` and records it beside the
running estimate in ``summary.json``, the newest checkpoint and the SAELens export;
:func:`calibrate_path` does the same on demand for a run directory or a SAELens directory
(``sae-ref calibrate``). Which rows:

- a store: the first :math:`\lfloor H/2 \rfloor` of the :math:`H` held-out batches
  (:math:`H \ge 2`) calibrate and the remaining ones measure the held-out L0 each
  :math:`\theta` gives, so the two never share a row (with :math:`H = 1` they share the one
  batch: the record says ``in_sample``; with :math:`H = 0` nothing is unused and nothing is
  calibrated);
- an endless (synthetic) source: :math:`\max(H, 1)` batches of its own seed
  (:data:`CALIBRATION_SEED`), the L0 on the held-out stream.

Which :math:`\theta` the SAELens export's threshold holds is :data:`EXPORTS`: ``"calibrated"``
(default, the final model's) or ``"running"`` (the training estimator's);
``cfg.json``'s ``metadata.theta_calibration`` records both either way.

>>> import numpy as np
>>> from sae_ref.sae import SAEConfig, init_params
>>> params = init_params(8, 32, xp=np, seed=0)
>>> rng = np.random.default_rng(0)
>>> batches = [rng.standard_normal((64, 8)).astype(np.float32) for _ in range(4)]
>>> cal = calibrate_theta(params, SAEConfig("batchtopk", k=4), batches)
>>> cal.n_batches, cal.batch_rows, bool(cal.theta > 0 and cal.stderr > 0)
(4, 64, True)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sae_ref import _checks as C
from sae_ref.arrays import to_numpy
from sae_ref.io import _atomic
from sae_ref.sae import SAEConfig, SAEParams, encode
from sae_ref.theta import batch_min_kept

#: Seed of an endless source's calibration stream (training uses ``data_seed``, the held-out
#: stream :data:`sae_ref.fit.HOLDOUT_SEED`).
CALIBRATION_SEED = 2_000_003
#: Which :math:`\theta` a SAELens export's threshold holds.
EXPORTS = ("calibrated", "running")


@dataclass(frozen=True)
class ThetaCalibration:
    r""":math:`\hat\theta` of one SAE: ``theta``, its standard error ``stderr`` (NaN with one
    batch), ``n_batches`` batches of ``batch_rows`` rows, and each batch's ``minima``
    :math:`m(X_i)` (host floats)."""

    theta: float
    stderr: float
    n_batches: int
    batch_rows: int
    minima: tuple[float, ...]


def calibrate_theta(params: SAEParams, config: SAEConfig, batches) -> ThetaCalibration:
    r"""The mean over ``batches`` of the smallest value the batch selection keeps.

    .. math:: \hat\theta = \frac1n\sum_i \min\{f_{bj}(X_i) : f_{bj}(X_i) > 0\},
              \qquad \mathrm{se} = s_m / \sqrt n

    Parameters
    ----------
    params : SAEParams
    config : SAEConfig
        The training selection, ``SAEConfig("batchtopk", k=...)`` (with its ``standardize``).
    batches : iterable of arrays [B, d]
        Rows the SAE did not train on, all of the training batch size B.

    Returns
    -------
    ThetaCalibration
        A batch with no positive kept value has no minimum and is left out of the mean
        (``n_batches`` counts the others); all of them so is an error.
    """
    op = "calibrate_theta"
    if not isinstance(config, SAEConfig) or config.activation != "batchtopk":
        raise ValueError(f"{op}: argument 'config' must be SAEConfig('batchtopk', k=...) (the "
                         f"training selection), got {config!r}")
    minima, rows = [], None
    for i, x in enumerate(batches):
        if rows is not None and x.shape[0] != rows:
            raise ValueError(f"{op}: argument 'batches[{i}]' has {x.shape[0]} rows but batches[0] "
                             f"has {rows}: theta depends on the batch size, calibrate on batches of one size")
        rows = x.shape[0]
        minima.append(batch_min_kept(encode(params, x, config).values))
    if rows is None:
        raise ValueError(f"{op}: argument 'batches' holds no batch")
    host = to_numpy(C.namespace(op, minima=minima[0]).stack(minima)).astype(np.float64)
    host = host[np.isfinite(host)]  # one host read of the n minima
    n = int(host.shape[0])
    if n == 0:
        raise ValueError(f"{op}: no batch of 'batches' has a positive kept value: theta is undefined")
    se = float(host.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return ThetaCalibration(float(host.mean()), se, n, int(rows), tuple(host.tolist()))


def mean_l0(params: SAEParams, config: SAEConfig, batches) -> tuple[float, int]:
    """Mean active latents per row of ``batches`` under ``config``, and the rows counted."""
    xp = C.namespace("mean_l0", W_enc=params.W_enc)
    total, n = 0, 0
    for x in batches:
        total += int(xp.count_nonzero(encode(params, x, config).values))
        n += x.shape[0]
    if n == 0:
        raise ValueError("mean_l0: argument 'batches' holds no batch")
    return total / n, n


def threshold_config(config: SAEConfig, theta: float) -> SAEConfig:
    """Threshold inference at ``theta`` with the training config's input handling."""
    return SAEConfig("threshold", theta=float(theta), standardize=config.standardize,
                     precision=config.precision)


# --- which rows ----------------------------------------------------------------------------------
def split_heldout(rows: tuple[int, int], batch_size: int) -> tuple[tuple[int, int], tuple[int, int], bool]:
    """A held-out row range of H whole batches cut into (calibration, evaluation, in_sample):
    the first floor(H/2) batches and the rest; with H = 1 both are the one batch."""
    a, b = rows
    h = (b - a) // batch_size
    if h < 1:
        raise ValueError(f"split_heldout: argument 'rows' {list(rows)} holds no whole batch of {batch_size}")
    if h == 1:
        return (a, b), (a, b), True
    cut = a + (h // 2) * batch_size
    return (a, cut), (cut, b), False


def _store_batches(source, batch_size, rows, xp, device, dtype):
    s = source.stream(batch_size, seed=0, rows=rows, xp=xp, device=device, dtype=dtype, nonfinite="skip")
    return [next(s) for _ in range((rows[1] - rows[0]) // batch_size)]


def _seed_batches(source, batch_size, seed, n, xp, device, dtype):
    s = source.stream(batch_size, seed=seed, xp=xp, device=device, dtype=dtype, nonfinite="skip")
    return [next(s) for _ in range(n)]


def _data(source, batch_size, holdout_batches, held_rows, xp, device, dtype):
    """(calibration batches, evaluation batches, where-record) or None when no row is unused."""
    from sae_ref.fit import HOLDOUT_SEED

    if getattr(source, "n_rows", None) is None:  # endless: its own seed
        n = max(holdout_batches, 1)
        cal = _seed_batches(source, batch_size, CALIBRATION_SEED, n, xp, device, dtype)
        ev = _seed_batches(source, batch_size, HOLDOUT_SEED, n, xp, device, dtype)
        return cal, ev, {"calibration_seed": CALIBRATION_SEED, "heldout_seed": HOLDOUT_SEED,
                         "in_sample": False}
    if held_rows is None or holdout_batches < 1:
        return None
    cal_rows, ev_rows, same = split_heldout(tuple(held_rows), batch_size)
    cal = _store_batches(source, batch_size, cal_rows, xp, device, dtype)
    ev = cal if same else _store_batches(source, batch_size, ev_rows, xp, device, dtype)
    return cal, ev, {"calibration_rows": list(cal_rows), "heldout_rows": list(ev_rows), "in_sample": same}


# --- one SAE -------------------------------------------------------------------------------------
def calibration_record(params, train_config: SAEConfig, cal_batches, eval_batches, *,
                       theta_running: float | None, estimator: str | None, where: dict,
                       export: str = "calibrated") -> dict:
    """Calibrate ``params`` and measure the held-out L0 that each theta gives: the JSON-ready
    record written beside the running estimate (see the module docs)."""
    C.choice("calibration_record", "export", export, EXPORTS)
    with C.no_checks():
        cal = calibrate_theta(params, train_config, cal_batches)
        l0_cal, n = mean_l0(params, threshold_config(train_config, cal.theta), eval_batches)
        l0_run = (mean_l0(params, threshold_config(train_config, theta_running), eval_batches)[0]
                  if theta_running is not None and math.isfinite(theta_running) else None)
        l0_sel = mean_l0(params, train_config, eval_batches)[0]
    if export == "running" and l0_run is None:
        raise ValueError("calibration_record: argument 'export' is 'running' but there is no running estimate")
    return {"theta": cal.theta, "stderr": cal.stderr if math.isfinite(cal.stderr) else None,
            "batches": cal.n_batches,
            "batch_size": cal.batch_rows, "minima": list(cal.minima), **where,
            "theta_running": theta_running, "theta_estimator": estimator, "k": train_config.k,
            "heldout_tokens": n, "l0_calibrated": l0_cal, "l0_running": l0_run,
            "l0_training_selection": l0_sel, "export": export,
            "theta_exported": cal.theta if export == "calibrated" else theta_running}


def calibrate_fit(state, source, summary: dict, run=None) -> dict:
    """After :func:`sae_ref.fit.fit`: calibrate a BatchTopK run's final weights on rows
    training did not use, and record it (``summary["theta_calibration"]``; with ``run``,
    also in ``summary.json``, the newest checkpoint and ``sae/``, which then exports the
    calibrated theta). Other architectures: ``summary`` unchanged. Returns ``summary``."""
    from array_api_compat import array_namespace
    from array_api_compat import device as device_of

    from sae_ref.theta import theta_value

    if state.config.arch != "batchtopk":
        return summary
    p = state.params
    xp, dev, dt = array_namespace(p.W_enc), device_of(p.W_enc), p.W_enc.dtype
    held = summary.get("heldout_rows")
    data = _data(source, summary["batch_size"], summary["holdout_batches"], held, xp, dev, dt)
    if data is None:
        summary["theta_calibration"] = {"skipped": "no held-out rows: every row of the store was "
                                        "trained on; the export keeps the running estimate"}
    else:
        running = float(theta_value(state.theta))
        summary["theta_calibration"] = calibration_record(
            p, state.config.sae_config(), data[0], data[1], theta_running=running,
            estimator=state.config.theta_estimator, where={**data[2], "step": state.t})
    if run is not None:
        record_run(Path(run), summary["theta_calibration"], summary=summary)
    return summary


# --- where it is recorded ------------------------------------------------------------------------
def record_run(run: Path, record: dict, *, summary: dict | None = None) -> None:
    """Write ``record`` into the run's ``summary.json``, its newest checkpoint's meta and its
    SAELens export (threshold = ``record["theta_exported"]``)."""
    from sae_ref.io.checkpoint import latest_checkpoint, update_meta
    from sae_ref.io.saelens import set_threshold

    if summary is None and (run / "summary.json").is_file():
        summary = json.loads((run / "summary.json").read_text())
    if summary is not None:
        summary["theta_calibration"] = record
        _atomic.atomic_write_bytes(run / "summary.json", json.dumps(summary, indent=2).encode())
    newest = latest_checkpoint(run / "checkpoints")
    if newest is not None:
        update_meta(newest, theta_calibration=record)
    if "theta_exported" in record and (run / "sae" / "cfg.json").is_file():
        set_threshold(run / "sae", record["theta_exported"], metadata={"theta_calibration": record})


def read_record(path) -> dict | None:
    """The calibration record of a run directory (``summary.json``, else its newest
    checkpoint) or of a SAELens directory (``path`` or ``path/sae``: ``cfg.json``'s
    ``metadata.theta_calibration``); None when there is none."""
    from sae_ref.io.checkpoint import latest_checkpoint

    path = Path(path)
    try:
        if (path / "summary.json").is_file():
            rec = json.loads((path / "summary.json").read_text()).get("theta_calibration")
            if rec is not None:
                return rec
        newest = latest_checkpoint(path / "checkpoints")
        if newest is not None:
            rec = json.loads(newest.read_text())["meta"].get("theta_calibration")
            if rec is not None:
                return rec
        for d in (path, path / "sae"):
            if (d / "cfg.json").is_file():
                return json.loads((d / "cfg.json").read_text()).get("metadata", {}).get("theta_calibration")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return None


def batchtopk_k(path) -> int | None:
    """k of a BatchTopK SAE saved as SAELens (``metadata.training_architecture_details``)."""
    from sae_ref.io.saelens import read_saelens_cfg

    try:
        det = read_saelens_cfg(path).get("metadata", {}).get("training_architecture_details") or {}
    except (OSError, ValueError, FileNotFoundError):
        return None
    return int(det["k"]) if det.get("architecture") == "batchtopk" and det.get("k") else None


def calibrate_path(path, store, *, batch_size: int | None = None, batches: int = 4,
                   rows: tuple[int, int] | None = None, k: int | None = None,
                   export: str = "calibrated", write: bool = True, backend: str = "numpy",
                   device=None) -> dict:
    """Calibrate theta of a BatchTopK run directory or SAELens directory on ``store``.

    Rows: ``rows`` (a range of whole batches, cut by :func:`split_heldout`); else, for a run
    whose record names this store, its held-out tail as :func:`calibrate_fit` cuts it; else
    the last ``2 * batches`` batches of the store (not checked to be unseen by training:
    ``"unchecked": true``). ``batch_size``: default the run's training batch size (a SAELens
    directory needs it). ``k``: a SAELens directory without sae-ref's training record needs
    it. ``export``: which theta the SAELens threshold holds (:data:`EXPORTS`). ``write``:
    record it (run: summary, checkpoint, ``sae/``; SAELens: ``cfg.json`` and the threshold).
    Returns the record.
    """
    from sae_ref.arrays import resolve
    from sae_ref.data.store import ActivationStore
    from sae_ref.fit import load_run

    op = "calibrate_path"
    C.choice(op, "export", export, EXPORTS)
    if not isinstance(store, ActivationStore):
        store = ActivationStore(store)
    xp, dev = resolve(backend, device)
    path = Path(path)
    loaded = load_run(path, xp=xp, device=dev)
    tc, meta = loaded.train_config, _run_meta(path)
    if tc is not None:
        if tc.arch != "batchtopk":
            raise ValueError(f"{op}: argument 'path' holds a {tc.arch} run; theta is BatchTopK's")
        train_cfg, running, estimator = tc.sae_config(), loaded.config.theta, tc.theta_estimator
        sae_dir = path / "sae"
    else:
        sae_dir = path if (path / "cfg.json").is_file() else path / "sae"
        k = k if k is not None else batchtopk_k(sae_dir)
        if k is None:
            raise ValueError(f"{op}: argument 'k' is needed: '{sae_dir}' does not record a BatchTopK k")
        train_cfg = SAEConfig("batchtopk", k=k, standardize=loaded.config.standardize)
        running = _common_threshold(loaded)
        estimator = (read_record(path) or {}).get("theta_estimator", "as exported")
    batch_size = batch_size or (meta or {}).get("batch_size")
    if batch_size is None:
        raise ValueError(f"{op}: argument 'batch_size' is needed (the training batch size: theta depends on it)")
    batch_size = C.integer_in(op, "batch_size", batch_size, 1, store.n_rows)
    unchecked = False
    if rows is None and meta and meta.get("heldout_rows") and (meta.get("data") or {}).get("fingerprint") == store.fingerprint():
        rows = tuple(meta["heldout_rows"])
    if rows is None:
        batches = C.integer_in(op, "batches", batches, 1, 2**40)
        rows, unchecked = (max(0, store.n_rows - 2 * batches * batch_size), store.n_rows), True
    cal_rows, ev_rows, same = split_heldout(tuple(rows), batch_size)
    dt = loaded.params.W_enc.dtype
    cal = _store_batches(store, batch_size, cal_rows, xp, dev, dt)
    ev = cal if same else _store_batches(store, batch_size, ev_rows, xp, dev, dt)
    where = {"calibration_rows": list(cal_rows), "heldout_rows": list(ev_rows), "in_sample": same,
             "store": str(store.directory), "unchecked": unchecked}
    rec = calibration_record(loaded.params, train_cfg, cal, ev, theta_running=running,
                             estimator=estimator, where=where, export=export)
    if write and tc is not None:
        record_run(path, rec)
    elif write:
        from sae_ref.io.saelens import set_threshold

        set_threshold(sae_dir, rec["theta_exported"], metadata={"theta_calibration": rec})
    return rec


def _run_meta(path: Path) -> dict | None:
    if (path / "summary.json").is_file():
        try:
            return json.loads((path / "summary.json").read_text())
        except (OSError, ValueError):
            return None
    return None


def _common_threshold(loaded) -> float | None:
    """The one threshold of a SAELens JumpReLU holding a global theta (else None)."""
    from sae_ref.arrays import to_numpy

    if loaded.config.activation == "threshold":
        return loaded.config.theta
    t = loaded.params.theta
    if t is None:
        return None
    t = to_numpy(t)
    return float(t[0]) if (t == t[0]).all() else None


def inference_config(loaded, record: dict | None):
    """The config a report evaluates a loaded SAE with: BatchTopK at the calibrated theta
    when a record holds one, else as loaded; and which theta that is."""
    if record is None or "theta" not in record:
        return loaded.config, None
    cfg = loaded.config
    return SAEConfig("threshold", theta=float(record["theta"]), standardize=cfg.standardize,
                     precision=cfg.precision), "calibrated"


__all__ = ["CALIBRATION_SEED", "EXPORTS", "ThetaCalibration", "calibrate_fit", "calibrate_path",
           "calibrate_theta", "calibration_record", "mean_l0", "read_record", "split_heldout",
           "threshold_config"]
