"""The authors' published LiFlow models: safe checkpoint import, element table, resolution.

The LiFlow authors published trained Propagator / Corrector models (MIT License) with their
reference implementation (GitHub ``learningmatter-mit/liflow``, commit e6fc475): universal models
trained on MACE-MP-0 MD of 4,186 Li materials (600-1200 K, Δτ = 1 ps), and single-material models
of Li10GeP2S12 (LGPS, AIMD, Δτ = 670 x 1.5 fs = 1.005 ps) and Li3PS4 (LPS, AIMD, Δτ = 1 ps).

Their files are PyTorch Lightning checkpoints, i.e. pickles. A downloaded pickle is untrusted
input, so it is read with torch's *weights-only* unpickler, which builds nothing but tensors and
plain containers; the only other classes allowed are inert stand-ins for the five OmegaConf
config classes of the hyper-parameters (they just hold their state and are converted to plain
dicts / lists). A file that names any other global (e.g. a function to call) is refused.

Import writes the project's own flow-model checkpoint (``flow.training.CKPT_FORMAT``): weights
renamed to :class:`~liflow_screen.flow.painn.FlowModel` (whose conventions match), the element
table (Z -> embedding row), the prior settings, Δτ, and provenance (source file, SHA-256, license,
settings the checkpoint implies).

Shipped copies: the universal Propagator and Corrector (``P_universal``, ``C_universal``) ship with
the package, already imported (``data/models/*.pt``, with the authors' LICENSE and a
``PROVENANCE.json`` recording the source files' SHA-256 and the shipped files' SHA-256; made by
``scripts/ship_published_models.py``). Resolution (:func:`resolve_published`): an explicit path,
else the cache, else the shipped copy, else a download (so the single-material models, which do not
ship, still download). :func:`import_checkpoint` accepts an already imported checkpoint such as a
shipped copy: it copies it (re-tabling the elements if an ``element_index`` is given).

Element table: embedding rows are indexed by the training set's element index (``element_index.npy``
in the authors' dataset archive, not reachable offline). The checkpoints themselves pin rows for
Z <= 32 (H, Li, Be, B, C, N, O, F, Na, ..., Ge -> 0..28; He, Ne, Ar absent): only those rows of the
single-material models were ever trained (LPS: Li, P, S = 1, 12, 13; LGPS: + Ge = 28). Those are
built in; rows for heavier elements need the user's ``element_index.npy``. Rows the training never
updated (Adam's second moment is exactly zero there: e.g. all but Li, P, S, Ge in the LGPS models)
are left out of the table, so a structure with such an element gets a status row, not a random
embedding.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import math
import os
import shutil
import typing
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import InputError, LiflowError
from ..core.settings import Settings
from ..io.files import atomic_path, provenance, sha256_of
from .painn import N_Z, FlowModel

log = logging.getLogger(__name__)

REPOSITORY = "learningmatter-mit/liflow"
COMMIT = "e6fc475361d046865f12cae1aee11c4f56c48d87"
LICENSE_NAME = "MIT License, Copyright (c) 2024 Learning Matter @ MIT"
LICENSE_URL = f"https://github.com/{REPOSITORY}/blob/{COMMIT}/LICENSE"
DEFAULT_BASE_URL = f"https://raw.githubusercontent.com/{REPOSITORY}/{COMMIT}/ckpt/"


@dataclass(frozen=True)
class PublishedModel:
    """One published checkpoint: file name in the authors' ``ckpt/`` folder, SHA-256, Δτ (ps)."""

    name: str
    file: str
    sha256: str
    kind: str            # propagator | corrector
    delta_tau_ps: float  # the training pairs' time lag
    trained_on: str

    def url(self, base_url: str | None = None) -> str:
        """Download address: ``base_url`` + file name, default the authors' repository at COMMIT."""
        return (base_url or DEFAULT_BASE_URL).rstrip("/") + "/" + self.file


