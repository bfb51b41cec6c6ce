"""Conditional flow-matching training of the LiFlow Propagator and Corrector (Eq. 11, Alg. A1/A2).

Units: positions and displacements Å, temperature K, flow time t dimensionless in [0, 1].

* **Propagator** (Alg. A1): D1 = X_{τ+Δτ} - X_τ (unwrapped), conditioning geometry X_τ.
  Prior by ``variant``: ``adaptive`` (Eq. 10, per-graph small/large scales from the prior
  selector's predictions ``li_slow`` / ``frame_slow`` with ``train.prior_li`` / ``train.prior_frame``),
  ``uniform`` (Maxwell–Boltzmann with ``train.uniform_scale``), ``isotropic`` (``train.isotropic_scale``
  Å for every atom). ``regressor`` is the non-generative ablation: the model evaluated at
  D=0, t=0 regresses D1 directly (MSE).
* **Corrector** (Alg. A2): conditioning X~ = X_{τ+Δτ} + D, D ~ N(0, σ'^2) per atom with
  σ' ~ U(0, ``train.corrector_sigma_max``) per atom; D1 = -D; uniform Maxwell–Boltzmann prior
  with scale ``train.corrector_prior_scale``.

Flow matching on the linear path D_t = (1-t) D0 + t D1. The conditional target
u_t = (D1 - D_t)/(1 - t) equals D1 - D0 exactly for this path, and we use the latter form: no
division, so no clamping of t near 1 is needed and t ~ U(0, 1) is used as is.
Loss: squared error |v - u|^2 summed over Cartesian components, averaged over atoms (Å^2 per unit
flow time squared), as the reference implementation computes it.

Reproducibility: a numpy Generator draws the batches (in the training process), and pair j of
step s draws its flow time and noise from its own CPU ``torch.Generator`` (SeedSequence of the seed,
s and j: :func:`pair_generators`), so the same seed gives the same numbers on CPU and CUDA, with any
number of DataLoader workers, and split over any number of DDP processes. The numpy state goes into
``last.pt``, so a resumed run is bitwise the run that was never interrupted (on the same device).
Validation uses ``val_batches`` batches drawn once, with fixed flow times and noise.

Several processes (torchrun; ``train.batch_size`` is per process): every process draws the same
global batch of ``batch_size x processes`` pairs and trains on its share under
DistributedDataParallel; each share's loss is its squared error summed over atoms divided by the
global batch's atoms, so the averaged gradient is that of one process on the whole batch.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..core.errors import ConfigError, InputError
from ..io.files import atomic_path, config_digest, load_torch_file, provenance, write_json_atomic
from ..core.runtime import resolve_device
from ..core.settings import Settings, TrainSettings
from .graph import GraphBatch, make_batch
from .painn import FlowModel
from .priors import prior_sigma, select_scales

KINDS = ("propagator", "corrector")
PROPAGATOR_VARIANTS = ("adaptive", "uniform", "isotropic", "regressor")
#: The Corrector always uses a uniform-scale Maxwell–Boltzmann prior; the variant names of the
#: pipeline ("adaptive" = baseline P_adaptive + C) are accepted and recorded as such.
CORRECTOR_VARIANTS = ("uniform", "adaptive")
CKPT_FORMAT = "liflow-flow-checkpoint/2"
#: train.* keys that may change between a run and its resumption (everything else must match).
RESUMABLE_KEYS = frozenset({"max_steps", "max_epochs", "device", "variants", "classifier_hidden",
                            "classifier_epochs", "classifier_lr", "loader_workers"})

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- data
@dataclass
class Pair:
    """One time-separated pair of frames of one (structure, temperature) trajectory.

    x0 = X_τ and x1 = X_{τ+Δτ}, both unwrapped Cartesian Å, float32 (n, 3); cell rows a, b, c in Å;
    li_slow / frame_slow are the prior selector's *predictions* for (structure, T).
    """

    id: str
    numbers: np.ndarray
    cell: np.ndarray
    x0: np.ndarray
    x1: np.ndarray
    temperature: float
    li_slow: bool
    frame_slow: bool

    def check(self) -> None:
        """Raise InputError on inconsistent shapes or non-finite values."""
        n = len(self.numbers)
        if n == 0:
            raise InputError(f"pair {self.id}: no atoms")
        if np.shape(self.x0) != (n, 3) or np.shape(self.x1) != (n, 3):
            raise InputError(f"pair {self.id}: x0/x1 must have shape ({n}, 3), got "
                             f"{np.shape(self.x0)} and {np.shape(self.x1)}")
        if np.shape(self.cell) != (3, 3):
            raise InputError(f"pair {self.id}: cell must be (3, 3), got {np.shape(self.cell)}")
        if not (np.all(np.isfinite(self.x0)) and np.all(np.isfinite(self.x1))):
            raise InputError(f"pair {self.id}: non-finite positions")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise InputError(f"pair {self.id}: temperature must be > 0 K, got {self.temperature}")


class PairSource(Protocol):
    """Anything that draws training pairs; deterministic given ``rng``. ``draw`` makes every random
    choice of a batch (cheap, in the training process), ``fetch`` turns draws into pairs (may read
    files; runs in DataLoader workers when ``train.loader_workers`` > 0)."""

    def draw(self, batch_size: int, rng: np.random.Generator) -> list[Any]: ...

    def fetch(self, draws: Sequence[Any]) -> list[Pair]: ...

    def atoms(self, draw: Any) -> int:
        """Atoms of the pair a draw stands for, without fetching it."""
        ...

    def sample(self, batch_size: int, rng: np.random.Generator) -> list[Pair]: ...

    def __len__(self) -> int:
        """Distinct pairs the source can draw (an epoch is this many pairs)."""
        ...


class ListPairSource:
    """In-memory PairSource: draws pairs with replacement, optionally with sampling weights."""

    def __init__(self, pairs: Sequence[Pair], weights: Sequence[float] | None = None) -> None:
        if len(pairs) == 0:
            raise InputError("ListPairSource: no pairs")
        for p in pairs:
            p.check()
        self.pairs = list(pairs)
        if weights is None:
            self.p = None
        else:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (len(pairs),) or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
                raise InputError("ListPairSource: weights must be finite, >= 0, one per pair, not all 0")
            self.p = w / w.sum()

    def __len__(self) -> int:
        return len(self.pairs)

    def draw(self, batch_size: int, rng: np.random.Generator) -> list[int]:
        return [int(i) for i in rng.choice(len(self.pairs), size=batch_size, replace=True, p=self.p)]

    def fetch(self, draws: Sequence[int]) -> list[Pair]:
        return [self.pairs[i] for i in draws]

    def atoms(self, draw: int) -> int:
        return len(self.pairs[draw].numbers)

    def sample(self, batch_size: int, rng: np.random.Generator) -> list[Pair]:
        return self.fetch(self.draw(batch_size, rng))


# --------------------------------------------------------------------------- one batch
@dataclass
class FlowBatch:
    """Everything one loss evaluation needs (CPU-built, then moved to the device)."""

    g: GraphBatch      # conditioning geometry in g.pos (X_τ, or X~ for the Corrector)
    d0: Tensor         # (N,3) prior sample, Å
    d1: Tensor         # (N,3) target displacement, Å
    t: Tensor          # (G,) flow time

    def to(self, device: torch.device, non_blocking: bool = False) -> "FlowBatch":
        return FlowBatch(self.g.to(device, non_blocking), self.d0.to(device, non_blocking=non_blocking),
                         self.d1.to(device, non_blocking=non_blocking), self.t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "FlowBatch":
        """Page-locked copy (DataLoader ``pin_memory``), for asynchronous host-to-GPU copies."""
        return FlowBatch(self.g.pin_memory(), self.d0.pin_memory(), self.d1.pin_memory(), self.t.pin_memory())


def _prior_settings(kind: str, variant: str, tr: TrainSettings) -> dict[str, Any]:
    """The prior a model of (kind, variant) was trained with (stored in checkpoints for rollouts; Å)."""
    if kind == "corrector":
        return {"kind": "uniform", "scale": tr.corrector_prior_scale, "sigma_max": tr.corrector_sigma_max}
    if variant == "adaptive":
        return {"kind": "adaptive", "prior_li": list(tr.prior_li), "prior_frame": list(tr.prior_frame)}
    if variant == "uniform":
        return {"kind": "uniform", "scale": tr.uniform_scale}
    if variant == "isotropic":
        return {"kind": "isotropic", "scale": tr.isotropic_scale}
    return {"kind": "none"}  # regressor


def prior_sigma_for(g: GraphBatch, prior: dict[str, Any], li_slow: Tensor, frame_slow: Tensor) -> Tensor:
    """(N,) per-atom prior standard deviation (Å) for the stored ``prior`` settings.

    li_slow / frame_slow: (G,) bool predictions of the prior selector (used by "adaptive" only).
    """
    kind = prior["kind"]
    if kind == "adaptive":
        li = select_scales(li_slow, tuple(prior["prior_li"]))
        fr = select_scales(frame_slow, tuple(prior["prior_frame"]))
        return prior_sigma(g, "adaptive", li_scale=li, frame_scale=fr)
    if kind in ("uniform", "isotropic"):
        return prior_sigma(g, kind, scale=prior["scale"])
    raise ValueError(f"no prior for kind {kind!r}")


def pair_generators(seed: int, step: int, n: int, offset: int = 0, stream: int = 0) -> list[torch.Generator]:
    """One CPU generator per pair of batch ``step``: pair ``offset + j`` of the global batch gets the
    stream SeedSequence([seed, stream, step, offset + j]), so a pair's noise does not depend on how the
    batch is split over processes (DDP) or on which process builds it (DataLoader workers).
    ``stream``: 0 training, 1 validation."""
    gens = []
    for j in range(offset, offset + n):
        s = int(np.random.SeedSequence([int(seed), int(stream), int(step), j]).generate_state(1, dtype=np.uint64)[0] >> 1)
        gens.append(torch.Generator().manual_seed(s))
    return gens


def build_batch(pairs: Sequence[Pair], kind: str, prior: dict[str, Any],
                gen: torch.Generator | Sequence[torch.Generator]) -> FlowBatch:
    """Draw flow times and noise for ``pairs`` (on CPU) and assemble a FlowBatch.

    ``gen``: one generator per pair (:func:`pair_generators`), or one shared by all pairs in turn.
    Per pair, in this order: the Corrector's σ' (n) and D (n, 3), the flow time t, the prior D0 (n, 3).
    """
    for p in pairs:
        p.check()
    gens = list(gen) if isinstance(gen, Sequence) else [gen] * len(pairs)
    if len(gens) != len(pairs):
        raise ValueError(f"{len(gens)} generators for {len(pairs)} pairs")
    sizes = [len(p.numbers) for p in pairs]
    temps = [float(p.temperature) for p in pairs]
    li_slow = torch.tensor([bool(p.li_slow) for p in pairs])
    fr_slow = torch.tensor([bool(p.frame_slow) for p in pairs])
    x1 = torch.as_tensor(np.concatenate([np.asarray(p.x1, np.float32) for p in pairs]))
    if kind == "propagator":
        g = make_batch([p.numbers for p in pairs], [p.x0 for p in pairs], [p.cell for p in pairs], temps)
        d1 = x1 - g.pos
    else:
        g0 = make_batch([p.numbers for p in pairs], [p.x1 for p in pairs], [p.cell for p in pairs], temps)
        smax = float(prior["sigma_max"])
        parts = []
        for n, gj in zip(sizes, gens):
            sig = torch.rand(n, generator=gj) * smax                 # σ' ~ U(0, σ_max) per atom, Å
            parts.append(torch.randn(n, 3, generator=gj) * sig.unsqueeze(-1))  # D ~ N(0, σ'^2)
        noise = torch.cat(parts)
        g = g0.with_pos(g0.pos + noise)                               # X~ = X + D
        d1 = -noise                                                   # D1 = -D
    t = torch.cat([torch.rand(1, generator=gj) for gj in gens])
    if prior["kind"] == "none":
        d0 = torch.zeros_like(d1)
    else:
        sigma = prior_sigma_for(g, prior, li_slow, fr_slow)
        z = torch.cat([torch.randn(n, 3, generator=gj) for n, gj in zip(sizes, gens)])
        d0 = (z * sigma.unsqueeze(-1)).to(d1.dtype)
    return FlowBatch(g=g, d0=d0, d1=d1, t=t)


def flow_loss(model: FlowModel, b: FlowBatch, regressor: bool = False, n_atoms: int | None = None) -> Tensor:
    """CFM loss on one batch: mean over atoms of |v(D_t, t) - (D1 - D0)|^2 (Å^2);
    regressor: mean over atoms of |model(0, 0) - D1|^2. ``n_atoms``: divide the sum by this instead
    (the atoms of the global batch, when this batch is one process's share of it)."""
    cond = model.condition(b.g)
    if regressor:
        pred = model(torch.zeros_like(b.d1), torch.zeros_like(b.t), b.g, cond)
        sq = ((pred - b.d1) ** 2).sum(-1)
    else:
        tn = b.t[b.g.batch].unsqueeze(-1)
        dt = (1.0 - tn) * b.d0 + tn * b.d1
        v = model(dt, b.t, b.g, cond)
        sq = ((v - (b.d1 - b.d0)) ** 2).sum(-1)
    return sq.mean() if n_atoms is None else sq.sum() / n_atoms


class _Loss(torch.nn.Module):
    """The training loss as a module, so that DistributedDataParallel wraps the whole computation."""

    def __init__(self, model: FlowModel, regressor: bool) -> None:
        super().__init__()
        self.model, self.regressor = model, regressor

    def forward(self, b: FlowBatch, n_atoms: int) -> Tensor:
        return flow_loss(self.model, b, self.regressor, n_atoms)


@dataclass
class _Step:
    """One optimizer step's share of the global batch: its draws and the rng state after them."""

    step: int              # 1-based optimizer step
    draws: list[Any]       # this process's share of the global batch's draws
    offset: int            # index of draws[0] in the global batch
    n_atoms: int           # atoms in the global batch
    rng_state: str         # numpy generator state after drawing this step (JSON), for resuming


class _StepBatches(torch.utils.data.Dataset):
    """``_Step`` -> (step, rng state, FlowBatch): reads the pairs and draws their noise; runs in
    DataLoader workers (each with its own copy of the source)."""

    def __init__(self, src: PairSource, kind: str, prior: dict[str, Any], noise_seed: int) -> None:
        self.src, self.kind, self.prior, self.noise_seed = src, kind, prior, noise_seed

    def __len__(self) -> int:  # not used: the sampler drives
        return 0

    def __getitem__(self, st: _Step) -> tuple[_Step, FlowBatch]:
        pairs = self.src.fetch(st.draws)
        gens = pair_generators(self.noise_seed, st.step, len(pairs), st.offset)
        return st, build_batch(pairs, self.kind, self.prior, gens)


class _StepSampler(torch.utils.data.Sampler):
    """Draws the global batch of every step in order, in the training process (all randomness of
    the batch selection is here, so it does not depend on the number of workers), and yields this
    process's share."""

    def __init__(self, src: PairSource, rng: np.random.Generator, first: int, last: int, per_rank: int,
                 rank: int, world: int) -> None:
        self.src, self.rng, self.first, self.last = src, rng, first, last
        self.per_rank, self.rank, self.world = per_rank, rank, world

    def __iter__(self):
        for step in range(self.first, self.last + 1):
            draws = self.src.draw(self.per_rank * self.world, self.rng)
            lo = self.rank * self.per_rank
            yield _Step(step, draws[lo:lo + self.per_rank], lo, sum(self.src.atoms(d) for d in draws),
                        json.dumps(self.rng.bit_generator.state))

    def __len__(self) -> int:
        return self.last - self.first + 1


def _collate(item: Any) -> Any:
    return item


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process under torchrun (0, 1, 0 otherwise)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


@contextmanager
def process_group(device: str) -> Iterator[None]:
    """Under torchrun (WORLD_SIZE > 1): start the process group for the block (NCCL when training on
    CUDA, gloo on CPU) and end it after; otherwise nothing."""
    started = False
    if distributed()[1] > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if resolve_device(device, key="train.device") == "cuda" else "gloo")
        started = True
    try:
        yield
    finally:
        if started:
            torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- helpers
