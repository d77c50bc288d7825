#!/usr/bin/env bash
# Builds the GPU kit, .gpu-kit/ (git-ignored), here where PyPI is reachable: the wheels the
# borrowed GPU machine lacks (bench/gpu/kit.txt, at constraints.txt's versions, for CPython 3.12
# manylinux x86-64, trimmed of what the check never loads) and SmolLM2's config and tokenizer.
# Prints the kit's size plus the tree's; fails above 60 MiB (a call carries 64). docs/gpu.md.
#
#   bench/gpu/prepare.sh               # the kit (about 30 s)
#   bench/gpu/prepare.sh --rehearsal   # and .gpu-image/, the image's stand-in for the CPU rehearsal
#                                      # (Python 3.12 from pyenv, torch 2.11: a few minutes, ~5 GB)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
"$PY" bench/gpu/kit.py build
if [ "${1:-}" = "--rehearsal" ]; then
  "$PY" bench/gpu/kit.py image
fi
