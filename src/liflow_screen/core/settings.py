"""Typed settings: one frozen dataclass per config section, built once from the validated config.

Stages and engines take these objects, never the config dict: a field has one type (cast here,
once), one name (the schema key) and its unit in the name or the comment. The config schema
(``data/config.schema.yaml``, :mod:`.config`) stays the one place for defaults, allowed values and
cross-key rules; :func:`Settings.from_config` requires the section dataclasses and the schema to
name exactly the same keys, so the two cannot drift apart (tested).

Usage::

    s = Settings.load("config.yaml")           # or Settings.from_config(config.validate(raw))
    s.md.temperatures, s.rollout.n_steps       # typed
    MDSettings.defaults(duration_ps=0.1)       # a section from the schema defaults, with changes
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")


# ------------------------------------------------------------------------------------------- sections
class _Section:
    """A top-level config section (``Settings.<name>``)."""

    @classmethod
    def defaults(cls: type[T], **changes: Any) -> T:
        """The section from the schema defaults with ``changes`` (key: value), validated."""
        name = next(f.name for f in dataclasses.fields(Settings) if typing.get_type_hints(Settings)[f.name] is cls)
        return getattr(Settings.defaults(**{name: changes}), name)


@dataclass(frozen=True)
class MPSettings:
    """``structures.mp``: the Materials Project query."""

    li_fraction_min: float  # fraction of Li among the atoms
    band_gap_min: float  # eV
    e_above_hull_max: float  # eV/atom
    max_structures: int | None
    endpoint: str | None  # API base URL; None = the public Materials Project API
    retries: int
    backoff_s: float  # s, doubled per retry


@dataclass(frozen=True)
class StructuresSettings(_Section):
    """``structures``: where the structures come from, supercells and the composition split."""

    source: str  # panel | mp | cif_dir | manifest | embedded | trajectories
    path: str | None
    panel_ids: tuple[str, ...] | None
    ids: tuple[str, ...] | None
    min_width: float  # Å, minimum perpendicular width of a supercell
    max_atoms: int | None
    test_fraction: float
    val_fraction: float
    mp: MPSettings


@dataclass(frozen=True)
class MDSettings(_Section):
    """``md``: relaxation and the reference NVT molecular dynamics."""

    potential: str
    model_path: str | None
    device: str
    dtype: str
    temperatures: tuple[float, ...]  # K
    timestep_fs: float  # fs
    duration_ps: float  # ps
    save_every: int  # MD steps between saved frames
    ttime_fs: float  # fs, Nosé–Hoover characteristic time
    relax_fmax: float  # eV/Å
    relax_steps: int
    relax_cell: bool
    splits: tuple[str, ...]
    max_structures: int | dict[str, int] | None  # per split, or one number for every split
    chunk_size: int  # structures per MD job
    batch_size: int  # structures advanced in one model call (> 1: the batched engine, md.batched)
    batch_atoms: int | None  # atoms per batch (None: the engine's default for the device)
    checkpoint_every: int  # saved frames between checkpoints
    max_step_displacement: float  # Å between saved frames above which a trajectory exploded
    max_temperature_factor: float  # instantaneous T / target above which a trajectory exploded

    @property
    def frame_dt_ps(self) -> float:
        """Time between saved frames, ps."""
        return self.save_every * self.timestep_fs / 1000.0

    @property
    def n_frames(self) -> int:
        """Saved frames including frame 0: floor(duration / frame interval) + 1."""
        return int(math.floor(self.duration_ps / self.frame_dt_ps + 1e-9)) + 1


@dataclass(frozen=True)
class DatasetSettings(_Section):
    """``dataset``: the LiFlow time step and the MSD labels."""

    delta_tau_ps: float  # ps (set from delta_tau_frames when that is given)
    delta_tau_frames: int | None
    zstd_level: int
    slow_threshold: float  # Å²/ps, mobility rate below which a group is "slow"


@dataclass(frozen=True)
class TrainSettings(_Section):
    """``train``: the flow models (PaiNN), their priors, training and the prior selector."""

    device: str
    features: int
    radial: int
    layers: int
    cutoff: float  # Å
    offset: float  # Å
    lr: float
    grad_clip: float
    batch_size: int
    max_steps: int
    max_epochs: int | None  # passes over the distinct training pairs; caps max_steps on small data
    loader_workers: int  # DataLoader worker processes reading pairs ahead
    processes: int  # DDP training processes (torchrun); batch_size is per process
    precision: str  # fp32 | bf16 (autocast of the training forward)
    compile: bool  # torch.compile the model for training
    val_every: int
    val_batches: int
    patience: int
    prior_li: tuple[float, ...]  # Å, (fast, slow) ... adaptive prior scales of Li
    prior_frame: tuple[float, ...]  # Å, of the frame
    uniform_scale: float  # Å
    isotropic_scale: float  # Å
    corrector_sigma_max: float  # Å
    corrector_prior_scale: float  # Å
    prior_classes: str
    classifier_hidden: tuple[int, ...]
    classifier_epochs: int
    classifier_lr: float
    variants: tuple[str, ...]
    init_from: str | None


@dataclass(frozen=True)
class PretrainedSettings(_Section):
    """``pretrained``: the published models screened as variant ``published``."""

    propagator: str | None
    corrector: str | None
    propagator_path: str | None
    corrector_path: str | None
    element_index: str | None
    download: bool
    base_url: str | None


@dataclass(frozen=True)
class RolloutSettings(_Section):
    """``rollout``: batched LiFlow rollouts (Algorithm 1) and the prior class of each."""

    prior_selection: str  # selector | pilot | labels | fast | slow
    pilot_steps: int  # Δτ steps of a pilot rollout
    device: str
    temperatures: tuple[float, ...] | None  # K; None = the MD temperatures
    n_steps: int  # Δτ steps per rollout
    n_flow: int  # Euler steps per flow integration
    n_flow_corrector: int | None
    corrector_every: int
    supercell: tuple[int, ...]  # (n_a, n_b, n_c) repeat of each cell
    corrector: bool
    ablate_corrector: bool
    batch_structures: int | None
    batch_atoms: int | None
    compile: str | bool  # auto | True | False
    precision: str  # fp32 | tf32 | bf16
    chunk_size: int  # structures per rollout job
    max_step_displacement: float  # Å per Δτ step above which a structure diverged
    retries: int
    replicas: int  # independent trajectories per (structure, T), pooled in the analysis
    max_steps: int | None  # Δτ steps an unresolved trajectory may reach by extension; None = n_steps
    extend_steps: int | None  # Δτ steps per extension round; None = n_steps
    extend_budget_ps: float | None  # structure-ps per run for extensions (every replica counts); None = no cap

    @property
    def max_total_steps(self) -> int:
        """The longest a trajectory may run, Δτ steps (max_steps, at least n_steps)."""
        return max(self.n_steps, self.max_steps or self.n_steps)


@dataclass(frozen=True)
class AnalysisSettings(_Section):
    """``analysis``: kinisi, RDF, the Arrhenius extrapolation and the reports."""

    kinisi_n_dt: int
    kinisi_samples: int
    rdf_rmax: float  # Å
    rdf_bins: int
    rdf_discard: float  # fraction of frames discarded before the RDF
    target_temperature: float  # K of the extrapolated D* and σ
    top_n: int
    metric_tau_ps: float | None  # ps
    ranking_variant: str | None


@dataclass(frozen=True)
class Settings:
    """The whole run. ``config`` is the validated config dict it was built from, kept for the
    provenance records only (outputs record the config that made them)."""

    run_name: str
    seed: int
    results_dir: str
    structures: StructuresSettings
    md: MDSettings
    dataset: DatasetSettings
    train: TrainSettings
    pretrained: PretrainedSettings
    rollout: RolloutSettings
    analysis: AnalysisSettings
    config: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def rollout_temperatures(self) -> tuple[float, ...]:
        """Rollout temperatures, K (rollout.temperatures, else the MD temperatures)."""
        t = self.rollout.temperatures
        return t if t is not None else self.md.temperatures

    @property
    def delta_tau_frames(self) -> int:
        """Δτ in saved-frame intervals (the config schema checks it is whole)."""
        return int(round(self.dataset.delta_tau_ps / self.md.frame_dt_ps))

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Settings:
        """Settings from a config already validated by :func:`.config.validate` (defaults filled)."""
        s = _build(cls, cfg, "")
        return dataclasses.replace(s, config=cfg)

    @classmethod
    def load(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> Settings:
        """Load, validate (:func:`.config.load`) and type a YAML config."""
        from . import config

        return cls.from_config(config.load(path, overrides))

    @classmethod
    def defaults(cls, **sections: Mapping[str, Any]) -> Settings:
        """The schema defaults with ``sections`` ({section: {key: value}}) given, validated."""
        from . import config

        return cls.from_config(config.validate(dict(sections)))


# ------------------------------------------------------------------------------------------- builder
_NONE = type(None)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """``value`` as type ``tp`` (int, float, bool, str, tuple[X, ...], X | None, dict, a section)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and _NONE in args:
            return None
        if isinstance(value, Mapping) and any(typing.get_origin(a) is dict for a in args):
            return {str(k): int(v) for k, v in value.items()}
        if isinstance(value, bool) and bool in args:
            return value
        for a in args:
            if a is not _NONE:
                return _coerce(a, value, where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is tuple:
        (item, _ellipsis) = typing.get_args(tp)
        return tuple(_coerce(item, v, where) for v in value)
    if tp is bool:
        return bool(value)
    if tp in (int, float, str):
        return tp(value)
    raise TypeError(f"settings field {where}: unsupported type {tp!r}")


def _build(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    """Instance of the section dataclass ``cls`` from the config mapping ``data`` (exact keys)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init and f.name != "config"]
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key {where or '<top level>'} must be a mapping")
    missing, extra = set(names) - set(data), set(data) - set(names)
    if missing or extra:  # a schema key without a settings field, or the reverse: a programming error
        raise ConfigError(f"settings {cls.__name__} and the config schema disagree at {where or '<top level>'}: "
                          f"not in the config {sorted(missing)}, not in the settings {sorted(extra)}")
    prefix = f"{where}." if where else ""
    return cls(**{n: _coerce(hints[n], data[n], prefix + n) for n in names})
