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
                selector: str | Path | None = None, max_steps: int | None = None,
                init_from: str | Path | None = None) -> dict[str, Any]:
    """Train a Propagator (variant adaptive | uniform | isotropic | regressor) or the Corrector,
    from scratch or fine-tuning the flow-model checkpoint ``init_from``."""
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
    if init_from is not None:  # the model to fine-tune must have an embedding for every element
        from .model.train import load_flow

        base = load_flow(init_from)
        missing = sorted({e for t in train + val for e in base.unsupported_elements(t.numbers)})
        if missing:
            raise InputError(f"cannot fine-tune {init_from}: the training data holds {', '.join(missing)}, "
                             "outside its element table (give pretrained.element_index, or leave those "
                             "structures out of the MD)")
    k = delta_frames(cfg)
    _discard_stale_state(Path(out_dir), cfg, root, kind, variant, selector, init_from)
    corr_variant = "uniform" if kind == "corrector" else variant
    summary = train_flow(kind, corr_variant, cfg, ParquetPairSource(train, k, slow), ParquetPairSource(val, k, slow),
                         Path(out_dir), max_steps=max_steps, progress=True, init_from=init_from)
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
                         selector: str | Path | None, init_from: str | Path | None = None) -> None:
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
        "init": hashlib.sha256(Path(init_from).read_bytes()).hexdigest()[:16] if init_from else None,
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


#: Pilot rates within this factor of the threshold flag the class choice as uncertain.
PILOT_UNCERTAIN_FACTOR = 2.0


def pair_generator(seed: int, sid: str, temperature: float, stream: int = 0):
    """CPU torch.Generator of one (structure, T) rollout: stream 0 = production, 1 = pilot.

    Seeded from (config seed, structure id, T) only, so results do not depend on batching or chunking.
    """
    import torch

    state = np.random.SeedSequence([int(seed), hash_id(sid), int(round(temperature)), int(stream)]).generate_state(2)
    return torch.Generator(device="cpu").manual_seed(int(state[0]) << 31 ^ int(state[1]))


def _graph(structs: pd.DataFrame, batch: list[tuple[str, float, str]], device: Any):
    """GraphBatch of the relaxed supercells of ``batch`` [(id, T K, split)]."""
    from .model.graph import make_batch

    sts = [structs.loc[j[0]] for j in batch]
    return make_batch([np.asarray(s["numbers"]) for s in sts], [np.asarray(s["positions"]).reshape(-1, 3) for s in sts],
                      [np.asarray(s["cell"]).reshape(3, 3) for s in sts], [j[1] for j in batch], device=device)


def _rollout_batches(cfg: dict[str, Any], prop: Any, corr: Any, structs: pd.DataFrame,
                     jobs: list[tuple[str, float, str]], classes: dict[tuple[str, int], tuple[bool, bool]],
                     n_steps: int, stream: int, device: Any):
    """Yield (batch, RolloutResult, wall s) for ``jobs`` in groups of rollout.batch_structures."""
    import torch

    from .model.train import prior_sigma_for
    from .rollout import rollout

    rc = cfg["rollout"]
    regressor = prop.liflow_meta["prior"]["kind"] == "none"
    bs = int(rc["batch_structures"])
    for b0 in range(0, len(jobs), bs):
        batch = jobs[b0:b0 + bs]
        g = _graph(structs, batch, device)
        cls = [classes.get((j[0], int(round(j[1]))), (True, True)) for j in batch]
        li_slow = torch.as_tensor([c[0] for c in cls], device=device)
        fr_slow = torch.as_tensor([c[1] for c in cls], device=device)
        sig_p = (torch.zeros(g.pos.shape[0], device=device) if regressor
                 else prior_sigma_for(g, prop.liflow_meta["prior"], li_slow, fr_slow))
        sig_c = prior_sigma_for(g, corr.liflow_meta["prior"], li_slow, fr_slow) if corr is not None else None
        gens = [pair_generator(int(cfg["seed"]), sid, T, stream) for sid, T, _ in batch]
        t0 = time.perf_counter()
        res = rollout(prop, corr, g, sig_p, sig_c, n_steps, int(rc["n_flow"]), gens,
                      max_step_displacement=float(rc["max_step_displacement"]), retries=int(rc["retries"]),
                      regressor=regressor, progress=False)
        yield batch, res, time.perf_counter() - t0


