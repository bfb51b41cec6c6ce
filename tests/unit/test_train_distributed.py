"""Training's throughput machinery changes no number: DataLoader workers, and DistributedDataParallel
over 2 processes (gloo, CPU) against 1 process with the doubled batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from liflow_screen.flow.training import ListPairSource, train_flow
from test_train import _cfg, _pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[2]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_loader_workers_give_the_same_training(tmp_path: Path) -> None:
    tr, va = ListPairSource(_pairs(16, seed=5)), ListPairSource(_pairs(4, seed=6))
    for w in (0, 2):
        train_flow("corrector", "uniform", _cfg(val_every=5, loader_workers=w), tr, va, tmp_path / f"w{w}",
                   max_steps=12, progress=False)
    a, b = _weights(tmp_path / "w0/last.pt"), _weights(tmp_path / "w2/last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = (json.loads((tmp_path / f"w{w}/history.json").read_text())["history"] for w in (0, 2))
    assert [h["val_loss"] for h in ha] == [h["val_loss"] for h in hb]


SCRIPT = """
import json, sys
sys.path[:0] = [{tests!r}, {tests!r} + "/.."]
import torch
from liflow_screen.flow.training import ListPairSource, process_group, train_flow
from test_train import _cfg, _pairs

cfg = _cfg(val_every=1, batch_size={batch}, lr=3e-3)
with process_group("cpu"):
    s = train_flow("propagator", "adaptive", cfg, ListPairSource(_pairs(16, seed=5)),
                   ListPairSource(_pairs(4, seed=6)), {out!r}, max_steps={steps}, progress=False)
    if torch.distributed.get_rank() == 1:
        json.dump(s, open({out!r} + "/rank1.json", "w"))
