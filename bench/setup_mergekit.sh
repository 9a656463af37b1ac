#!/usr/bin/env bash
# Create bench/.venv-mergekit: mergekit from PyPI in its own environment (git-ignored).
#
# torch is installed FIRST and pinned (torch==2.13.0, the same CPU build as the project's venv;
# this machine's pip constraints cap torch at <=2.14.1). mergekit 0.1.5 (latest on PyPI) only
# requires torch>=2.0.0, so the normal resolver keeps our torch and no --no-deps is needed.
# If a future mergekit pinned an incompatible torch, install it with
#   pip install --no-deps mergekit==X && pip install <its Requires-Dist minus torch>
# (see `pip show mergekit`).
#
# Usage: bench/setup_mergekit.sh [MERGEKIT_VERSION]     (default 0.1.5)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="$HERE/.venv-mergekit"
MK_VERSION="${1:-0.1.5}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
# psutil: the bench's RSS sampler can run from either venv; the harness itself uses os.wait4.
"$VENV/bin/pip" install -q "mergekit==$MK_VERSION" "torch==$TORCH_VERSION" psutil

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch
print("torch", torch.__version__, "| mergekit", md.version("mergekit"),
      "| transformers", md.version("transformers"))
PY
"$VENV/bin/mergekit-yaml" --help > /dev/null
echo "mergekit-yaml --help: ok ($VENV/bin/mergekit-yaml)"
