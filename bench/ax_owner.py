"""How many parallel workers one Ax owner (the search's driver) keeps busy.

In a parallel search every worker's trial costs the driver, on its one thread: one `ask` when the
worker is idle (`get_next_trials` knowing of the other pending trials), one
`report_evaluation` per evaluation (Ax's data + the early-stopping decision) and one `complete`.
This times those calls with the pipeline's own `Optimizer` on the demo space (BoTorch, early
stopping on), after `--warm` trials completed with losses from the grid table
(bench/data/lora_grid.csv), at 1, 4, 16 and 64 pending trials. From the cost per trial c(W) with W
pending it prints the share of the driver's time W workers take for 1-minute and 30-minute
trials: W x c(W) / trial length; 1.0 means the driver is the bottleneck.

    python bench/ax_owner.py                          # pending 1,4,16,64
    python bench/ax_owner.py --pending 1,4 --repeats 1  # CI smoke size
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.search_efficiency import Table  # noqa: E402
from pipeline.config import load_config, with_overrides  # noqa: E402
from pipeline.core import console  # noqa: E402
from pipeline.search.ax.optimizer import Optimizer  # noqa: E402

EVALS_PER_TRIAL = 3  # the demo config evaluates at steps 50, 100 and 150


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def measure(config, table: Table, pending: int, warm: int, repeats: int) -> dict[str, float]:
    """Seconds per call with `pending` trials running: a batch ask filling them, a single ask
    (one worker idle), an evaluation report, a completion."""
    opt = Optimizer.create(config)
    for _ in range(warm):  # the model-based phase: BoTorch, fitted on `warm` completed trials
        index, params, _ = opt.ask()
        opt.complete(index, {"eval_loss": table(params)}, table.max_steps, False)
    batch, t_batch = timed(opt.ask_batch, pending)
    running = list(batch)
    asks, reports, completes = [], [], []
    for _ in range(repeats):
        index, params, _ = running.pop(0)  # the oldest trial finishes; its worker asks again
        curve = table.curve(params)
        for step, loss in curve[:-1]:
            reports.append(timed(opt.report_evaluation, index, step, loss)[1])
        completes.append(timed(opt.complete, index, {"eval_loss": curve[-1][1]}, curve[-1][0], False)[1])
        new, t_ask = timed(opt.ask_batch, 1)
        running += new
        asks.append(t_ask)
    return {
        "pending": pending,
        "got": len(batch),
        "batch_ask_s": t_batch,
        "ask_s": statistics.median(asks),
        "report_s": statistics.median(reports),
        "complete_s": statistics.median(completes),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo-cpu.yaml"))
    ap.add_argument("--table", default=str(ROOT / "bench" / "data" / "lora_grid.csv"))
    ap.add_argument("--pending", default="1,4,16,64")
    ap.add_argument("--warm", type=int, default=12, help="Completed trials before timing.")
    ap.add_argument("--repeats", type=int, default=3, help="Single asks timed per pending count.")
    args = ap.parse_args()
    logging.disable(logging.INFO)
    config = with_overrides(load_config(args.config), {"search.early_stopping.enabled": True})
    table = Table(Path(args.table))
    print(f"ax owner: demo space, {args.warm} completed trials, early stopping on", flush=True)
    print(
        "| pending W | batch ask (s) | ask, 1 idle (s) | eval report (s) | complete (s) | "
        "c(W) per trial (s) | driver share, 1-min trials | driver share, 30-min trials |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for pending in (int(n) for n in args.pending.split(",")):
        m = measure(config, table, pending, args.warm, args.repeats)
        per_trial = m["ask_s"] + EVALS_PER_TRIAL * m["report_s"] + m["complete_s"]
        got = "" if m["got"] == pending else f" (got {m['got']})"
        print(
            f"| {pending}{got} | {m['batch_ask_s']:.2f} | {m['ask_s']:.2f} | {m['report_s']:.3f} | "
            f"{m['complete_s']:.3f} | {per_trial:.2f} | {pending * per_trial / 60:.2f} | "
            f"{pending * per_trial / 1800:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    with console.muted():  # Ax's notes (a duplicate proposal) would drown the tables
        main()