"""


@pytest.mark.timeout(300)
def test_ddp_two_processes_match_one_with_the_doubled_batch(tmp_path: Path) -> None:
    """torchrun, 2 CPU processes (gloo) with batch 8 each train what 1 process does with batch 16:
    the same pairs and noise (every process draws the global batch, trains on its half), gradients
    averaged by DDP. Loss curves and weights agree to float rounding (the all-reduce sums in another
    order), far tighter than the difference a different batch makes."""
    steps = 8
    single = tmp_path / "single"
    train_flow("propagator", "adaptive", _cfg(val_every=1, batch_size=16, lr=3e-3),
               ListPairSource(_pairs(16, seed=5)), ListPairSource(_pairs(4, seed=6)), single, max_steps=steps,
               progress=False)
    ddp = tmp_path / "ddp"
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT.format(tests=str(REPO / "tests" / "unit"), batch=8, out=str(ddp), steps=steps))
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, timeout=280, env=env,
                          cwd=str(REPO / "tests"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    h1 = json.loads((single / "history.json").read_text())
    h2 = json.loads((ddp / "history.json").read_text())
    assert h2["world_size"] == 2 and json.loads((ddp / "rank1.json").read_text())["world_size"] == 2
    l1 = np.array([h["train_loss"] for h in h1["history"]])
    l2 = np.array([h["train_loss"] for h in h2["history"]])
    v1 = np.array([h["val_loss"] for h in h1["history"]])
    v2 = np.array([h["val_loss"] for h in h2["history"]])
    assert len(l1) == len(l2) == steps
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    np.testing.assert_allclose(v2, v1, rtol=1e-5)
    w1, w2 = _weights(single / "last.pt"), _weights(ddp / "last.pt")
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-5
    # a control: one process with batch 8 (half the pairs) trains measurably differently
    half = tmp_path / "half"
    train_flow("propagator", "adaptive", _cfg(val_every=1, batch_size=8, lr=3e-3),
               ListPairSource(_pairs(16, seed=5)), ListPairSource(_pairs(4, seed=6)), half, max_steps=steps,
               progress=False)
    l3 = np.array([h["train_loss"] for h in json.loads((half / "history.json").read_text())["history"]])
    assert np.abs(l3 / l1 - 1).max() > 1e-2
    print(f"DDP 2x8 vs 1x16: train loss max rel. diff {np.abs(l2 / l1 - 1).max():.1e}, val {np.abs(v2 / v1 - 1).max():.1e}, "
          f"weights {max(float((w1[k] - w2[k]).abs().max()) for k in w1):.1e}; 1x8: {np.abs(l3 / l1 - 1).max():.1e}")


@pytest.mark.timeout(300)
def test_train_command_under_torchrun_streams_and_matches_one_process(tmp_path: Path) -> None:
    """The train stage as the workflow runs it with train.processes: 2 (torchrun, gloo), pairs streamed
    from a dataset folder by a DataLoader worker per process: the loss curve of one process with the
    doubled batch and no workers."""
    from test_dataset import SPECS, _cfg as ds_cfg, _fake_md, md_files

    from liflow_screen.stages import run_dataset

    _fake_md(tmp_path / "md", SPECS)
    run_dataset.run(ds_cfg(), tmp_path / "md" / "manifest.parquet", md_files(tmp_path / "md"), tmp_path / "dataset")
    common = ("md: {temperatures: [600, 1000], timestep_fs: 2.0, save_every: 10, duration_ps: 2.0}\n"
              "train: {features: 16, radial: 8, layers: 2, cutoff: 3.0, max_steps: 6, val_every: 2, "
              "val_batches: 2, prior_classes: labels, device: cpu, ")
    (tmp_path / "two.yaml").write_text(common + "batch_size: 4, processes: 2, loader_workers: 1}\n")
    (tmp_path / "one.yaml").write_text(common + "batch_size: 8, processes: 1, loader_workers: 0}\n")
    env = {"OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path)}
    args = ["train", "--threads", "1", "--dataset", "dataset", "--kind", "propagator", "--variant", "adaptive"]
    runs = {"two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "liflow_screen", *args, "--config", "two.yaml", "--out-dir", "out_two"],
            "one": [sys.executable, "-m", "liflow_screen", *args, "--config", "one.yaml", "--out-dir", "out_one"]}
    for cmd in runs.values():
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    h1, h2 = (json.loads((tmp_path / f"out_{k}" / "history.json").read_text()) for k in ("one", "two"))
    assert (h1["world_size"], h2["world_size"], h2["steps"]) == (1, 2, 6)
    np.testing.assert_allclose([h["train_loss"] for h in h2["history"]], [h["train_loss"] for h in h1["history"]],
                               rtol=1e-5)
    np.testing.assert_allclose([h["val_loss"] for h in h2["history"]], [h["val_loss"] for h in h1["history"]],
                               rtol=1e-5)


def test_bf16_autocast_trains_to_the_same_validation_loss(tmp_path: Path) -> None:
    """train.precision: bf16 runs the training forward under autocast: not the fp32 numbers (so it is
    really on), but the validation loss (always fp32) after training within 5 % of fp32's."""
    tr, va = ListPairSource(_pairs(64, seed=1)), ListPairSource(_pairs(16, seed=2))
    vals = {}
    for prec in ("fp32", "bf16"):
        s = train_flow("propagator", "adaptive", _cfg(lr=2e-3, val_every=10, val_batches=4, precision=prec), tr, va,
                       tmp_path / prec, max_steps=200, progress=False)
        vals[prec] = s["best_val"]
        h = json.loads((tmp_path / prec / "history.json").read_text())["history"]
        assert h[-1]["val_loss"] < 0.9 * h[0]["val_loss"], (prec, "did not learn", h[0]["val_loss"], h[-1]["val_loss"])
    a, b = _weights(tmp_path / "fp32/last.pt"), _weights(tmp_path / "bf16/last.pt")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert vals["bf16"] == pytest.approx(vals["fp32"], rel=0.05), vals
    print(f"best validation loss after 200 steps: fp32 {vals['fp32']:.4f}, bf16 {vals['bf16']:.4f}")
