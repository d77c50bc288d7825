"""Parallel trials on Ray against today's sequential search, on this machine, paired by seed.

The same n-trial demo search (configs/demo-cpu.yaml, early stopping as configured) run twice
per seed, each from a fresh sqlite store, as a user runs it (`python -m pipeline search`):

- `local`: the default executor, one trial after another, torch on all the machine's cores;
- `ray`:   `search.executor=ray search.workers=N`, each worker with cores/N threads.

The search's wall time includes everything the user waits for (Ray's start-up, the baseline,
the report and the registry). Prints one row per seed and the median speed-up and best
eval_loss of each arm; `--out` also writes them as CSV.

    python bench/parallel.py                      # 8 trials, 3 seeds, 2 workers
    python bench/parallel.py --trials 2 --seeds 1 --set "train.max_steps=8 train.eval_steps=4"
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEST = re.compile(r"^search run (\w+): best trial (\d+) eval_loss ([0-9.]+)", re.M)


def run(arm: str, seed: int, args: argparse.Namespace, tmp: Path) -> dict:
    """One search in a fresh store; its wall time and best eval_loss."""
    store = tmp / f"{arm}-{seed}"
    store.mkdir()
    sets = [
        f"search.seed={seed}",
        f"search.output_dir={store / 'search'}",
        f"train.output_dir={store / 'out'}",
        "tracking.log_system_metrics=false",
        "search.replicates=null",  # trials only: replicates are measured by bench/noise.py
        f"tracking.experiment_name=bench-parallel-{arm}",
    ]
    if arm == "ray":
        sets += ["search.executor=ray", f"search.workers={args.workers}"]
    cmd = [sys.executable, "-m", "pipeline", "search", "--config", args.config, "--quiet"]
    cmd += ["--n-trials", str(args.trials), "--set", " ".join(sets)]
    if args.set:
        cmd += ["--set", args.set]
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{store / 'mlflow.db'}", PYTHONUNBUFFERED="1")
    env.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster
    env.pop("MLFLOW_RUN_ID", None)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    m = BEST.search(p.stdout)
    if p.returncode != 0 or not m:
        raise SystemExit(
            f"{arm} seed {seed} failed (exit {p.returncode}):\n{p.stdout[-2000:]}{p.stderr[-2000:]}"
        )
    stopped = sum(" early_stopped " in line for line in p.stdout.splitlines())
    return {
        "arm": arm,
        "seed": seed,
        "wall_s": wall,
        "best_eval_loss": float(m.group(3)),
        "early_stopped": stopped,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo-cpu.yaml"))
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--set", default="", help="Extra overrides for both arms (space-separated).")
    ap.add_argument("--out", default=None, help="Also write the rows as CSV here.")
    args = ap.parse_args()

    rows = []
    print(
        f"parallel: {args.trials}-trial search, local (1 process, {os.cpu_count()} threads) vs ray "
        f"({args.workers} workers), {args.seeds} seeds",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-parallel-") as tmp:
        for seed in range(args.seeds):
            pair = {arm: run(arm, seed, args, Path(tmp)) for arm in ("ray", "local")}
            rows += pair.values()
            local, ray = pair["local"], pair["ray"]
            print(
                f"seed {seed}: ray {ray['wall_s']:.0f}s best {ray['best_eval_loss']:.4f} | "
                f"local {local['wall_s']:.0f}s best {local['best_eval_loss']:.4f} | "
                f"speed-up {local['wall_s'] / ray['wall_s']:.2f}x",
                flush=True,
            )
    by = {arm: [r for r in rows if r["arm"] == arm] for arm in ("local", "ray")}
    ratios = [lo["wall_s"] / r["wall_s"] for lo, r in zip(by["local"], by["ray"], strict=True)]
    best = {arm: statistics.median(r["best_eval_loss"] for r in by[arm]) for arm in by}
    print(
        f"parallel: speed-up median {statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max "
        f"{max(ratios):.2f}) over {len(ratios)} seeds; best eval_loss median local {best['local']:.4f}, "
        f"ray {best['ray']:.4f}"
    )
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