#: The published checkpoints (SHA-256 of the files at commit e6fc475).
PUBLISHED: dict[str, PublishedModel] = {m.name: m for m in (
    PublishedModel("P_universal", "P_universal.ckpt",
                   "41c1763f56ec1666bc7bbf2a9a17971633bb1e59d4ea4a75cbf0cf999dd50f2d", "propagator", 1.0,
                   "MACE-MP-0 small MD of 4,186 Li materials, 600-1200 K, 25 ps (paper Table 1)"),
    PublishedModel("C_universal", "C_universal.ckpt",
                   "a38418094109e250f31cfd4860da485403c0a39b5968a7733f94ab925f557088", "corrector", 1.0,
                   "MACE-MP-0 small MD of 4,186 Li materials, 600-1200 K, 25 ps (paper Table 1)"),
    PublishedModel("P_LGPS", "P_LGPS.ckpt",
                   "b8785d2441264aaba1319814337e9b7712bf4215b03bb233f35cc5936b7f442e", "propagator", 1.005,
                   "AIMD of Li10GeP2S12 2x2x1 (200 atoms), 650-1400 K, first 25 ps (paper section 4.3)"),
    PublishedModel("C_LGPS_0.1", "C_LGPS_0.1.ckpt",
                   "56b497d9b14e3af0a61f17e814e2a992611d5350806bc774acbeb0018e562f6d", "corrector", 1.005,
                   "AIMD of Li10GeP2S12 2x2x1, Corrector noise maximum 0.1 Å (paper section 4.3)"),
    PublishedModel("P_LPS", "P_LPS.ckpt",
                   "d1c022f55c75ad55f7a382aa743af99749d718cde2f61c4e1ce87f9ce37b3a23", "propagator", 1.0,
                   "AIMD of alpha/beta/gamma-Li3PS4, 600-800 K, first 25 ps (paper section 4.3)"),
    PublishedModel("C_LPS", "C_LPS.ckpt",
                   "883ed18414ebbc8b987a61860f206c021352981e9a76638ef463cd691af5331a", "corrector", 1.0,
                   "AIMD of alpha/beta/gamma-Li3PS4, Corrector noise maximum 0.1 Å (paper section 4.3)"),
)}
_BY_SHA = {m.sha256: m for m in PUBLISHED.values()}

#: Elements whose embedding row the published checkpoints pin (Z <= 32 without He, Ne, Ar), in row order.
PINNED_ELEMENTS = (1, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28,
                   29, 30, 31, 32)


# --------------------------------------------------------------------------- safe unpickling
class _ConfigNode:
    """Inert stand-in for an OmegaConf node: keeps the pickled state, runs no code of its own."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class _DictConfig(_ConfigNode):
    pass


class _ListConfig(_ConfigNode):
    pass


class _AnyNode(_ConfigNode):
    pass


class _Metadata(_ConfigNode):
    pass


class _ContainerMetadata(_ConfigNode):
    pass


def _plain_dict(*_args: Any) -> dict:
    """Stand-in for ``collections.defaultdict`` (OmegaConf's resolver cache): a plain dict."""
    return {}


#: The globals a Lightning checkpoint of the reference code names besides tensors, mapped to inert stand-ins.
_ALLOWED_GLOBALS: list[Any] = [
    (_DictConfig, "omegaconf.dictconfig.DictConfig"),
    (_ListConfig, "omegaconf.listconfig.ListConfig"),
    (_AnyNode, "omegaconf.nodes.AnyNode"),
    (_Metadata, "omegaconf.base.Metadata"),
    (_ContainerMetadata, "omegaconf.base.ContainerMetadata"),
    (typing.Any, "typing.Any"),
    (_plain_dict, "collections.defaultdict"),
    dict, list, int,  # type objects named in the config metadata (object_type, key_type)
]


def _plain(x: Any) -> Any:
    """OmegaConf stand-ins -> plain dicts / lists / values."""
    if isinstance(x, _DictConfig):
        return {str(k): _plain(v) for k, v in (x.__dict__.get("_content") or {}).items()}
    if isinstance(x, _ListConfig):
        return [_plain(v) for v in (x.__dict__.get("_content") or [])]
    if isinstance(x, _AnyNode):
        return x.__dict__.get("_val")
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def read_lightning_checkpoint(path: str | os.PathLike[str]
                              ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model state dict without the ``model.`` prefix, hyper-parameter config as plain dicts,
    training info: global_step, epoch, Lightning version).

    Weights-only unpickling with the OmegaConf stand-ins allowed; anything else is refused with an
    InputError (one line).
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"checkpoint not found: {p}")
    try:
        with torch.serialization.safe_globals(_ALLOWED_GLOBALS):
            ck = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        detail = str(exc)
        marker = "WeightsUnpickler error:"
        if marker in detail:
            detail = detail.split(marker, 1)[1].strip().splitlines()[0]
        else:
            detail = f"{type(exc).__name__}: {detail.splitlines()[0] if detail else ''}"
        raise InputError(f"refusing to load {p}: not a plain weights checkpoint ({detail[:200]})") from exc
    if not isinstance(ck, dict) or "state_dict" not in ck or "hyper_parameters" not in ck:
        raise InputError(f"{p} is not a LiFlow Lightning checkpoint (no state_dict / hyper_parameters)")
    hp = _plain(ck["hyper_parameters"])
    hp = hp.get("cfg", hp) if isinstance(hp, dict) else None  # the Lightning module saved its config as "cfg"
    if not isinstance(hp, dict) or "model" not in hp:
        raise InputError(f"{p}: hyper_parameters carry no model config")
    state = {k.removeprefix("model."): v for k, v in ck["state_dict"].items() if k.startswith("model.")}
    if not state:
        raise InputError(f"{p}: state_dict has no model.* parameters")
    info = {k: ck.get(k) for k in ("global_step", "epoch", "pytorch-lightning_version")}
    info["trained_rows"] = _trained_embedding_rows(ck, state.get("atom_embedding.weight"))
    return state, hp, info


