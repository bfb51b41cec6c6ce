"""Time the LiFlow authors' own published inference code (``FlowSimulator``) on CPU, in this process.

What it runs: ``liflow.utils.inference.FlowSimulator`` from GitHub ``learningmatter-mit/liflow`` at
commit e6fc475361d046865f12cae1aee11c4f56c48d87 (MIT License), with their ``FlowModule`` models holding
the published universal Propagator and Corrector (``P_universal.ckpt``, ``C_universal.ckpt``), their
prior classes, and their ``FlowSimulator.run`` loop: Euler, 10 Propagator + 10 Corrector flow steps per
Δτ = 1 ps step, Corrector every step, centre-of-mass fix, no retries (their ``config/test.yaml``). The
result is a denominator for quoting our batched engine's speed as a ratio to the real reference.

This module imports the reference package from an exported tree of that commit outside this
repository (default ``<repo>/../liflow-ref``: ``git archive`` of the mirror, the ``liflow/`` folder);
it copies none of its code. ``load_reference`` checks the imported files against the commit's git blob
ids below and says whether they matched.

Its third-party needs beyond ours: ``lightning`` and ``omegaconf`` (pure Python, pip), and
``torch_scatter``, which has neither a pure-Python distribution nor a CPU wheel on PyPI. If a compiled
``torch_scatter`` is importable it is used; otherwise the unmodified torch-scatter 2.1.2 source (the PyPI
sdist, unpacked at ``<repo>/../liflow-ref-deps/torch_scatter-2.1.2``) is imported with its own
``BUILD_DOCS=1`` switch, which skips loading the compiled extension. The only function LiFlow calls,
``scatter_sum``, is plain Python over ``Tensor.scatter_add_`` in both builds; the switch only swaps
ops LiFlow never calls (scatter_min/max/mul, segment_*) for placeholders that raise. PyG's optional
dependency probe (``torch_geometric.typing``) runs before that import, so PyG does not pick it up.

The checkpoints are Lightning 2.3 pickles that hold an OmegaConf config and a ``defaultdict``, which
``torch.load(weights_only=True)`` refuses. They are read with a restricted unpickler (an allow-list of
exactly the classes they hold), then ``FlowModule(cfg)`` + ``load_state_dict(strict=True)``: what
``FlowModule.load_from_checkpoint`` does for this module, without unpickling arbitrary code.

Element table: the universal models index their 77 embedding rows by an ``element_index`` that ships
with the authors' dataset only. Per ``shared/liflow-reference/README.md`` the rows of H, Li, Be, B, C,
N, O, F, Na, Mg, Al, Si, P, S, Cl, K, Ca, Sc, Ti, V, Cr, Mn, Fe, Co, Ni, Cu, Zn, Ga, Ge are 0..28;
``FlowSimulator`` takes the table as an array indexed by atomic number, and any other element is
refused here (their code would silently read row -1).

Version note: with today's vesin (0.6.2) ``FlowSimulator`` fails on its first Corrector call if given
float64 positions and cell (vesin now refuses points and box of different dtypes, and the Propagator
returns float32), so ``time_flowsimulator`` passes both as float32. vesin converts them to float64
internally and the models take float32 input anyway; only the neighbour search reads float32-rounded
coordinates (sub-micro-Å).

Usage (smoke test, one thread): ``python bench/reference_flowsim.py --steps 1``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import pickle
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REFERENCE_COMMIT = "e6fc475361d046865f12cae1aee11c4f56c48d87"
DEFAULT_REFERENCE_REPO = REPO.parent / "liflow-ref"
DEFAULT_CKPT_DIR = REPO.parent / "shared" / "liflow-reference"
DEFAULT_TORCH_SCATTER_SRC = REPO.parent / "liflow-ref-deps" / "torch_scatter-2.1.2"

FLOW_STEPS = 10  # per model and Δτ step: 10 Propagator + 10 Corrector evaluations (paper; test.yaml)
DELTA_TAU_PS = 1.0  # one FlowSimulator step of the universal models (time_delay_steps 100 MD frames)
SOLVER = "euler"

# git blob ids (sha1 of "blob <len>\0<bytes>") of the files imported, at REFERENCE_COMMIT
REFERENCE_BLOBS: dict[str, str] = {
    "liflow/__init__.py": "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391",
    "liflow/model/__init__.py": "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391",
    "liflow/model/layers.py": "61440cac2080d0c175d17cece68c2ef8c7480b89",
    "liflow/model/models.py": "4923d798bca9e81ddf9bad8ca50a012f08219896",
    "liflow/model/modules.py": "6ed0bbca9671e2f46c802a4a29a7283c2a97492d",
    "liflow/utils/__init__.py": "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391",
    "liflow/utils/geometry.py": "10e1d2cd6a08ff874c306426810868558b0043a0",
    "liflow/utils/inference.py": "1c76bb3d07a4072fcc1cd51a7b9318a5a3134653",
    "liflow/utils/prior.py": "f82faeedb540d1c09dd58cbc7512b62dee2710b8",
}

# atomic numbers of embedding rows 0, 1, 2, ... (universal models; rows for Z > 32 are unknown)
ELEMENT_ROWS_Z: tuple[int, ...] = (1, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16, 17, 19, 20, 21, 22, 23,
                                   24, 25, 26, 27, 28, 29, 30, 31, 32)

# what the universal checkpoints' pickles hold, besides tensors and storages (which torch resolves)
_CKPT_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    ("collections", "OrderedDict"), ("collections", "defaultdict"), ("typing", "Any"),
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "int"),
    ("__builtin__", "dict"), ("__builtin__", "list"), ("__builtin__", "int"), ("__builtin__", "long"),
    ("omegaconf.dictconfig", "DictConfig"), ("omegaconf.listconfig", "ListConfig"),
    ("omegaconf.base", "ContainerMetadata"), ("omegaconf.base", "Metadata"), ("omegaconf.nodes", "AnyNode"),
    ("torch._utils", "_rebuild_tensor_v2"),
})


class _CheckpointUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CKPT_GLOBALS:
            raise pickle.UnpicklingError(f"checkpoint refers to {module}.{name}, which is not on the allow-list")
        return super().find_class(module, name)


_restricted_pickle = types.ModuleType("restricted_pickle")
_restricted_pickle.Unpickler = _CheckpointUnpickler  # type: ignore[attr-defined]
_restricted_pickle.load = pickle.load  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ReferenceFlowSim:
    """The imported reference package, its two loaded models and the element table."""

    repo: Path
    commit: str
    files_match_commit: bool
    mismatched_files: tuple[str, ...]
    flow_simulator_cls: type
    get_prior: Callable[..., Any]
    propagator: torch.nn.Module  # liflow.model.modules.FlowModule, eval mode, CPU
    corrector: torch.nn.Module
    element_idx: np.ndarray  # (119,) int64, atomic number -> embedding row, -1 where unknown
    checkpoints: dict[str, str] = field(default_factory=dict)  # file -> sha256
    torch_scatter: str = ""
    versions: dict[str, str] = field(default_factory=dict)


def _git_blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _import_torch_scatter(src: Path) -> str:
    """Import torch_scatter (compiled if installed, else the pure-Python source); return its origin."""
    import torch_geometric.typing  # noqa: F401 - PyG's optional-dependency probe runs first (see docstring)

    if "torch_scatter" not in sys.modules and importlib.util.find_spec("torch_scatter") is None:
        if not (src / "torch_scatter" / "__init__.py").is_file():
            raise FileNotFoundError(
                f"torch_scatter is not installed and {src} holds no torch_scatter source (unpack the sdist: "
                "pip download --no-deps --no-build-isolation --no-binary :all: torch-scatter==2.1.2)")
        sys.path.insert(0, str(src))
        with _env("BUILD_DOCS", "1"):  # torch_scatter's own switch: skip the compiled extension
            importlib.import_module("torch_scatter")
    import torch_scatter

    return f"torch_scatter {torch_scatter.__version__} from {Path(torch_scatter.__file__).parent}"


def _element_index() -> np.ndarray:
    table = np.full(119, -1, dtype=np.int64)
    table[list(ELEMENT_ROWS_Z)] = np.arange(len(ELEMENT_ROWS_Z))
    return table


def _load_module(flow_module_cls: type, path: Path) -> torch.nn.Module:
    ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
    model = flow_module_cls(**ckpt["hyper_parameters"])
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model.eval()


def import_reference(repo: Path = DEFAULT_REFERENCE_REPO, *, torch_scatter_src: Path = DEFAULT_TORCH_SCATTER_SRC,
                     blobs: dict[str, str] | None = None) -> tuple[Path, tuple[str, ...], str]:
    """Make the reference package in ``repo`` (a tree of commit e6fc475 holding ``liflow/``) importable
    and check it: returns (resolved repo, files whose git blob id differs from ``blobs`` (default
    REFERENCE_BLOBS) or that are missing, torch_scatter origin). Raises if ``liflow`` would be imported
    from elsewhere or its ``scatter_sum`` is not torch_scatter's."""
    repo = Path(repo).resolve()
    if not (repo / "liflow" / "utils" / "inference.py").is_file():
        raise FileNotFoundError(f"{repo} is not a tree of learningmatter-mit/liflow (no liflow/utils/inference.py)")
    mismatched = tuple(f for f, blob in (REFERENCE_BLOBS if blobs is None else blobs).items()
                       if not (repo / f).is_file() or _git_blob_id(repo / f) != blob)
    scatter = _import_torch_scatter(Path(torch_scatter_src))
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    layers = importlib.import_module("liflow.model.layers")
    if Path(layers.__file__).resolve().parents[2] != repo:
        raise ImportError(f"liflow was imported from {layers.__file__}, not from {repo}")
    if inspect.getmodule(layers.scatter_sum).__name__ != "torch_scatter.scatter":  # type: ignore[union-attr]
        raise ImportError("liflow.model.layers.scatter_sum is not torch_scatter's scatter_sum")
    return repo, mismatched, scatter


