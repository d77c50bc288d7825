"""A tabular benchmark of real LoRA runs: the demo search space on a grid, every point trained.

Each grid point is one `run_trial` of the demo config (150 steps, eval_loss at steps 50, 100 and
150 on the 200 held-out examples) with one MLflow run per point, the base model loaded once.
Rows are appended to the CSV as they finish, so an interrupted grid resumes where it stopped.

    python bench/grid.py                                  # 4 r x 4 alpha x 5 lr x 3 bs = 240 runs
    python bench/grid.py --limit 2 --out /tmp/grid.csv    # CI smoke size
    python bench/grid.py --top 30 --seeds 1,2,3,4,5 --out bench/data/lora_grid_seeds.csv

The committed table is bench/data/lora_grid.csv; bench/search_efficiency.py replays searches on it.
With `--seeds`, the best `--top` points of that table (and the demo's baseline point) are trained
again with each `train.seed` given: the replicated slice bench/noise.py replays with seed noise.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import time
from pathlib import Path

from pipeline.config import load_config, with_overrides
from pipeline.model.adapter import discard_local_adapter
from pipeline.trial.resources import Resources
from pipeline.trial.run import run_trial

ROOT = Path(__file__).resolve().parents[1]
# The demo search space (configs/demo-cpu.yaml); the learning rate, a log range there, on 5
# log-spaced points spanning it.
GRID = {
    "lora.r": [4, 8, 16, 32],
    "lora.alpha": [8, 16, 32, 64],
    "train.learning_rate": [1e-4, 3.16e-4, 1e-3, 3.16e-3, 1e-2],
    "train.batch_size": [4, 8, 16],
}
EVAL_STEPS = (50, 100, 150)
FIELDS = [*GRID, *(f"eval_loss@{s}" for s in EVAL_STEPS), "eval_loss", "train_seconds", "run_id"]
SEED = "train.seed"
BASELINE_POINT = (8, 16, 1e-3, 8)  # configs/demo-cpu.yaml's own values of the four keys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo-cpu.yaml"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "data" / "lora_grid.csv"))
    ap.add_argument("--store", default=str(ROOT / "bench" / "results" / "grid.db"))
    ap.add_argument("--limit", type=int, default=None, help="Stop after this many new points.")
    ap.add_argument(
        "--shard",
        default="0/1",
        help="i/n: run every n-th point from the i-th, into <out>.<i> (merge with --merge). On a "
        "small model, n processes with OMP_NUM_THREADS=1 beat one process with n threads.",
    )
    ap.add_argument("--merge", type=int, default=None, metavar="N", help="Merge <out>.0..N-1 into <out>.")
    ap.add_argument("--seeds", default=None, help="Comma-separated train seeds: replicate the --top points.")
    ap.add_argument("--top", type=int, default=30, help="With --seeds: the best N points of --grid.")
    ap.add_argument("--grid", default=str(ROOT / "bench" / "data" / "lora_grid.csv"))
    args = ap.parse_args()

    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else None
    keys = [*GRID, SEED] if seeds else list(GRID)
    fields = [*keys, *FIELDS[len(GRID) :]]
    if args.merge:
        merge(Path(args.out), args.merge, keys, fields)
        return
    shard, n_shards = (int(x) for x in args.shard.split("/"))
    Path(args.store).parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path(args.store).resolve()}")
    base = with_overrides(
        load_config(args.config),
        {
            "train.eval_steps": EVAL_STEPS[0], "eval.generation_samples": 0, "tracking.log_system_metrics": False,
            "tracking.experiment_name": "bench-lora-grid", "train.output_dir": "/tmp/lora-grid", "search": None,
        },
    )  # fmt: skip
    assert base.train.max_steps == EVAL_STEPS[-1], "the grid's curves assume the demo's 150 steps"
    out = Path(args.out) if n_shards == 1 else Path(f"{args.out}.{shard}")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        with out.open() as f:
            done = {tuple(row[k] for k in keys) for row in csv.DictReader(f)}
    else:
        with out.open("w", newline="") as f:
            csv.DictWriter(f, fields).writeheader()

    points = (replicated(Path(args.grid), args.top, seeds) if seeds else all_points())[shard::n_shards]
    todo = [p for p in points if tuple(str(v) for v in p) not in done][: args.limit]
    print(f"grid: {len(points)} points, {len(done)} done, {len(todo)} to run")
    resources = Resources()
    t0 = time.monotonic()
    for i, values in enumerate(todo, 1):
        params = dict(zip(keys, values, strict=True))
        result = run_trial(with_overrides(base, params), resources=resources, quiet=True)
        discard_local_adapter(result.adapter_dir)  # 240 adapters: they are on their runs
        evals = dict(result.evals)
        row = {
            **params,
            **{f"eval_loss@{s}": f"{evals[s]:.6f}" for s in EVAL_STEPS},
            "eval_loss": f"{result.eval_loss:.6f}",
            "train_seconds": f"{result.wall_seconds:.2f}",
            "run_id": result.run_id,
        }
        with out.open("a", newline="") as f:
            csv.DictWriter(f, fields).writerow(row)
        eta = (time.monotonic() - t0) / i * (len(todo) - i)
        print(
            f"[{i}/{len(todo)}] {params} eval_loss {result.eval_loss:.4f} (ETA {eta / 60:.0f} min)",
            flush=True,
        )


def all_points() -> list[tuple]:
    return list(itertools.product(*GRID.values()))


def replicated(grid: Path, top: int, seeds: list[int]) -> list[tuple]:
    """The `top` best points of the grid table (by final eval loss) and the baseline point, each
    with every seed: best point first, seeds in the order given."""
    with grid.open() as f:
        rows = sorted(csv.DictReader(f), key=lambda r: float(r["eval_loss"]))
    cast = (int, int, float, int)
    points = [tuple(c(r[k]) for c, k in zip(cast, GRID, strict=True)) for r in rows[:top]]
    if BASELINE_POINT not in points:
        points.append(BASELINE_POINT)
    return [(*p, seed) for p in points for seed in seeds]


def merge(out: Path, n_shards: int, keys: list[str], fields: list[str]) -> None:
    """Shards -> one CSV in grid order (by point, then seed)."""
    rows = []
    for i in range(n_shards):
        with Path(f"{out}.{i}").open() as f:
            rows += list(csv.DictReader(f))
    rows.sort(key=lambda r: tuple(float(r[k]) for k in keys))
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        w.writerows(rows)
    print(f"{out}: {len(rows)} rows")


if __name__ == "__main__":
    main()
