#!/usr/bin/env python
"""Regenerate the published models shipped with the package, or check the shipped ones.

The LiFlow authors' universal Propagator and Corrector (``P_universal.ckpt``, ``C_universal.ckpt``,
GitHub learningmatter-mit/liflow at the commit in ``liflow_screen.flow.published.COMMIT``, MIT
License) are shipped in this project's own imported format, so a fresh offline install screens
without a download:

    src/liflow_screen/data/models/P_universal.pt, C_universal.pt   imported checkpoints (float32)
    src/liflow_screen/data/models/LICENSE                          the authors' license, verbatim
    src/liflow_screen/data/models/PROVENANCE.json, PROVENANCE.md   sources, SHA-256s, tool, date

Each source file is checked against its published SHA-256, imported with
``published.import_checkpoint`` (built-in element table), and written deterministically: the
machine-specific fields of an import (absolute source path, host, time, library versions) are
replaced by fixed ones, and the date and versions go to PROVENANCE.json instead. Re-running on the
same sources gives byte-identical files (the PROVENANCE date is kept when nothing changed).

    .venv/bin/python scripts/ship_published_models.py            # write
    .venv/bin/python scripts/ship_published_models.py --check    # regenerate to a temp dir and compare

``--check`` exits 0 when the shipped files are byte-identical to a regeneration, or weight- and
metadata-identical (e.g. another torch version pickles differently: said so), else 1.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from liflow_screen.io.files import config_digest, sha256_of, versions, write_json_atomic, write_text_atomic  # noqa: E402
from liflow_screen.flow import published as pub  # noqa: E402
from liflow_screen.flow.training import CKPT_FORMAT  # noqa: E402

DEFAULT_SOURCE = REPO.parent / "shared" / "liflow-reference"
DEFAULT_OUT = REPO / "src" / "liflow_screen" / "data" / "models"
TOOL = "scripts/ship_published_models.py (liflow_screen.flow.published.import_checkpoint, built-in element table)"
NOT_SHIPPED = [n for n in pub.PUBLISHED if n not in pub.SHIPPED]


def convert(name: str, source: Path, out_dir: Path) -> dict:
    """Import ``source/<name>.ckpt`` into ``out_dir/<name>.pt`` deterministically; its record."""
    model = pub.PUBLISHED[name]
    src = source / model.file
    if not src.is_file():
        raise SystemExit(f"error: {src} not found")
    got = sha256_of(src)
    if got != model.sha256:
        raise SystemExit(f"error: {src} has SHA-256 {got}, the published file has {model.sha256}")
    out = out_dir / f"{name}.pt"
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.pt"
        pub.import_checkpoint(src, raw)
        blob = torch.load(raw, map_location="cpu", weights_only=True)
    blob["imported_from"]["file"] = f"{pub.REPOSITORY}@{pub.COMMIT[:7]}:ckpt/{model.file}"
    blob["provenance"] = {"config": {}, "config_digest": config_digest({}), "stage": "ship-published-models",
                          "tool": TOOL, "record": "PROVENANCE.json (date, library versions)"}
    blob["model"] = {k: (v.float() if v.is_floating_point() else v).contiguous().clone()
                     for k, v in blob["model"].items()}
    if blob.get("format") != CKPT_FORMAT:
        raise SystemExit(f"error: the import wrote format {blob.get('format')!r}, not {CKPT_FORMAT!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, out)
    imp = blob["imported_from"]
    return {
        "file": out.name, "sha256": sha256_of(out), "bytes": out.stat().st_size,
        "kind": blob["kind"], "delta_tau_ps": blob["delta_tau_ps"], "prior": blob["prior"],
        "parameters": int(sum(v.numel() for k, v in blob["model"].items() if v.is_floating_point())),
        "source_file": model.file, "source_sha256": got, "source_bytes": src.stat().st_size,
        "source_url": f"https://github.com/{pub.REPOSITORY}/blob/{pub.COMMIT}/ckpt/{model.file}",
        "trained_on": model.trained_on, "training_run": imp.get("training_run"),
        "global_step": imp.get("global_step"), "elements_covered": imp["elements_covered"],
    }


def record(models: dict, date: str) -> dict:
    return {
        "what": "The LiFlow authors' published universal Propagator and Corrector, imported into "
                "liflow_screen's flow-model checkpoint format (load with liflow_screen.flow.training.load_flow).",
        "source": {"repository": f"https://github.com/{pub.REPOSITORY}", "commit": pub.COMMIT, "folder": "ckpt/",
                   "license": pub.LICENSE_NAME, "license_url": pub.LICENSE_URL, "license_file": "LICENSE"},
        "conversion": {"tool": TOOL, "format": CKPT_FORMAT, "date": date,
                       "element_table": "built-in rows pinned by the published checkpoints (Z <= 32 without "
                                        "He, Ne, Ar); pretrained.element_index re-tables a copy at import",
                       "contents": "float32 state dict of FlowModel + element table (int64), prior settings, "
                                   "hparams, delta_tau_ps, imported_from (source SHA-256, reference config); "
                                   "no optimizer state",
                       "versions": {k: v for k, v in versions().items() if k in ("python", "torch", "numpy")}},
        "shipped": list(pub.SHIPPED),
        "not_shipped": NOT_SHIPPED,
        "note": "Only these two models ship. The single-material models (" + ", ".join(NOT_SHIPPED) + ") are "
                "resolved from an explicit path, the cache or a download (SHA-256 checked).",
        "models": models,
    }


def markdown(rec: dict) -> str:
    src = rec["source"]
    lines = [
        "# Shipped published LiFlow models",
        "",
        f"{rec['what']}",
        "",
        f"- Source: {src['repository']} at commit `{src['commit']}`, folder `{src['folder']}`.",
        f"- License: {src['license']} ({src['license_url']}); the text is in `LICENSE` here and must "
        "accompany any copy.",
        f"- Conversion: {rec['conversion']['tool']}, on {rec['conversion']['date']}; format "
        f"`{rec['conversion']['format']}`. Element table: {rec['conversion']['element_table']}.",
        f"- {rec['note']}",
        "- Regenerate / check: `.venv/bin/python scripts/ship_published_models.py [--check]` "
        "(sources: `../shared/liflow-reference`).",
        "",
        "| shipped file | bytes | SHA-256 | source file | source SHA-256 | kind | Δτ (ps) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in rec["models"].values():
        lines.append(f"| `{m['file']}` | {m['bytes']} | `{m['sha256']}` | `{m['source_file']}` | "
                     f"`{m['source_sha256']}` | {m['kind']} | {m['delta_tau_ps']} |")
    return "\n".join(lines) + "\n"


def generate(source: Path, out_dir: Path, date: str | None) -> dict:
    """Write the shipped files into ``out_dir``; the record. The date of an existing record is kept
    when the models did not change."""
    models = {name: convert(name, source, out_dir) for name in pub.SHIPPED}
    old = out_dir / "PROVENANCE.json"
    if date is None:
        prev = json.loads(old.read_text()) if old.is_file() else None
        same = prev is not None and prev.get("models") == json.loads(json.dumps(models))
        date = prev["conversion"]["date"] if same else _dt.date.today().isoformat()
    shutil.copyfile(source / "LICENSE", out_dir / "LICENSE")
    rec = record(models, date)
    write_json_atomic(out_dir / "PROVENANCE.json", rec)
    write_text_atomic(out_dir / "PROVENANCE.md", markdown(rec))
    for f in ("LICENSE", "PROVENANCE.json", "PROVENANCE.md", *(m["file"] for m in models.values())):
        (out_dir / f).chmod(0o644)
    return rec


def _same_weights(a: Path, b: Path) -> list[str]:
    """Differences between two imported checkpoints (weights and metadata); empty when identical."""
    x = torch.load(a, map_location="cpu", weights_only=True)
    y = torch.load(b, map_location="cpu", weights_only=True)
    diffs = []
    if set(x) != set(y):
        diffs.append(f"keys {sorted(set(x) ^ set(y))}")
    for k in set(x) & set(y):
        if k == "model":
            for p in sorted(set(x[k]) | set(y[k])):
                a, b = x[k].get(p), y[k].get(p)
                if a is None or b is None or a.dtype != b.dtype or not torch.equal(a, b):
                    diffs.append(f"weight {p}")
        elif json.dumps(x[k], sort_keys=True, default=str) != json.dumps(y[k], sort_keys=True, default=str):
            diffs.append(f"metadata {k}")
    return diffs


def check(source: Path, out_dir: Path) -> int:
    shipped = json.loads((out_dir / "PROVENANCE.json").read_text())
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        rec = generate(source, Path(tmp), shipped["conversion"]["date"])
        for name, m in rec["models"].items():
            have = out_dir / m["file"]
            recorded = shipped["models"][name]["sha256"]
            if sha256_of(have) != recorded:
                print(f"{have}: SHA-256 {sha256_of(have)} differs from PROVENANCE.json {recorded}")
                bad += 1
            if m["sha256"] == recorded:
                print(f"{name}: byte-identical ({recorded})")
                continue
            diffs = _same_weights(Path(tmp) / m["file"], have)
            if diffs:
                print(f"{name}: regeneration differs: {', '.join(diffs[:5])}")
                bad += 1
            else:
                print(f"{name}: weight- and metadata-identical, bytes differ (torch {torch.__version__} "
                      f"pickles differently from {shipped['conversion']['versions'].get('torch')})")
        if (Path(tmp) / "LICENSE").read_bytes() != (out_dir / "LICENSE").read_bytes():
            print("LICENSE differs from the source's")
            bad += 1
        for key in ("source", "shipped", "not_shipped"):
            if rec[key] != shipped[key]:
                print(f"PROVENANCE.json {key} differs from a regeneration")
                bad += 1
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder holding the published .ckpt files")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="package data folder to write")
    ap.add_argument("--check", action="store_true", help="compare a regeneration with the shipped files; write nothing")
    ap.add_argument("--date", default=None, help="conversion date to record (default: kept if unchanged, else today)")
    ns = ap.parse_args(argv)
    torch.set_num_threads(1)
    if ns.check:
        return check(ns.source, ns.out)
    rec = generate(ns.source, ns.out, ns.date)
    for m in rec["models"].values():
        print(f"{ns.out / m['file']}: {m['bytes']} bytes, sha256 {m['sha256']} (from {m['source_file']} "
              f"{m['source_sha256'][:12]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
