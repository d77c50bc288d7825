"""Early stopping on real runs: the same seeded demo search with Ax's percentile rule and without.

Both searches use the same seed, so their first (Sobol) trials are the same configurations;
after that each follows its own data. Reported: training steps spent on trials, wall time, and
the best eval loss each found. The ratios come last.

    python bench/early_stopping.py                              # the demo search, 10 trials
    python bench/early_stopping.py --set search.early_stopping.percentile=30
    python bench/early_stopping.py --trials 3 --set "train.max_steps=12 train.eval_steps=4"   # CI smoke size
"""

from __future__ import annotations

import time

from search_bench import fresh_store, parse_args


def main() -> None:
    args = parse_args(__doc__)
    tmp, common = fresh_store("bench-es-", args)
    from pipeline.search import run_search, search_config

    results = {}
    for label, enabled in (("without", "false"), ("with", "true")):
        overrides = [
            "search.reuse_baseline=false",
            *common,
            f"search.output_dir={tmp / label}",
            f"tracking.experiment_name=bench-es-{label}",
            f"registry.model_name=bench-es-{label}",
            f"search.early_stopping.enabled={enabled}",
        ]
        t0 = time.perf_counter()
        r = run_search(search_config(args.config, overrides, n_trials=args.trials), quiet=True)
        wall = time.perf_counter() - t0
        trials = [t for t in r.state.trials if t.scored]
        steps = sum(t.steps for t in trials)
        stopped = sum(t.status == "early_stopped" for t in trials)
        results[label] = (steps, wall, r.best.eval_loss)
        print(
            f"{label:>7} early stopping: {len(trials)} trials ({stopped} stopped early), {steps} training "
            f"steps, wall {wall:.0f}s, best eval_loss {r.best.eval_loss:.4f} ({r.best.run_name}; search run "
            f"{r.parent_run_id})",
            flush=True,
        )
    (s0, w0, l0), (s1, w1, l1) = results["without"], results["with"]
    print(f"store: {tmp / 'mlflow.db'}")
    print(
        f"early stopping saved {100 * (1 - s1 / s0):.1f}% of training steps ({100 * (1 - w1 / w0):.1f}% of wall "
        f"time) at {100 * (l1 - l0) / l0:+.2f}% best eval_loss"
    )


if __name__ == "__main__":
    main()