def _trained_embedding_rows(ck: dict[str, Any], embedding: torch.Tensor | None) -> list[int] | None:
    """Embedding rows the training ever updated: Adam's second moment is exactly zero on rows whose
    gradient was always zero (elements absent from the training set). None if not recorded."""
    if embedding is None:
        return None
    hits = []
    for opt in ck.get("optimizer_states") or []:
        for st in (opt.get("state") or {}).values():
            sq = st.get("exp_avg_sq") if isinstance(st, dict) else None
            if isinstance(sq, torch.Tensor) and sq.shape == embedding.shape:
                hits.append(sq)
    if len(hits) != 1:
        return None
    return torch.nonzero(hits[0].abs().sum(dim=1) > 0).reshape(-1).tolist()


# --------------------------------------------------------------------------- element table
def builtin_element_rows() -> np.ndarray:
    """(119,) Z -> row for the rows the published checkpoints pin; -1 elsewhere."""
    rows = np.full(N_Z, -1, dtype=np.int64)
    rows[list(PINNED_ELEMENTS)] = np.arange(len(PINNED_ELEMENTS))
    return rows


def element_rows_from_file(path: str | os.PathLike[str], n_elements: int) -> np.ndarray:
    """(119,) Z -> row from a dataset's ``element_index.npy`` (array indexed by Z).

    Entries outside [0, n_elements) are absent. A row claimed by several elements cannot tell them
    apart: those elements are left out (with a warning) unless the pinned rows settle them. The
    table must agree with the rows the checkpoints pin (else InputError).
    """
    p = Path(path)
    try:
        arr = np.load(p, allow_pickle=False)
    except Exception as exc:
        raise InputError(f"cannot read element table {p}: {type(exc).__name__}") from exc
    arr = np.asarray(arr).reshape(-1)
    if arr.dtype.kind not in "iu" or arr.size == 0 or arr.size > N_Z:
        raise InputError(f"{p}: an element table is an integer array indexed by atomic number (<= {N_Z} entries)")
    rows = np.full(N_Z, -1, dtype=np.int64)
    rows[:arr.size] = arr
    rows[(rows < 0) | (rows >= n_elements)] = -1
    pinned = builtin_element_rows()
    for z in PINNED_ELEMENTS:
        if rows[z] != pinned[z]:
            raise InputError(f"{p}: element Z={z} has row {rows[z]}, but the checkpoints pin row {pinned[z]}")
    values, counts = np.unique(rows[rows >= 0], return_counts=True)
    for row in values[counts > 1]:
        zs = np.flatnonzero(rows == row)
        keep = [z for z in zs if pinned[z] == row]
        drop = [int(z) for z in zs if z not in keep]
        log.warning("%s: row %d is claimed by Z = %s; keeping %s, leaving out %s", p, row, zs.tolist(), keep, drop)
        rows[drop] = -1
    return rows


