"""Interatomic potentials behind one interface: an ASE calculator, batched energies/forces, descriptors.

Supported ``md.potential`` values:

- ``chgnet``: CHGNet 0.3.0, whose weights ship inside the ``chgnet`` wheel (the offline default).
- ``mace-mp-0-small``: MACE-MP-0 small, resolved from ``md.model_path``, then the mace cache
  (``$XDG_CACHE_HOME/mace`` or ``~/.cache/mace``, file name as ``mace_mp(model="small")`` stores it),
  then a download through mace-torch. Offline with none of them: a one-line :class:`LiflowError`.
- ``mace-file``: any local MACE model file, loaded through the same code path as MACE-MP-0 small.

Units: energies eV, forces eV/Å, positions Å. Descriptors are the mean invariant per-atom features of
the Li atoms and of the non-Li ("frame") atoms (Appendix D.1 of the LiFlow paper: 128 features for
MACE-MP-0 small, i.e. the invariant part of the first interaction layer; 64 for CHGNet).
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from ..core.errors import ConfigError, InputError, LiflowError
from ..core.runtime import resolve_device
from ..core.settings import MDSettings

# mace-torch pins e3nn 0.4.4, whose import calls torch.load on a pickle that torch >= 2.6 refuses
# under weights_only=True. mace itself sets this variable on import; set it before any e3nn import.
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

import torch  # noqa: E402

LI = 3
POTENTIALS = ("chgnet", "mace-mp-0-small", "mace-file")


def _import_mace() -> None:
    """Import mace (and so e3nn) safely under torch >= 2.6 (see module comment)."""
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    import mace  # noqa: F401
    import mace.calculators  # noqa: F401


def _group_means(feats: np.ndarray, numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of per-atom features (n, F) over Li atoms and over non-Li atoms.

    An empty group gives a NaN-filled vector of length F (the classifier treats NaN as missing).
    """
    feats = np.asarray(feats, dtype=np.float64)
    is_li = np.asarray(numbers) == LI
    n_feat = feats.shape[1]

    def mean(mask: np.ndarray) -> np.ndarray:
        if not mask.any():
            return np.full(n_feat, np.nan, dtype=np.float32)
        return feats[mask].mean(axis=0).astype(np.float32)

    return mean(is_li), mean(~is_li)


@dataclass
class Systems:
    """Several periodic structures as one batch of tensors on one device (atoms of a structure contiguous).

    ``numbers`` (N,) int64, ``positions`` (N,3) float64 Å (unwrapped), ``cell`` (G,3,3) float64 Å
    (rows a, b, c), ``batch`` (N,) structure index, ``ptr`` (G+1,) atom offsets. Never modified in
    place: a new cell or positions is a new ``Systems`` (the neighbour-list plan is keyed by tensor).
    """

    numbers: torch.Tensor
    positions: torch.Tensor
    cell: torch.Tensor
    batch: torch.Tensor
    ptr: torch.Tensor

    @classmethod
    def from_atoms(cls, atoms_list: list, device: str | torch.device = "cpu") -> "Systems":
        sizes = [len(a) for a in atoms_list]
        ptr = torch.tensor(np.concatenate([[0], np.cumsum(sizes)]), dtype=torch.long, device=device)
        return cls(
            numbers=torch.tensor(np.concatenate([a.get_atomic_numbers() for a in atoms_list]), dtype=torch.long,
                                 device=device),
            positions=torch.tensor(np.concatenate([a.get_positions() for a in atoms_list]), dtype=torch.float64,
                                   device=device),
            cell=torch.tensor(np.stack([a.cell.array for a in atoms_list]), dtype=torch.float64, device=device),
            batch=torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                          torch.tensor(sizes, device=device)),
            ptr=ptr)

    @property
    def n_systems(self) -> int:
        return int(self.cell.shape[0])

    def with_geometry(self, positions: torch.Tensor, cell: torch.Tensor | None = None) -> "Systems":
        return Systems(self.numbers, positions, self.cell if cell is None else cell, self.batch, self.ptr)

    def atoms(self, g: int):
        """Structure ``g`` as ase.Atoms (pbc)."""
        from ase import Atoms

        lo, hi = int(self.ptr[g]), int(self.ptr[g + 1])
        return Atoms(numbers=self.numbers[lo:hi].cpu().numpy(), positions=self.positions[lo:hi].detach().cpu().numpy(),
                     cell=self.cell[g].detach().cpu().numpy(), pbc=True)

    def select(self, keep: list[int]) -> tuple["Systems", torch.Tensor]:
        """The structures ``keep`` (in that order) and the indices (into this batch) of their atoms."""
        dev = self.positions.device
        ptr = self.ptr.cpu().tolist()
        idx = torch.cat([torch.arange(ptr[g], ptr[g + 1], device=dev) for g in keep]) if keep else \
            torch.zeros(0, dtype=torch.long, device=dev)
        sizes = torch.tensor([ptr[g + 1] - ptr[g] for g in keep], dtype=torch.long, device=dev)
        return Systems(self.numbers[idx], self.positions[idx], self.cell[list(keep)],
                       torch.repeat_interleave(torch.arange(len(keep), device=dev), sizes),
                       torch.cat([torch.zeros(1, dtype=torch.long, device=dev), torch.cumsum(sizes, 0)])), idx


