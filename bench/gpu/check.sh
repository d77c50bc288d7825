#!/usr/bin/env bash
# The GPU check, one tier per command (each at most 8 minutes on one H100; docs/gpu.md):
#
#   bench/gpu/check.sh --tier 1                       # on the borrowed GPU machine: its python3 + .gpu-kit/
#   bench/gpu/check.sh --cpu                          # the rehearsal here: .gpu-image/ + .gpu-kit/, on CPU
#   bench/gpu/check.sh --python .venv/bin/python      # on your own GPU, with your venv (no kit)
#   ... --only a,b                                    # some steps of the tier (a-e; see bench/gpu/tier.py)
#
# Results: $OUT/tier<N>.json and $OUT/tier<N>.md, rewritten after every step (the device tool sets
# OUT; elsewhere it is /tmp/gpu-check), and each step's log beside them.
set -uo pipefail
cd "$(dirname "$0")/../.."
TIER=1 CPU="" PY="" ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tier) TIER=$2; shift 2 ;;
    --cpu) CPU=--cpu; shift ;;
    --python) PY=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    *) echo "usage: bench/gpu/check.sh [--tier 1|2] [--cpu] [--python PY] [--only a,b,...]" >&2; exit 2 ;;
  esac
done
export OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the pipeline from this tree, not installed
if [ -z "$PY" ]; then
  PY=python3
  [ -n "$CPU" ] && PY=.gpu-image/bin/python
  if [ ! -d .gpu-kit/wheels ]; then
    echo "error: .gpu-kit/wheels is missing: run bench/gpu/prepare.sh where PyPI is reachable, and carry .gpu-kit" >&2
    exit 2
  fi
  SITE=${SITE:-/tmp/gpu-kit-site}
  start=$(date +%s)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .gpu-kit/wheels/*.whl || { echo "error: the kit did not install into $SITE" >&2; exit 3; }
  export PYTHONPATH="$SITE:$PYTHONPATH"
  echo "kit: $(ls .gpu-kit/wheels | wc -l) wheels installed in $(( $(date +%s) - start )) s"
fi
if [ -n "$CPU" ]; then
  # The rehearsal records what every process imported: tests/bench/test_gpu_kit.py checks each
  # module against the image's list and the kit (bench/gpu/imports-tier<N>.txt).
  export PYTHONPATH="$PWD/bench/gpu/record:$PYTHONPATH" PIPELINE_RECORD_IMPORTS="$OUT/imports"
fi
command -v nvidia-smi > /dev/null && nvidia-smi -L
"$PY" bench/gpu/tier.py --tier "$TIER" $CPU --out "$OUT" ${ONLY:+--only "$ONLY"}
code=$?
if [ -n "$CPU" ] && [ -z "$ONLY" ]; then
  "$PY" bench/gpu/kit.py imports "$OUT"/imports/*.txt --write "bench/gpu/imports-tier$TIER.txt" || code=1
fi
echo "results: $OUT/tier$TIER.md, $OUT/tier$TIER.json (exit $code)"
exit $code
