"""Shared pytest fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
sys.path.insert(0, str(Path(__file__).parent))  # tests/mp_server.py etc.

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def default_cfg():
    """The validated default config (schema defaults only)."""
    from liflow_screen import config

    return config.validate({})


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a test module (small graphs on a shared 2-core machine:
    a second thread only spin-waits and makes small steps ~10x slower under load); restored after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