def choose_prior_classes(cfg: dict[str, Any], method: str, prop: Any, corr: Any, structs: pd.DataFrame,
                         jobs: list[tuple[str, float, str]], selector: str | Path | None, device: Any,
                         source: str) -> pd.DataFrame:
    """The adaptive-prior class (li_slow, frame_slow) of every job, as schema.PRIORS rows.

    * ``selector``: the prior-selector classifier trained on this run's MD (P(slow) >= 0.5);
    * ``pilot``: a ``rollout.pilot_steps``-step rollout with the LARGE Li prior (and the small frame
      prior); Li is classified by the same rule as the MD labels: slow if its mobility rate (slope
      of the multi-origin MSD over the later half, Å²/ps) < ``dataset.slow_threshold``. The frame
      gets the small prior: a pilot with the large frame prior is self-fulfilling (the flow turns a
      wide prior into wide displacements: LiCl's frame "diffused" at 600 K), and a melting frame is
      a sanity flag of its own, not something to screen with;
    * ``fast`` / ``slow``: that class for every group.
    A non-adaptive Propagator prior has no classes (method "none").
    """
    from .analysis import mobility_rate

    rows = []
    key = [(sid, int(round(T))) for sid, T, _ in jobs]
    base = {"source": source, "p_slow_li": np.nan, "p_slow_frame": np.nan, "pilot_rate_li": np.nan,
            "pilot_rate_frame": np.nan, "uncertain": False}
    if prop.liflow_meta["prior"]["kind"] != "adaptive":
        method = "none"
    if method in ("none", "fast", "slow"):
        slow = method != "fast"
        return pd.DataFrame([{**base, "id": sid, "temperature": T, "method": method, "li_slow": slow,
                              "frame_slow": slow} for sid, T in key], columns=[f.name for f in schema.PRIORS])
    if method == "selector":
        if selector is None:
            raise InputError("rollout.prior_selection is 'selector' but no prior selector was given (--selector)")
        preds = selector_predictions(selector, structs.reset_index(), [(j[0], j[1]) for j in jobs])
        for (sid, T), p in zip(key, preds.itertuples(index=False)):
            rows.append({**base, "id": sid, "temperature": T, "method": "selector", "li_slow": bool(p.li_slow),
                         "frame_slow": bool(p.frame_slow), "p_slow_li": p.p_slow_li, "p_slow_frame": p.p_slow_frame,
                         "uncertain": bool(p.uncertain)})
        return pd.DataFrame(rows, columns=[f.name for f in schema.PRIORS])
    if method != "pilot":
        raise InputError(f"unknown rollout.prior_selection {method!r}")
    thr = float(cfg["dataset"]["slow_threshold"])
    n_pilot = int(cfg["rollout"]["pilot_steps"])
    large = {k: (False, True) for k in key}
    dt_ps = float(prop.liflow_meta.get("delta_tau_ps") or cfg["dataset"]["delta_tau_ps"])
    for batch, res, wall in _rollout_batches(cfg, prop, corr, structs, jobs, large, n_pilot, 1, device):
        for k, (sid, T, _) in enumerate(batch):
            traj = res.trajectory(k).astype(np.float64)
            li = np.asarray(structs.loc[sid]["numbers"]) == 3
            times = np.arange(traj.shape[0]) * dt_ps
            # a pilot that diverged before 2 steps cannot be classified: keep the large prior
            r_li = mobility_rate(traj, times, li) if traj.shape[0] > 2 else np.nan
            r_fr = mobility_rate(traj, times, ~li) if traj.shape[0] > 2 and (~li).any() else np.nan
            unc = bool(res.diverged[k]) or bool(np.isfinite(r_li) and thr / PILOT_UNCERTAIN_FACTOR <= r_li
                                                 <= thr * PILOT_UNCERTAIN_FACTOR)
            rows.append({**base, "id": sid, "temperature": int(round(T)), "method": "pilot",
                         "li_slow": bool(np.isfinite(r_li) and r_li < thr), "frame_slow": True,
                         "pilot_rate_li": r_li, "pilot_rate_frame": r_fr, "uncertain": unc})
        log.info("pilot rollouts: %d pairs (%.1f s)", len(batch), wall)
    return pd.DataFrame(rows, columns=[f.name for f in schema.PRIORS])


