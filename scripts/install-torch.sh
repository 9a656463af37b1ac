#!/usr/bin/env bash
# Install PyTorch into the given venv before the project, so that pip never picks a build for us.
# With an NVIDIA GPU: PyPI's default torch build (CUDA). Without: the CPU build; on machines
# that carry a local CPU wheel pip finds it through its configured find-links; elsewhere set
# TORCH_CPU_INDEX to PyTorch's CPU wheel index.
set -euo pipefail
venv=${1:-.venv}
version=${TORCH_VERSION:-2.13.0}
gpu=
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpu=1
fi
# already there, and with CUDA where there is a GPU
if "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$version' or bool('$gpu' and torch.version.cuda is None))" 2>/dev/null; then
  exit 0
fi
if [ -n "$gpu" ]; then
  echo "install-torch: NVIDIA GPU found, installing torch==$version (CUDA build)"
  # `===`: this version exactly, never a local variant: PEP 440 ranks a `+cpu` wheel that
  # pip's configured find-links may offer above the plain version, so `==` would take it
  "$venv/bin/pip" install -q "torch===$version"
  if ! "$venv/bin/python" -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then
    echo "install-torch: torch $version was installed without CUDA" >&2
    exit 1
  fi
else
  echo "install-torch: no NVIDIA GPU, installing torch==$version (CPU build)"
  "$venv/bin/pip" install -q "torch==$version" ${TORCH_CPU_INDEX:+--index-url "$TORCH_CPU_INDEX"}
fi
