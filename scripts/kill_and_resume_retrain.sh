#!/bin/bash
# A demo retrain (1 epoch, 429 steps, of trial 9 of docs/example-search) run once without
# interruption, then again SIGKILLed a few seconds after its fourth checkpoint (step 168) and continued with
# `retrain --resume`; prints both eval losses and whether the curves are equal.
#   scripts/kill_and_resume_retrain.sh      (about 3 minutes on 2 CPU cores)
set -e
cd "$(dirname "$0")/.."
T=$(mktemp -d)
export MLFLOW_TRACKING_URI=sqlite:///$T/mlflow.db BEST=$T/best.yaml
.venv/bin/python - <<'PY'
import os
from pipeline.config import load_config, to_yaml, with_overrides
values = {"lora.r": 32, "lora.alpha": 8.0, "train.learning_rate": 0.01, "train.batch_size": 16}
config = with_overrides(load_config("configs/demo-cpu.yaml", search=False), values)
open(os.environ["BEST"], "w").write(to_yaml(config, "trial 9 of docs/example-search"))
PY
SET="retrain.epochs=1 train.output_dir=$T/out tracking.experiment_name=kill-demo"
CMD=".venv/bin/python -m pipeline retrain --quiet --best-config $BEST --allow-duplicate true"
$CMD --set "$SET" > "$T/whole.txt" 2>&1
WHOLE=$(sed -n 's/^retrain run \([0-9a-f]*\):.*/\1/p' "$T/whole.txt")
$CMD --set "$SET" > "$T/killed.txt" 2>&1 &
PID=$!
while true; do
  M=$(ls $T/out/checkpoints/*/checkpoint-*/pipeline_checkpoint.json 2>/dev/null | sort -V | tail -1 || true)
  if [[ "$M" =~ checkpoint-([0-9]+)/ ]] && [ "${BASH_REMATCH[1]}" -ge 129 ]; then break; fi
  sleep 0.2
done
sleep 3
kill -9 $PID; wait $PID || true
RUN=$(basename "$(dirname "$(dirname "$M")")")
echo "SIGKILLed retrain run $RUN (checkpoints left: $(ls $T/out/checkpoints/$RUN | tr '\n' ' '))"
$CMD --set "$SET" --resume "$RUN" 2>&1 | grep -v "^Downloading\|Loading weights" | tail -4
WHOLE=$WHOLE RUN=$RUN .venv/bin/python - <<'PY'
import os
from mlflow.tracking import MlflowClient
c = MlflowClient()
curve = lambda r: [(m.step, m.value) for m in c.get_metric_history(r, "eval_loss")]
w, r = os.environ["WHOLE"], os.environ["RUN"]
run = c.get_run(r)
print(f"uninterrupted {w}: eval_loss {c.get_run(w).data.metrics['eval_loss']!r}")
print(f"continued     {r}: eval_loss {run.data.metrics['eval_loss']!r}, resumed_from_step "
      f"{run.data.tags['trial.resumed_from_step']}, status {run.info.status}")
print(f"eval-loss curves equal: {curve(w) == curve(r)} ({len(curve(r))} points)")
PY
