#!/usr/bin/env bash
# Set up (or update) the project's virtual environment in .venv: CPU torch, then the package
# with every stage family and the test tools. Idempotent; needs only Python >= 3.10 and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# CPU build of torch first (a plain `torch` requirement could pull a multi-GB CUDA build).
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[all,test]"
echo "liflow-screen environment ready: $(.venv/bin/liflow-screen --version)"
