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