def load_reference(repo: Path = DEFAULT_REFERENCE_REPO, ckpt_dir: Path = DEFAULT_CKPT_DIR, *,
                   torch_scatter_src: Path = DEFAULT_TORCH_SCATTER_SRC) -> ReferenceFlowSim:
    """Import the reference package from ``repo`` (a tree of commit e6fc475 holding ``liflow/``) and load
    ``P_universal.ckpt`` and ``C_universal.ckpt`` from ``ckpt_dir`` into their ``FlowModule`` on CPU."""
    repo, mismatched, scatter = import_reference(repo, torch_scatter_src=torch_scatter_src)
    ckpt_dir = Path(ckpt_dir)
    inference = importlib.import_module("liflow.utils.inference")
    modules = importlib.import_module("liflow.model.modules")
    prior = importlib.import_module("liflow.utils.prior")

    ckpts = {name: ckpt_dir / f"{name}.ckpt" for name in ("P_universal", "C_universal")}
    prop = _load_module(modules.FlowModule, ckpts["P_universal"])
    corr = _load_module(modules.FlowModule, ckpts["C_universal"])
    import lightning
    import omegaconf

    return ReferenceFlowSim(
        repo=repo, commit=REFERENCE_COMMIT, files_match_commit=not mismatched, mismatched_files=mismatched,
        flow_simulator_cls=inference.FlowSimulator, get_prior=prior.get_prior, propagator=prop, corrector=corr,
        element_idx=_element_index(), checkpoints={p.name: _sha256(p) for p in ckpts.values()},
        torch_scatter=scatter,
        versions={"torch": torch.__version__, "lightning": lightning.__version__,
                  "omegaconf": omegaconf.__version__, "numpy": np.__version__})


