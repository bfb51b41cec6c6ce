"""Benchmark: Propagator training steps/s, ours and the LiFlow authors', in one run -> results/bench/train_<device>.json.

Both sides train the Table A2 model (64 features, 20 Bessel functions, 3 layers, 5 Å cutoff, 0.5 Å
offset) at the paper's batch size 16 on the same pairs: a rock-salt LiF 2x2x3 supercell (96 atoms,
a = 4.03 Å; a dense crystal, so the edge count per atom is at the high end of Li electrolytes) with
synthetic displacements (Gaussian, Li 0.8 Å, F 0.2 Å; a step's cost does not depend on their values),
64 pairs, batches drawn with replacement by the same seeded index sequence on both sides.

(a) ours, as ``liflow_screen.flow.training.train_flow`` runs a step: ``build_batch`` with per-pair
    generators (``pair_generators``) and pinning on CUDA = phase ``data``; then the copy to the device,
    ``flow_loss`` (which builds the periodic radius graph on the device) under ``torch.autocast(bf16)``
    when ``train.precision`` is bf16 and through ``torch.compile(model, dynamic=True)`` when
    ``train.compile``, the finite-loss check, ``zero_grad``, ``backward``, ``clip_grad_norm_`` and Adam
    = phase ``step``. One entry per named configuration in ``OUR_CONFIGS`` (train.* overrides); one whose
    setting does not exist in ``TrainSettings``, or that fails to compile, is recorded as skipped.
(b) theirs: ``bench/reference_train.py`` (their ``FlowModule.training_step`` on batches from their
    ``TimeDelayedPairDataset``; their neighbour list is built on the CPU in the data phase).

The configurations run interleaved: ``--rounds`` rounds of [each of ours, then theirs], ``--steps``
timed steps each, after ``--warmup`` untimed steps per configuration (which include compilation).
Reported per configuration: steps/s of the model step alone (``step``; theirs then excludes its
neighbour list, which their 32 DataLoader workers overlap, ours includes its radius graph) and of data +
step in one process (``serial``), as 1 / median step time over all rounds, with per-round values and
quartiles; ratios ours/theirs (> 1: ours faster). For bf16, the loss and gradient deviation from fp32 on
one fixed batch with the same weights and noise (a per-step numerical check, not a training run).

Usage: ``python bench/bench_train.py --device cuda`` (defaults: 20 steps x 3 rounds; smoke test:
``OMP_NUM_THREADS=1 python bench/bench_train.py --device cpu --steps 2 --rounds 1 --warmup 1``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from liflow_screen.core.settings import Settings, TrainSettings  # noqa: E402
from liflow_screen.flow.training import (  # noqa: E402
    Pair,
    _model_from_settings,
    _prior_settings,
    build_batch,
    flow_loss,
    pair_generators,
)
from liflow_screen.io.files import provenance, write_json_atomic  # noqa: E402
from reference_flowsim import REFERENCE_COMMIT  # noqa: E402

A = 4.03
FRAC = np.array([[0, 0, 0], [0, .5, .5], [.5, 0, .5], [.5, .5, 0],
                 [.5, .5, .5], [.5, 0, 0], [0, .5, 0], [0, 0, .5]])
Z = np.array([3, 3, 3, 3, 9, 9, 9, 9])
REPS = (2, 2, 3)
N_PAIRS = 64
BATCH_SIZE = 16  # the paper's (and both codes' default)
SEED = 0

#: our step's named configurations: train.* overrides of the defaults
OUR_CONFIGS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "bf16": {"precision": "bf16"},
    "compile": {"compile": True},
    "compile_bf16": {"compile": True, "precision": "bf16"},
}


def lif_supercell() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(numbers (96,), positions (96,3) Å, cell (3,3) Å) of the LiF 2x2x3 supercell."""
    shifts = np.array([[i, j, k] for i in range(REPS[0]) for j in range(REPS[1]) for k in range(REPS[2])])
    frac = (FRAC[None] + shifts[:, None]).reshape(-1, 3)
    return np.tile(Z, len(shifts)), frac * A, np.diag(np.array(REPS, float) * A)


