"""Base-model reuse across trials: what the search saves by keeping the base model loaded.

Runs the same N short trials twice through `run_trial`: once with one `Resources` for all trials
(the search's way: the base is loaded once, only the LoRA adapter changes) and once with fresh
`Resources` per trial (reload every trial). Prints the wall time of each and the ratio last.

    python bench/model_reuse.py                                  # SmolLM2-135M from its GGUF file
    python bench/model_reuse.py --config configs/demo-cpu.yaml --trials 4
    python bench/model_reuse.py --config configs/demo-cpu.yaml --trials 2 --steps 2   # CI smoke size
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from pipeline.config import load_config, with_overrides
from pipeline.trial.resources import Resources
from pipeline.trial.run import run_trial


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/smollm2-cpu.yaml")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()

    tmp = tempfile.mkdtemp()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/bench.db")
    config = with_overrides(
        load_config(args.config),
        {
            "train.max_steps": args.steps, "train.eval_steps": None, "train.batch_size": 2, "train.logging_steps": 1,
            "train.output_dir": tmp, "data.max_seq_len": 64, "data.max_eval_examples": 8, "eval.generation_samples": 0,
            "tracking.log_system_metrics": False, "tracking.experiment_name": "bench-model-reuse", "search": None,
        },
    )  # fmt: skip
    configs = [with_overrides(config, {"lora.r": 4 * (i + 1), "train.seed": i}) for i in range(args.trials)]

    results = {}
    for mode in ("reload per trial", "reuse the base"):
        shared = Resources()
        t0 = time.perf_counter()
        loads = []
        for cfg in configs:
            res = shared if mode == "reuse the base" else Resources()
            loads.append(run_trial(cfg, resources=res, quiet=True).metrics["model_load_s"])
        results[mode] = time.perf_counter() - t0
        print(
            f"{mode:18s} {args.trials} trials: {results[mode]:7.1f} s  (model load per trial: {', '.join(f'{s:.1f}' for s in loads)} s)"
        )
    print(f"ratio reload / reuse: {results['reload per trial'] / results['reuse the base']:.2f}x")


if __name__ == "__main__":
    main()
