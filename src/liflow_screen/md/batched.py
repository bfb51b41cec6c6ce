"""Batched MD and relaxation: many structures advanced in ONE model call per step, on the potential's
device (``md.batch_size > 1``).

- NVT: velocity Verlet with a Nosé–Hoover chain per structure, the same integrator as ASE's
  ``NoseHooverChainNVT`` (Martyna–Klein–Tuckerman chain of ``TCHAIN`` thermostats, masses
  Q1 = 3N kT τ², Qj = kT τ², fourth-order Suzuki–Yoshida factorisation, one loop), written for a
  batch of structures with their own temperature, chain and masses. Same initial velocities as the
  one-by-one path (:func:`.integrate.velocity_rng`), same frames, checks and statuses.
- Relaxation: FIRE (ASE's parameters and step rule) on positions and the cell through the Fréchet
  cell filter (ASE's ``FrechetCellFilter``: cell degrees of freedom = N · log of the deformation
  gradient), each structure with its own FIRE state; converged structures leave the batch.

Structures are packed into batches of at most ``md.batch_size`` structures and ``md.batch_atoms``
atoms. A structure that explodes, turns NaN or makes the model raise is stopped and flagged; the
others go on (the batch is compacted). MD checkpoints hold a batch's whole state (tensors, frames so
far) every ``md.checkpoint_every`` saved frames; a killed run resumes bit for bit on the same machine.

Units: positions Å, time fs internally converted to ASE units, T K, energy eV, masses amu, stress eV/Å³.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator

from ..core.settings import MDSettings
from ..flow.batching import pack
from .integrate import TCHAIN, FrameCallback, TrajectoryResult, _fingerprint, failure_reason, frame_problem, \
    load_pickle, safe_name, save_pickle, velocity_rng
from .potentials import Potential, Systems

#: Fourth-order Suzuki–Yoshida weights of the thermostat factorisation (as ASE's NoseHooverChainNVT).
SY4 = (1 / (2 - 2 ** (1 / 3)), -(2 ** (1 / 3)) / (2 - 2 ** (1 / 3)), 1 / (2 - 2 ** (1 / 3)))

#: Atoms per batch when ``md.batch_atoms`` is null: on CPU the model's cost is linear in atoms, so a
#: batch only needs to amortise the per-step overhead; on CUDA ~25,000 atoms (256 x ~100) keep a
#: MACE-MP-0-small graph well inside an H100's memory (not yet measured on a GPU).
CPU_BATCH_ATOMS = 4096
CUDA_BATCH_ATOMS = 32768

#: On CPU the model is called on groups of consecutive structures of at most this many atoms (a
#: structure larger than that alone): MACE-MP-0 small's cost per atom on CPU grows with the graph
#: (measured, 96-atom Li2O, 2 threads: 173-192 atom-steps/s one structure per call, 136-163 at 8,
#: 87 at 32 in one graph: the edge tensors, ~75 MB per structure, fall out of cache). The integrator
#: and the neighbour list stay batched. On CUDA the whole batch is one call.
CPU_MODEL_ATOMS = 128


def batch_atom_budget(batch_atoms: int | None, device: str) -> int:
    """Atoms per batch: ``md.batch_atoms`` if set, else :data:`CPU_BATCH_ATOMS` / :data:`CUDA_BATCH_ATOMS`."""
    if batch_atoms:
        return int(batch_atoms)
    return CUDA_BATCH_ATOMS if str(device).startswith("cuda") else CPU_BATCH_ATOMS


def _segment_sum(values: torch.Tensor, batch: torch.Tensor, n: int) -> torch.Tensor:
    """Sum of ``values`` (N,) per structure -> (G,)."""
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, batch, values)


class _Evaluator:
    """``potential.evaluate`` with failure isolation: when the batched call raises, each structure is
    evaluated alone; the ones that raise (or give non-finite output) are reported, not raised."""

    def __init__(self, potential: Potential, stress: bool = False, model_atoms: int | None = None) -> None:
        self.potential = potential
        self.stress = stress
        self.calls = 0
        on_cpu = torch.device(potential.device).type == "cpu"
        self.model_atoms = model_atoms if model_atoms is not None else (CPU_MODEL_ATOMS if on_cpu else None)

    def _evaluate(self, systems: Systems) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One model call, or on CPU one per group of <= ``model_atoms`` atoms (:data:`CPU_MODEL_ATOMS`).

        The groups are kept while the batch's layout (its cell and batch tensors) stays, so each
        group's neighbour-list plan is reused from step to step."""
        if not self.model_atoms:
            return self.potential.evaluate(systems, stress=self.stress)
        key = (id(systems.cell), id(systems.batch))
        if getattr(self, "_split_key", None) != key:
            sizes = (systems.ptr[1:] - systems.ptr[:-1]).cpu().tolist()
            groups = pack(sizes, len(sizes), self.model_atoms)
            self._split = [systems.select(g) for g in groups] if len(groups) > 1 else []
            self._split_key, self._split_refs = key, (systems.cell, systems.batch)  # refs: ids stay unique
        if not self._split:
            return self.potential.evaluate(systems, stress=self.stress)
        parts = [self.potential.evaluate(sub.with_geometry(systems.positions[idx]), stress=self.stress)
                 for sub, idx in self._split]
        stress = torch.cat([p[2] for p in parts]) if self.stress else None
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), stress

    def __call__(self, systems: Systems) -> tuple[Any, dict[int, tuple[str, str]]]:
        """(energy, forces, stress) of ``systems`` and {structure: (status, reason)} of failures (whose
        outputs are garbage and must be dropped by the caller)."""
        self.calls += 1
        try:
            out = self._evaluate(systems)
        except Exception as exc:  # noqa: BLE001 - find the culprit(s), one structure at a time
            if systems.n_systems == 1:
                return None, {0: ("error", failure_reason(exc))}
            failed: dict[int, tuple[str, str]] = {}
            for g in range(systems.n_systems):
                sub, _ = systems.select([g])
                try:
                    self.potential.evaluate(sub, stress=self.stress)
                except Exception as exc1:  # noqa: BLE001
                    failed[g] = ("error", failure_reason(exc1))
            if not failed:  # only the batch fails (memory?): not a structure's fault
                raise
            return None, failed
        energy, forces = out[0], out[1]
        ok = torch.isfinite(energy) & _segment_sum(torch.isfinite(forces).all(-1).logical_not().to(energy.dtype),
                                                   systems.batch, systems.n_systems).eq(0)
        if self.stress and out[2] is not None:
            ok &= torch.isfinite(out[2]).flatten(1).all(-1)
        if bool(ok.all()):
            return out, {}
        return out, {int(g): ("nan", "non-finite energy, forces or stress") for g in torch.nonzero(~ok).flatten().tolist()}


