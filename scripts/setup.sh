#!/usr/bin/env bash
# Set up everything xcit needs on a fresh Debian machine: the Fashion-MNIST dataset (Debian
# package), a virtual environment in .venv with PyTorch, and this package with its test extras.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "[setup] installing the Fashion-MNIST dataset (Debian package dataset-fashion-mnist)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi

if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo "[setup] installing PyTorch (torch 2.14.1, torchvision 0.29.1)"
  .venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
fi

echo "[setup] installing xcit and its test dependencies"
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
# Real annotated images for the dense tasks ship inside these wheels (only their data files are read;
# --no-deps skips their heavy dependencies). Licences: stardist BSD-3-Clause, deepforest MIT.
.venv/bin/pip install -q --disable-pip-version-check --no-deps stardist==0.9.2 deepforest==2.1.0
echo "[setup] done: $(.venv/bin/python -c 'import torch, xcit; print(f"xcit {xcit.__version__}, torch {torch.__version__}")')"
