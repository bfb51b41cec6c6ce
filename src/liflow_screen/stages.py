"""Stage glue between the dataset and the models: prior-selector training and predictions,
flow-model training from the Parquet dataset, and chunked batched rollouts.

Units: Å, ps, K. Every output is written atomically with provenance.
"""

from __future__ import annotations

import hashlib
import logging
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import schema
from .dataset import ParquetPairSource, delta_frames, frames_file, load_trajectories
from .errors import InputError, SchemaError
from .io import provenance, write_json_atomic

log = logging.getLogger(__name__)

GROUPS = ("li", "frame")
#: P(slow) within this distance of 0.5 flags a (structure, T) as classifier-uncertain.
UNCERTAIN_BAND = 0.15


def _desc_matrix(structs: pd.DataFrame, ids: list[str], col: str) -> np.ndarray:
    """(M, F) descriptors for ``ids``; rows of structures without descriptors (or empty group) are NaN."""
    lens = {len(v) for v in structs[col] if v is not None and len(v)}
    if not lens:
        raise SchemaError(f"no structure has {col} descriptors")
    if len(lens) > 1:
        raise SchemaError(f"{col} descriptors have different lengths {sorted(lens)}")
    width = lens.pop()
    out = np.full((len(ids), width), np.nan, dtype=np.float64)
    for k, sid in enumerate(ids):
        v = structs.at[sid, col]
        if v is not None and len(v) == width:
            out[k] = np.asarray(v, dtype=np.float64)
    return out


def _selector_inputs(structs: pd.DataFrame, ids: list[str]) -> dict[str, np.ndarray]:
    return {"li": _desc_matrix(structs, ids, "desc_li"), "frame": _desc_matrix(structs, ids, "desc_frame")}


def train_selector(cfg: dict[str, Any], dataset_dir: str | Path, out: str | Path, report: str | Path) -> dict[str, Any]:
    """Fit the prior selector on the train split, early-stop on val, evaluate on test (Appendix D.1)."""
    from .model.classifier import PriorSelector

    root = Path(dataset_dir)
    structs = schema.read_df(root / "structures.parquet", "structures").set_index("id")
    labels = schema.read_df(root / "labels.parquet", "labels")
    if labels.empty:
        raise SchemaError(f"{root}/labels.parquet has no trajectories: nothing to train the prior selector on")
    tcfg = cfg["train"]

    def arrays(split: str):
        sub = labels[labels["split"] == split]
        if sub.empty:
            return None
        ids = sub["id"].tolist()
        temps = sub["temperature"].to_numpy(dtype=np.float64)
        return (_selector_inputs(structs, ids), temps,
                {"li": sub["slow_li"].to_numpy(bool), "frame": sub["slow_frame"].to_numpy(bool)})

    train, val, test = arrays("train"), arrays("val"), arrays("test")
    if train is None:
        raise SchemaError("no train-split trajectories in the dataset: cannot train the prior selector")
    sel = PriorSelector.fit(train[0], train[1], train[2], hidden=tuple(tcfg["classifier_hidden"]),
                            epochs=int(tcfg["classifier_epochs"]), lr=float(tcfg["classifier_lr"]),
                            seed=int(cfg["seed"]), val=val)
    rep: dict[str, Any] = {"training": sel.report, "threshold_A2_per_ps": cfg["dataset"]["slow_threshold"]}
    for name, data in (("train", train), ("val", val), ("test", test)):
        if data is None:
            rep[name] = {"note": f"no {name}-split trajectories"}
            continue
        rep[name] = {g: sel.evaluate(g, data[0][g], data[1], data[2][g]) for g in GROUPS}
    sel.save(out, config=cfg)
    write_json_atomic(report, {**rep, "provenance": provenance(cfg, stage="train-selector")})
    for name in ("train", "test"):
        for g in GROUPS:
            r = rep[name].get(g) if isinstance(rep[name], dict) else None
            if r:
                log.info("prior selector %s/%s: accuracy %.3f on %d, confusion %s", name, g, r["accuracy"], r["n"], r["confusion"])
    return rep


def selector_predictions(selector_path: str | Path, structs: pd.DataFrame, pairs: list[tuple[str, float]]) -> pd.DataFrame:
    """Predictions for (id, T) pairs: columns id, temperature, p_slow_li, p_slow_frame, li_slow,
    frame_slow, uncertain (P(slow) of either group within UNCERTAIN_BAND of 0.5)."""
    from .model.classifier import PriorSelector

    sel = PriorSelector.load(selector_path)
    ids = [p[0] for p in pairs]
    temps = np.array([p[1] for p in pairs], dtype=np.float64)
    st = structs if structs.index.name == "id" else structs.set_index("id")
    x = _selector_inputs(st, ids)
    out = pd.DataFrame({"id": ids, "temperature": [int(round(t)) for t in temps]})
    for g in GROUPS:
        out[f"p_slow_{g}"] = sel.predict_proba(g, x[g], temps)
        out[f"{g}_slow"] = sel.predict_slow(g, x[g], temps)
    unc = np.zeros(len(out), bool)
    for g in GROUPS:
        p = out[f"p_slow_{g}"].to_numpy()
        unc |= np.isfinite(p) & (np.abs(p - 0.5) < UNCERTAIN_BAND)
    out["uncertain"] = unc
    return out