# --------------------------------------------------------------------------- Nosé–Hoover chain

@dataclass
class NHC:
    """Nosé–Hoover chain state of G structures: positions ``eta`` (G,C), momenta ``p_eta`` (G,C) and
    masses ``Q`` (G,C) in ASE units; ``kT`` (G,) eV; ``n_atoms`` (G,) (3N degrees of freedom, as ASE)."""

    eta: torch.Tensor
    p_eta: torch.Tensor
    Q: torch.Tensor
    kT: torch.Tensor
    n_atoms: torch.Tensor

    @classmethod
    def create(cls, temperatures: torch.Tensor, n_atoms: torch.Tensor, tdamp: float, tchain: int = TCHAIN) -> "NHC":
        """Chains at rest for ``temperatures`` K, thermostat time ``tdamp`` (ASE time units)."""
        kT = units.kB * temperatures.to(torch.float64)
        n = n_atoms.to(torch.float64)
        Q = (kT * tdamp ** 2).unsqueeze(1).repeat(1, tchain)
        Q[:, 0] *= 3 * n
        zeros = torch.zeros_like(Q)
        return cls(zeros.clone(), zeros.clone(), Q, kT, n)

    def select(self, keep: list[int]) -> "NHC":
        return NHC(self.eta[keep], self.p_eta[keep], self.Q[keep], self.kT[keep], self.n_atoms[keep])

    def energy(self) -> torch.Tensor:
        """Thermostat energy (G,) eV (conserved quantity = E_pot + E_kin + this)."""
        return (3 * self.n_atoms * self.kT * self.eta[:, 0] + self.kT * self.eta[:, 1:].sum(1)
                + (0.5 * self.p_eta ** 2 / self.Q).sum(1))

    def integrate(self, p: torch.Tensor, masses: torch.Tensor, batch: torch.Tensor, delta: float) -> torch.Tensor:
        """exp(iL_NHC delta) on momenta ``p`` (N,3) of atoms with ``masses`` (N,1) amu: the chain's
        variables advance in place; returns the rescaled momenta. The kinetic term 2 E_kin follows the
        momenta's rescaling analytically (one reduction per call, as the scaling is per structure)."""
        G, C = self.eta.shape
        ke2 = _segment_sum((p * p / masses).sum(-1), batch, G)    # sum p^2/m per structure
        scale = torch.ones(G, dtype=p.dtype, device=p.device)
        three_nkt = 3 * self.n_atoms * self.kT
        pe, Q = self.p_eta, self.Q

        def chain_j(j: int, d2: float, d4: float) -> None:
            if j < C - 1:
                pe[:, j] *= torch.exp(-d4 * pe[:, j + 1] / Q[:, j + 1])
            g = ke2 * scale * scale - three_nkt if j == 0 else pe[:, j - 1] ** 2 / Q[:, j - 1] - self.kT
            pe[:, j] += d2 * g
            if j < C - 1:
                pe[:, j] *= torch.exp(-d4 * pe[:, j + 1] / Q[:, j + 1])

        for w in SY4:
            d = w * delta
            for j in reversed(range(C)):
                chain_j(j, d / 2, d / 4)
            self.eta += d * pe / Q
            scale = scale * torch.exp(-d * pe[:, 0] / Q[:, 0])
            for j in range(C):
                chain_j(j, d / 2, d / 4)
        return p * scale[batch].unsqueeze(-1)