def _seeds(seed: int, kind: str) -> tuple[int, int, int]:
    """Independent seeds for (batch sampling, training noise, validation set) from the master seed."""
    ss = np.random.SeedSequence([int(seed), KINDS.index(kind)])
    a, b, c = ss.generate_state(3)
    return int(a), int(b), int(c)


def _model_from_settings(tr: TrainSettings, seed: int) -> FlowModel:
    return FlowModel(features=tr.features, radial=tr.radial, layers=tr.layers, cutoff=tr.cutoff,
                     offset=tr.offset, seed=seed)


def _save(obj: dict[str, Any], path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _cpu_state(model: FlowModel) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


def _optimizer_state_to(opt: torch.optim.Optimizer, device: torch.device) -> None:
    for st in opt.state.values():
        for k, v in st.items():
            if isinstance(v, Tensor) and k != "step":
                st[k] = v.to(device)


@torch.no_grad()
def _validate(model: FlowModel, val: list[FlowBatch], regressor: bool) -> float:
    model.eval()
    losses = [float(flow_loss(model, b, regressor)) for b in val]
    model.train()
    return float(np.mean(losses))


# --------------------------------------------------------------------------- training
def train_flow(
    kind: str,
    variant: str,
    settings: Settings,
    train_src: PairSource,
    val_src: PairSource,
    out_dir: Path,
    max_steps: int | None = None,
    progress: bool = True,
    init_from: str | Path | None = None,
) -> dict[str, Any]:
    """Train a Propagator or Corrector; resume from ``out_dir/last.pt`` when it exists.

    init_from: a flow-model checkpoint (e.g. an imported published model) to fine-tune: its
    architecture, element table, weights and prior settings are kept (the ``train`` section's model
    sizes and prior scales are then not used); the training itself is unchanged.

    settings: the run's settings; uses ``train``, ``seed`` and ``dataset.delta_tau_ps``.
    max_steps: overrides ``train.max_steps`` and ``train.max_epochs`` (total optimizer steps, counted
    across resumes); otherwise the steps are ``train.max_steps``, capped at ``train.max_epochs``
    passes over the ``len(train_src)`` distinct training pairs when that is set.
    Writes ``best.pt`` (lowest validation loss), ``last.pt`` (full training state, saved at every
    validation and at the end) and ``history.json``, all atomically and with provenance.
    Returns the summary dict (steps, best_val, best_step, wall_s, params, steps_per_s,
    stopped_early, device, kind, variant).
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown model kind {kind!r} (expected one of {', '.join(KINDS)})")
    allowed = PROPAGATOR_VARIANTS if kind == "propagator" else CORRECTOR_VARIANTS
    if variant not in allowed:
        raise ConfigError(f"unknown {kind} variant {variant!r} (expected one of {', '.join(allowed)})")
    tr, seed = settings.train, settings.seed
    batch_size = tr.batch_size
    total = int(max_steps if max_steps is not None else tr.max_steps)
    if max_steps is None and tr.max_epochs is not None:
        by_epochs = max(1, math.ceil(tr.max_epochs * len(train_src) / (batch_size * distributed()[1])))
        if by_epochs < total:
            log.info("%s/%s: %d steps = train.max_epochs %d x %d pairs / batch %d (< train.max_steps %d)", kind,
                     variant, by_epochs, tr.max_epochs, len(train_src), batch_size, total)
            total = by_epochs
    val_every, n_val, patience = tr.val_every, tr.val_batches, tr.patience
    lr, clip = tr.lr, tr.grad_clip
    if total < 1:
        raise ConfigError("max_steps must be >= 1")
    regressor = variant == "regressor"
    prior = _prior_settings(kind, variant, tr)
    init = None
    if init_from is not None:
        init = _load_ckpt(Path(init_from))
        if init.get("kind") != kind:
            raise InputError(f"cannot fine-tune a {kind} from {init_from}: it is a {init.get('kind')}")
        if prior["kind"] == "none" or (init["prior"]["kind"] != prior["kind"]):
            raise InputError(f"{kind}/{variant}: the {init['prior']['kind']} prior of {init_from} does not fit "
                             f"the {prior['kind']} variant")
        prior = copy.deepcopy(init["prior"])
        dtau = settings.dataset.delta_tau_ps
        if not math.isclose(float(init.get("delta_tau_ps") or float("nan")), dtau, rel_tol=1e-6):
            raise InputError(f"{init_from} was trained with Δτ = {init.get('delta_tau_ps')} ps, the dataset's "
                             f"pairs are {dtau} ps apart (dataset.delta_tau_ps)")
    rank, world, local_rank = distributed()
    device = torch.device(resolve_device(tr.device, key="train.device"))
    if world > 1:
        if not torch.distributed.is_initialized():
            raise ConfigError(f"WORLD_SIZE={world}: run through liflow-screen's train command under torchrun "
                              "(it starts the process group)")
        if device.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(f"training process {local_rank} of {world} on this node, but "
                                  f"{torch.cuda.device_count()} GPU(s) visible (train.processes: one per GPU)")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = config_digest({"train": {k: v for k, v in dataclasses.asdict(tr).items() if k not in RESUMABLE_KEYS},
                            "seed": seed, "world_size": world,
                            "init_from": None if init_from is None else str(init_from)})

    s_batch, s_noise, s_val = _seeds(seed, kind)
    # Fixed validation set: batches, flow times and noise drawn once from their own streams (every
    # process of a distributed run builds and evaluates the same set).
    vrng = np.random.default_rng(s_val)
    val = [build_batch(val_src.sample(batch_size * world, vrng), kind, prior,
                       pair_generators(s_val, v, batch_size * world, stream=1)).to(device) for v in range(n_val)]

    if init is not None:
        model = FlowModel(**init["hparams"])
        model.load_state_dict(init["model"])
        model = model.to(device)
    else:
        model = _model_from_settings(tr, seed).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(s_batch)
    step, best, best_step, since, stopped = 0, float("inf"), 0, 0, False
    history: list[dict[str, Any]] = []
    wall_prev = 0.0
    best_state: dict[str, Tensor] | None = None
    best_val_loss = float("nan")

    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if last_path.is_file():
        ck = _load_ckpt(last_path)
        if ck.get("kind") != kind or ck.get("variant") != variant or ck.get("train_digest") != digest:
            raise InputError(f"{last_path} belongs to a different run (kind/variant/train config); "
                             "remove it or use another output directory")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        _optimizer_state_to(opt, device)
        st = ck["state"]
        step, best, best_step, since, stopped = (int(st["step"]), float(st["best"]), int(st["best_step"]),
                                                 int(st["since"]), bool(st["stopped"]))
        rng.bit_generator.state = json.loads(st["np_rng"])
        history = list(st["history"])
        wall_prev = float(st["wall_s"])
        best_state, best_val_loss = ck.get("best_model"), float(st.get("best", float("nan")))

    meta = {"kind": kind, "variant": variant, "prior": prior, "hparams": model.hparams,
            "delta_tau_ps": settings.dataset.delta_tau_ps,
            "fine_tuned_from": None if init is None else {
                "file": str(init_from), "imported_from": init.get("imported_from"), "step": init.get("step")}}
    rng_state = json.dumps(rng.bit_generator.state)  # after the last completed step's draws

    def write_last(wall: float) -> None:
        if rank != 0:
            return
        _save({
            "format": CKPT_FORMAT, **meta, "train_digest": digest,
            "model": _cpu_state(model), "optimizer": opt.state_dict(),
            "best_model": best_state,  # so best.pt can be rebuilt if it was removed (e.g. by Snakemake)
            "state": {"step": step, "best": best, "best_step": best_step, "since": since, "stopped": stopped,
                      "np_rng": rng_state, "history": history, "wall_s": wall, "world_size": world},
            "provenance": provenance(settings),
        }, last_path)

    def write_best() -> None:
        if rank != 0:
            return
        _save({"format": CKPT_FORMAT, **meta, "model": best_state, "step": best_step,
               "val_loss": best_val_loss, "provenance": provenance(settings)}, best_path)

    def write_history(wall: float) -> None:
        if rank != 0:
            return
        write_json_atomic(out_dir / "history.json", {
            **meta, "history": history, "best_val": best, "best_step": best_step, "steps": step,
            "stopped_early": stopped, "wall_s": wall, "world_size": world, "provenance": provenance(settings)})

    loss_module: torch.nn.Module = _Loss(torch.compile(model, dynamic=True) if tr.compile else model, regressor)
    bf16 = tr.precision == "bf16"
    if world > 1:
        loss_module = torch.nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    workers = int(tr.loader_workers)
    sampler = _StepSampler(train_src, rng, step + 1, total, batch_size, rank, world)
    loader = torch.utils.data.DataLoader(
        _StepBatches(train_src, kind, prior, s_noise), batch_size=None, sampler=sampler, num_workers=workers,
        collate_fn=_collate, pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)

    t_start = time.perf_counter()
    steps_start = step
    model.train()
    running: list[float] = []
    bar = tqdm(total=total, initial=min(step, total), disable=not progress or rank != 0, desc=f"{kind}/{variant}",
               unit="step", dynamic_ncols=True)
    it = iter(loader)
    try:
        while step < total and not stopped:
            st, b = next(it)
            b = b.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):  # validation stays fp32
                loss = loss_module(b, st.n_atoms).float() * world  # DDP averages gradients: sum / atoms
            report = loss.detach() / world
            if world > 1:
                torch.distributed.all_reduce(report)
            if not torch.isfinite(report):
                raise InputError(f"{kind}/{variant}: non-finite training loss at step {step + 1} "
                                 "(check the training pairs for huge displacements)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            step, rng_state = st.step, st.rng_state
            running.append(float(report))
            bar.update(1)
            if step % val_every == 0 or step == total:
                vloss = _validate(model, val, regressor)
                improved = vloss < best
                if improved:
                    best, best_step, since = vloss, step, 0
                    best_state, best_val_loss = _cpu_state(model), vloss
                    write_best()
                else:
                    since += 1
                    stopped = since >= patience
                wall = wall_prev + time.perf_counter() - t_start
                history.append({"step": step, "train_loss": float(np.mean(running)), "val_loss": vloss,
                                "best_val": best, "wall_s": round(wall, 3)})
                running = []
                bar.set_postfix(train=f"{history[-1]['train_loss']:.4g}", val=f"{vloss:.4g}")
                write_last(wall)
                write_history(wall)
    finally:
        bar.close()
        del it  # stops the workers
    if rank == 0 and not best_path.is_file() and best_state is not None:
        write_best()  # resumed after best.pt was removed: restore it from last.pt
    if world > 1:
        torch.distributed.barrier()
    wall = wall_prev + time.perf_counter() - t_start
    session = time.perf_counter() - t_start
    return {
        "kind": kind, "variant": variant, "steps": step, "best_val": best, "best_step": best_step,
        "wall_s": wall, "params": model.n_parameters(),
        "steps_per_s": (step - steps_start) / session if session > 0 and step > steps_start else float("nan"),
        "stopped_early": stopped, "device": str(device), "world_size": world,
    }


# --------------------------------------------------------------------------- loading
def _load_ckpt(path: Path) -> dict[str, Any]:
    return load_torch_file(path, CKPT_FORMAT, "LiFlow flow-model checkpoint")


def flow_meta(path: str | Path) -> dict[str, Any]:
    """kind, variant, prior settings, hparams, Δτ (ps) and provenance of a best.pt / last.pt file."""
    ck = _load_ckpt(Path(path))
    return {k: copy.deepcopy(ck.get(k)) for k in ("kind", "variant", "prior", "hparams", "delta_tau_ps",
                                                   "provenance", "step", "val_loss", "imported_from",
                                                   "fine_tuned_from")}


def load_flow(path: str | Path, device: torch.device | str = "cpu") -> FlowModel:
    """Rebuild a FlowModel from a checkpoint's hparams and weights, in eval mode.

    The returned model carries ``model.liflow_meta`` (kind, variant, prior settings, Δτ).
    """
    ck = _load_ckpt(Path(path))
    model = FlowModel(**ck["hparams"])
    model.load_state_dict(ck["model"])
    model.liflow_meta = {k: copy.deepcopy(ck.get(k)) for k in ("kind", "variant", "prior", "delta_tau_ps",
                                                                "imported_from")}
    return model.to(device).eval()