#: Embedding rows of every published checkpoint (their ``n_elements``).
PUBLISHED_N_ELEMENTS = 77


def screening_elements(settings: Settings) -> frozenset[int] | None:
    """Atomic numbers a published-models-only screening can roll out (the built-in table, or
    ``pretrained.element_index``); None when something else also uses every structure (trained
    variants), so every structure needs its relaxation. The rollout stage still checks each
    checkpoint's own trained rows; this is the upper bound the md stage uses to skip relaxations
    nothing would use."""
    pre = settings.pretrained
    if not pre.propagator or settings.train.variants:
        return None
    rows = (element_rows_from_file(pre.element_index, PUBLISHED_N_ELEMENTS) if pre.element_index
            else builtin_element_rows())
    return frozenset(int(z) for z in np.flatnonzero(rows >= 0))


# --------------------------------------------------------------------------- import
def _check_buffers(state: dict[str, torch.Tensor], hp: dict[str, Any], src: Path) -> None:
    """The reference's fixed buffers must be those FlowModel computes from the hyper-parameters."""
    rc, radial = float(hp["cutoff"]), int(hp["radial"])
    expect = {
        "radial_embedding.freqs": torch.arange(1, radial + 1, dtype=torch.float32) * math.pi / rc,
        "radial_embedding.prefactor": torch.tensor(math.sqrt(2.0 / rc)),
        "cutoff_fn.r_max": torch.tensor(rc),
    }
    for key, val in expect.items():
        if key not in state:
            raise InputError(f"{src}: missing {key}")
        if not torch.allclose(state[key].float(), val, rtol=1e-6, atol=1e-6):
            raise InputError(f"{src}: {key} does not match a Bessel basis of {radial} functions with cutoff {rc} Å")


def flow_model_from_reference(state: dict[str, torch.Tensor], hp: dict[str, Any], src: Path,
                              element_rows: np.ndarray) -> FlowModel:
    """A FlowModel carrying the reference model's weights (conventions match; keys renamed)."""
    m = hp["model"]
    if m.get("prediction_mode", "velocity") not in (None, "velocity"):
        raise InputError(f"{src}: prediction_mode {m['prediction_mode']!r} is not supported (velocity only)")
    hp = dict(features=int(m["num_features"]), radial=int(m["num_radial_basis"]), layers=int(m["num_layers"]),
              cutoff=float(m["r_max"]), offset=float(m.get("r_offset", 0.0)), n_elements=int(m["num_elements"]),
              ref_temp=float(m.get("ref_temp", 1000.0)), seed=0)
    _check_buffers(state, hp, src)
    model = FlowModel(**hp)
    ours = {k: v for k, v in state.items() if k not in ("radial_embedding.prefactor", "cutoff_fn.r_max")}
    ours["element_rows"] = model.element_rows
    mine = model.state_dict()
    missing = sorted(set(mine) - set(ours))
    extra = sorted(set(ours) - set(mine))
    if missing or extra:
        raise InputError(f"{src}: parameters do not match a LiFlow flow model (missing {missing[:3]}, "
                         f"unexpected {extra[:3]})")
    for k, v in ours.items():
        if tuple(v.shape) != tuple(mine[k].shape):
            raise InputError(f"{src}: {k} has shape {tuple(v.shape)}, expected {tuple(mine[k].shape)}")
    model.load_state_dict(ours)
    model.set_element_rows(torch.as_tensor(element_rows))
    return model.eval()