def rollout_chunk(cfg: dict[str, Any], manifest_path: str | Path, dataset_dir: str | Path, selector: str | Path | None,
                  propagator: str | Path, corrector: str | Path | None, variant: str, chunk: int,
                  out_dir: str | Path) -> dict[str, int]:
    """LiFlow rollouts (Algorithm 1) for every structure of a chunk at every rollout temperature.

    (structure, T) pairs are batched ``rollout.batch_structures`` at a time into one graph. Starts
    from the relaxed supercell; works without reference MD. Structures whose relaxation failed, or
    holding an element outside the model's element table, get a status row naming the reason.
    Writes frames_T<K>.parquet per temperature, status.parquet (schema.FRAMES / STATUS) and
    priors.parquet (schema.PRIORS: the prior class of each rollout and how it was chosen).
    """
    from . import config as cfgmod
    from .model.train import load_flow, resolve_device
    from .rollout import rollout_status_rows, rollout_to_rows

    rc = cfg["rollout"]
    device = resolve_device(rc["device"])
    manifest = schema.read_df(manifest_path, "manifest")
    rows = rollout_chunk_rows(manifest, chunk, int(rc["chunk_size"]))
    structs = schema.read_df(Path(dataset_dir) / "structures.parquet", "structures").set_index("id")
    temps = cfgmod.rollout_temperatures(cfg)
    prop = load_flow(propagator, device)
    corr = load_flow(corrector, device) if corrector else None
    dt_ps = float(prop.liflow_meta.get("delta_tau_ps") or cfg["dataset"]["delta_tau_ps"])
    source = f"liflow:{variant}"
    status_rows: list[dict[str, Any]] = []
    jobs: list[tuple[str, float, str]] = []

    def skip(sid: str, split: str, status: str, reason: str) -> None:
        status_rows.extend({"id": sid, "temperature": int(round(T)), "split": split, "source": source,
                            "status": status, "reason": reason, "n_frames": 0, "duration_ps": 0.0, "wall_s": 0.0}
                           for T in temps)

    for r in rows.itertuples():
        if r.id not in structs.index:
            raise SchemaError(f"structure {r.id} of the manifest is missing from {dataset_dir}/structures.parquet")
        st = structs.loc[r.id]
        if str(st["relax_status"]).startswith("failed"):
            skip(r.id, r.split, "relax_failed", str(st["relax_status"]))
            continue
        missing = sorted(set(prop.unsupported_elements(st["numbers"]))
                         | set(corr.unsupported_elements(st["numbers"]) if corr is not None else []))
        if missing:
            skip(r.id, r.split, "unsupported_element",
                 f"element{'s' if len(missing) > 1 else ''} {', '.join(missing)} not in the element table of "
                 f"{Path(propagator).name}{' / ' + Path(corrector).name if corrector else ''}")
            continue
        jobs += [(r.id, T, r.split) for T in temps]
    priors = choose_prior_classes(cfg, rc["prior_selection"], prop, corr, structs, jobs, selector, device, source)
    classes = {(p.id, int(p.temperature)): (bool(p.li_slow), bool(p.frame_slow)) for p in priors.itertuples()}
    frames: dict[int, list[dict[str, Any]]] = {int(round(T)): [] for T in temps}
    done = 0
    for batch, res, wall in _rollout_batches(cfg, prop, corr, structs, jobs, classes, int(rc["n_steps"]), 0, device):
        ids, ts = [j[0] for j in batch], [j[1] for j in batch]
        for row in rollout_to_rows(res, ids, ts, source, dt_ps):
            frames[row.pop("temperature")].append(row)
        status_rows += rollout_status_rows(res, ids, ts, source, dt_ps, split=[j[2] for j in batch], wall_s=wall)
        done += len(batch)
        log.info("rollout %s chunk %d: %d/%d pairs done (%.1f s for %d)", variant, chunk, done, len(jobs), wall, len(batch))
    prov = provenance(cfg, stage="rollout", variant=variant, chunk=int(chunk),
                      propagator=str(propagator), corrector=str(corrector) if corrector else None)
    out = Path(out_dir)
    for T, frows in frames.items():
        schema.write_rows(frows, frames_file(out, T), "frames", prov=prov)
    schema.write_rows(status_rows, out / "status.parquet", "status", prov=prov)
    schema.write_rows(priors, out / "priors.parquet", "priors", prov=prov)
    n_div = sum(r["status"] == "diverged" for r in status_rows)
    return {"pairs": len(jobs), "diverged": n_div}


def hash_id(sid: str) -> int:
    """Stable (process-independent) 31-bit hash of a structure id, for seeding."""
    return zlib.crc32(sid.encode()) & 0x7FFFFFFF