# --------------------------------------------------------------------------- batched NVT MD

@dataclass
class _Live:
    """The integrator state of the structures still running in a batch (float64, on the device)."""

    members: list[int]           # job index (into the batch's job list) of each live structure
    systems: Systems
    p: torch.Tensor              # (N,3) momenta, ASE units (amu Å / ASE time)
    masses: torch.Tensor         # (N,1) amu
    forces: torch.Tensor         # (N,3) eV/Å at the current positions
    energy: torch.Tensor         # (G,) eV at the current positions
    nhc: NHC

    def select(self, keep_local: list[int]) -> "_Live":
        systems, idx = self.systems.select(keep_local)
        return _Live([self.members[g] for g in keep_local], systems, self.p[idx], self.masses[idx],
                     self.forces[idx], self.energy[keep_local], self.nhc.select(keep_local))

    def to_cpu(self) -> dict[str, Any]:
        s = self.systems
        return {"members": list(self.members), "q": s.positions.cpu(), "p": self.p.cpu(), "forces": self.forces.cpu(),
                "energy": self.energy.cpu(), "eta": self.nhc.eta.cpu(), "p_eta": self.nhc.p_eta.cpu()}


def _temperatures(p: torch.Tensor, masses: torch.Tensor, systems: Systems) -> torch.Tensor:
    """Instantaneous kinetic temperature (G,) K = 2 E_kin / (3 N k_B), as ``ase.Atoms.get_temperature``."""
    ke = 0.5 * _segment_sum((p * p / masses).sum(-1), systems.batch, systems.n_systems)
    n = (systems.ptr[1:] - systems.ptr[:-1]).to(p.dtype)
    return 2 * ke / (3 * n * units.kB)


