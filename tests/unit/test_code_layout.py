"""Rules of the source layout (issue 17): no two modules share a name, and configuration is read
through the typed settings only."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from conftest import REPO

PKG = REPO / "src" / "liflow_screen"


def test_no_two_modules_share_a_name() -> None:
    """Module files (except ``__init__``/``__main__``) and packages have names unique under src/."""
    seen: dict[str, list[str]] = defaultdict(list)
    for f in PKG.rglob("*.py"):
        if f.name in ("__init__.py", "__main__.py"):
            continue
        seen[f.stem].append(str(f.relative_to(PKG)))
    for d in PKG.rglob("__init__.py"):
        if d.parent != PKG:
            seen[d.parent.name].append(str(d.parent.relative_to(PKG)) + "/")
    twins = {k: v for k, v in seen.items() if len(v) > 1}
    assert not twins, f"modules sharing a name: {twins}"


def test_each_cli_stage_has_its_stage_module() -> None:
    """``liflow-screen <stage>`` is run by ``stages/run_<stage>.py`` (hyphens as underscores)."""
    from liflow_screen import cli

    stages = {p.stem for p in (PKG / "stages").glob("run_*.py")}
    for name in cli._COMMANDS:
        if name in ("validate-config", "verify", "train-selector"):
            continue  # config / results-folder utilities; train-selector is run_train's
        assert "run_" + name.replace("-", "_") in stages, name


def test_config_is_read_through_the_typed_settings_only() -> None:
    """No module walks the config dict: ``cfg["`` appears only in config loading (core/config.py,
    the validation and cross-key rules), and only core/settings.py imports the config loader."""
    walkers, loaders = [], []
    for f in PKG.rglob("*.py"):
        rel = str(f.relative_to(PKG))
        text = f.read_text()
        if 'cfg["' in text and rel != "core/config.py":
            walkers.append(rel)
        if re.search(r"from \.+core import config\b|from \.+core\.config import|from \. import config\b", text) \
                and rel not in ("core/settings.py",):
            loaders.append(rel)
    assert not walkers, f"modules walking the config dict: {walkers}"
    assert not loaders, f"modules importing the config loader instead of the settings: {loaders}"


def test_settings_name_exactly_the_schema_keys() -> None:
    """Every schema key is a settings field and the reverse (the builder refuses a mismatch), with the
    field types the builder can cast; the defaults build."""
    import dataclasses

    from liflow_screen.core import config
    from liflow_screen.core.settings import Settings

    sch = config.schema()

    def keys(s: dict) -> set[str]:
        return set(s.get("properties", {}))

    s = Settings.defaults()
    assert keys(sch) == {f.name for f in dataclasses.fields(Settings)} - {"config"}
    for name, sub in sch["properties"].items():
        if sub.get("type") == "object" and "properties" in sub:
            section = getattr(s, name)
            assert keys(sub) == {f.name for f in dataclasses.fields(section)}, name
    assert s.md.temperatures == (600.0, 1000.0) and isinstance(s.rollout.n_steps, int)


def test_settings_builder_casts_once_and_refuses_unknown_keys() -> None:
    import pytest

    from liflow_screen.core.errors import ConfigError
    from liflow_screen.core.settings import Settings, _build, AnalysisSettings

    raw = dict(Settings.defaults().config["analysis"])
    raw.update(target_temperature=300, rdf_bins=50, metric_tau_ps=None)
    a = _build(AnalysisSettings, raw, "analysis")
    assert type(a.target_temperature) is float and a.target_temperature == 300.0 and a.metric_tau_ps is None
    with pytest.raises(ConfigError, match="disagree.*not in the settings \\['extra'\\]"):
        _build(AnalysisSettings, {**raw, "extra": 1}, "analysis")
    with pytest.raises(dataclasses_frozen_error()):
        a.top_n = 3  # frozen


def dataclasses_frozen_error() -> type[Exception]:
    import dataclasses

    return dataclasses.FrozenInstanceError