def _prior_from_config(kind: str, hp: dict[str, Any], src: Path) -> dict[str, Any]:
    """The prior settings of the project's checkpoint format from the reference config."""
    if kind == "corrector":
        prior, noise = hp.get("correct_prior", {}), hp.get("correct_noise", {})
        if prior.get("class_name") != "MaxwellBoltzmannPrior":
            raise InputError(f"{src}: unsupported Corrector prior {prior.get('class_name')!r}")
        return {"kind": "uniform", "scale": float(prior["params"]["scale"]),
                "sigma_max": float(noise.get("params", {}).get("scale", math.nan))}
    prior = hp.get("propagate_prior", {})
    name, params = prior.get("class_name"), prior.get("params", {})
    if name == "AdaptiveMaxwellBoltzmannPrior":
        scale = params["scale"]
        return {"kind": "adaptive", "prior_li": [float(x) for x in scale[0]],
                "prior_frame": [float(x) for x in scale[1]]}
    if name == "MaxwellBoltzmannPrior":
        return {"kind": "uniform", "scale": float(params["scale"])}
    if name == "NormalPrior":
        return {"kind": "isotropic", "scale": float(params["scale"])}
    raise InputError(f"{src}: unsupported Propagator prior {name!r}")


def import_checkpoint(src: str | os.PathLike[str], out: str | os.PathLike[str],
                      element_index: str | os.PathLike[str] | None = None,
                      delta_tau_ps: float | None = None, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Convert a published Lightning checkpoint into the project's flow-model checkpoint at ``out``.

    ``src`` may also be an already imported checkpoint of this project's format (a shipped copy from
    :func:`shipped_model`, or an earlier import): it is copied byte for byte, or, with an
    ``element_index``, copied with that element table.

    ``element_index``: the dataset's ``element_index.npy`` (else the built-in pinned rows).
    ``delta_tau_ps``: Δτ of the model in ps; known for the published files (by SHA-256), required
    for any other file. Returns the metadata written (kind, prior, hparams, Δτ, provenance).
    """
    from .training import CKPT_FORMAT

    src = Path(src)
    digest = sha256_of(src)
    imported = _imported_checkpoint(src, digest)
    if imported is not None:
        return _copy_imported(src, imported, digest, out, element_index, delta_tau_ps, config)
    known = _BY_SHA.get(digest)
    state, hp, info = read_lightning_checkpoint(src)
    task = hp.get("task")
    kind = {"propagate": "propagator", "correct": "corrector"}.get(task)
    if kind is None:
        raise InputError(f"{src}: task {task!r} is neither 'propagate' nor 'correct'")
    if known is not None and known.kind != kind:
        raise InputError(f"{src}: a published {known.kind} file claims task {task!r}")
    if delta_tau_ps is None:
        if known is None:
            raise InputError(f"{src} is not one of the published checkpoints: give its Δτ (--delta-tau-ps)")
        delta_tau_ps = known.delta_tau_ps
    if not delta_tau_ps > 0:
        raise InputError(f"Δτ must be > 0 ps, got {delta_tau_ps}")
    n_elem = int(hp["model"]["num_elements"])
    if element_index is not None:
        rows = element_rows_from_file(element_index, n_elem)
        table_source = f"{element_index} (sha256 {sha256_of(element_index)})"
    else:
        rows = builtin_element_rows()
        table_source = "built-in rows pinned by the published checkpoints (Z <= 32 without He, Ne, Ar)"
    trained = info["trained_rows"]
    untrained = []
    if trained is not None:  # an element whose row was never trained has no usable embedding
        keep = np.isin(rows, trained)
        untrained = [int(z) for z in np.flatnonzero((rows >= 0) & ~keep)]
        rows = np.where(keep, rows, -1)
    model = flow_model_from_reference(state, hp, src, rows)
    prior = _prior_from_config(kind, hp, src)
    meta = {
        "kind": kind, "variant": "published", "prior": prior, "hparams": model.hparams,
        "delta_tau_ps": float(delta_tau_ps),
        "imported_from": {
            "file": str(src.resolve()), "name": known.name if known else src.stem, "sha256": digest,
            "repository": REPOSITORY, "commit": COMMIT if known else None, "license": LICENSE_NAME,
            "license_url": LICENSE_URL, "trained_on": known.trained_on if known else None,
            "training_run": hp.get("name"), "global_step": info["global_step"],
            "element_table": table_source,
            "elements_covered": [int(z) for z in np.flatnonzero(rows >= 0)],
            "elements_untrained": untrained,
            "trained_rows": trained,
            "reference_config": {k: hp.get(k) for k in ("model", "propagate_prior", "correct_prior",
                                                          "correct_noise", "data", "optimizer", "seed")},
        },
    }
    with atomic_path(out) as tmp:
        torch.save({"format": CKPT_FORMAT, **meta, "model": {k: v.clone() for k, v in model.state_dict().items()},
                    "step": 0, "val_loss": float("nan"),
                    "provenance": provenance(config or {}, stage="import-model")}, tmp)
    log.info("imported %s (%s, sha256 %s...) -> %s", src, kind, digest[:12], out)
    return meta


def _imported_checkpoint(src: Path, digest: str) -> dict[str, Any] | None:
    """The contents of ``src`` if it is already a checkpoint of this project's format made by an
    import (a shipped copy, or an earlier ``import-model`` output); None for anything else (e.g. a
    Lightning checkpoint, which the weights-only loader without the OmegaConf stand-ins refuses).
    A shipped file is recognised by its SHA-256 first."""
    from .training import CKPT_FORMAT

    if digest not in _shipped_digests():
        if src.stat().st_size > 64 << 20:
            return None
        try:
            blob = torch.load(src, map_location="cpu", weights_only=True)
        except Exception:
            return None
        if not (isinstance(blob, dict) and blob.get("format") == CKPT_FORMAT):
            return None
    else:
        blob = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(blob.get("imported_from"), dict) or blob.get("variant") != "published":
        raise InputError(f"{src} is a flow-model checkpoint of this project but not an imported published model")
    return blob


def _shipped_digests() -> set[str]:
    try:
        return {rec["sha256"] for rec in shipped_record()["models"].values()}
    except LiflowError:
        return set()


def _copy_imported(src: Path, blob: dict[str, Any], digest: str, out: str | os.PathLike[str],
                   element_index: str | os.PathLike[str] | None, delta_tau_ps: float | None,
                   config: dict[str, Any] | None) -> dict[str, Any]:
    """Import an already imported checkpoint: a byte copy (its SHA-256 recorded in the log), or,
    with an ``element_index``, a copy with that element table (restricted to the trained rows)."""
    from .training import flow_meta

    if delta_tau_ps is not None and abs(float(delta_tau_ps) - float(blob["delta_tau_ps"])) > 1e-12:
        raise InputError(f"{src} is an imported model with Δτ {blob['delta_tau_ps']} ps, not {delta_tau_ps} ps")
    if element_index is None:
        with atomic_path(out) as tmp:
            shutil.copyfile(src, tmp)
            if sha256_of(tmp) != digest:
                raise LiflowError(f"copying {src} to {out} changed its bytes")
        log.info("copied imported model %s (sha256 %s...) -> %s", src, digest[:12], out)
        return flow_meta(out)
    imp = dict(blob["imported_from"])
    trained = imp.get("trained_rows")
    if trained is None:
        raise InputError(f"{src} does not record which embedding rows were trained: import the published .ckpt "
                         "file itself with an element_index")
    rows = element_rows_from_file(element_index, int(blob["hparams"]["n_elements"]))
    keep = np.isin(rows, trained)
    imp["elements_untrained"] = [int(z) for z in np.flatnonzero((rows >= 0) & ~keep)]
    rows = np.where(keep, rows, -1)
    imp["elements_covered"] = [int(z) for z in np.flatnonzero(rows >= 0)]
    imp["element_table"] = f"{element_index} (sha256 {sha256_of(element_index)})"
    imp["copied_from"] = {"file": str(src), "sha256": digest}
    model = FlowModel(**blob["hparams"])
    model.load_state_dict(blob["model"])
    model.set_element_rows(torch.as_tensor(rows))
    new = {**blob, "imported_from": imp, "model": {k: v.clone() for k, v in model.state_dict().items()},
           "provenance": provenance(config or {}, stage="import-model")}
    with atomic_path(out) as tmp:
        torch.save(new, tmp)
    log.info("re-tabled imported model %s (sha256 %s...) with %s -> %s", src, digest[:12], element_index, out)
    return flow_meta(out)


# --------------------------------------------------------------------------- shipped copies
#: The published models that ship with the package (imported), in ``data/models``.
SHIPPED = ("P_universal", "C_universal")
SHIPPED_RECORD = "PROVENANCE.json"


def shipped_dir() -> Path:
    """The package folder of the shipped imported models (``liflow_screen/data/models``)."""
    return Path(str(importlib.resources.files("liflow_screen") / "data" / "models"))


def shipped_record() -> dict[str, Any]:
    """The shipped models' provenance record (``PROVENANCE.json``): source repository, commit and
    SHA-256 of each source file, SHA-256 of each shipped file, conversion tool and date."""
    p = shipped_dir() / SHIPPED_RECORD
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise LiflowError(f"cannot read the shipped models' record {p}: {type(exc).__name__}") from exc
    if not isinstance(rec, dict) or not isinstance(rec.get("models"), dict):
        raise LiflowError(f"{p} has no 'models' table")
    return rec


def shipped_model(name: str) -> Path | None:
    """The shipped imported checkpoint of published model ``name``, its SHA-256 checked against
    ``PROVENANCE.json``; None if ``name`` does not ship (or the file is missing or altered: warned)."""
    if name not in SHIPPED:
        return None
    try:
        rec = shipped_record()["models"].get(name)
    except LiflowError as exc:
        log.warning("%s", exc)
        return None
    p = shipped_dir() / rec["file"] if rec else None
    if p is None or not p.is_file():
        log.warning("the shipped copy of %s is missing (%s)", name, p or shipped_dir())
        return None
    if sha256_of(p) != rec["sha256"]:
        log.warning("the shipped copy %s does not match its recorded SHA-256; not using it", p)
        return None
    return p


# --------------------------------------------------------------------------- resolution
def cache_dir() -> Path:
    """Where downloaded published checkpoints are kept: $LIFLOW_SCREEN_CACHE, else
    $XDG_CACHE_HOME/liflow-screen, else ~/.cache/liflow-screen."""
    env = os.environ.get("LIFLOW_SCREEN_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "liflow-screen"


def resolve_published(name: str, explicit: str | os.PathLike[str] | None = None, download: bool = True,
                      base_url: str | None = None, timeout_s: float = 60.0, shipped: bool = True) -> Path:
    """Path of a published checkpoint: the explicit file, else the cache, else the shipped copy
    (``P_universal``, ``C_universal``: an already imported ``.pt``, see :func:`shipped_model`;
    ``shipped=False`` skips it), else a download into the cache.

    The result is either a Lightning ``.ckpt`` or a shipped imported ``.pt``; :func:`import_checkpoint`
    takes both. A cached or downloaded file is checked against its SHA-256 before it is used.
    Offline with none of these, one LiflowError names them.
    """
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise InputError(f"published model {name}: file not found: {p}")
        return p
    if name not in PUBLISHED:
        raise InputError(f"unknown published model {name!r} (known: {', '.join(PUBLISHED)})")
    model = PUBLISHED[name]
    cached = cache_dir() / model.file
    if cached.is_file():
        if sha256_of(cached) == model.sha256:
            return cached
        log.warning("cached %s has the wrong SHA-256; not using it", cached)
    ship = shipped_model(name) if shipped else None
    if ship is not None:
        log.info("using the shipped copy of %s (%s)", name, ship)
        return ship
    if download:
        try:
            return _download(model, cached, model.url(base_url), timeout_s)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            failure = f"download from {model.url(base_url)} failed ({reason})"
        except LiflowError as exc:
            failure = str(exc)
    else:
        failure = "downloads are off"
    if name in SHIPPED and shipped:
        failure += f"; the shipped copy is missing or altered (reinstall the package: {shipped_dir()})"
    raise LiflowError(f"published model {name} is not available: give its path (pretrained.{model.kind}), "
                      f"or put {model.file} in the cache {cache_dir()}, or allow the download; {failure}")


def _download(model: PublishedModel, dest: Path, url: str, timeout_s: float) -> Path:
    """Download ``model`` from ``url`` into ``dest`` atomically, verifying its SHA-256."""
    log.info("downloading %s from %s", model.file, url)
    with atomic_path(dest) as tmp:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(tmp, "wb") as fh:
            shutil.copyfileobj(resp, fh)
        got = sha256_of(tmp)
        if got != model.sha256:
            raise LiflowError(f"downloaded {model.file} has SHA-256 {got[:16]}..., expected {model.sha256[:16]}...")
    return dest
