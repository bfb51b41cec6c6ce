"""Rollouts on CPU are bit-reproducible for a given seed and thread count, across processes.

Each run is a separate Python process (fresh allocator, fresh MKL / OpenMP state), as two workflow
runs are. The models: the authors' published universal Propagator + Corrector when
``../shared/liflow-reference`` holds them (real, chaotic dynamics: the most sensitive case), else
Table-A2-size models with seeded random weights.
"""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

SHARED = REPO.parent / "shared" / "liflow-reference"

SCRIPT = r"""
import hashlib, sys
from liflow_screen.cli import reproducible_math_env
reproducible_math_env()                      # what the CLI does before torch is imported
import numpy as np, torch
torch.set_num_threads(2)
from pymatgen.util.testing import PymatgenTest
from liflow_screen.flow.graph import make_batch
from liflow_screen.flow.painn import FlowModel
from liflow_screen.flow.training import prior_sigma_for
from liflow_screen.flow.engine import rollout
from liflow_screen.core import seeds

shared = sys.argv[1]
if shared:
    from liflow_screen.flow import published as pub
    models = []
    for name in ("P_universal", "C_universal"):
        out = sys.argv[2] + f"/{name}.pt"
        pub.import_checkpoint(f"{shared}/{name}.ckpt", out)
        from liflow_screen.flow.training import load_flow
        models.append(load_flow(out))
    prop, corr = models
    prior_p, prior_c = prop.liflow_meta["prior"], corr.liflow_meta["prior"]
else:
    prop, corr = FlowModel(seed=1).eval(), FlowModel(seed=2).eval()
    prior_p = {"kind": "adaptive", "prior_li": [1.0, 10.0], "prior_frame": [0.316, 3.16]}
    prior_c = {"kind": "uniform", "scale": 0.1, "sigma_max": 0.25}
s = PymatgenTest.get_structure("LiFePO4")
s2 = s * (2, 1, 1)
nums = [np.array([x.specie.Z for x in t]) for t in (s, s2)]
g = make_batch(nums, [t.cart_coords for t in (s, s2)], [t.lattice.matrix for t in (s, s2)], [900.0, 1200.0])
fast = torch.tensor([False, False])
sp = prior_sigma_for(g, prior_p, fast, ~fast)
sc = prior_sigma_for(g, prior_c, fast, ~fast)
gens = [seeds.rollout_key(7, "LiFePO4", 900.0, seeds.ROLLOUT), seeds.rollout_key(7, "LiFePO4x2", 1200.0, seeds.ROLLOUT)]
with torch.no_grad():
    res = rollout(prop, corr, g, sp, sc, n_steps=6, n_flow=5, generator=gens, retries=0)
print(hashlib.sha256(res.positions.numpy().tobytes()).hexdigest(), float(res.positions.abs().max()))
"""


def test_rollout_bytes_identical_in_two_processes(tmp_path):
    shared = str(SHARED) if (SHARED / "P_universal.ckpt").is_file() else ""
    outs = []
    for k in range(2):
        d = tmp_path / f"run{k}"
        d.mkdir()
        proc = subprocess.run([sys.executable, "-c", SCRIPT, shared, str(d)], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(proc.stdout.split())
    (h0, m0), (h1, _) = outs
    assert float(m0) > 0 and h0 == h1