@dataclass
class Potential:
    """A loaded potential: ``calculator`` (ASE), ``energies_forces`` (batched), ``descriptors``.

    ``model`` is the torch module that does the work (used by benchmarks to time model calls).
    """

    name: str
    device: str
    dtype: str
    model: torch.nn.Module
    calculator: Any = field(repr=False)

    def energies_forces(self, atoms_list: list) -> tuple[np.ndarray, list[np.ndarray]]:
        """Potential energies (G,) eV and forces [(n_g, 3)] eV/Å of several structures in ONE model call."""
        raise NotImplementedError

    def evaluate(self, systems: Systems, stress: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Energies (G,) eV, forces (N,3) eV/Å and, with ``stress``, stresses (G,3,3) eV/Å³ (ASE's
        sign: positive = tensile) of a batch of structures in ONE model call; float64 tensors on
        ``systems``' device. The batched MD and relaxation engines (:mod:`.batched`) call this."""
        raise NotImplementedError

    def atom_features(self, atoms) -> np.ndarray:
        """Invariant per-atom features (n, F) of one structure."""
        raise NotImplementedError

    def descriptors(self, atoms) -> tuple[np.ndarray, np.ndarray]:
        """(desc_li, desc_frame): float32 (F,) means of invariant features over Li / non-Li atoms.

        A group with no atoms gives a NaN-filled vector of length F.
        """
        return _group_means(self.atom_features(atoms), atoms.get_atomic_numbers())


class MacePotential(Potential):
    """A MACE model (MACE-MP-0 small or any local MACE file) on one device."""

    descriptor_layers: int = 1

    def _batch(self, atoms_list: list):
        from mace import data as mace_data
        from mace.tools import torch_geometric, torch_tools

        calc = self.calculator
        keyspec = mace_data.KeySpecification(info_keys={}, arrays_keys={})
        graphs = []
        with torch_tools.default_dtype(self.dtype):
            for atoms in atoms_list:
                config = mace_data.config_from_atoms(atoms, key_specification=keyspec, head_name=calc.head)
                graphs.append(mace_data.AtomicData.from_config(
                    config, z_table=calc.z_table, cutoff=calc.r_max, heads=calc.available_heads))
        return torch_geometric.Batch.from_data_list(graphs).to(self.device)

    def energies_forces(self, atoms_list: list) -> tuple[np.ndarray, list[np.ndarray]]:
        if not atoms_list:
            return np.zeros(0), []
        batch = self._batch(atoms_list)
        out = self.model(batch.to_dict(), compute_force=True, compute_stress=False, training=False)
        energy = out["energy"].detach().to("cpu", torch.float64).numpy()
        forces = out["forces"].detach().to("cpu", torch.float64).numpy()
        ptr = batch.ptr.cpu().numpy()
        return energy, [forces[ptr[g]:ptr[g + 1]] for g in range(len(atoms_list))]

    def evaluate(self, systems: Systems, stress: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One forward of the whole batch, its graph from the project's batched cell list on the device
        (no per-structure ASE/matscipy neighbour list, no AtomicData objects)."""
        from ..core.geometry import radius_graph_pbc

        calc = self.calculator
        dt = torch.float64 if self.dtype == "float64" else torch.float32
        dev = systems.positions.device
        if getattr(self, "_z_lookup", None) is None or self._z_lookup.device != dev:
            lookup = torch.full((119,), -1, dtype=torch.long)
            for k, z in enumerate(calc.z_table.zs):
                lookup[int(z)] = k
            self._z_lookup = lookup.to(dev)
        idx = self._z_lookup[systems.numbers]
        if bool((idx < 0).any()):
            bad = sorted({int(z) for z in systems.numbers[idx < 0].cpu().tolist()})
            raise InputError(f"atomic numbers {bad} are outside the MACE model's element table")
        edge_index, shift, images = radius_graph_pbc(systems.positions, systems.cell, systems.batch,
                                                     float(calc.r_max), return_images=True)
        heads = list(getattr(calc, "available_heads", None) or ["default"])
        head = heads.index(calc.head) if getattr(calc, "head", None) in heads else 0
        n_graphs = systems.n_systems
        data = {
            "positions": systems.positions.detach().to(dt, copy=True),
            "node_attrs": torch.nn.functional.one_hot(idx, len(calc.z_table.zs)).to(dt),
            "edge_index": edge_index, "shifts": shift.to(dt), "unit_shifts": images.to(dt),
            "cell": systems.cell.detach().to(dt).reshape(-1, 3), "batch": systems.batch, "ptr": systems.ptr,
            "head": torch.full((n_graphs,), head, dtype=torch.long, device=dev),
        }
        out = self.model(data, compute_force=True, compute_stress=stress, training=False)
        f64 = torch.float64
        s = out["stress"].detach().to(f64) if stress else None
        return out["energy"].detach().to(f64), out["forces"].detach().to(f64), s

    def atom_features(self, atoms) -> np.ndarray:
        from mace.modules.utils import extract_invariant
        from e3nn import o3

        batch = self._batch([atoms])
        feats = self.model(batch.to_dict(), compute_force=False, training=False)["node_feats"]
        irreps_out = o3.Irreps(str(self.model.products[0].linear.irreps_out))
        l_max = irreps_out.lmax
        n_inv = irreps_out.dim // (l_max + 1) ** 2
        n_layers = min(self.descriptor_layers, int(self.model.num_interactions))
        inv = extract_invariant(feats, num_layers=n_layers, num_features=n_inv, l_max=l_max)
        return inv[:, : n_inv * n_layers].detach().to("cpu", torch.float64).numpy()


class ChgnetPotential(Potential):
    """CHGNet (pretrained 0.3.0 weights from the wheel); always float32."""

    def _graphs(self, atoms_list: list) -> list:
        from pymatgen.io.ase import AseAtomsAdaptor

        return [self.model.graph_converter(AseAtomsAdaptor.get_structure(a)) for a in atoms_list]

    def energies_forces(self, atoms_list: list) -> tuple[np.ndarray, list[np.ndarray]]:
        if not atoms_list:
            return np.zeros(0), []
        graphs = self._graphs(atoms_list)
        preds = self.model.predict_graph(graphs, task="ef", batch_size=len(graphs))
        if isinstance(preds, dict):
            preds = [preds]
        n = np.array([len(a) for a in atoms_list], dtype=np.float64)
        e = np.array([float(p["e"]) for p in preds], dtype=np.float64)
        if self.model.is_intensive:
            e = e * n  # CHGNet predicts eV/atom
        return e, [np.asarray(p["f"], dtype=np.float64) for p in preds]

    def evaluate(self, systems: Systems, stress: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """CHGNet builds its graphs per structure on the host (its own converter); the model call is one
        batch. Stress from CHGNet's GPa to eV/Å³ as its ASE calculator does."""
        from ase import units

        atoms_list = [systems.atoms(g) for g in range(systems.n_systems)]
        graphs = self._graphs(atoms_list)
        preds = self.model.predict_graph(graphs, task="efs" if stress else "ef", batch_size=len(graphs))
        if isinstance(preds, dict):
            preds = [preds]
        dev = systems.positions.device
        n = torch.tensor([len(a) for a in atoms_list], dtype=torch.float64)
        e = torch.tensor([float(p["e"]) for p in preds], dtype=torch.float64)
        if self.model.is_intensive:
            e = e * n
        f = torch.from_numpy(np.concatenate([np.asarray(p["f"], dtype=np.float64) for p in preds]))
        s = None
        if stress:
            s = torch.from_numpy(np.stack([np.asarray(p["s"], dtype=np.float64).reshape(3, 3) for p in preds])) * units.GPa
            s = s.to(dev)
        return e.to(dev), f.to(dev), s

    def atom_features(self, atoms) -> np.ndarray:
        graphs = self._graphs([atoms])
        pred = self.model.predict_graph(graphs[0], task="e", return_atom_feas=True)
        return np.asarray(pred["atom_fea"], dtype=np.float64)


# --------------------------------------------------------------------------- MACE-MP-0 small

def mace_mp_small_cache_path() -> Path:
    """Where ``mace_mp(model="small")`` caches its file: ``<mace cache dir>/<sanitised URL basename>``."""
    _import_mace()
    from mace.calculators.foundations_models import mace_mp_urls
    from mace.tools.utils import get_cache_dir

    name = "".join(c for c in os.path.basename(mace_mp_urls["small"]) if c.isalnum() or c in "_")
    return Path(get_cache_dir()) / name


def resolve_mace_mp_small(model_path: str | None = None, allow_download: bool = True) -> Path:
    """Local file of MACE-MP-0 small: explicit ``model_path``, then the mace cache, then a download."""
    if model_path:
        p = Path(model_path).expanduser()
        if not p.is_file():
            raise InputError(f"md.model_path {str(p)!r} does not exist (MACE-MP-0 small model file)")
        return p
    cached = mace_mp_small_cache_path()
    if cached.is_file():
        return cached
    reason = "downloads disabled"
    if allow_download:
        from mace.calculators.foundations_models import download_mace_mp_checkpoint

        try:
            with contextlib.redirect_stdout(io.StringIO()):
                return Path(download_mace_mp_checkpoint("small"))
        except Exception as exc:  # URLError, timeouts, HTTP errors, RuntimeError on HTML
            reason = f"download failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    raise LiflowError(
        f"MACE-MP-0 small model not available ({reason}): set md.model_path to a local model file, "
        f"put the file at {cached}, or allow network access so mace-torch can download it"
    )


def load_mace_model(path: str | os.PathLike[str], device: str = "cpu", dtype: str = "float32") -> torch.nn.Module:
    """Load a pickled MACE model file (as written by mace-torch or :func:`save_mace_model`)."""
    _import_mace()
    p = Path(path)
    if not p.is_file():
        raise InputError(f"MACE model file {str(p)!r} does not exist")
    try:
        model = torch.load(p, map_location=device, weights_only=False)
    except Exception as exc:
        raise InputError(f"{p}: not a loadable MACE model file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "r_max") or not hasattr(model, "atomic_numbers"):
        raise InputError(f"{p}: does not contain a MACE model (got {type(model).__name__})")
    model = model.double() if dtype == "float64" else model.float()
    return model.to(device).eval()


def _mace_potential(name: str, path: Path, device: str, dtype: str) -> MacePotential:
    from mace.calculators import MACECalculator

    model = load_mace_model(path, device, dtype)
    calc = MACECalculator(models=model, device=device, default_dtype=dtype)
    return MacePotential(name=name, device=device, dtype=dtype, model=calc.models[0], calculator=calc)


def load_potential(md: MDSettings, device: str = "auto", allow_download: bool = True) -> Potential:
    """Load the potential named by ``md.potential`` (``md.model_path``, ``md.dtype``, ``md.device``).

    ``device`` overrides ``md.device`` unless it is ``auto``. ``allow_download=False`` forbids
    the network fallback of ``mace-mp-0-small``.
    """
    kind, dtype = md.potential, md.dtype
    if dtype not in ("float32", "float64"):
        raise ConfigError(f"config key md.dtype: {dtype!r} is not float32 or float64")
    dev = resolve_device(device if device != "auto" else md.device, key="md.device")
    if kind == "chgnet":
        from chgnet.model import CHGNet
        from chgnet.model.dynamics import CHGNetCalculator

        with contextlib.redirect_stdout(io.StringIO()):
            model = CHGNet.load(verbose=False, use_device=dev)
            calc = CHGNetCalculator(model=model, use_device=dev, on_isolated_atoms="ignore")
        model.eval()
        return ChgnetPotential(name="chgnet", device=dev, dtype="float32", model=model, calculator=calc)
    if kind == "mace-mp-0-small":
        path = resolve_mace_mp_small(md.model_path, allow_download=allow_download)
        return _mace_potential("mace-mp-0-small", path, dev, dtype)
    if kind == "mace-file":
        if not md.model_path:
            raise ConfigError("config key md.model_path is required when md.potential is 'mace-file'")
        return _mace_potential("mace-file", Path(md.model_path), dev, dtype)
    raise ConfigError(f"config key md.potential: unknown potential {kind!r} (allowed: {', '.join(POTENTIALS)})")


# --------------------------------------------------------------------------- random MACE models

#: MACE-MP-0 small's architecture (mace-mp release 2023-12-10, "128-L0"): sizes for benchmarks.
MACE_SIZES: dict[str, dict[str, Any]] = {
    "small": dict(r_max=6.0, num_bessel=10, num_polynomial_cutoff=5, max_ell=3, num_interactions=2,
                  hidden_irreps="128x0e", MLP_irreps="16x0e", correlation=3, radial_MLP=[64, 64, 64],
                  avg_num_neighbors=61.0, pair_repulsion=False),
    "tiny": dict(r_max=4.0, num_bessel=4, num_polynomial_cutoff=5, max_ell=1, num_interactions=2,
                 hidden_irreps="8x0e", MLP_irreps="4x0e", correlation=2, radial_MLP=[8, 8],
                 avg_num_neighbors=20.0, pair_repulsion=True),
}


def build_random_mace(size: str = "tiny", seed: int = 0, n_elements: int = 89) -> torch.nn.Module:
    """A randomly initialised ``ScaleShiftMACE`` covering elements 1..n_elements (89 = MACE-MP-0).

    ``small`` has MACE-MP-0 small's hyper-parameters (128x0e, r_max 6 Å, 2 interactions, max_L 0,
    correlation 3); ``tiny`` is minimal (8x0e, r_max 4 Å) with ZBL pair repulsion so short MD stays
    physical. Energies are scaled to ~0.1 eV/atom so random forces stay moderate. Not a physical model:
    for tests and benchmarks only. The global torch RNG is left untouched.
    """
    if size not in MACE_SIZES:
        raise ConfigError(f"unknown random MACE size {size!r} (allowed: {', '.join(MACE_SIZES)})")
    _import_mace()
    from e3nn import o3
    from mace import modules

    hp = dict(MACE_SIZES[size])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = modules.ScaleShiftMACE(
            r_max=hp["r_max"], num_bessel=hp["num_bessel"], num_polynomial_cutoff=hp["num_polynomial_cutoff"],
            max_ell=hp["max_ell"],
            interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            num_interactions=hp["num_interactions"], num_elements=n_elements,
            hidden_irreps=o3.Irreps(hp["hidden_irreps"]), MLP_irreps=o3.Irreps(hp["MLP_irreps"]),
            atomic_energies=np.zeros(n_elements), avg_num_neighbors=hp["avg_num_neighbors"],
            atomic_numbers=list(range(1, n_elements + 1)), correlation=hp["correlation"],
            gate=torch.nn.functional.silu, radial_MLP=hp["radial_MLP"], pair_repulsion=hp["pair_repulsion"],
            atomic_inter_scale=0.1, atomic_inter_shift=0.0,
        )
    return model.float().eval()


def save_mace_model(model: torch.nn.Module, path: str | os.PathLike[str]) -> Path:
    """Save a MACE model as a full pickled module (the format mace-torch writes and ``mace-file`` reads)."""
    from ..io.files import atomic_path

    with atomic_path(path) as tmp:
        torch.save(model, tmp)
    return Path(path)


class EnergyForcesCalculator(Calculator):
    """Lean ASE calculator (energy eV, forces eV/Å) over ``Potential.energies_forces``, for MD.

    Unlike ``Potential.calculator`` it skips stress and magnetic moments, so an MD step costs one
    energy+force evaluation, through the same batched code path as lock-step batched MD.
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, potential: Potential) -> None:
        super().__init__()
        self.potential = potential

    def calculate(self, atoms=None, properties=None, system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        e, f = self.potential.energies_forces([self.atoms])
        self.results = {"energy": float(e[0]), "free_energy": float(e[0]), "forces": f[0]}
