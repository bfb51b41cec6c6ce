"""One NVT Nosé–Hoover trajectory (ASE), with explosion checks and resumable checkpoints.

Units: positions Å, time fs (integrator) and ps (frames), temperature K, energy eV, masses amu.
Positions are saved UNWRAPPED (the ASE integrator never wraps; neither do we). A trajectory that
explodes (max displacement between saved frames > ``md.max_step_displacement`` Å or instantaneous
T > ``md.max_temperature_factor`` x target), turns NaN or raises ends with a status, not an
exception. Checkpoints (every ``md.checkpoint_every`` saved frames) make a killed run resume and
produce the same frames as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator

from ..core import seeds
from ..core.errors import LiflowError
from ..core.settings import MDSettings
from ..io.files import atomic_path, config_digest

FrameCallback = Callable[[str, float, int], None]


#: Nosé–Hoover chain length.
TCHAIN = 3


def md_digest(settings: MDSettings, seed: int) -> str:
    """Digest of what a trajectory's frames depend on besides the structure, T and potential
    (checkpoints from other settings are not resumed)."""
    return config_digest({"timestep_fs": settings.timestep_fs, "duration_ps": settings.duration_ps,
                          "save_every": settings.save_every, "ttime_fs": settings.ttime_fs,
                          "checkpoint_every": settings.checkpoint_every,
                          "max_step_displacement": settings.max_step_displacement,
                          "max_temperature_factor": settings.max_temperature_factor, "seed": seed, "tchain": TCHAIN})


def velocity_rng(seed: int, sid: str, temperature: float) -> np.random.Generator:
    """RNG of the initial velocities: the root stream of (config seed, structure id, temperature K)."""
    return seeds.numpy_rng(seed, sid, temperature, *seeds.MD_VELOCITIES)


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


def safe_name(sid: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", str(sid))[:60]
    return f"{clean}-{hashlib.sha256(str(sid).encode()).hexdigest()[:8]}"


def save_pickle(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)


def load_pickle(path: Path | None) -> Any:
    if path is None or not path.is_file():
        return None
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh)
    except Exception:  # a truncated/corrupt checkpoint is ignored: the work is redone
        return None


def _fingerprint(sid: str, atoms: Atoms, temperature: float, settings: MDSettings, seed: int,
                 potential_name: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([str(sid), float(temperature), md_digest(settings, seed), potential_name]).encode())
    h.update(np.ascontiguousarray(atoms.get_atomic_numbers(), dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(atoms.get_positions(), dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(atoms.cell.array, dtype=np.float64).tobytes())
    return h.hexdigest()[:24]


def _thermostat_state(dyn) -> dict[str, np.ndarray]:
    th = dyn._thermostat  # ASE 3.29 NoseHooverChainNVT keeps its chain state here (eta, p_eta)
    return {"eta": th._eta.copy(), "p_eta": th._p_eta.copy()}


def _set_thermostat_state(dyn, state: dict[str, np.ndarray]) -> None:
    th = dyn._thermostat
    th._eta[:] = state["eta"]
    th._p_eta[:] = state["p_eta"]


def failure_reason(exc: BaseException) -> str:
    """One line naming a failure: ``<ExceptionType>: <first line of its message, <= 200 chars>``."""
    msg = (str(exc).splitlines()[0] if str(exc) else "")[:200]
    return f"{type(exc).__name__}: {msg}".rstrip(": ")


def frame_problem(pos: np.ndarray, prev: np.ndarray, energy: float, temp: float, target: float,
                  settings: MDSettings, frame: int) -> tuple[str, str] | None:
    """(status, reason) if saved frame ``frame`` (positions ``pos`` Å, previous frame ``prev`` Å,
    potential energy eV, kinetic temperature K) ends its trajectory: non-finite values (``nan``), a
    displacement above ``max_step_displacement`` Å or T above ``max_temperature_factor`` x ``target``
    K (``exploded``); else None. The one check of the ASE and the batched engines."""
    if not (np.isfinite(pos).all() and math.isfinite(energy) and math.isfinite(temp)):
        return "nan", f"non-finite positions/energy at frame {frame}"
    disp = float(np.linalg.norm(np.asarray(pos, dtype=np.float64) - np.asarray(prev, dtype=np.float64), axis=1).max())
    if disp > settings.max_step_displacement:
        return "exploded", (f"max displacement {disp:.2f} A between frames {frame - 1} and {frame} "
                            f"> {settings.max_step_displacement:g} A")
    if temp > settings.max_temperature_factor * target:
        return "exploded", (f"instantaneous temperature {temp:.0f} K at frame {frame} > "
                            f"{settings.max_temperature_factor:g} x {target:g} K")
    return None


def _failure_kind(atoms: Atoms) -> str:
    return "nan" if not np.isfinite(atoms.get_positions()).all() else "error"


def run_trajectory(sid: str, atoms: Atoms, temperature: float, settings: MDSettings, calculator: Calculator,
                   ckpt_path: Path | None = None, potential_name: str = "",
                   frame_callback: FrameCallback | None = None, *, seed: int) -> TrajectoryResult:
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
    fp = _fingerprint(sid, atoms, temperature, settings, seed, potential_name)
    state = load_pickle(ckpt_path)
    if state is not None and state.get("fingerprint") != fp:
        state = None
    if state is not None and state.get("done"):
        return TrajectoryResult(sid, temperature, np.asarray(state["pos"], dtype=np.float32),
                                np.asarray(state["energy"]), np.asarray(state["temp"]), state["status"],
                                state["reason"], state["wall_s"])

    work = atoms.copy()
    work.calc = calculator
    rng = velocity_rng(seed, sid, temperature)
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
        save_pickle(ckpt_path, rec)

    def finish(status: str = "ok", reason: str = "") -> TrajectoryResult:
        res = result(status, reason)
        checkpoint(done=True, res=res)
        return res

    dyn = NoseHooverChainNVT(work, timestep=settings.timestep_fs * units.fs, temperature_K=temperature,
                             tdamp=settings.ttime_fs * units.fs, tchain=TCHAIN)
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
            problem = frame_problem(pos, pos_frames[-1], energy, temp, target, settings, frame)
            if problem is not None:
                return finish(*problem)
            pos_frames.append(pos.astype(np.float32))
            e_frames.append(energy)
            t_frames.append(temp)
            if frame % settings.checkpoint_every == 0 and len(pos_frames) < settings.n_frames:
                checkpoint()
            if frame_callback is not None:
                frame_callback(sid, temperature, frame)
    except Exception as exc:
        return finish(_failure_kind(work), failure_reason(exc))
    return finish()
