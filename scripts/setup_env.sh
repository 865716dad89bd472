#!/usr/bin/env bash
# Create the project's virtual environment and install the project into it.
#   scripts/setup_env.sh VENV [EXTRAS]
# Torch: a CUDA build where an NVIDIA GPU answers `nvidia-smi -L`, the CPU build (torch==2.13.0) otherwise.
# Set TORCH_SPEC to override (e.g. TORCH_SPEC="torch==2.13.0+cu128").
set -euo pipefail
venv=${1:-.venv}
extras=${2:-}
python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "error: Python 3.10 or newer is needed (found: $("$python" --version 2>&1))" >&2; exit 1
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip="$venv/bin/python -m pip"
if [ -n "${TORCH_SPEC:-}" ]; then
  torch_spec=$TORCH_SPEC
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "NVIDIA GPU found: installing a CUDA build of torch"
  torch_spec="torch>=2.6,<2.15"
else
  echo "no NVIDIA GPU found: installing the CPU build of torch"
  torch_spec="torch==2.13.0"
fi
if ! $venv/bin/python -c 'import torch' >/dev/null 2>&1; then
  $pip install --quiet "$torch_spec"
fi
if [ -n "$extras" ]; then
  $pip install --quiet -e ".[$extras]"
else
  $pip install --quiet -e .
fi
echo "environment ready in $venv"
