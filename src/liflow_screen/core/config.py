"""The single config schema: load a YAML config, validate it, fill defaults.

The schema lives in ``liflow_screen/data/config.schema.yaml`` (``workflow/schemas`` links to it),
so the CLI and the Snakefile validate against the same file.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .errors import ConfigError

SCHEMA_RESOURCE = "config.schema.yaml"


def schema() -> dict[str, Any]:
    """The JSON schema (draft 2020-12) of the configuration, as a dict."""
    text = resources.files("liflow_screen.data").joinpath(SCHEMA_RESOURCE).read_text()
    return yaml.safe_load(text)


def _fill_defaults(instance: dict[str, Any], sch: dict[str, Any]) -> None:
    """Recursively insert schema defaults for missing object properties (in place)."""
    for key, sub in sch.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if isinstance(instance.get(key), dict) and sub.get("type") == "object":
            _fill_defaults(instance[key], sub)


def _path_of(err: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in err.absolute_path) or "<top level>"


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Return a validated deep copy of ``config`` with defaults filled.

    Raises ConfigError naming the first offending key (unknown keys included).
    """
    if not isinstance(config, dict):
        raise ConfigError("config must be a mapping of keys to values")
    cfg = copy.deepcopy(config)
    dataset = cfg.get("dataset")
    given_dtau_ps = dataset.get("delta_tau_ps") if isinstance(dataset, dict) else None
    sch = schema()
    _fill_defaults(cfg, sch)
    validator = jsonschema.Draft202012Validator(sch)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        err = errors[0]
        if err.validator == "additionalProperties":
            allowed = sorted(err.schema.get("properties", {}))
            extra = sorted(set(err.instance) - set(allowed))
            where = _path_of(err)
            raise ConfigError(
                f"unknown config key {extra[0]!r} in {where} (allowed: {', '.join(allowed)})"
            )
        raise ConfigError(f"config key {_path_of(err)}: {err.message}")
    _delta_tau_from_frames(cfg, given_dtau_ps)
    _check_consistency(cfg)
    return cfg


def _delta_tau_from_frames(cfg: dict[str, Any], given_ps: float | None) -> None:
    """dataset.delta_tau_frames, when set, defines dataset.delta_tau_ps (a given one must agree)."""
    n = cfg["dataset"]["delta_tau_frames"]
    if n is None:
        return
    md = cfg["md"]
    ps = n * md["timestep_fs"] * md["save_every"] / 1000.0
    if given_ps is not None and abs(float(given_ps) - ps) > 1e-9 * ps:
        raise ConfigError(f"config keys dataset.delta_tau_frames ({n} frames = {ps:g} ps) and dataset.delta_tau_ps "
                          f"({given_ps} ps) disagree: give one of them")
    cfg["dataset"]["delta_tau_ps"] = ps


def _check_consistency(cfg: dict[str, Any]) -> None:
    tr, pre = cfg["train"], cfg["pretrained"]
    if not tr["variants"] and not pre["propagator"]:
        raise ConfigError("nothing to roll out: config key train.variants is empty and pretrained.propagator is not set")
    if tr["init_from"] == "published":
        if not pre["propagator"]:
            raise ConfigError("config key train.init_from is 'published' but pretrained.propagator is not set")
        if set(tr["variants"]) - {"adaptive"}:
            raise ConfigError("config key train.init_from 'published' fine-tunes the published adaptive-prior "
                              f"Propagator: train.variants must be [adaptive], got {tr['variants']}")
        if cfg["rollout"]["corrector"] and not pre["corrector"]:
            raise ConfigError("config key train.init_from is 'published' but pretrained.corrector is not set")
    s = cfg["structures"]
    if s["source"] in ("cif_dir", "manifest", "trajectories") and not s["path"]:
        raise ConfigError(f"config key structures.path is required when structures.source is {s['source']!r}")
    if cfg["md"]["potential"] == "mace-file" and not cfg["md"]["model_path"]:
        raise ConfigError("config key md.model_path is required when md.potential is 'mace-file'")
    md = cfg["md"]
    frame_ps = md["timestep_fs"] * md["save_every"] / 1000.0
    ratio = cfg["dataset"]["delta_tau_ps"] / frame_ps
    if abs(ratio - round(ratio)) > 1e-6:
        raise ConfigError(
            f"config key dataset.delta_tau_ps ({cfg['dataset']['delta_tau_ps']} ps) must be a whole "
            f"number of saved-frame intervals ({frame_ps:g} ps)"
        )


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load YAML config from ``path``, apply shallow-merged ``overrides``, validate."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if overrides:
        raw = deep_merge(raw, overrides)
    return validate(raw)


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated recursively with ``extra`` (neither is modified)."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out
