"""Reference MD stage: supercell, relaxation, descriptors, NVT Nosé–Hoover MD, checkpoints.

Units: positions Å, time fs (integrator) and ps (frames), temperature K, energy eV, masses amu.
Positions are saved UNWRAPPED (the ASE integrator never wraps; neither do we).

One chunk of the manifest (``run_chunk``) writes, each atomically with provenance:

- ``structures.parquet`` (schema STRUCTURES): relaxed supercell + descriptors for EVERY row;
- ``frames_T{T}.parquet`` (schema FRAMES), one per configured temperature, frames of the
  trajectories that ended ``ok`` (the split of each id is in ``structures.parquet``);
- ``status.parquet`` (schema STATUS): one row per (structure with ``run_md``, temperature).

A trajectory that explodes (max displacement between saved frames > ``md.max_step_displacement``
Å or instantaneous T > ``md.max_temperature_factor`` x target), turns NaN, raises, or whose
relaxation failed, is a status row; the other structures go on. Checkpoints under ``out_dir/ckpt``
(every ``md.checkpoint_every`` saved frames) make a killed chunk resume and produce the same frames
as an uninterrupted run; they are removed when the chunk completes.

Batched MD (``md.batch_size > 1``): the per-structure ASE integrators run in lock-step threads
whose calculators hand their positions to a shared evaluator; when every live trajectory of the
group has asked, ONE ``Potential.energies_forces`` call evaluates them all.
"""

from __future__ import annotations

import contextlib
import hashlib
import io as _io
import json
import math
import pickle
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.singlepoint import SinglePointCalculator

from . import schema
from .errors import InputError, LiflowError
from .io import atomic_path, provenance
from .potentials import EnergyForcesCalculator, Potential, load_potential

LI = 3
FrameCallback = Callable[[str, float, int], None]


# --------------------------------------------------------------------------- structures

def build_supercell(row: Any) -> Atoms:
    """Supercell (ase.Atoms, pbc) of a manifest row: its ``cif`` unit cell repeated ``supercell`` times."""
    from ase.io import read

    get = row.get if hasattr(row, "get") else lambda k, d=None: getattr(row, k, d)
    sid = get("id", "?")
    cif = get("cif")
    if not isinstance(cif, str) or not cif.strip():
        raise InputError(f"structure {sid}: empty CIF text in the manifest")
    try:
        atoms = read(_io.StringIO(cif), format="cif")
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"structure {sid}: unreadable CIF ({msg})") from exc
    if isinstance(atoms, list):
        atoms = atoms[0]
    rep = get("supercell")
    rep = (1, 1, 1) if rep is None else tuple(int(r) for r in rep)
    if len(rep) != 3 or min(rep) < 1:
        raise InputError(f"structure {sid}: supercell repeats {rep} are not three positive integers")
    atoms = atoms.repeat(rep)
    atoms.pbc = True
    atoms.info.clear()
    return atoms


def _finite(atoms: Atoms) -> bool:
    return bool(np.isfinite(atoms.get_positions()).all() and np.isfinite(atoms.cell.array).all())


