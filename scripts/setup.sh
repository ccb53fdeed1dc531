#!/usr/bin/env bash
# Sets up everything splitflower needs on a fresh Debian-like machine: a virtual
# environment with the CPU build of torch, the project and its dev tools, and the
# Fashion-MNIST files from Debian's package. Safe to run again: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# torch first: with it present, the project's "torch>=2.2" installs nothing more (otherwise
# pip would pull a multi-GB CUDA build).
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION}" 2>&1 | grep -v "^WARNING: Location" || true
fi
.venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, flwr, splitflower.strategies, splitflower.algorithms" \
  || { echo "setup: the environment does not import; see pip's output above" >&2; exit 1; }

if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${SPLITFLOWER_FASHION_MNIST:-}" ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null
  elif command -v sudo >/dev/null; then
    sudo apt-get update -q >/dev/null && sudo apt-get install -y -q dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST missing; run 'apt-get install dataset-fashion-mnist' as root" \
         "or set SPLITFLOWER_FASHION_MNIST to a folder with its four IDX files" >&2
  fi
fi

export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0 \
  FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 HF_HUB_OFFLINE=1 GRPC_ENABLE_FORK_SUPPORT=0
