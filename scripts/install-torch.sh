#!/usr/bin/env bash
# Install PyTorch into the given venv before the project, so that pip never picks a build for us.
# With an NVIDIA GPU: PyPI's default torch build (CUDA). Without: the CPU build; on machines
# that carry a local CPU wheel pip finds it through its configured find-links; elsewhere set
# TORCH_CPU_INDEX to PyTorch's CPU wheel index.
set -euo pipefail
venv=${1:-.venv}
version=${TORCH_VERSION:-2.13.0}
if "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$version')" 2>/dev/null; then
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "install-torch: NVIDIA GPU found, installing torch==$version (CUDA build)"
  "$venv/bin/pip" install -q "torch==$version"
else
  echo "install-torch: no NVIDIA GPU, installing torch==$version (CPU build)"
  "$venv/bin/pip" install -q "torch==$version" ${TORCH_CPU_INDEX:+--index-url "$TORCH_CPU_INDEX"}
fi