def _slow_map(preds: pd.DataFrame) -> dict[tuple[str, int], tuple[bool, bool]]:
    return {(r.id, int(r.temperature)): (bool(r.li_slow), bool(r.frame_slow)) for r in preds.itertuples()}


def train_model(cfg: dict[str, Any], dataset_dir: str | Path, kind: str, variant: str, out_dir: str | Path,
                selector: str | Path | None = None, max_steps: int | None = None) -> dict[str, Any]:
    """Train a Propagator (variant adaptive | uniform | isotropic | regressor) or the Corrector."""
    from .model.train import train_flow

    root = Path(dataset_dir)
    train = load_trajectories(root, ["train"])
    val = load_trajectories(root, ["val"])
    if not train:
        raise SchemaError(f"{root}: no train-split trajectories to train on")
    if not val:
        log.warning("no val-split trajectories: validating on the train split (early stopping is then optimistic)")
        val = train
    slow = None
    if kind == "propagator" and variant == "adaptive":
        if selector is None:
            raise InputError("the adaptive prior needs the prior selector (--selector)")
        structs = schema.read_df(root / "structures.parquet", "structures")
        keys = sorted({(t.id, t.temperature) for t in train + val})
        slow = _slow_map(selector_predictions(selector, structs, keys))
    k = delta_frames(cfg)
    _discard_stale_state(Path(out_dir), cfg, root, kind, variant, selector)
    corr_variant = "uniform" if kind == "corrector" else variant
    summary = train_flow(kind, corr_variant, cfg, ParquetPairSource(train, k, slow), ParquetPairSource(val, k, slow),
                         Path(out_dir), max_steps=max_steps, progress=True)
    log.info("%s/%s: %s", kind, variant, {k: summary[k] for k in ("steps", "best_val", "steps_per_s") if k in summary})
    return summary


def dataset_fingerprint(root: str | Path) -> str:
    """Identity of a dataset for resuming: label / structure table bytes, frame files' names, sizes, mtimes."""
    root = Path(root)
    h = hashlib.sha256()
    for name in ("labels.parquet", "structures.parquet"):
        h.update((root / name).read_bytes())
    for f in sorted((root / "frames").rglob("*.parquet")):
        st = f.stat()
        h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _discard_stale_state(out_dir: Path, cfg: dict[str, Any], dataset_dir: Path, kind: str, variant: str,
                         selector: str | Path | None) -> None:
    """Remove a previous run's training state unless it was made from the same data and config.

    ``last.pt`` lets a killed training resume; after the dataset, the selector or the (non-resumable)
    training config changed, the workflow re-runs the rule and the old state must not be resumed.
    """
    from .io import config_digest
    from .model.train import _RESUMABLE_KEYS

    sel = Path(selector).read_bytes() if (selector and kind == "propagator" and variant == "adaptive") else b""
    stamp = config_digest({
        "data": dataset_fingerprint(dataset_dir), "selector": hashlib.sha256(sel).hexdigest()[:16],
        "train": {k: v for k, v in cfg["train"].items() if k not in _RESUMABLE_KEYS},
        "dataset": cfg["dataset"], "seed": cfg["seed"], "kind": kind, "variant": variant,
    })
    marker = out_dir / "inputs.digest"
    last = out_dir / "last.pt"
    if last.exists() and (not marker.exists() or marker.read_text().strip() != stamp):
        log.info("%s: training state from other inputs or config; starting afresh", out_dir)
        for name in ("last.pt", "best.pt", "history.json"):
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(stamp + "\n")


def rollout_chunk_rows(manifest: pd.DataFrame, chunk: int, chunk_size: int) -> pd.DataFrame:
    """Manifest rows of rollout chunk ``chunk`` (blocks of ``chunk_size`` in manifest order)."""
    sub = manifest.iloc[chunk * chunk_size:(chunk + 1) * chunk_size]
    if sub.empty:
        raise InputError(f"rollout chunk {chunk} is empty (manifest has {len(manifest)} rows, chunk size {chunk_size})")
    return sub