def time_flowsimulator(ref: ReferenceFlowSim, numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray,
                       temperature_K: float, n_steps: int, seed: int = 0, *, scale_li_index: int = 0,
                       scale_frame_index: int = 0, warmup_steps: int = 0) -> dict[str, Any]:
    """Run ``FlowSimulator.run`` for ``n_steps`` Δτ = 1 ps steps of one structure and time it.

    Priors are built as their test script does (``get_prior(class, **params, seed=seed)`` from each
    checkpoint's config), fresh per call. ``scale_*_index`` picks the adaptive Propagator prior's column:
    0 = the small ("slow") scale (Li 1.0, frame 0.316), 1 = the large one. ``warmup_steps`` > 0 runs that
    many untimed steps first (on a separate simulator with the same seed). Returns wall time,
    structure_ps_per_s = completed steps x 1 ps / wall, and whether the trajectory stayed finite.
    """
    z = np.asarray(numbers, dtype=np.int64)
    # float32 positions and cell: FlowSimulator hands the models' float32 outputs back to vesin, which
    # (vesin >= 0.5; 0.6.2 here) refuses points and box of different dtypes; vesin still computes in
    # float64, and the models see float32 positions either way.
    x0 = np.asarray(positions, dtype=np.float32)
    lattice = np.asarray(cell, dtype=np.float32)
    if z.ndim != 1 or x0.shape != (len(z), 3) or lattice.shape != (3, 3):
        raise ValueError("numbers (n,), positions (n, 3), cell (3, 3) expected")
    unknown = sorted({int(a) for a in z if not 0 < a < len(ref.element_idx) or ref.element_idx[a] < 0})
    if unknown:
        raise ValueError(f"atomic numbers {unknown} have no known embedding row in the universal models")
    p_cfg, c_cfg = ref.propagator.cfg.propagate_prior, ref.corrector.cfg.correct_prior  # type: ignore[union-attr]

    def simulator() -> Any:
        return ref.flow_simulator_cls(
            propagate_model=ref.propagator,
            propagate_prior=ref.get_prior(p_cfg.class_name, **p_cfg.params, seed=seed),
            atomic_numbers=z, element_idx=ref.element_idx, lattice=lattice, temp=float(temperature_K),
            correct_model=ref.corrector,
            correct_prior=ref.get_prior(c_cfg.class_name, **c_cfg.params, seed=seed),
            pbc=True, scale_Li_index=scale_li_index, scale_frame_index=scale_frame_index)

    run_kw = dict(flow_steps=FLOW_STEPS, solver=SOLVER, verbose=False, fix_com=True, num_retries=0,
                  corrector_every=1)
    if warmup_steps > 0:
        simulator().run(x0.copy(), steps=warmup_steps, **run_kw)
    sim = simulator()
    t0 = time.perf_counter()
    traj = sim.run(x0.copy(), steps=n_steps, **run_kw)
    wall = time.perf_counter() - t0
    frames = np.asarray(traj, dtype=np.float64)
    completed = len(traj) - 1
    step_disp = np.linalg.norm(np.diff(frames, axis=0), axis=-1) if completed else np.zeros((0, len(z)))
    return {
        "runner": "learningmatter-mit/liflow FlowSimulator.run",
        "commit": ref.commit, "files_match_commit": ref.files_match_commit,
        "n_atoms": int(len(z)), "temperature_K": float(temperature_K), "seed": int(seed),
        "n_steps": int(n_steps), "n_steps_completed": int(completed), "warmup_steps": int(warmup_steps),
        "delta_tau_ps": DELTA_TAU_PS, "flow_steps_propagator": FLOW_STEPS, "flow_steps_corrector": FLOW_STEPS,
        "solver": SOLVER, "num_retries": 0, "corrector_every": 1, "fix_com": True,
        "propagate_prior": {"class": str(p_cfg.class_name), "scale_li_index": scale_li_index,
                            "scale_frame_index": scale_frame_index,
                            "scale": [list(map(float, row)) for row in p_cfg.params.scale]},
        "correct_prior": {"class": str(c_cfg.class_name), "scale": float(c_cfg.params.scale),
                          "added_to_corrector_start": False},
        "torch_threads": torch.get_num_threads(),
        "wall_s": wall,
        "s_per_step": wall / completed if completed else float("nan"),
        "structure_ps_per_s": completed * DELTA_TAU_PS / wall,
        "all_steps_completed": completed == n_steps,
        "trajectory_finite": bool(np.isfinite(frames).all()) and completed == n_steps,
        "max_step_displacement_A": float(step_disp.max()) if step_disp.size else 0.0,
    }


def _lifepo4() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 112-atom LiFePO4 bench cell (pymatgen LiFePO4.json, 2x2x1, rattled 0.05 Å, seed 0)."""
    cells = HERE / "data" / "bench_cells.npz"
    if cells.is_file():
        f = np.load(cells)
        return f["lifepo4/numbers"], f["lifepo4/positions"], f["lifepo4/cell"]
    import pymatgen.util
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = AseAtomsAdaptor.get_atoms(
        Structure.from_file(Path(pymatgen.util.__file__).parent / "structures" / "LiFePO4.json")).repeat((2, 2, 1))
    atoms.rattle(0.05, seed=0)
    return atoms.numbers, atoms.positions, atoms.cell.array


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=DEFAULT_REFERENCE_REPO)
    ap.add_argument("--ckpt-dir", type=Path, default=DEFAULT_CKPT_DIR)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=800.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ref = load_reference(args.repo, args.ckpt_dir)
    z, x, c = _lifepo4()
    out = time_flowsimulator(ref, z, x, c, args.temperature, args.steps, warmup_steps=args.warmup)
    out["torch_scatter"] = ref.torch_scatter
    out["versions"] = ref.versions
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