def _single_threaded_blas():
    """Limit BLAS to one thread: the cell filter's 3x3 expm/solve calls are ~10x slower when a
    multi-threaded OpenBLAS competes for a busy 2-core machine. No-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: only a speed matter
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def relax(atoms: Atoms, potential: Potential, fmax: float = 0.05, steps: int = 200,
          cell: bool = True) -> tuple[Atoms, str]:
    """Relax positions (and the cell with ASE's FrechetCellFilter when ``cell``) with FIRE.

    Returns (relaxed copy with a single-point calculator holding energy eV / forces eV/Å, status):
    ``ok`` (max force < fmax eV/Å), ``not_converged`` (``steps`` exhausted) or ``failed: <reason>``
    (exception or NaN), in which case the unrelaxed input is returned. Never raises on model failure.
    """
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    work = atoms.copy()
    work.calc = potential.calculator
    try:
        target = FrechetCellFilter(work) if cell else work
        opt = FIRE(target, logfile=None)
        with _single_threaded_blas():
            converged = bool(opt.run(fmax=fmax, steps=steps))
        energy = float(work.get_potential_energy())
        forces = np.asarray(work.get_forces(), dtype=float)
        if not (_finite(work) and math.isfinite(energy) and np.isfinite(forces).all()):
            raise FloatingPointError("non-finite positions, cell, energy or forces")
    except Exception as exc:
        msg = (str(exc).splitlines()[0] if str(exc) else "")[:200]
        failed = atoms.copy()
        failed.calc = None
        return failed, f"failed: {type(exc).__name__}: {msg}".rstrip(": ")
    out = atoms.copy()
    out.set_cell(work.cell.array, scale_atoms=False)
    out.set_positions(work.get_positions())
    out.calc = SinglePointCalculator(out, energy=energy, forces=forces)
    return out, "ok" if converged else "not_converged"


# --------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class MDSettings:
    """MD parameters of one run (from the ``md`` config section and the master ``seed``)."""

    timestep_fs: float = 2.0
    duration_ps: float = 2.0
    save_every: int = 10
    ttime_fs: float = 100.0
    checkpoint_every: int = 50
    max_step_displacement: float = 3.0
    max_temperature_factor: float = 5.0
    seed: int = 0
    tchain: int = 3

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> MDSettings:
        md = cfg["md"]
        return cls(timestep_fs=float(md["timestep_fs"]), duration_ps=float(md["duration_ps"]),
                   save_every=int(md["save_every"]), ttime_fs=float(md["ttime_fs"]),
                   checkpoint_every=int(md["checkpoint_every"]),
                   max_step_displacement=float(md["max_step_displacement"]),
                   max_temperature_factor=float(md["max_temperature_factor"]), seed=int(cfg.get("seed", 0)))

    @property
    def frame_dt_ps(self) -> float:
        """Time between saved frames, ps."""
        return self.save_every * self.timestep_fs / 1000.0

    @property
    def n_frames(self) -> int:
        """Saved frames including frame 0: floor(duration / frame interval) + 1."""
        return int(math.floor(self.duration_ps / self.frame_dt_ps + 1e-9)) + 1

    def digest(self) -> str:
        blob = json.dumps(self.__dict__, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def velocity_rng(seed: int, sid: str, temperature: float) -> np.random.Generator:
    """RNG of the initial velocities, from (config seed, structure id, temperature K): stable across runs."""
    sid_key = int.from_bytes(hashlib.sha256(str(sid).encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed), sid_key, int(round(temperature * 1000))])


@dataclass
class TrajectoryResult:
    """One (structure, temperature) trajectory: frames (F, n, 3) float32 Å, energies eV, T_inst K."""

    sid: str
    temperature: float
    positions: np.ndarray
    energies: np.ndarray
    temperatures: np.ndarray
    status: str = "ok"
    reason: str = ""
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return int(self.positions.shape[0])


# --------------------------------------------------------------------------- checkpoints

def _safe_name(sid: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", str(sid))[:60]
    return f"{clean}-{hashlib.sha256(str(sid).encode()).hexdigest()[:8]}"


def _save_pickle(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)


def _load_pickle(path: Path | None) -> Any:
    if path is None or not path.is_file():
        return None
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh)
    except Exception:  # a truncated/corrupt checkpoint is ignored: the work is redone
        return None


def _fingerprint(sid: str, atoms: Atoms, temperature: float, settings: MDSettings, potential_name: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([str(sid), float(temperature), settings.digest(), potential_name]).encode())
    h.update(np.ascontiguousarray(atoms.get_atomic_numbers(), dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(atoms.get_positions(), dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(atoms.cell.array, dtype=np.float64).tobytes())
    return h.hexdigest()[:24]


# --------------------------------------------------------------------------- one trajectory

def _thermostat_state(dyn) -> dict[str, np.ndarray]:
    th = dyn._thermostat  # ASE 3.29 NoseHooverChainNVT keeps its chain state here (eta, p_eta)
    return {"eta": th._eta.copy(), "p_eta": th._p_eta.copy()}


def _set_thermostat_state(dyn, state: dict[str, np.ndarray]) -> None:
    th = dyn._thermostat
    th._eta[:] = state["eta"]
    th._p_eta[:] = state["p_eta"]


def _failure_kind(atoms: Atoms) -> str:
    return "nan" if not np.isfinite(atoms.get_positions()).all() else "error"


def run_trajectory(sid: str, atoms: Atoms, temperature: float, settings: MDSettings, calculator: Calculator,
                   ckpt_path: Path | None = None, potential_name: str = "",
                   frame_callback: FrameCallback | None = None) -> TrajectoryResult:
    """NVT Nosé–Hoover chain MD (ASE ``NoseHooverChainNVT``) of one structure at ``temperature`` K.

    Maxwell–Boltzmann initial velocities from :func:`velocity_rng`, zero CoM momentum, time step
    ``settings.timestep_fs`` fs, thermostat time ``settings.ttime_fs`` fs. Frames (unwrapped Å,
    float32) every ``save_every`` steps, frame 0 = initial. Checkpoints to ``ckpt_path`` every
    ``checkpoint_every`` frames and at the end; resumes from it when its fingerprint matches.
    Model errors, NaN and explosions end the trajectory with a non-``ok`` status (never raise);
    ``frame_callback(sid, T, frame)`` is called after each saved frame (and its checkpoint).
    """
    from ase.md.nose_hoover_chain import NoseHooverChainNVT
    from ase.md.velocitydistribution import Stationary, thermalize_momenta

    t0 = time.perf_counter()
    fp = _fingerprint(sid, atoms, temperature, settings, potential_name)
    state = _load_pickle(ckpt_path)
    if state is not None and state.get("fingerprint") != fp:
        state = None
    if state is not None and state.get("done"):
        return TrajectoryResult(sid, temperature, np.asarray(state["pos"], dtype=np.float32),
                                np.asarray(state["energy"]), np.asarray(state["temp"]), state["status"],
                                state["reason"], state["wall_s"])

    work = atoms.copy()
    work.calc = calculator
    rng = velocity_rng(settings.seed, sid, temperature)
    pos_frames: list[np.ndarray] = []
    e_frames: list[float] = []
    t_frames: list[float] = []
    wall_prev = 0.0
    if state is None:
        thermalize_momenta(work, temperature_K=temperature, rng=rng)
        Stationary(work, preserve_temperature=False)
    else:
        work.set_positions(state["q"])
        work.set_momenta(state["p"])
        rng.bit_generator.state = state["rng"]
        pos_frames = [np.asarray(p, dtype=np.float32) for p in state["pos"]]
        e_frames = list(state["energy"])
        t_frames = list(state["temp"])
        wall_prev = float(state["wall_s"])

    def result(status: str = "ok", reason: str = "") -> TrajectoryResult:
        pos = np.stack(pos_frames) if pos_frames else np.zeros((0, len(atoms), 3), np.float32)
        return TrajectoryResult(sid, temperature, pos, np.asarray(e_frames, dtype=np.float64),
                                np.asarray(t_frames, dtype=np.float64), status, reason,
                                wall_prev + time.perf_counter() - t0)

    def checkpoint(done: bool = False, res: TrajectoryResult | None = None) -> None:
        if ckpt_path is None:
            return
        rec = {"fingerprint": fp, "done": done, "pos": pos_frames, "energy": e_frames, "temp": t_frames,
               "wall_s": wall_prev + time.perf_counter() - t0}
        if done and res is not None:
            rec.update(status=res.status, reason=res.reason, wall_s=res.wall_s)
        else:
            rec.update(q=dyn._q.copy(), p=dyn._p.copy(), nsteps=dyn.nsteps,
                       thermostat=_thermostat_state(dyn), rng=rng.bit_generator.state)
        _save_pickle(ckpt_path, rec)

    def finish(status: str = "ok", reason: str = "") -> TrajectoryResult:
        res = result(status, reason)
        checkpoint(done=True, res=res)
        return res

    dyn = NoseHooverChainNVT(work, timestep=settings.timestep_fs * units.fs, temperature_K=temperature,
                             tdamp=settings.ttime_fs * units.fs, tchain=settings.tchain)
    th = getattr(dyn, "_thermostat", None)
    if th is None or not hasattr(th, "_eta") or not hasattr(th, "_p_eta") or not hasattr(dyn, "_q"):
        raise LiflowError("this ASE version's NoseHooverChainNVT has no (_q, _p, _thermostat._eta/_p_eta) "
                          "state to checkpoint (written against ase 3.29)")
    if state is not None:
        _set_thermostat_state(dyn, state["thermostat"])
        dyn.nsteps = int(state["nsteps"])

    target = float(temperature)
    try:
        if not pos_frames:  # frame 0: the relaxed structure with its initial velocities
            e0 = float(work.get_potential_energy())
            pos_frames.append(work.get_positions().astype(np.float32))
            e_frames.append(e0)
            t_frames.append(float(work.get_temperature()))
            if not math.isfinite(e0):
                return finish("nan", "non-finite initial energy")
            if frame_callback is not None:
                frame_callback(sid, temperature, 0)
        while len(pos_frames) < settings.n_frames:
            dyn.run(settings.save_every)
            pos = work.get_positions()
            energy = float(work.get_potential_energy())
            temp = float(work.get_temperature())
            frame = len(pos_frames)
            if not (np.isfinite(pos).all() and math.isfinite(energy) and math.isfinite(temp)):
                return finish("nan", f"non-finite positions/energy at frame {frame}")
            disp = float(np.linalg.norm(pos - pos_frames[-1].astype(np.float64), axis=1).max())
            if disp > settings.max_step_displacement:
                return finish("exploded", f"max displacement {disp:.2f} A between frames {frame - 1} and {frame} "
                                          f"> {settings.max_step_displacement:g} A")
            if temp > settings.max_temperature_factor * target:
                return finish("exploded", f"instantaneous temperature {temp:.0f} K at frame {frame} > "
                                          f"{settings.max_temperature_factor:g} x {target:g} K")
            pos_frames.append(pos.astype(np.float32))
            e_frames.append(energy)
            t_frames.append(temp)
            if frame % settings.checkpoint_every == 0 and len(pos_frames) < settings.n_frames:
                checkpoint()
            if frame_callback is not None:
                frame_callback(sid, temperature, frame)
    except Exception as exc:
        msg = (str(exc).splitlines()[0] if str(exc) else "")[:200]
        kind = _failure_kind(work)
        return finish(kind, f"{type(exc).__name__}: {msg}".rstrip(": "))
    return finish()


# --------------------------------------------------------------------------- lock-step batching

class _LockstepEvaluator:
    """Collects one force request per live trajectory, then evaluates them in ONE model call.

    A failing batched call is retried one structure at a time so that only the culprit fails.
    """

    def __init__(self, potential: Potential, n_members: int) -> None:
        self.potential = potential
        self._cond = threading.Condition()
        self._live = n_members
        self._pending: dict[int, Atoms] = {}
        self._results: dict[int, Any] = {}
        self.n_calls = 0

    def evaluate(self, slot: int, atoms: Atoms) -> tuple[float, np.ndarray]:
        with self._cond:
            self._pending[slot] = atoms
            self._maybe_run()
            while slot not in self._results:
                self._cond.wait()
            res = self._results.pop(slot)
        if isinstance(res, BaseException):
            raise res
        return res

    def leave(self) -> None:
        """A trajectory ended (finished, failed or killed): stop waiting for it."""
        with self._cond:
            self._live -= 1
            self._maybe_run()

    def _maybe_run(self) -> None:
        if not self._pending or len(self._pending) < self._live:
            return
        slots = sorted(self._pending)
        batch = [self._pending.pop(s) for s in slots]
        self.n_calls += 1
        try:
            energies, forces = self.potential.energies_forces(batch)
            for s, e, f in zip(slots, energies, forces):
                self._results[s] = (float(e), f)
        except Exception:
            for s, a in zip(slots, batch):
                try:
                    e1, f1 = self.potential.energies_forces([a])
                    self._results[s] = (float(e1[0]), f1[0])
                except Exception as exc:
                    self._results[s] = exc
        self._cond.notify_all()


class _LockstepCalculator(Calculator):
    """ASE calculator of one lock-step member: forwards to the shared :class:`_LockstepEvaluator`."""

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, evaluator: _LockstepEvaluator, slot: int) -> None:
        super().__init__()
        self._evaluator = evaluator
        self._slot = slot

    def calculate(self, atoms=None, properties=None, system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        e, f = self._evaluator.evaluate(self._slot, self.atoms.copy())
        self.results = {"energy": e, "free_energy": e, "forces": f}


@dataclass
class MDJob:
    """One trajectory to run: structure id, relaxed supercell, temperature K."""

    sid: str
    atoms: Atoms
    temperature: float


def run_trajectories(jobs: list[MDJob], potential: Potential, settings: MDSettings, batch_size: int = 1,
                     ckpt_dir: Path | None = None, frame_callback: FrameCallback | None = None) -> list[TrajectoryResult]:
    """Run MD jobs one by one (``batch_size == 1``) or in lock-step groups of ``batch_size``.

    In a group every MD step costs one ``potential.energies_forces`` call for all live members.
    """

    def ckpt(job: MDJob) -> Path | None:
        if ckpt_dir is None:
            return None
        return Path(ckpt_dir) / f"md_{_safe_name(job.sid)}_T{int(round(job.temperature))}.pkl"

    results: list[TrajectoryResult] = []
    if batch_size <= 1:
        calc = EnergyForcesCalculator(potential)
        for job in jobs:
            results.append(run_trajectory(job.sid, job.atoms, job.temperature, settings, calc, ckpt(job),
                                          potential.name, frame_callback))
        return results

    for start in range(0, len(jobs), batch_size):
        group = jobs[start:start + batch_size]
        evaluator = _LockstepEvaluator(potential, len(group))
        out: list[Any] = [None] * len(group)

        def worker(i: int, job: MDJob) -> None:
            try:
                out[i] = run_trajectory(job.sid, job.atoms, job.temperature, settings,
                                        _LockstepCalculator(evaluator, i), ckpt(job), potential.name, frame_callback)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                out[i] = exc
            finally:
                evaluator.leave()

        threads = [threading.Thread(target=worker, args=(i, j), daemon=True, name=f"md-{j.sid}-{j.temperature:g}")
                   for i, j in enumerate(group)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for item in out:
            if isinstance(item, BaseException):
                raise item
        results.extend(out)
    return results


# --------------------------------------------------------------------------- one chunk

def _row_get(row: pd.Series, key: str, default: Any = None) -> Any:
    val = row.get(key, default)
    return default if val is None or (isinstance(val, float) and math.isnan(val)) else val


def run_chunk(cfg: dict[str, Any], manifest: pd.DataFrame, chunk: int, out_dir: Path,
              potential: Potential | None = None, progress: bool = True,
              frame_callback: FrameCallback | None = None) -> dict[str, Path]:
    """Relax, describe and simulate every manifest row with ``chunk == chunk``; write the chunk's files.

    ``cfg`` is the validated config. Descriptors are computed for ALL rows; MD (every
    ``md.temperatures``) only for rows with ``run_md``. Returns the written paths by name.
    """
    from tqdm.auto import tqdm

    md = cfg["md"]
    settings = MDSettings.from_config(cfg)
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "ckpt"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if "chunk" not in manifest.columns:
        raise InputError("manifest has no 'chunk' column")
    rows = manifest[manifest["chunk"] == chunk]
    temps = [float(t) for t in md["temperatures"]]
    if len({int(round(t)) for t in temps}) != len(temps):
        raise InputError(f"md.temperatures {temps} contain duplicates after rounding to whole K")
    if potential is None:
        potential = load_potential(md)

    struct_rows: list[dict[str, Any]] = []
    status_rows: list[dict[str, Any]] = []
    split_of: dict[str, str] = {}
    jobs: list[MDJob] = []

    def status_row(sid: str, split: str, temp: float, status: str, reason: str, n_frames: int = 0,
                   wall_s: float = 0.0) -> dict[str, Any]:
        return {"id": sid, "temperature": int(round(temp)), "split": split, "source": "md", "status": status,
                "reason": reason, "n_frames": n_frames,
                "duration_ps": max(n_frames - 1, 0) * settings.frame_dt_ps, "wall_s": wall_s}

    for _, row in tqdm(list(rows.iterrows()), desc=f"relax chunk {chunk}", disable=not progress):
        sid = str(row["id"])
        split = str(_row_get(row, "split", "train"))
        split_of[sid] = split
        run_md = bool(_row_get(row, "run_md", False))
        try:
            atoms0 = build_supercell(row)
        except InputError as exc:
            for t in temps if run_md else []:
                status_rows.append(status_row(sid, split, t, "error", str(exc)))
            continue
        rpath = ckpt_dir / f"relax_{_safe_name(sid)}.pkl"
        rfp = hashlib.sha256(json.dumps([str(row["cif"]), [int(r) for r in _row_get(row, "supercell", (1, 1, 1))],
                                         md["relax_fmax"], md["relax_steps"], md["relax_cell"], potential.name,
                                         potential.dtype]).encode()).hexdigest()[:24]
        rec = _load_pickle(rpath)
        if rec is None or rec.get("fingerprint") != rfp:
            relaxed, rstatus = relax(atoms0, potential, float(md["relax_fmax"]), int(md["relax_steps"]),
                                     bool(md["relax_cell"]))
            energy = float(relaxed.get_potential_energy()) if relaxed.calc is not None else float("nan")
            try:
                desc_li, desc_frame = potential.descriptors(relaxed)
                desc_li, desc_frame = desc_li.tolist(), desc_frame.tolist()
            except Exception:  # descriptors unavailable (e.g. element outside the model): empty lists
                desc_li, desc_frame = [], []
            rec = {"fingerprint": rfp, "numbers": relaxed.get_atomic_numbers(), "cell": relaxed.cell.array,
                   "positions": relaxed.get_positions(), "status": rstatus, "energy": energy,
                   "desc_li": desc_li, "desc_frame": desc_frame}
            _save_pickle(rpath, rec)
        relaxed = Atoms(numbers=rec["numbers"], positions=rec["positions"], cell=rec["cell"], pbc=True)
        numbers = relaxed.get_atomic_numbers()
        struct_rows.append({
            "id": sid, "reduced_formula": str(_row_get(row, "reduced_formula", relaxed.get_chemical_formula("hill", empirical=True))),
            "split": split, "numbers": numbers.astype(np.int16).tolist(),
            "cell": relaxed.cell.array.reshape(-1).tolist(), "positions": relaxed.get_positions().reshape(-1).tolist(),
            "n_atoms": len(relaxed), "n_li": int((numbers == LI).sum()),
            "desc_li": rec["desc_li"], "desc_frame": rec["desc_frame"], "energy": rec["energy"],
            "relax_status": rec["status"],
        })
        if not run_md:
            continue
        if rec["status"].startswith("failed"):
            for t in temps:
                status_rows.append(status_row(sid, split, t, "relax_failed", rec["status"]))
            continue
        jobs.extend(MDJob(sid, relaxed, t) for t in temps)

    bar = tqdm(total=len(jobs) * (settings.n_frames - 1), desc=f"md chunk {chunk}", disable=not progress)
    lock = threading.Lock()

    def on_frame(sid: str, temp: float, frame: int) -> None:
        if frame > 0:
            with lock:
                bar.update(1)
        if frame_callback is not None:
            frame_callback(sid, temp, frame)

    results = run_trajectories(jobs, potential, settings, int(md.get("batch_size", 1)), ckpt_dir, on_frame)
    bar.close()

    frames_by_t: dict[int, list[dict[str, Any]]] = {int(round(t)): [] for t in temps}
    for res in results:
        tk = int(round(res.temperature))
        status_rows.append(status_row(res.sid, split_of[res.sid], res.temperature, res.status, res.reason,
                                      res.n_frames, res.wall_s))
        if res.status != "ok":
            continue
        for f in range(res.n_frames):
            frames_by_t[tk].append({
                "id": res.sid, "source": "md", "frame": f, "time_ps": np.float32(f * settings.frame_dt_ps),
                "positions": res.positions[f].reshape(-1), "energy": float(res.energies[f]),
                "temperature_inst": np.float32(res.temperatures[f]),
            })

    prov = provenance(cfg, stage="md", chunk=int(chunk), potential=potential.name)
    paths = {"structures": out_dir / "structures.parquet", "status": out_dir / "status.parquet"}
    schema.write_rows(struct_rows, paths["structures"], "structures", prov=prov)
    for tk, frows in frames_by_t.items():
        paths[f"frames_T{tk}"] = out_dir / f"frames_T{tk}.parquet"
        schema.write_rows(frows, paths[f"frames_T{tk}"], "frames", prov=prov)
    schema.write_rows(status_rows, paths["status"], "status", prov=prov)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return paths