def rollout_chunk(cfg: dict[str, Any], manifest_path: str | Path, dataset_dir: str | Path, selector: str | Path,
                  propagator: str | Path, corrector: str | Path | None, variant: str, chunk: int,
                  out_dir: str | Path) -> dict[str, int]:
    """LiFlow rollouts (Algorithm 1) for every structure of a chunk at every rollout temperature.

    (structure, T) pairs are batched ``rollout.batch_structures`` at a time into one graph. Starts
    from the relaxed supercell; works without reference MD. Writes frames_T<K>.parquet per
    temperature and status.parquet (schema.FRAMES / STATUS) in ``out_dir``.
    """
    import torch

    from . import config as cfgmod
    from .model.graph import make_batch
    from .model.train import load_flow, prior_sigma_for, resolve_device
    from .rollout import rollout, rollout_status_rows, rollout_to_rows

    rc = cfg["rollout"]
    device = resolve_device(rc["device"])
    manifest = schema.read_df(manifest_path, "manifest")
    rows = rollout_chunk_rows(manifest, chunk, int(rc["chunk_size"]))
    structs = schema.read_df(Path(dataset_dir) / "structures.parquet", "structures").set_index("id")
    temps = cfgmod.rollout_temperatures(cfg)
    prop = load_flow(propagator, device)
    corr = load_flow(corrector, device) if corrector else None
    meta = prop.liflow_meta
    regressor = meta["prior"]["kind"] == "none"
    dt_ps = float(meta.get("delta_tau_ps") or cfg["dataset"]["delta_tau_ps"])
    source = f"liflow:{variant}"
    status_rows: list[dict[str, Any]] = []
    jobs: list[tuple[str, float, str]] = []
    for r in rows.itertuples():
        st = structs.loc[r.id] if r.id in structs.index else None
        if st is None:
            raise SchemaError(f"structure {r.id} of the manifest is missing from {dataset_dir}/structures.parquet")
        if str(st["relax_status"]).startswith("failed"):
            status_rows += [{"id": r.id, "temperature": int(round(T)), "split": r.split, "source": source,
                             "status": "relax_failed", "reason": str(st["relax_status"]), "n_frames": 0,
                             "duration_ps": 0.0, "wall_s": 0.0} for T in temps]
            continue
        jobs += [(r.id, T, r.split) for T in temps]
    preds = selector_predictions(selector, structs.reset_index(), [(j[0], j[1]) for j in jobs]) if jobs else None
    frames: dict[int, list[dict[str, Any]]] = {int(round(T)): [] for T in temps}
    bs = int(rc["batch_structures"])
    for b0 in range(0, len(jobs), bs):
        batch = jobs[b0:b0 + bs]
        sts = [structs.loc[j[0]] for j in batch]
        g = make_batch([np.asarray(s["numbers"]) for s in sts],
                       [np.asarray(s["positions"]).reshape(-1, 3) for s in sts],
                       [np.asarray(s["cell"]).reshape(3, 3) for s in sts], [j[1] for j in batch], device=device)
        p = preds.iloc[b0:b0 + bs]
        li_slow = torch.as_tensor(p["li_slow"].to_numpy(bool), device=device)
        fr_slow = torch.as_tensor(p["frame_slow"].to_numpy(bool), device=device)
        sig_p = None if regressor else prior_sigma_for(g, meta["prior"], li_slow, fr_slow)
        sig_c = prior_sigma_for(g, corr.liflow_meta["prior"], li_slow, fr_slow) if corr is not None else None
        gens = []
        for sid, T, _ in batch:  # one generator per (structure, T): results do not depend on batching
            gen = torch.Generator(device="cpu")
            gen.manual_seed(int(cfg["seed"]) * 1_000_003 + (hash_id(sid) ^ int(round(T))) % 2_147_483_647)
            gens.append(gen)
        t0 = time.perf_counter()
        res = rollout(prop, corr, g, sig_p if sig_p is not None else torch.zeros(g.pos.shape[0], device=device),
                      sig_c, int(rc["n_steps"]), int(rc["n_flow"]), gens,
                      max_step_displacement=float(rc["max_step_displacement"]), retries=int(rc["retries"]),
                      regressor=regressor, progress=False)
        wall = time.perf_counter() - t0
        ids, ts = [j[0] for j in batch], [j[1] for j in batch]
        for row in rollout_to_rows(res, ids, ts, source, dt_ps):
            frames[row.pop("temperature")].append(row)
        status_rows += rollout_status_rows(res, ids, ts, source, dt_ps, split=[j[2] for j in batch], wall_s=wall)
        log.info("rollout %s chunk %d: %d/%d pairs done (%.1f s for %d)", variant, chunk, b0 + len(batch), len(jobs), wall, len(batch))
    prov = provenance(cfg, stage="rollout", variant=variant, chunk=int(chunk),
                      propagator=str(propagator), corrector=str(corrector) if corrector else None)
    out = Path(out_dir)
    for T, frows in frames.items():
        schema.write_rows(frows, frames_file(out, T), "frames", prov=prov)
    schema.write_rows(status_rows, out / "status.parquet", "status", prov=prov)
    n_div = sum(r["status"] == "diverged" for r in status_rows)
    return {"pairs": len(jobs), "diverged": n_div}


def hash_id(sid: str) -> int:
    """Stable (process-independent) 31-bit hash of a structure id, for seeding."""
    return zlib.crc32(sid.encode()) & 0x7FFFFFFF