@dataclass
class MDJob:
    """One trajectory to run: structure id, relaxed supercell, temperature K."""

    sid: str
    atoms: Atoms
    temperature: float


def run_batch(jobs: list[MDJob], potential: Potential, settings: MDSettings, seed: int,
              ckpt_path: Path | None = None, frame_callback: FrameCallback | None = None,
              thermostat: bool = True) -> list[TrajectoryResult]:
    """NVT Nosé–Hoover MD of ``jobs`` advanced together (one ``potential.evaluate`` per MD step).

    Frames, checks and statuses as :func:`.integrate.run_trajectory`: frame 0 = the input with its
    Maxwell–Boltzmann velocities (same RNG stream as the one-by-one path), then every ``save_every``
    steps; a structure whose positions/energy turn non-finite, whose model call raises, that moves
    more than ``max_step_displacement`` Å between frames or exceeds ``max_temperature_factor`` x T is
    stopped with its status and leaves the batch. ``thermostat=False`` integrates NVE (tests).
    ``wall_s`` of each result is the batch's wall time (its structures ran together).
    """
    from ase.md.velocitydistribution import Stationary, thermalize_momenta

    t0 = time.perf_counter()
    dev = potential.device
    n_jobs = len(jobs)
    fps = [_fingerprint(j.sid, j.atoms, j.temperature, settings, seed, potential.name) for j in jobs]
    fp = hashlib.sha256(("batched-nvt" if thermostat else "batched-nve").encode() + "".join(fps).encode()).hexdigest()[:24]
    frames: list[list[np.ndarray]] = [[] for _ in jobs]
    e_frames: list[list[float]] = [[] for _ in jobs]
    t_frames: list[list[float]] = [[] for _ in jobs]
    status: list[tuple[str, str] | None] = [None] * n_jobs
    wall_prev = 0.0
    step = 0
    state = load_pickle(ckpt_path)
    if state is not None and state.get("fingerprint") != fp:
        state = None
    dt = settings.timestep_fs * units.fs
    save_every, n_frames = settings.save_every, settings.n_frames

    def make_live(members: list[int], q: np.ndarray | torch.Tensor, p: np.ndarray | torch.Tensor) -> _Live:
        systems = Systems.from_atoms([jobs[m].atoms for m in members], dev)
        systems = systems.with_geometry(torch.as_tensor(q, dtype=torch.float64, device=dev))
        masses = torch.tensor(np.concatenate([jobs[m].atoms.get_masses() for m in members]), dtype=torch.float64,
                              device=dev).unsqueeze(-1)
        temps = torch.tensor([float(jobs[m].temperature) for m in members], dtype=torch.float64, device=dev)
        nhc = NHC.create(temps, systems.ptr[1:] - systems.ptr[:-1], settings.ttime_fs * units.fs)
        p_t = torch.as_tensor(p, dtype=torch.float64, device=dev)
        return _Live(members, systems, p_t, masses, torch.zeros_like(p_t), torch.zeros(len(members), device=dev,
                                                                                        dtype=torch.float64), nhc)

    evaluate = _Evaluator(potential)

    def fail(live: _Live, failed: dict[int, tuple[str, str]]) -> _Live:
        for g, st in failed.items():
            status[live.members[g]] = st
        return live.select([g for g in range(len(live.members)) if g not in failed])

    def compute(live: _Live) -> _Live:
        """Forces and energies at the current positions; failing structures leave (repeat until clean)."""
        while live.members:
            out, failed = evaluate(live.systems)
            if failed:
                live = fail(live, failed)
                continue
            live.energy, live.forces = out[0], out[1]
            return live
        return live

    def results(wall: float) -> list[TrajectoryResult]:
        out = []
        for m, job in enumerate(jobs):
            st, reason = status[m] or ("ok", "")
            pos = np.stack(frames[m]) if frames[m] else np.zeros((0, len(job.atoms), 3), np.float32)
            out.append(TrajectoryResult(job.sid, job.temperature, pos, np.asarray(e_frames[m], dtype=np.float64),
                                        np.asarray(t_frames[m], dtype=np.float64), st, reason, wall,
                                        extra={"batch_evaluations": evaluate.calls}))
        return out

    if state is not None:
        frames = [[np.asarray(f, dtype=np.float32) for f in fr] for fr in state["frames"]]
        e_frames, t_frames = state["energy"], state["temp"]
        status = [tuple(s) if s is not None else None for s in state["status"]]
        wall_prev, step = float(state["wall_s"]), int(state["step"])
        if state.get("done"):
            return results(wall_prev)
        live = make_live(state["live"]["members"], state["live"]["q"], state["live"]["p"])
        live.forces = state["live"]["forces"].to(dev)
        live.energy = state["live"]["energy"].to(dev)
        live.nhc.eta = state["live"]["eta"].to(dev)
        live.nhc.p_eta = state["live"]["p_eta"].to(dev)
    else:
        q0, p0 = [], []
        for job in jobs:
            work = job.atoms.copy()
            thermalize_momenta(work, temperature_K=job.temperature, rng=velocity_rng(seed, job.sid, job.temperature))
            Stationary(work, preserve_temperature=False)
            q0.append(work.get_positions())
            p0.append(work.get_momenta())
        live = make_live(list(range(n_jobs)), np.concatenate(q0), np.concatenate(p0))
        live = compute(live)

    def checkpoint(done: bool = False) -> None:
        if ckpt_path is None:
            return
        save_pickle(ckpt_path, {"fingerprint": fp, "done": done, "frames": frames, "energy": e_frames,
                                "temp": t_frames, "status": status, "step": step,
                                "wall_s": wall_prev + time.perf_counter() - t0,
                                "live": None if done else live.to_cpu()})

    def save_frame(live: _Live) -> _Live:
        """Record a frame of every live structure; stop the ones that fail a check."""
        q = live.systems.positions.to("cpu", torch.float32).numpy()
        energy = live.energy.cpu().numpy()
        temp = _temperatures(live.p, live.masses, live.systems).cpu().numpy()
        ptr = live.systems.ptr.cpu().tolist()
        stop: dict[int, tuple[str, str]] = {}
        for g, m in enumerate(live.members):
            pos = q[ptr[g]:ptr[g + 1]]
            frame = len(frames[m])
            # frame 0 has no previous frame: only the finiteness check applies (as the ASE path)
            prev = frames[m][-1] if frame > 0 else pos
            target = float(jobs[m].temperature) if frame > 0 else math.inf
            problem = frame_problem(pos, prev, float(energy[g]), float(temp[g]), target, settings, frame)
            if problem is not None:
                stop[g] = problem
                continue
            frames[m].append(pos.copy())
            e_frames[m].append(float(energy[g]))
            t_frames[m].append(float(temp[g]))
            if frame_callback is not None:
                frame_callback(jobs[m].sid, jobs[m].temperature, frame)
        return fail(live, stop) if stop else live

    if state is None and live.members:
        live = save_frame(live)
    half = dt / 2
    while live.members and any(len(frames[m]) < n_frames for m in live.members):
        s = live.systems
        if thermostat:
            live.p = live.nhc.integrate(live.p, live.masses, s.batch, half)
        live.p = live.p + half * live.forces
        live.systems = s.with_geometry(s.positions + dt * live.p / live.masses)
        live = compute(live)
        if not live.members:
            break
        live.p = live.p + half * live.forces
        if thermostat:
            live.p = live.nhc.integrate(live.p, live.masses, live.systems.batch, half)
        step += 1
        if step % save_every == 0:
            live = save_frame(live)
            done = [g for g, m in enumerate(live.members) if len(frames[m]) >= n_frames]
            if done:
                live = live.select([g for g in range(len(live.members)) if g not in done])
            if (step // save_every) % settings.checkpoint_every == 0 and live.members:
                checkpoint()
    checkpoint(done=True)
    return results(wall_prev + time.perf_counter() - t0)


def run_trajectories(jobs: list[MDJob], potential: Potential, settings: MDSettings, seed: int, batch_size: int = 1,
                     ckpt_dir: Path | None = None, frame_callback: FrameCallback | None = None,
                     batch_atoms: int | None = None) -> list[TrajectoryResult]:
    """Run MD jobs one by one through ASE (``batch_size == 1``: :func:`.integrate.run_trajectory`) or
    in batches (:func:`run_batch`) of at most ``batch_size`` structures and ``batch_atoms`` atoms
    (:func:`batch_atom_budget`), packed in job order. Results in job order. ``seed``: the run's master
    seed (initial velocities). Checkpoints: one file per trajectory or per batch under ``ckpt_dir``.
    """
    from .potentials import EnergyForcesCalculator
    from .integrate import run_trajectory

    if batch_size <= 1:
        calc = EnergyForcesCalculator(potential)
        out = []
        for job in jobs:
            ck = None if ckpt_dir is None else Path(ckpt_dir) / f"md_{safe_name(job.sid)}_T{int(round(job.temperature))}.pkl"
            out.append(run_trajectory(job.sid, job.atoms, job.temperature, settings, calc, ck, potential.name,
                                      frame_callback, seed=seed))
        return out
    budget = batch_atom_budget(batch_atoms, potential.device)
    results: list[TrajectoryResult | None] = [None] * len(jobs)
    for idx in pack([len(j.atoms) for j in jobs], batch_size, budget):
        group = [jobs[i] for i in idx]
        ck = None
        if ckpt_dir is not None:
            key = hashlib.sha256("|".join(f"{j.sid}@{j.temperature:g}" for j in group).encode()).hexdigest()[:16]
            ck = Path(ckpt_dir) / f"md_batch_{key}.pkl"
        for i, res in zip(idx, run_batch(group, potential, settings, seed, ck, frame_callback)):
            results[i] = res
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------- batched FIRE relaxation

#: ASE FIRE's defaults (``ase.optimize.FIRE``): initial/max time step, max step Å, Nmin, finc, fdec, astart, fa.
FIRE_DT, FIRE_DTMAX, FIRE_MAXSTEP, FIRE_NMIN, FIRE_FINC, FIRE_FDEC, FIRE_ASTART, FIRE_FA = (
    0.1, 1.0, 0.2, 5, 1.1, 0.5, 0.1, 0.99)


def _expm_frechet_adjoint(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The adjoint of the Fréchet derivative of expm at ``a`` (G,3,3) applied to ``c``: the matrix M with
    M_ij = <L(a, E_ij), c> (Frobenius), i.e. L(aᵀ, c), from the block exponential expm([[aᵀ, c], [0, aᵀ]])."""
    g = a.shape[0]
    blk = torch.zeros(g, 6, 6, dtype=a.dtype, device=a.device)
    at = a.transpose(1, 2)
    blk[:, :3, :3] = at
    blk[:, 3:, 3:] = at
    blk[:, :3, 3:] = c
    return torch.linalg.matrix_exp(blk)[:, :3, 3:]


def relax_batch(atoms_list: list[Atoms], potential: Potential, fmax: float = 0.05, steps: int = 200,
                cell: bool = True) -> list[tuple[Atoms, str]]:
    """FIRE relaxation of several structures together (one ``potential.evaluate`` per step).

    The same algorithm as :func:`.relax.relax` (ASE FIRE with its default parameters on a
    ``FrechetCellFilter`` when ``cell``): per structure, the degrees of freedom are the positions in
    the reference cell and X = N log F (F the deformation gradient from the input cell, N atoms); the
    generalised forces are f F and the Fréchet-derivative pull-back of the virial, divided by N; a
    structure converges when its largest generalised force row is below ``fmax`` eV/Å, and then leaves
    the batch. Returns, per input, (relaxed copy with a single-point calculator (energy eV, forces
    eV/Å), ``ok`` | ``not_converged`` | ``failed: <reason>`` (the input returned unrelaxed)).
    """
    dev = potential.device
    out: list[tuple[Atoms, str] | None] = [None] * len(atoms_list)
    if not atoms_list:
        return []
    sys0 = Systems.from_atoms(atoms_list, dev)
    members = list(range(len(atoms_list)))
    x = sys0.positions.clone()                      # positions in the reference (input) cell, Å
    cell0 = sys0.cell.clone()                       # (G,3,3) reference cells
    G = len(members)
    logf = torch.zeros(G, 3, 3, dtype=torch.float64, device=dev)   # X / N = log F
    n_at = (sys0.ptr[1:] - sys0.ptr[:-1]).to(torch.float64)
    vel_x = torch.zeros_like(x)
    vel_c = torch.zeros_like(logf)
    dt_fire = torch.full((G,), FIRE_DT, dtype=torch.float64, device=dev)
    a_fire = torch.full((G,), FIRE_ASTART, dtype=torch.float64, device=dev)
    n_pos = torch.zeros(G, dtype=torch.long, device=dev)
    nsteps = 0
    started = torch.zeros(G, dtype=torch.bool, device=dev)
    base = sys0
    evaluate = _Evaluator(potential, stress=cell)

    def keep_only(keep: list[int]) -> torch.Tensor:
        """Drop every structure but ``keep`` from the FIRE state; returns the kept atoms' indices."""
        nonlocal base, x, vel_x, cell0, logf, vel_c, dt_fire, a_fire, n_pos, n_at, started, members
        base, idx = base.select(keep)
        x, vel_x = x[idx], vel_x[idx]
        cell0, logf, vel_c = cell0[keep], logf[keep], vel_c[keep]
        dt_fire, a_fire, n_pos, n_at, started = dt_fire[keep], a_fire[keep], n_pos[keep], n_at[keep], started[keep]
        members = [members[g] for g in keep]
        return idx

    def finish(g: int, systems: Systems, energy: float, forces: np.ndarray, st: str) -> None:
        a = atoms_list[members[g]].copy()
        lo, hi = int(systems.ptr[g]), int(systems.ptr[g + 1])
        a.set_cell(systems.cell[g].cpu().numpy(), scale_atoms=False)
        a.set_positions(systems.positions[lo:hi].cpu().numpy())
        a.calc = SinglePointCalculator(a, energy=energy, forces=forces)
        out[members[g]] = (a, st)

    while members:
        f_def = torch.linalg.matrix_exp(logf) if cell else None          # (G,3,3) deformation gradients
        if cell:
            cur_cell = cell0 @ f_def.transpose(1, 2)
            pos = torch.bmm(x.unsqueeze(1), f_def.transpose(1, 2)[base.batch]).squeeze(1)
        else:
            cur_cell, pos = cell0, x
        systems = Systems(base.numbers, pos, cur_cell, base.batch, base.ptr)
        res, failed = evaluate(systems)
        if failed:
            for g, (st, reason) in failed.items():
                a = atoms_list[members[g]].copy()
                a.calc = None
                out[members[g]] = (a, f"failed: {reason}")
            keep_only([g for g in range(len(members)) if g not in failed])
            continue
        energy, forces, stress = res
        gx = forces
        if cell:
            gx = torch.bmm(forces.unsqueeze(1), f_def[base.batch]).squeeze(1)   # f F
            volume = torch.linalg.det(cur_cell).abs()
            virial = -volume.view(-1, 1, 1) * stress
            ucf = virial @ torch.linalg.inv(f_def.transpose(1, 2))
            gc = _expm_frechet_adjoint(logf, ucf) / n_at.view(-1, 1, 1)
        else:
            gc = torch.zeros_like(logf)
        G = len(members)
        fmax2 = torch.maximum(_segment_max((gx * gx).sum(-1), base.batch, G), (gc * gc).sum(-1).amax(-1))
        converged = fmax2 < fmax * fmax
        leave = converged | torch.tensor(nsteps >= steps, device=dev)
        if bool(leave.any()):
            e_h, f_h = energy.cpu().numpy(), forces.cpu().numpy()
            ptr = systems.ptr.cpu().tolist()
            conv_h = converged.cpu().tolist()
            gone = torch.nonzero(leave).flatten().tolist()
            for g in gone:
                finish(g, systems, float(e_h[g]), f_h[ptr[g]:ptr[g + 1]].copy(), "ok" if conv_h[g] else "not_converged")
            keep = [g for g in range(G) if g not in set(gone)]
            if not keep:
                break
            gx, gc = gx[keep_only(keep)], gc[keep]
            G = len(members)
        # FIRE step (ASE's rule, per structure; velocities and forces over atoms + 3 cell rows)
        b = base.batch

        def dot(u_x: torch.Tensor, u_c: torch.Tensor, w_x: torch.Tensor, w_c: torch.Tensor) -> torch.Tensor:
            return _segment_sum((u_x * w_x).sum(-1), b, G) + (u_c * w_c).sum((1, 2))

        vf = dot(gx, gc, vel_x, vel_c)
        g2 = dot(gx, gc, gx, gc)
        v2 = dot(vel_x, vel_c, vel_x, vel_c)
        down = (vf > 0) & started
        mix = torch.where(down, torch.sqrt(v2) / torch.sqrt(g2).clamp_min(1e-300), torch.zeros_like(v2))
        a_b = torch.where(down, a_fire, torch.zeros_like(a_fire))
        vel_x = torch.where(down[b].unsqueeze(-1), (1 - a_b[b]).unsqueeze(-1) * vel_x
                            + (a_b * mix)[b].unsqueeze(-1) * gx, torch.zeros_like(vel_x))
        vel_c = torch.where(down.view(-1, 1, 1), (1 - a_b).view(-1, 1, 1) * vel_c + (a_b * mix).view(-1, 1, 1) * gc,
                            torch.zeros_like(vel_c))
        grow = down & (n_pos > FIRE_NMIN)
        dt_fire = torch.where(grow, torch.clamp(dt_fire * FIRE_FINC, max=FIRE_DTMAX), dt_fire)
        a_fire = torch.where(grow, a_fire * FIRE_FA, a_fire)
        n_pos = torch.where(down, n_pos + 1, n_pos)
        reset = started & ~down
        a_fire = torch.where(reset, torch.full_like(a_fire, FIRE_ASTART), a_fire)
        dt_fire = torch.where(reset, dt_fire * FIRE_FDEC, dt_fire)
        n_pos = torch.where(reset, torch.zeros_like(n_pos), n_pos)
        started = torch.ones_like(started)
        vel_x = vel_x + dt_fire[b].unsqueeze(-1) * gx
        vel_c = vel_c + dt_fire.view(-1, 1, 1) * gc
        dr_x = dt_fire[b].unsqueeze(-1) * vel_x
        dr_c = dt_fire.view(-1, 1, 1) * vel_c
        norm = torch.sqrt(dot(dr_x, dr_c, dr_x, dr_c))
        factor = torch.where(norm > FIRE_MAXSTEP, FIRE_MAXSTEP / norm.clamp_min(1e-300), torch.ones_like(norm))
        x = x + factor[b].unsqueeze(-1) * dr_x
        if cell:
            logf = logf + factor.view(-1, 1, 1) * dr_c / n_at.view(-1, 1, 1)
        nsteps += 1
    return out  # type: ignore[return-value]


def _segment_max(values: torch.Tensor, batch: torch.Tensor, n: int) -> torch.Tensor:
    """Max of ``values`` (N,) per structure -> (G,) (-inf for an empty structure)."""
    out = torch.full((n,), -math.inf, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, batch, values, reduce="amax", include_self=True)
