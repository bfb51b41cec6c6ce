"""Shared pytest fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
sys.path.insert(0, str(Path(__file__).parent))  # tests/mp_server.py etc.

REPO = Path(__file__).resolve().parents[1]


def make_settings(raw: dict | None = None):
    """Typed settings of a config given as a dict (validated, schema defaults filled)."""
    from liflow_screen.core import config
    from liflow_screen.core.settings import Settings

    return Settings.from_config(config.validate(raw or {}))


@pytest.fixture
def default_settings():
    """The settings of the schema defaults only."""
    return make_settings({})


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a test module (small graphs on a shared 2-core machine:
    a second thread only spin-waits and makes small steps ~10x slower under load); restored after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def parity_errors(prop, corr, fixture, structure: str) -> dict:
    """Max |ours - reference| (Å) of one structure of the parity fixture (``tests/data/parity_fixture.npz``,
    the reference implementation's outputs; provenance in ``tests/data/README.md``):
    ``evals`` {(k, "P"|"C"): error} of the Propagator / Corrector outputs, ``after_P`` and ``next``
    of the whole 1-ps step, and ``move`` (the step's largest displacement, to show it is a real move)."""
    import numpy as np
    import torch

    from liflow_screen.flow.graph import make_batch
    from liflow_screen.flow.engine import liflow_step

    fx, s = fixture, structure
    nums, pos, cell = fx[f"{s}/numbers"], fx[f"{s}/positions"], fx[f"{s}/cell"]
    out: dict = {"evals": {}}
    with torch.no_grad():
        for k in range(3):
            e = f"{s}/eval{k}"
            g = make_batch([nums], [pos], [cell], [float(fx[f"{e}/T"])])
            t = torch.tensor([float(fx[f"{e}/t"])])
            for model, tag in ((prop, "P"), (corr, "C")):
                v = model(torch.as_tensor(fx[f"{e}/D_{tag}"]), t, g).numpy()
                out["evals"][(k, tag)] = float(np.abs(v - fx[f"{e}/v_{tag}"]).max())
        g = make_batch([nums], [pos], [cell], [float(fx[f"{s}/step/T"])])
        x_p, x_next = liflow_step(prop, corr, g, torch.as_tensor(fx[f"{s}/step/D0_P"]),
                                  torch.as_tensor(fx[f"{s}/step/D0_C"]), n_flow=10)
    out["after_P"] = float(np.abs(x_p.numpy() - fx[f"{s}/step/X_after_P"]).max())
    out["next"] = float(np.abs(x_next.numpy() - fx[f"{s}/step/X_next"]).max())
    out["move"] = float(np.abs(x_next.numpy() - pos).max())
    return out


GOLDEN = REPO / "tests" / "golden"
GOLDEN_FILES = ("ranking.csv", "metrics.csv", "diffusivity.csv")


def assert_golden(name: str, reports: Path) -> None:
    """The run's ranking, metrics and diffusivity tables are byte-identical to ``tests/golden/<name>/``.

    The golden files were written by the same test before the layout and settings refactor (issue 17);
    a change of behaviour fails here. After an intended change of numbers, rewrite them with
    ``LIFLOW_WRITE_GOLDEN=1 pytest <the test>`` and say why in the commit.
    """
    want = GOLDEN / name
    if os.environ.get("LIFLOW_WRITE_GOLDEN") == "1":
        want.mkdir(parents=True, exist_ok=True)
        for f in GOLDEN_FILES:
            (want / f).write_bytes((reports / f).read_bytes())
        return
    for f in GOLDEN_FILES:
        got, ref = (reports / f).read_bytes(), (want / f).read_bytes()
        if got != ref:
            import difflib

            diff = "\n".join(list(difflib.unified_diff(ref.decode().splitlines(), got.decode().splitlines(),
                                                       f"golden/{name}/{f}", f"run/{f}", lineterm=""))[:40])
            raise AssertionError(f"{f} of the {name} run differs from tests/golden/{name}/{f}:\n{diff}")
