"""Pipeline overhead of a search: wall time that is not training or evaluation, and where it goes.

Runs a real search (`run_search`, the `search` entry point's function) on a fresh sqlite store
and reads back what the runs logged: every trial's `time_<phase>_s` (load, tracking, lora,
train, eval_hook, generation, adapter, other) and the parent's `search_time_<phase>_s` (ax,
trials, baseline, state, report, registry). Pure work is training steps plus evaluations
(`time_train_s`, which excludes the metric flushes and early-stopping hooks inside it, plus
`time_generation_s`, the generation metric). Everything else is overhead, broken down.

    python bench/overhead.py                                 # the demo search, 10 trials
    python bench/overhead.py --set train.max_steps=300        # longer trials
    python bench/overhead.py --trials 2 --set "train.max_steps=6 train.eval_steps=3"   # CI smoke size
"""

from __future__ import annotations

import time

from search_bench import fresh_store, parse_args


def main() -> None:
    args = parse_args(__doc__)
    tmp, common = fresh_store("bench-overhead-", args)
    from mlflow.tracking import MlflowClient

    from pipeline.search import run_search, search_config

    overrides = [
        f"search.output_dir={tmp / 'search'}",
        "tracking.experiment_name=bench-overhead",
        "registry.model_name=bench-overhead",
        *common,
    ]
    t0 = time.perf_counter()
    result = run_search(search_config(args.config, overrides, n_trials=args.trials), quiet=True)
    wall = time.perf_counter() - t0

    client = MlflowClient()
    parent = client.get_run(result.parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'"
    )

    def total(metric: str) -> float:
        return sum(c.data.metrics.get(metric, 0.0) for c in children)

    search_time = {
        k.removeprefix("search_time_").removesuffix("_s"): v
        for k, v in parent.data.metrics.items()
        if k.startswith("search_time_")
    }
    pure = total("time_train_s") + total("time_generation_s")
    parts = {
        "Ax (candidate generation, data, early-stopping checks, analysis)": search_time.get("ax", 0.0)
        + total("time_eval_hook_s"),
        "MLflow logging (run start/end, params, metrics, artifacts)": total("time_tracking_s"),
        "adapter save (safetensors + tokenizer, logged as artifact)": total("time_adapter_s"),
        "model, tokenizer and data load": total("time_load_s"),
        "LoRA attach/detach": total("time_lora_s"),
        "search state saved after every trial (resume)": search_time.get("state", 0.0),
        "report, plots and registry": search_time.get("report", 0.0) + search_time.get("registry", 0.0),
    }
    parts["other (untimed: run ends, trial bookkeeping)"] = wall - pure - sum(parts.values())
    print(
        f"search of {args.trials} trials + baseline: wall {wall:.1f}s, pure training + evaluation {pure:.1f}s"
    )
    print(f"{'where the rest went':<72} {'seconds':>8} {'% of wall':>9}")
    for name, seconds in parts.items():
        print(f"{name:<72} {seconds:8.2f} {100 * seconds / wall:8.2f}%")
    print(f"(store: {tmp / 'mlflow.db'}, search run {result.parent_run_id})")
    print(f"pipeline overhead: {100 * (wall - pure) / wall:.2f}% of the search's wall time (goal <= 5%)")


if __name__ == "__main__":
    main()
