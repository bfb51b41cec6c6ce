"""Batched MD (``md.batch_size > 1``): the per-structure ASE integrators run in lock-step threads
whose calculators hand their positions to a shared evaluator; when every live trajectory of the
group has asked, ONE ``Potential.energies_forces`` call evaluates them all.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from .potentials import EnergyForcesCalculator, Potential
from ..core.settings import MDSettings
from .integrate import FrameCallback, TrajectoryResult, run_trajectory, safe_name


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


def run_trajectories(jobs: list[MDJob], potential: Potential, settings: MDSettings, seed: int, batch_size: int = 1,
                     ckpt_dir: Path | None = None, frame_callback: FrameCallback | None = None) -> list[TrajectoryResult]:
    """Run MD jobs one by one (``batch_size == 1``) or in lock-step groups of ``batch_size``.

    In a group every MD step costs one ``potential.energies_forces`` call for all live members.
    ``seed``: the run's master seed (initial velocities).
    """

    def ckpt(job: MDJob) -> Path | None:
        if ckpt_dir is None:
            return None
        return Path(ckpt_dir) / f"md_{safe_name(job.sid)}_T{int(round(job.temperature))}.pkl"

    results: list[TrajectoryResult] = []
    if batch_size <= 1:
        calc = EnergyForcesCalculator(potential)
        for job in jobs:
            results.append(run_trajectory(job.sid, job.atoms, job.temperature, settings, calc, ckpt(job),
                                          potential.name, frame_callback, seed=seed))
        return results

    for start in range(0, len(jobs), batch_size):
        group = jobs[start:start + batch_size]
        evaluator = _LockstepEvaluator(potential, len(group))
        out: list[Any] = [None] * len(group)

        def worker(i: int, job: MDJob) -> None:
            try:
                out[i] = run_trajectory(job.sid, job.atoms, job.temperature, settings,
                                        _LockstepCalculator(evaluator, i), ckpt(job), potential.name, frame_callback,
                                        seed=seed)
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
