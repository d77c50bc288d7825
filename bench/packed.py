"""Packed trials (`search.pack`): how much shorter is the same search when trials share steps?

The same 12-trial search runs with `search.pack` 1, 2, 4 and 8, early stopping off and on, on
several search seeds, each search in a fresh process (its own peak RSS) against one tracking
store whose baseline was trained once beforehand (every search reuses it, so no search pays for
it). Printed per setting: the search's wall time (mean and spread over seeds), its ratio to
`pack: 1` paired by seed, the best eval loss per seed, training tokens per second in total
(all trials' tokens over the search's wall time) and per trial (each trial's own
`train_tokens_per_second`, which counts its steps' wall time, shared or not), and the peak RSS.

    python bench/packed.py                                     # demo, seeds 0,1,2
    python bench/packed.py --part steps                        # where the ratio comes from
    python bench/packed.py --config configs/smollm2-cpu.yaml --packs 1,4 --trials 6 --init 3 \\
        --set train.max_steps=16 train.eval_steps=8 eval.generation_samples=0 data.max_eval_examples=32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(spec: dict) -> dict:
    """One search in this process; what the parent prints."""
    from pipeline.core import console
    from pipeline.search import run_search, search_config

    console.silence_library_noise(quiet=True)
    t0 = time.perf_counter()
    result = run_search(search_config(spec["config"], spec["overrides"], n_trials=spec["trials"]), quiet=True)
    wall = time.perf_counter() - t0
    trials = result.state.trials
    scored = [t for t in trials if t.eval_loss is not None]
    tokens = sum(t.metrics.get("train_tokens", 0.0) for t in trials)
    per_trial = [
        t.metrics["train_tokens_per_second"] for t in trials if "train_tokens_per_second" in t.metrics
    ]
    return {
        "wall_s": wall,
        "best_eval_loss": min(t.eval_loss for t in scored) if scored else None,
        "trials": [(t.parameters, t.eval_loss, t.status, t.steps) for t in trials],
        "tokens": tokens,
        "tokens_per_s_total": tokens / wall,
        "tokens_per_s_per_trial": statistics.fmean(per_trial) if per_trial else None,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "search_run": result.parent_run_id,
    }


def steps(config_path: str, sets: list[str], batches: list[int], pack: int, repeats: int = 10) -> None:
    """Where the ratio comes from: one training step (forward, backward, AdamW) of one trial
    alone at each batch size, fitted as fixed + per-example cost; then `pack` trials' steps
    alone one after another against the same trials in one packed step (the router, no threads,
    no tracking: the arithmetic and per-operation cost only)."""
    import torch

    from pipeline.config import load_config
    from pipeline.data.collate import LabelPositions, build_collator, completion_loss
    from pipeline.model.device import plan_device
    from pipeline.model.load import attach_lora
    from pipeline.training.packing import ThreadState
    from pipeline.training.router import Router, lora_layers_by_path, share_weights
    from pipeline.trial.resources import Resources

    config = load_config(config_path, sets)
    plan = plan_device(config.model, config.train)
    resources = Resources()
    base = resources.base_model(config, plan)[0].model
    data, tokenizer = resources.data(config), resources.tokenizer(config)
    collate = LabelPositions(build_collator(config.train.batching, tokenizer, config.data.max_seq_len))
    device = next(base.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def batch(size: int, offset: int) -> dict:
        rows = [{k: e[k] for k in ("input_ids", "labels")} for e in data.train[offset : offset + size]]
        return {k: v.to(device) for k, v in collate(rows).items()}

    def trial(seed: int) -> tuple:
        model = attach_lora(share_weights(base), config.lora, seed)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=1e-4)

    def timed(step) -> float:
        for _ in range(3):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            step()
        sync()
        return (time.perf_counter() - t0) / repeats

    def alone_step(model, optimizer, b):
        def step():
            labels = b["labels"]
            out = model(**{k: v for k, v in b.items() if k != "labels"})
            completion_loss(out, labels).backward()
            optimizer.step()
            optimizer.zero_grad()

        return step

    def packed_step(router, data_, layers, optimizers):
        def step():
            outs = router.forward([{k: v for k, v in b.items() if k != "labels"} for b in data_], layers)
            torch.autograd.backward(
                [completion_loss(o, b["labels"]) for o, b in zip(outs, data_, strict=True)]
            )
            for o in optimizers:
                o.step()
                o.zero_grad()

        return step

    model, optimizer = trial(0)
    times = {n: timed(alone_step(model, optimizer, batch(n, 0))) for n in batches}
    slope = statistics.linear_regression(list(times), list(times.values()))
    print(f"{config_path} on {plan.describe()}: one step alone, ms by batch size:")
    print("  " + ", ".join(f"{n}: {1000 * t:.1f}" for n, t in times.items()))
    print(f"  fit: {1000 * slope.intercept:.1f} ms fixed + {1000 * slope.slope:.1f} ms per example")
    for n in batches:
        trials = [trial(i) for i in range(pack)]
        data_ = [batch(n, i * n) for i in range(pack)]
        alone = sum(timed(alone_step(m, o, b)) for (m, o), b in zip(trials, data_, strict=True))
        states = [ThreadState() for _ in trials]
        for st in states:
            st.capture()
        packed_router = Router(base, list(lora_layers_by_path(trials[0][0])))
        layers = [(lora_layers_by_path(m), st) for (m, _), st in zip(trials, states, strict=True)]

        shared = timed(packed_step(packed_router, data_, layers, [o for _, o in trials]))
        print(
            f"  batch {n}: {pack} trials alone {1000 * alone:.1f} ms, packed {1000 * shared:.1f} ms: "
            f"{alone / shared:.2f}x"
        )


def run_child(spec: dict, env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if out.returncode != 0:
        raise SystemExit(f"search failed: {spec}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def overrides(work: Path, pack: int, seed: int, stopping: bool, init: int, sets: list[str]) -> list[str]:
    return [
        f"search.pack={pack}",
        f"search.seed={seed}",
        f"search.initialization_trials={init}",
        f"search.early_stopping.enabled={str(stopping).lower()}",
        "search.replicates=null",
        f"search.output_dir={work / 'search'}",
        f"train.output_dir={work / 'out'}",
        "tracking.log_system_metrics=false",
        f"registry.model_name=bench-packed-{work.name}",
        *sets,
    ]


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--part", choices=["search", "steps"], default="search", help="steps: the step-cost model")
    p.add_argument("--config", default="configs/demo-cpu.yaml")
    p.add_argument("--packs", default="1,2,4,8")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--stopping", default="off,on", help="early stopping settings to run: off, on or both")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--init", type=int, default=4, help="Sobol trials before BoTorch")
    p.add_argument("--set", nargs="*", default=[], help="config overrides for every search")
    p.add_argument("--out", default=None, help="JSON results (default bench/results/packed-<config>.json)")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.part == "steps":
        steps(args.config, args.set, [1, 2, 4, 8, 16], 4)
        return
    store = tempfile.mkdtemp(prefix="packed-bench-")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db"}
    packs = [int(x) for x in args.packs.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    # The baseline once, untimed: every search below reuses it.
    with tempfile.TemporaryDirectory(prefix="packed-warm-") as work:
        spec = {
            "config": args.config,
            "trials": 1,
            "overrides": overrides(Path(work), 1, 99, False, 1, args.set),
        }
        run_child(spec, env)
    rows = []
    for stopping in [s == "on" for s in args.stopping.split(",")]:
        for seed in seeds:
            for pack in packs:
                with tempfile.TemporaryDirectory(prefix=f"packed-{pack}-{seed}-") as work:
                    sets = overrides(Path(work), pack, seed, stopping, args.init, args.set)
                    got = run_child({"config": args.config, "trials": args.trials, "overrides": sets}, env)
                got.update(pack=pack, seed=seed, early_stopping=stopping)
                rows.append(got)
                print(
                    f"early stopping {'on ' if stopping else 'off'} seed {seed} pack {pack}: "
                    f"{got['wall_s']:.1f} s, best {got['best_eval_loss']:.4f}, "
                    f"{got['tokens_per_s_total']:.0f} tok/s total, peak RSS {got['peak_rss_gb']:.2f} GiB",
                    flush=True,
                )
    print(
        "\n| early stopping | pack | search wall (s) | vs pack 1 (paired) | best eval loss per seed | "
        "tokens/s total | tokens/s per trial | peak RSS (GiB) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for stopping in sorted({r["early_stopping"] for r in rows}):
        for pack in packs:
            mine = sorted(
                (r for r in rows if r["early_stopping"] == stopping and r["pack"] == pack),
                key=lambda r: r["seed"],
            )
            ones = {r["seed"]: r for r in rows if r["early_stopping"] == stopping and r["pack"] == packs[0]}
            ratios = [ones[r["seed"]]["wall_s"] / r["wall_s"] for r in mine]
            best = ", ".join(f"{r['best_eval_loss']:.4f}" for r in mine)
            print(
                f"| {'on' if stopping else 'off'} | {pack} | {spread([r['wall_s'] for r in mine])} | "
                f"{statistics.fmean(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
                f"{best} | "
                f"{spread([r['tokens_per_s_total'] for r in mine])} | "
                f"{spread([r['tokens_per_s_per_trial'] for r in mine])} | "
                f"{max(r['peak_rss_gb'] for r in mine):.2f} |"
            )
    out = Path(args.out or ROOT / "bench" / "results" / f"packed-{Path(args.config).stem}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "set": args.set, "rows": rows}, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
