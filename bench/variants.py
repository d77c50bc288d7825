"""Is a LoRA variant worth it on this data? Plain LoRA with a tuned learning rate against the
variant space (DoRA, PiSSA/OLoRA/EVA inits, LoRA+, rsLoRA, the learning rate tuned with them),
with the same budget of trials, on several search seeds: the small-scale version of arXiv
2602.04998's question.

Each search runs for real (`run_search`, its own tracking store) with seed replicates of its
recommended configuration (`search.replicates: {top_k: 1, seeds: 2}`), so each winner has three
seeds' eval losses. Printed per search seed: each space's winner (its variant settings), its
mean eval loss over the three seeds, and the difference variant - plain with a Welch 95 %
confidence interval; then the differences' mean over the search seeds.

    python bench/variants.py                                   # demo, seeds 0,1,2, 12 trials each
    python bench/variants.py --config configs/smollm2-cpu.yaml --trials 6 --init 3 \\
        --set train.max_steps=20 train.eval_steps=10           # SmolLM2, short trials
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.core import console  # noqa: E402


def spaces(lr: float) -> dict[str, str]:
    """The two search spaces, around the config's learning rate (a decade each way)."""
    rate = f"train.learning_rate: {{type: range, bounds: [{lr / 10:.3g}, {lr * 10:.3g}], log: true}}"
    variants = (
        "lora.use_dora: {type: choice, values: [false, true]}, "
        "lora.use_rslora: {type: choice, values: [false, true]}, "
        "lora.init: {type: choice, values: [default, pissa, olora, eva], "
        "dependents: {pissa: [lora.pissa_iterations]}}, "
        "lora.pissa_iterations: {type: choice, values: [4, 16]}, "
        "train.loraplus_lr_ratio: {type: choice, values: [1, 4, 16]}"
    )
    return {"plain": "{" + rate + "}", "variants": "{" + rate + ", " + variants + "}"}


def search(
    config_path: str, space: str, seed: int, trials: int, init: int, sets: list[str], work: Path
) -> dict:
    """One search with replicates of its winner; its winner and the winner's seeds' eval losses."""
    from pipeline.search import run_search, search_config

    overrides = [
        shlex.quote(f"search.parameters={space}"),
        f"search.seed={seed}",
        f"search.initialization_trials={init}",
        "search.replicates.top_k=1",
        "search.replicates.seeds=2",
        f"search.output_dir={work / 'search'}",
        f"train.output_dir={work / 'out'}",
        "tracking.log_system_metrics=false",
        f"registry.model_name=bench-variants-{work.name}",
        *sets,
    ]
    t0 = time.perf_counter()
    result = run_search(search_config(config_path, overrides, n_trials=trials), quiet=True)
    best, state = result.best, result.state
    seeds = [best.eval_loss] + [
        r.eval_loss for r in state.replicates or [] if r.of == str(best.index) and r.eval_loss is not None
    ]
    return {
        "winner": best.parameters,
        "selection_eval_loss": best.eval_loss,
        "seed_eval_losses": seeds,
        "baseline_eval_loss": state.baseline.eval_loss if state.baseline else None,
        "failed": sum(t.status in ("failed", "abandoned") for t in state.trials),
        "trials": [(t.parameters, t.eval_loss, t.status) for t in state.trials],
        "minutes": (time.perf_counter() - t0) / 60,
        "search_run": result.parent_run_id,
    }


def welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its Welch 95 % confidence interval."""
    from scipy import stats

    test = stats.ttest_ind(a, b, equal_var=False)
    ci = test.confidence_interval(0.95)
    return statistics.fmean(a) - statistics.fmean(b), float(ci.low), float(ci.high)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo-cpu.yaml")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--init", type=int, default=4, help="Sobol trials before BoTorch")
    p.add_argument("--set", nargs="*", default=[], help="config overrides for every search")
    p.add_argument("--out", default=None, help="JSON results (default bench/results/variants-<config>.json)")
    args = p.parse_args()
    console.silence_library_noise(quiet=True)
    lr = load_config(args.config).train.learning_rate
    # One store for every search: after the first, each reuses the baseline (same config).
    store = tempfile.mkdtemp(prefix="variants-bench-")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        row: dict = {"seed": seed}
        for name, space in spaces(lr).items():
            with tempfile.TemporaryDirectory(prefix=f"variants-{name}-{seed}-") as work:
                row[name] = search(args.config, space, seed, args.trials, args.init, args.set, Path(work))
            won = row[name]
            print(
                f"seed {seed} {name:8s}: winner {won['winner']} | selection {won['selection_eval_loss']:.4f} | "
                f"seeds {', '.join(f'{v:.4f}' for v in won['seed_eval_losses'])} | {won['minutes']:.1f} min",
                flush=True,
            )
        diff, low, high = welch(row["variants"]["seed_eval_losses"], row["plain"]["seed_eval_losses"])
        row["difference"] = {"variants_minus_plain": diff, "ci95": [low, high]}
        verdict = "beyond seed noise" if high < 0 or low > 0 else "within seed noise"
        print(
            f"seed {seed}: variants - plain = {diff:+.4f} (95 % CI {low:+.4f} to {high:+.4f}): {verdict}",
            flush=True,
        )
        rows.append(row)
    diffs = [r["difference"]["variants_minus_plain"] for r in rows]
    print(
        f"\nover {len(rows)} search seeds: variants - plain = {statistics.fmean(diffs):+.4f} "
        f"(per seed: {', '.join(f'{d:+.4f}' for d in diffs)})"
    )
    out = Path(args.out or ROOT / "bench" / "results" / f"variants-{Path(args.config).stem}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"config": args.config, "trials": args.trials, "set": args.set, "rows": rows}, indent=2)
    )
    print(f"results: {out}")


if __name__ == "__main__":
    main()
