"""One seeding recipe for every per-(structure, T) stream (liflow_screen.core.seeds)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import torch

from liflow_screen.core import seeds
from liflow_screen.md.integrate import velocity_rng


def test_md_velocities_keep_their_historic_stream() -> None:
    """The MD velocity stream is the root sequence: the same draws as the recipe MD always used
    (default_rng([seed, sha256 key of the id, mK])), so MD outputs did not change."""
    key = int.from_bytes(hashlib.sha256(b"emb-LiCl").digest()[:8], "little")
    want = np.random.default_rng([2, key, 700_000]).normal(size=8)
    np.testing.assert_array_equal(velocity_rng(2, "emb-LiCl", 700.0).normal(size=8), want)


def test_streams_differ_and_repeat() -> None:
    def draw(*args) -> torch.Tensor:
        """Six normal variates of the stream's counter-based noise (atoms 0, 1; step 0, draw 0)."""
        from liflow_screen.flow.priors import counter_normal

        key = torch.tensor([seeds.rollout_key(*args)], dtype=torch.long).expand(2, 2)
        return counter_normal(key, torch.arange(2), torch.tensor([0, 0])).reshape(-1)

    a = draw(0, "x", 900.0, seeds.ROLLOUT)
    assert torch.equal(a, draw(0, "x", 900.0, seeds.ROLLOUT))
    for other in [(0, "x", 900.0, seeds.PILOT), (1, "x", 900.0, seeds.ROLLOUT), (0, "y", 900.0, seeds.ROLLOUT),
                  (0, "x", 901.0, seeds.ROLLOUT)]:
        assert not torch.equal(a, draw(*other)), other
    # the rollout stream is a child of, not equal to, the MD root stream
    root = seeds.trajectory_seed(0, "x", 900.0).generate_state(4)
    child = seeds.trajectory_seed(0, "x", 900.0, seeds.ROLLOUT).generate_state(4)
    assert not np.array_equal(root, child)


def test_independent_of_python_hash_seed() -> None:
    code = "from liflow_screen.core import seeds; print(seeds.trajectory_seed(3, 'emb-Li3N', 1200.0, 1).generate_state(2))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(h)}).stdout for h in (1, 2)}
    assert len(outs) == 1 and outs != {""}
