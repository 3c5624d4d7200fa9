#!/usr/bin/env bash
# Set up pocketlm in ./.venv: the CPU build of PyTorch, then pocketlm with what running, chatting, serving,
# quantizing, evaluating, training and the data pipeline need (`.[all]`).
#   bash scripts/install.sh          the user install (no test references: no llama.cpp build, no transformers)
#   bash scripts/install.sh --test   also the test dependencies (`.[test]`: reference runtimes, pytest, ...)
# Idempotent: a second run only checks what is there.
set -euo pipefail
EXTRAS=all
for arg in "$@"; do
  case "$arg" in
    --test) EXTRAS=test ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option '$arg' (expected --test)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# --no-compile: no byte-compiling of every installed file (torch alone has thousands); Python compiles the modules
# it imports on first use, so the install is faster and the first run barely slower
# torch==2.13.0 resolves to the CPU wheel on this machine; a bare `torch` would pull a multi-GB CUDA build.
# On a machine that already has torch>=2.11 (a GPU box), keep it.
python -c "import torch, sys; sys.exit(0 if tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])) >= (2, 11) else 1)" 2>/dev/null \
  || python -m pip install --quiet --no-compile "torch==2.13.0"
python -m pip install --quiet --no-compile -e ".[$EXTRAS]"
# pocketlm's CPU kernels (quant/kernels.c) for this machine's instruction set, built once into ~/.cache/pocketlm
# (they would otherwise be built on first use; without a C compiler pocketlm runs its reference path)
python -m pocketlm.quant.kernels || echo "note: the CPU kernels did not build; quantized models use the slower path"
echo "pocketlm installed in $(pwd)/.venv ($(python -c 'import torch; print("torch", torch.__version__)'))"
