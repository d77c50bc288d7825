"""A tabular benchmark of real LoRA runs: the demo search space on a grid, every point trained.

Each grid point is one `run_trial` of the demo config (150 steps, eval_loss at steps 50, 100 and
150 on the 200 held-out examples) with one MLflow run per point, the base model loaded once.
Rows are appended to the CSV as they finish, so an interrupted grid resumes where it stopped.

    python bench/grid.py                                  # 4 r x 4 alpha x 5 lr x 3 bs = 240 runs
    python bench/grid.py --limit 2 --out /tmp/grid.csv    # CI smoke size

The committed table is bench/data/lora_grid.csv; bench/search_efficiency.py replays searches on it.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import time
from pathlib import Path

from pipeline.config import load_config, with_overrides
from pipeline.resources import Resources
from pipeline.trial import discard_local_adapter, run_trial

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
    args = ap.parse_args()

    if args.merge:
        merge(Path(args.out), args.merge)
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
            done = {tuple(row[k] for k in GRID) for row in csv.DictReader(f)}
    else:
        with out.open("w", newline="") as f:
            csv.DictWriter(f, FIELDS).writeheader()

    points = list(itertools.product(*GRID.values()))[shard::n_shards]
    todo = [p for p in points if tuple(str(v) for v in p) not in done][: args.limit]
    print(f"grid: {len(points)} points, {len(done)} done, {len(todo)} to run")
    resources = Resources()
    t0 = time.monotonic()
    for i, values in enumerate(todo, 1):
        params = dict(zip(GRID, values, strict=True))
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
            csv.DictWriter(f, FIELDS).writerow(row)
        eta = (time.monotonic() - t0) / i * (len(todo) - i)
        print(
            f"[{i}/{len(todo)}] {params} eval_loss {result.eval_loss:.4f} (ETA {eta / 60:.0f} min)",
            flush=True,
        )


def merge(out: Path, n_shards: int) -> None:
    """Shards -> one CSV in grid order."""
    rows = []
    for i in range(n_shards):
        with Path(f"{out}.{i}").open() as f:
            rows += list(csv.DictReader(f))
    order = {tuple(str(v) for v in p): i for i, p in enumerate(itertools.product(*GRID.values()))}
    rows.sort(key=lambda r: order[tuple(r[k] for k in GRID)])
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(rows)
    print(f"{out}: {len(rows)} rows")


if __name__ == "__main__":
    main()
