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
