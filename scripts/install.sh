#!/usr/bin/env bash
# Set up pocketlm in ./.venv: the CPU build of PyTorch, then pocketlm with its test dependencies.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch==2.13.0 resolves to the CPU wheel on this machine; a bare `torch` would pull a multi-GB CUDA build.
# On a machine that already has torch>=2.11 (a GPU box), keep it.
python -c "import torch, sys; sys.exit(0 if tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])) >= (2, 11) else 1)" 2>/dev/null \
  || python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
# pocketlm's CPU kernels (quant/kernels.c) for this machine's instruction set, built once into ~/.cache/pocketlm
# (they would otherwise be built on first use; without a C compiler pocketlm runs its reference path)
python -m pocketlm.quant.kernels || echo "note: the CPU kernels did not build; quantized models use the slower path"
echo "pocketlm installed in $(pwd)/.venv ($(python -c 'import torch; print("torch", torch.__version__)'))"
