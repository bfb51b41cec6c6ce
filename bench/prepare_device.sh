#!/usr/bin/env bash
# Prepare what the GPU machine lacks for `bench/bench_rollout.py --device cuda`, in .devcarry/
# (git-ignored; pass it as `carry`): wheels of ase and vesin(-torch) for its Python 3.12 (its image
# has torch, numpy, pandas, pyarrow, scipy but no ase), and the published LGPS models imported into
# the project's format (from ../shared/liflow-reference). Then, on the GPU machine:
#   python3 -m pip install --no-deps -q .devcarry/wheels/*.whl && PYTHONPATH=$PWD/src \
#     python3 bench/bench_rollout.py --device cuda --lgps-models .devcarry/models --lgps-compile \
#     --traj-out $OUT/lgps_precision_cuda.npz --out $OUT/rollout_cuda.json
# (about 4 min on an H200), and here: python bench/lgps_precision.py <npz> for the D* of each precision.
# For `bench/bench_train.py --device cuda` (ours vs the authors' training step) it also puts the
# authors' liflow package (../liflow-ref, see bench/reference_flowsim.py), the torch-scatter 2.1.2
# source and the wheels their FlowModule imports (lightning, omegaconf, torch_geometric) in .devcarry:
#   python3 -m pip install --no-deps -q .devcarry/wheels/*.whl .devcarry/train-wheels/*.whl && \
#     PYTHONPATH=$PWD/src python3 bench/bench_train.py --device cuda --reference-repo .devcarry/liflow-ref \
#     --torch-scatter-src .devcarry/torch_scatter-2.1.2 --out $OUT/train_cuda.json
# For `bench/bench_md.py --device cuda` (batched MD and relaxation vs the ASE loop, MACE-MP-0 small's
# architecture) it puts mace-torch 0.3.16 and its pure-Python/3.12 dependencies in .devcarry/md-wheels:
#   python3 -m pip install --no-deps -q .devcarry/wheels/*.whl .devcarry/md-wheels/*.whl && \
#     PYTHONPATH=$PWD/src python3 bench/bench_md.py --device cuda --out $OUT/md_cuda.json
# (sizes 1, 8, 64, 256 x 96 atoms, 20 MD + 10 relaxation steps, 2 rounds: a few minutes on an H100/H200).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .devcarry/wheels .devcarry/models
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .devcarry/wheels ase vesin vesin-torch
.venv/bin/python - <<'PY'
from pathlib import Path
from liflow_screen.flow.published import import_checkpoint
src = Path("../shared/liflow-reference")
for name in ("P_LGPS", "C_LGPS_0.1"):
    if (src / f"{name}.ckpt").is_file():
        import_checkpoint(src / f"{name}.ckpt", Path(".devcarry/models") / f"{name}.pt")
PY
mkdir -p .devcarry/train-wheels
.venv/bin/pip download -q --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .devcarry/train-wheels \
  lightning==2.6.6 omegaconf==2.4.0 torch_geometric==2.8.1 --no-deps
.venv/bin/pip download -q --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .devcarry/train-wheels \
  --no-deps lightning-utilities==0.15.3 torchmetrics==1.9.0 pytorch-lightning==2.6.6 \
  fsspec aiohttp aiohappyeyeballs aiosignal frozenlist multidict propcache yarl xxhash attrs psutil tqdm
mkdir -p .devcarry/md-wheels
.venv/bin/pip download -q --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
  -d .devcarry/md-wheels --no-deps mace-torch==0.3.16 e3nn==0.4.4 opt_einsum opt-einsum-fx sympy mpmath torch-ema \
  prettytable wcwidth matscipy h5py torchmetrics lightning-utilities \
  lmdb orjson jsonschema jsonschema-specifications referencing rpds-py attrs pyyaml tqdm matplotlib contourpy \
  cycler fonttools kiwisolver pillow pyparsing
if [ -d ../liflow-ref/liflow ]; then
  rm -rf .devcarry/liflow-ref && mkdir -p .devcarry/liflow-ref && cp -r ../liflow-ref/. .devcarry/liflow-ref/
fi
if [ -d ../liflow-ref-deps/torch_scatter-2.1.2 ]; then
  rm -rf .devcarry/torch_scatter-2.1.2 && cp -r ../liflow-ref-deps/torch_scatter-2.1.2 .devcarry/
fi
du -sh .devcarry
