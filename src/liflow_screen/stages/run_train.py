"""Stage ``train``: the prior selector and the Propagator / Corrector flow models from the dataset
(Algorithms A1 / A2), resumable; stale training state of another dataset or config is discarded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..io import layout, schema
from ..dataset.loader import StreamingPairSource, index_trajectories
from ..core.errors import InputError, SchemaError
from ..core.settings import Settings
from ..io.files import provenance, write_json_atomic
from ..flow.selection import GROUPS, selector_inputs, selector_predictions, slow_map

log = logging.getLogger(__name__)


def run_selector(settings: Settings, dataset_dir: str | Path, out: str | Path, report: str | Path) -> dict[str, Any]:
    """Fit the prior selector on the train split, early-stop on val, evaluate on test (Appendix D.1)."""
    from ..flow.classifier import PriorSelector

    root = Path(dataset_dir)
    structs = schema.read_df(root / "structures.parquet", "structures").set_index("id")
    labels = schema.read_df(root / "labels.parquet", "labels")
    if labels.empty:
        raise SchemaError(f"{root}/labels.parquet has no trajectories: nothing to train the prior selector on")
    tr = settings.train

    def arrays(split: str):
        sub = labels[labels["split"] == split]
        if sub.empty:
            return None
        ids = sub["id"].tolist()
        temps = sub["temperature"].to_numpy(dtype=np.float64)
        return (selector_inputs(structs, ids), temps,
                {"li": sub["slow_li"].to_numpy(bool), "frame": sub["slow_frame"].to_numpy(bool)})

    train, val, test = arrays("train"), arrays("val"), arrays("test")
    if train is None:
        raise SchemaError("no train-split trajectories in the dataset: cannot train the prior selector")
    sel = PriorSelector.fit(train[0], train[1], train[2], hidden=tr.classifier_hidden,
                            epochs=tr.classifier_epochs, lr=tr.classifier_lr, seed=settings.seed, val=val)
    rep: dict[str, Any] = {"training": sel.report, "threshold_A2_per_ps": settings.dataset.slow_threshold}
    for name, data in (("train", train), ("val", val), ("test", test)):
        if data is None:
            rep[name] = {"note": f"no {name}-split trajectories"}
            continue
        rep[name] = {g: sel.evaluate(g, data[0][g], data[1], data[2][g]) for g in GROUPS}
    sel.save(out, config=settings)
    write_json_atomic(report, {**rep, "provenance": provenance(settings, stage="train-selector")})
    for name in ("train", "test"):
        for g in GROUPS:
            r = rep[name].get(g) if isinstance(rep[name], dict) else None
            if r:
                log.info("prior selector %s/%s: accuracy %.3f on %d, confusion %s", name, g, r["accuracy"], r["n"], r["confusion"])
    return rep


def run(settings: Settings, dataset_dir: str | Path, kind: str, variant: str, out_dir: str | Path,
                selector: str | Path | None = None, max_steps: int | None = None,
                init_from: str | Path | None = None) -> dict[str, Any]:
    """Train a Propagator (variant adaptive | uniform | isotropic | regressor) or the Corrector,
    from scratch or fine-tuning the flow-model checkpoint ``init_from``."""
    import torch

    from ..flow.training import distributed, process_group, train_flow

    root = Path(dataset_dir)
    k = settings.delta_tau_frames
    refs, files = index_trajectories(root, ["train"])
    if not refs:
        raise SchemaError(f"{root}: no train-split trajectories to train on")
    train_src = StreamingPairSource(refs, files, k)
    refs, files = index_trajectories(root, ["val"])
    if refs:
        val_src = StreamingPairSource(refs, files, k)
    else:
        log.warning("no val-split trajectories: validating on the train split (early stopping is then optimistic)")
        val_src = train_src
    train, val = train_src.trajs, val_src.trajs
    if kind == "propagator" and variant == "adaptive":
        keys = sorted({(t.id, t.temperature) for t in train + val})
        if settings.train.prior_classes == "labels":  # Appendix D.4: fixed per T from the training MSD
            labels = schema.read_df(root / layout.LABELS, "labels")
            slow = {(r.id, int(r.temperature)): (bool(r.slow_li), bool(r.slow_frame)) for r in labels.itertuples()}
            lost = [k for k in keys if (k[0], int(round(k[1]))) not in slow]
            if lost:
                raise SchemaError(f"{root}/labels.parquet has no label for {lost[0][0]} at {lost[0][1]:g} K")
            log.info("adaptive prior classes from the trajectories' own MSD labels: %s",
                     {f"{k[0]}@{k[1]}K": ("slow" if v[0] else "fast") for k, v in sorted(slow.items())})
        else:
            if selector is None:
                raise InputError("the adaptive prior needs the prior selector (--selector) unless "
                                 "train.prior_classes is 'labels'")
            structs = schema.read_df(root / layout.STRUCTURES, "structures")
            slow = slow_map(selector_predictions(selector, structs, keys))
        train_src.slow = val_src.slow = slow
    if init_from is not None:  # the model to fine-tune must have an embedding for every element
        from ..flow.training import load_flow

        base = load_flow(init_from)
        missing = sorted({e for t in train + val for e in base.unsupported_elements(t.numbers)})
        if missing:
            raise InputError(f"cannot fine-tune {init_from}: the training data holds {', '.join(missing)}, "
                             "outside its element table (give pretrained.element_index, or leave those "
                             "structures out of the MD)")
    corr_variant = "uniform" if kind == "corrector" else variant
    rank, world, _ = distributed()
    with process_group(settings.train.device):  # under torchrun: one process per GPU / CPU share
        if rank == 0:
            _discard_stale_state(Path(out_dir), settings, root, kind, variant, selector, init_from)
        if world > 1:
            torch.distributed.barrier()
        summary = train_flow(kind, corr_variant, settings, train_src, val_src, Path(out_dir), max_steps=max_steps,
                             progress=True, init_from=init_from)
    log.info("%s/%s: %s", kind, variant, {k: summary[k] for k in ("steps", "best_val", "steps_per_s") if k in summary})
    return summary


def dataset_fingerprint(root: str | Path) -> str:
    """Identity of a dataset for resuming: label / structure table bytes, frame files' names, sizes, mtimes."""
    root = Path(root)
    h = hashlib.sha256()
    for name in ("labels.parquet", "structures.parquet"):
        h.update((root / name).read_bytes())
    for f in layout.dataset_frame_files(root):
        st = f.stat()
        h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _discard_stale_state(out_dir: Path, settings: Settings, dataset_dir: Path, kind: str, variant: str,
                         selector: str | Path | None, init_from: str | Path | None = None) -> None:
    """Remove a previous run's training state unless it was made from the same data and config.

    ``last.pt`` lets a killed training resume; after the dataset, the selector or the (non-resumable)
    training config changed, the workflow re-runs the rule and the old state must not be resumed.
    """
    from ..io.files import config_digest, sha256_of
    from ..flow.training import RESUMABLE_KEYS

    use_sel = bool(selector and kind == "propagator" and variant == "adaptive"
                   and settings.train.prior_classes == "selector")
    stamp = config_digest({
        "data": dataset_fingerprint(dataset_dir), "selector": sha256_of(selector)[:16] if use_sel else None,
        "train": {k: v for k, v in dataclasses.asdict(settings.train).items() if k not in RESUMABLE_KEYS},
        "dataset": dataclasses.asdict(settings.dataset), "seed": settings.seed, "kind": kind, "variant": variant,
        "init": sha256_of(init_from)[:16] if init_from else None,
    })
    marker = out_dir / "inputs.digest"
    last = out_dir / "last.pt"
    if last.exists() and (not marker.exists() or marker.read_text().strip() != stamp):
        log.info("%s: training state from other inputs or config; starting afresh", out_dir)
        for name in ("last.pt", "best.pt", "history.json"):
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(stamp + "\n")