def make_pairs(n: int, seed: int) -> list[Pair]:
    rng = np.random.default_rng(seed)
    z, pos, cell = lif_supercell()
    sig = np.where(z == 3, 0.8, 0.2)[:, None]
    out = []
    for k in range(n):
        x0 = pos + rng.normal(0, 0.05, pos.shape)
        x1 = x0 + rng.normal(size=pos.shape) * sig
        temp = float(rng.choice([600.0, 1000.0]))
        out.append(Pair(f"LiF96-{k}", z, cell, x0.astype(np.float32), x1.astype(np.float32), temp,
                        bool(rng.random() < 0.5), True))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _summary(times: list[float]) -> dict[str, float]:
    t = np.asarray(times, dtype=np.float64)
    q1, med, q3 = np.percentile(t, [25, 50, 75])
    return {"median_s": float(med), "q1_s": float(q1), "q3_s": float(q3), "mean_s": float(t.mean()),
            "steps_per_s": float(1.0 / med)}


class OurTrainer:
    """Our model, optimizer and pairs for one named configuration, stepping as train_flow does."""

    def __init__(self, name: str, overrides: dict[str, Any], pairs: list[Pair], device: torch.device) -> None:
        self.name, self.pairs, self.device = name, pairs, device
        missing = sorted(set(overrides) - {f.name for f in dataclasses.fields(TrainSettings)})
        if missing:
            raise LookupError(f"train.{', train.'.join(missing)} not in TrainSettings")
        self.cfg = Settings.defaults(train={"device": device.type, "batch_size": BATCH_SIZE, **overrides})
        tr = self.cfg.train
        self.tr = tr
        self.prior = _prior_settings("propagator", "adaptive", tr)
        self.model = _model_from_settings(tr, self.cfg.seed).to(device)
        self.model.train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=tr.lr)
        self.bf16 = getattr(tr, "precision", "fp32") == "bf16"
        self.compiled = bool(getattr(tr, "compile", False))
        self.net = torch.compile(self.model, dynamic=True) if self.compiled else self.model
        self.rng = np.random.default_rng(SEED)  # the same index sequence as the reference's
        self.step_no = 0

    def next_batch(self, indices: Any = None) -> Any:
        if indices is None:
            indices = self.rng.integers(0, len(self.pairs), BATCH_SIZE)
        batch = [self.pairs[int(i)] for i in indices]
        b = build_batch(batch, "propagator", self.prior, pair_generators(self.cfg.seed, self.step_no + 1, len(batch)))
        return b.pin_memory() if self.device.type == "cuda" else b

    def loss(self, b: Any) -> torch.Tensor:
        n_atoms = int(b.d1.shape[0])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return flow_loss(self.net, b, False, n_atoms).float()

    def train_step(self, b: Any) -> float:
        b = b.to(self.device, non_blocking=True)
        loss = self.loss(b)
        report = loss.detach()
        if not torch.isfinite(report):
            raise FloatingPointError(f"{self.name}: non-finite training loss")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tr.grad_clip)
        self.opt.step()
        _sync(self.device)
        self.step_no += 1
        return float(report)

    def time_steps(self, steps: int) -> dict[str, list[float]]:
        data_s, step_s, losses = [], [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            b = self.next_batch()
            t1 = time.perf_counter()
            losses.append(self.train_step(b))
            t2 = time.perf_counter()
            data_s.append(t1 - t0)
            step_s.append(t2 - t1)
        return {"data_s": data_s, "step_s": step_s, "loss": losses}

    def n_edges(self, indices: Any) -> int:
        b = self.next_batch(indices).to(self.device)
        with torch.no_grad():
            return int(self.model.condition(b.g).n_edges)


def bf16_deviation(pairs: list[Pair], device: torch.device) -> dict[str, float]:
    """Loss and gradient of one fixed batch with the same weights and noise, fp32 vs bf16 autocast."""
    tr = Settings.defaults(train={"batch_size": BATCH_SIZE}).train
    prior = _prior_settings("propagator", "adaptive", tr)
    model = _model_from_settings(tr, 0).to(device)
    b = build_batch(pairs[:BATCH_SIZE], "propagator", prior, pair_generators(0, 1, BATCH_SIZE)).to(device)
    out = {}
    for name, on in (("fp32", False), ("bf16", True)):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on):
            loss = flow_loss(model, b).float()
        loss.backward()
        out[name] = (float(loss.detach()), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    (l32, g32), (l16, g16) = out["fp32"], out["bf16"]
    return {"loss_fp32": l32, "loss_bf16": l16, "loss_rel_diff": abs(l16 - l32) / abs(l32),
            "grad_rel_diff_norm": float((g16 - g32).norm() / g32.norm()),
            "grad_cosine": float(torch.nn.functional.cosine_similarity(g16, g32, dim=0))}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per configuration per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration (incl. compilation)")
    ap.add_argument("--configs", default=",".join(OUR_CONFIGS),
                    help=f"our configurations to time, comma-separated, from {', '.join(OUR_CONFIGS)}")
    ap.add_argument("--reference-repo", type=Path, default=None,
                    help="exported learningmatter-mit/liflow tree (default: <repo>/../liflow-ref)")
    ap.add_argument("--torch-scatter-src", type=Path, default=None,
                    help="unpacked torch-scatter 2.1.2 sdist (default: <repo>/../liflow-ref-deps/torch_scatter-2.1.2)")
    ap.add_argument("--out", default=None, help="default: results/bench/train_<device>.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    out_path = args.out or f"results/bench/train_{device.type}.json"
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in OUR_CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; known: {list(OUR_CONFIGS)}")

    load0 = os.getloadavg()
    pairs = make_pairs(N_PAIRS, seed=SEED)
    first = list(range(BATCH_SIZE))
    runners: dict[str, Any] = {}
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}

    # set up and warm up each configuration (compilation happens here)
    for name in names:
        try:
            r = OurTrainer(name, OUR_CONFIGS[name], pairs, device)
            t0 = time.perf_counter()
            r.time_steps(args.warmup)
            warm = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - a variant that cannot run here is recorded, not fatal
            skipped[name] = f"{type(e).__name__}: {e}".strip()[:2000]
            if not isinstance(e, LookupError):
                traceback.print_exc()
            continue
        runners[name] = r
        results[name] = {"overrides": OUR_CONFIGS[name], "warmup_s": warm, "params": r.model.n_parameters(),
                         "precision": getattr(r.tr, "precision", "fp32"), "compile": r.compiled,
                         "float32_matmul_precision": torch.get_float32_matmul_precision(),
                         "edges_first_batch": r.n_edges(first), "rounds": []}

    reference: dict[str, Any]
    ref = None
    try:
        from reference_train import ReferenceTrainer

        kw = {k: v for k, v in (("repo", args.reference_repo), ("torch_scatter_src", args.torch_scatter_src)) if v}
        ref = ReferenceTrainer(pairs, device, BATCH_SIZE, SEED, **kw)
        t0 = time.perf_counter()
        ref.time_steps(args.warmup)
        reference = {**ref.describe(), "warmup_s": time.perf_counter() - t0, "edges_first_batch": ref.n_edges(first),
                     "rounds": []}
    except Exception as e:  # noqa: BLE001 - ours still runs; why theirs did not is recorded
        traceback.print_exc()
        reference = {"skipped": f"{type(e).__name__}: {e}".strip()[:2000]}
        ref = None

    # interleaved rounds: each of ours, then theirs
    for rnd in range(args.rounds):
        for name in list(runners):
            try:
                results[name]["rounds"].append(runners[name].time_steps(args.steps))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                skipped[name] = f"round {rnd + 1}: {type(e).__name__}: {e}"[:2000]
                del runners[name], results[name]
        if ref is not None:
            reference["rounds"].append(ref.time_steps(args.steps))
    if ref is not None:
        ref.close()

    def finish(rec: dict[str, Any]) -> dict[str, Any]:
        rounds = rec.pop("rounds")
        step = [t for r in rounds for t in r["step_s"]]
        data = [t for r in rounds for t in r["data_s"]]
        serial = [a + b for r in rounds for a, b in zip(r["data_s"], r["step_s"])]
        loss = [x for r in rounds for x in r["loss"]]
        rec.update({
            "timed_steps": len(step), "step": _summary(step), "data": _summary(data), "serial": _summary(serial),
            "step_steps_per_s_by_round": [1.0 / float(np.median(r["step_s"])) for r in rounds],
            "serial_steps_per_s_by_round": [1.0 / float(np.median(np.add(r["data_s"], r["step_s"]))) for r in rounds],
            "loss_finite": bool(np.isfinite(loss).all()), "loss_last": loss[-1] if loss else None})
        return rec

    ours = {name: finish(rec) for name, rec in results.items()}
    if "rounds" in reference:
        reference = finish(reference)
    ratios = {}
    if "step" in reference:
        for name, rec in ours.items():
            ratios[name] = {k: rec[k]["steps_per_s"] / reference[k]["steps_per_s"] for k in ("step", "serial")}

    bf16_check: dict[str, Any] | str
    try:
        bf16_check = bf16_deviation(pairs, device) if any(r.get("precision") == "bf16" for r in ours.values()) \
            else "no bf16 configuration ran"
    except Exception as e:  # noqa: BLE001
        bf16_check = f"{type(e).__name__}: {e}"

    z = lif_supercell()[0]
    cfg = Settings.defaults(train={"device": device.type, "batch_size": BATCH_SIZE})
    result = {
        "what": "Propagator training step (adaptive prior), Table A2 model, batch 16: ours vs the LiFlow authors'",
        "cell": f"LiF rock salt {REPS[0]}x{REPS[1]}x{REPS[2]} supercell", "atoms_per_cell": int(len(z)),
        "atoms_per_batch": int(len(z)) * BATCH_SIZE, "batch_size": BATCH_SIZE, "pairs": N_PAIRS,
        "device": str(device), "device_name": _device_name(device), "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "loadavg_at_start": load0, "loadavg_at_end": os.getloadavg(),
        "rounds": args.rounds, "steps_per_round": args.steps, "warmup_steps": args.warmup,
        "phases": {"data": "batch construction on the CPU (ours: build_batch; theirs: dataset samples incl. the "
                           "vesin neighbour list + collate); pinned on CUDA",
                   "step": "host-to-device copy, forward (ours incl. the radius graph on the device), loss, "
                           "backward, clip, Adam, synchronised",
                   "serial": "data + step in one process"},
        "steps_per_s_statistic": "1 / median step time over all rounds",
        "ours": ours, "ours_skipped": skipped, "reference": reference,
        "reference_commit": REFERENCE_COMMIT,
        "reference_files_match_commit": reference.get("files_match_commit"),
        "ratio_ours_over_theirs": ratios, "bf16_vs_fp32_one_batch": bf16_check,
        "provenance": provenance(cfg),
    }
    write_json_atomic(out_path, result)
    print(f"{device} ({result['device_name']}), torch threads {result['torch_threads']}, "
          f"{args.rounds} x {args.steps} steps, batch {BATCH_SIZE} x {len(z)} atoms -> {out_path}")
    for name, rec in ours.items():
        print(f"  ours {name:13s} step {rec['step']['steps_per_s']:8.3f}/s  serial {rec['serial']['steps_per_s']:8.3f}/s"
              f"  (rounds {', '.join(f'{v:.3f}' for v in rec['step_steps_per_s_by_round'])})")
    for name, why in skipped.items():
        print(f"  ours {name:13s} skipped: {why.splitlines()[0][:150]}")
    if "step" in reference:
        print(f"  theirs {'':11s} step {reference['step']['steps_per_s']:8.3f}/s  serial "
              f"{reference['serial']['steps_per_s']:8.3f}/s  (rounds "
              f"{', '.join(f'{v:.3f}' for v in reference['step_steps_per_s_by_round'])}); "
              f"files match commit: {reference['files_match_commit']}")
        for name, r in ratios.items():
            print(f"  ours/theirs {name:13s} step {r['step']:.3f}  serial {r['serial']:.3f}")
    else:
        print(f"  theirs skipped: {reference.get('skipped', '').splitlines()[0][:200]}")


if __name__ == "__main__":
    main()
