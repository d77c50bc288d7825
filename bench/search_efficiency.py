"""Search efficiency on the tabular benchmark: the pipeline's Ax setup vs random search vs TPE.

Replays searches against bench/data/lora_grid.csv (240 real LoRA runs of the demo space, made by
bench/grid.py) instead of training: a proposed configuration gets the eval loss its grid point
measured. Each method searches the pipeline's own space (configs/demo-cpu.yaml: r, alpha and
batch size as choices, the learning rate as a log range, snapped to the nearest grid value in
log space), starts from the baseline config as the pipeline does, and stops once its best is
within 1 % of the grid's best. Reported: the median number of trials to get there over the
seeds (a seed that never gets there counts as its budget + 1), and the median best-so-far curves.

    python bench/search_efficiency.py                      # 20 seeds; Ax up to 60 trials, others 400
    python bench/search_efficiency.py --seeds 2 --budget 6 --budget-cheap 6   # CI smoke size
    python bench/search_efficiency.py --pending 1,4        # batch BO: 4 trials in flight vs 1
    python bench/search_efficiency.py --warm-start 10      # cold vs warm-started from a narrower search

- ax: `pipeline.search.build_client` on the config's search section (center + Sobol
  initialization, then BoTorch), the baseline attached as the status-quo arm.
- random: uniform choices, log-uniform learning rate (what `search.method: random` does).
- tpe: Optuna's TPESampler (a bench-only dependency), the baseline enqueued first.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.core import console  # noqa: E402

KEYS = ["lora.r", "lora.alpha", "train.learning_rate", "train.batch_size"]
Params = dict[str, float]


class Table:
    """The grid: configuration -> measured final eval loss."""

    def __init__(self, path: Path):
        with path.open() as f:
            rows = list(csv.DictReader(f))
        self.loss = {self.key(r): float(r["eval_loss"]) for r in rows}
        steps = sorted(int(k.split("@")[1]) for k in rows[0] if k.startswith("eval_loss@"))
        self.curves = {self.key(r): [(s, float(r[f"eval_loss@{s}"])) for s in steps] for r in rows}
        self.max_steps = steps[-1]
        self.lrs = sorted({float(r["train.learning_rate"]) for r in rows})
        self.best = min(self.loss.values())

    @staticmethod
    def key(p: dict) -> tuple:
        return (
            int(p["lora.r"]),
            int(p["lora.alpha"]),
            float(p["train.learning_rate"]),
            int(p["train.batch_size"]),
        )

    def snap(self, p: dict) -> Params:
        lr = min(self.lrs, key=lambda v: abs(math.log(v) - math.log(float(p["train.learning_rate"]))))
        return {**p, "train.learning_rate": lr}

    def __call__(self, p: dict) -> float:
        return self.loss[self.key(self.snap(p))]

    def curve(self, p: dict) -> list[tuple[int, float]]:
        return self.curves[self.key(self.snap(p))]


def run_ax(table: Table, config, baseline: Params, seed: int, budget: int, target: float) -> list[float]:
    from pipeline.search.ax.space import build_client

    search = config.search.model_copy(update={"seed": seed})
    client = build_client(search, name=f"replay-{seed}")
    index = client.attach_baseline(parameters=baseline)
    losses = [table(baseline)]
    client.complete_trial(index, raw_data={"eval_loss": losses[0]})
    while len(losses) < budget and min(losses) > target:
        for index, params in client.get_next_trials(max_trials=1).items():
            losses.append(table(params))
            client.complete_trial(index, raw_data={"eval_loss": losses[-1]})
    return losses


def run_ax_pending(
    table: Table, config, baseline: Params, seed: int, budget: int, target: float, pending: int
) -> list[float]:
    """An Ax search with `pending` trials in flight, as `search.workers` parallel workers keep
    it: one `get_next_trials(max_trials=idle)` whenever workers are idle, trials finishing in the
    order they started (equal durations). Losses in order of completion; pending=1 is `run_ax`."""
    from collections import deque

    from pipeline.search.ax.space import build_client

    search = config.search.model_copy(update={"seed": seed})
    client = build_client(search, name=f"replay-p{pending}-{seed}")
    index = client.attach_baseline(parameters=baseline)
    losses = [table(baseline)]
    client.complete_trial(index, raw_data={"eval_loss": losses[0]})
    running: deque = deque()
    while len(losses) < budget and min(losses) > target:
        if len(running) < pending:
            running.extend(client.get_next_trials(max_trials=pending - len(running)).items())
        index, params = running.popleft()
        losses.append(table(params))
        client.complete_trial(index, raw_data={"eval_loss": losses[-1]})
    return losses


def run_ax_warm(
    table: Table, config, baseline: Params, seed: int, budget: int, target: float, narrow: dict, n_source: int
) -> tuple[list[float], list[float]]:
    """Warm start, as `search.warm_start` does it: an earlier `n_source`-trial Ax search over a
    narrower space (`narrow`: config overrides), whose trials are then attached to a new search
    over the full space with `Optimizer.attach_measured` (the pipeline's own call) before its
    first trial. Returns (the new search's losses, baseline first; the earlier search's losses)."""
    from pipeline.config import with_overrides
    from pipeline.search.ax.optimizer import Optimizer
    from pipeline.search.ax.space import build_client

    def search(cfg) -> Optimizer:
        opt = Optimizer(build_client(cfg.search, name=f"replay-warm-{seed}"), cfg)
        opt.client.complete_trial(
            opt.client.attach_baseline(parameters=baseline), {"eval_loss": table(baseline)}
        )
        return opt

    earlier_cfg = with_overrides(config, {"search.seed": seed, **narrow})
    earlier, measured = search(earlier_cfg), []
    while len(measured) < n_source:
        for index, params in earlier.client.get_next_trials(max_trials=1).items():
            measured.append((dict(params), table(params)))
            earlier.client.complete_trial(index, raw_data={"eval_loss": measured[-1][1]})
    new = search(with_overrides(config, {"search.seed": seed}))  # the cold search's seed: paired
    for params, loss in measured:
        if new.in_search_space(params):
            new.attach_measured(params, [], {"eval_loss": loss}, table.max_steps, False)
    losses = [table(baseline)]
    while len(losses) < budget and min(losses) > target:
        for index, params, _ in new.ask_batch(1):
            losses.append(table(params))
            new.client.complete_trial(index, raw_data={"eval_loss": losses[-1]})
    return losses, [loss for _, loss in measured]


def run_ax_early_stopping(
    table: Table,
    config,
    baseline: Params,
    seed: int,
    n_trials: int,
    percentile: float | None,
    min_curves: int | None = None,
    progression: str = "steps",
) -> tuple[list[float], list[int]]:
    """A fixed-length Ax search whose trials report their eval curve to Ax's percentile rule, as
    the pipeline's evaluation hook does; a trial asked to stop keeps its last eval loss.

    `progression`: "steps" (optimizer steps: what the pipeline's `auto` uses for the grid's
    fixed-step trials) or "examples" (step x batch size: trials of different batch sizes compared
    on the same data seen); `min_progression` is the pipeline's default in that unit."""
    from pipeline.config import with_overrides
    from pipeline.search.ax.space import build_client, early_stopping_strategy

    cfg = with_overrides(
        config, {"search.seed": seed, "train.eval_steps": table.curves[table.key(baseline)][0][0]}
    )
    client = build_client(cfg.search, name=f"replay-es-{seed}")
    if percentile is not None:
        es = {
            "search.early_stopping.enabled": True,
            "search.early_stopping.percentile": percentile,
            "search.early_stopping.progression": progression,
        }
        if min_curves:
            es["search.early_stopping.min_curves"] = min_curves
        cfg = with_overrides(cfg, es)
        client.set_early_stopping_strategy(early_stopping_strategy(cfg))
    losses, steps = [], []

    def run(index: int, params: dict) -> None:
        per_step = int(params["train.batch_size"]) if progression == "examples" else 1
        for step, loss in table.curve(params):
            client.attach_data(index, {"eval_loss": loss}, progression=step * per_step)
            if percentile is not None and step < table.max_steps and client.should_stop_trial_early(index):
                client.mark_trial_early_stopped(index)
                break
        else:
            client.complete_trial(index)
        losses.append(loss)
        steps.append(step)

    run(client.attach_baseline(parameters=baseline), baseline)
    while len(losses) < n_trials + 1:
        for index, params in client.get_next_trials(max_trials=1).items():
            run(index, params)
    return losses, steps


def run_random(table: Table, config, baseline: Params, seed: int, budget: int, target: float) -> list[float]:
    rng = random.Random(seed)
    space = config.search.parameters
    lo, hi = (math.log(b) for b in space["train.learning_rate"].bounds)
    losses = [table(baseline)]
    while len(losses) < budget and min(losses) > target:
        p = {k: rng.choice(space[k].values) for k in ("lora.r", "lora.alpha", "train.batch_size")}
        p["train.learning_rate"] = math.exp(rng.uniform(lo, hi))
        losses.append(table(p))
    return losses


def run_tpe(table: Table, config, baseline: Params, seed: int, budget: int, target: float) -> list[float]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = config.search.parameters
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed), direction="minimize")
    study.enqueue_trial(baseline)
    losses: list[float] = []

    def objective(trial) -> float:
        p = {
            k: trial.suggest_categorical(k, space[k].values)
            for k in ("lora.r", "lora.alpha", "train.batch_size")
        }
        lr_bounds = space["train.learning_rate"].bounds
        p["train.learning_rate"] = trial.suggest_float("train.learning_rate", *lr_bounds, log=True)
        losses.append(table(p))
        if min(losses) <= target:
            study.stop()
        return losses[-1]

    study.optimize(objective, n_trials=budget)
    return losses


METHODS: dict[str, Callable[..., list[float]]] = {"ax": run_ax, "random": run_random, "tpe": run_tpe}


def trials_to_target(losses: list[float], target: float, budget: int) -> int:
    for i, _ in enumerate(losses, 1):
        if min(losses[:i]) <= target:
            return i
    return budget + 1


def best_so_far(losses: list[float], budget: int) -> list[float]:
    curve = [min(losses[: i + 1]) for i in range(len(losses))]
    return curve + [curve[-1]] * (budget - len(curve))  # held after the stop: an upper bound


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", default=str(ROOT / "bench" / "data" / "lora_grid.csv"))
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo-cpu.yaml"))
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument(
        "--budget", type=int, default=60, help="Most trials per Ax search (BoTorch costs ~1 s a trial)."
    )
    ap.add_argument(
        "--budget-cheap",
        type=int,
        default=400,
        help="Most trials per random / TPE search: cheap, and large enough that they rarely give up.",
    )
    ap.add_argument("--within", type=float, default=0.01, help="Target: best * (1 + within).")
    ap.add_argument("--methods", default="ax,random,tpe")
    ap.add_argument(
        "--pending",
        default=None,
        metavar="N1,N2,..",
        help="Instead: Ax with this many trials in flight (parallel workers), e.g. 1,4; prints the "
        "median trials to target of each and the ratio to the first.",
    )
    ap.add_argument(
        "--warm-start",
        type=int,
        default=None,
        metavar="N",
        help="Instead: cold Ax search vs one warm-started from an N-trial search over a narrower space "
        "(lora.r without 32, where the grid's best is); trials to target counted in the new search.",
    )
    ap.add_argument("--plot", default=str(ROOT / "bench" / "results" / "search_efficiency.png"))
    ap.add_argument(
        "--early-stopping",
        default=None,
        metavar="P1,P2,..",
        help="Instead: replay fixed-length Ax searches without and with Ax's percentile rule at "
        "these percentiles (compute saved vs best loss lost).",
    )
    ap.add_argument("--es-trials", type=int, default=15, help="Trials per search with --early-stopping.")
    ap.add_argument(
        "--es-min-curves", type=int, default=None, help="search.early_stopping.min_curves to use."
    )
    ap.add_argument(
        "--progression",
        default="steps,examples",
        help="Progression units to compare with --early-stopping (search.early_stopping.progression): "
        "steps (what `auto` picks for the grid's fixed-step trials), examples (step x batch size).",
    )
    args = ap.parse_args()
    logging.getLogger("ax").setLevel(logging.WARNING)
    logging.disable(logging.INFO)

    table = Table(Path(args.table))
    config = load_config(args.config)
    baseline = {k: getattr(getattr(config, k.split(".")[0]), k.split(".")[1]) for k in KEYS}
    target = table.best * (1 + args.within)
    n_hit = sum(v <= target for v in table.loss.values())
    print(
        f"table: {len(table.loss)} runs, best eval_loss {table.best:.4f}, target <= {target:.4f} "
        f"({n_hit} of {len(table.loss)} grid points); baseline {table(baseline):.4f}"
    )
    if args.early_stopping:
        early_stopping_study(table, config, baseline, args)
        return
    if args.warm_start:
        warm_start_study(table, config, baseline, target, args)
        return
    methods = dict(METHODS)
    if args.pending:
        pendings = [int(n) for n in args.pending.split(",")]
        for n in pendings:
            methods[f"ax-p{n}"] = lambda t, c, b, s, budget, target, n=n: run_ax_pending(
                t, c, b, s, budget, target, n
            )
        args.methods, args.plot = ",".join(f"ax-p{n}" for n in pendings), None
    results: dict[str, dict] = {}
    for method in args.methods.split(","):
        t0 = time.monotonic()
        counts, curves = [], []
        budget = args.budget if method.startswith("ax") else max(args.budget, args.budget_cheap)
        for seed in range(args.seeds):
            losses = methods[method](table, config, baseline, seed, budget, target)
            counts.append(trials_to_target(losses, target, budget))
            curves.append(best_so_far(losses, budget)[: args.budget])
        results[method] = {"counts": counts, "curves": curves}
        hit = sum(c <= budget for c in counts)
        print(
            f"{method:>6}: median {statistics.median(counts):5.1f} trials to within {args.within:.0%} "
            f"(reached in {hit}/{args.seeds} seeds; per seed {counts}) [{time.monotonic() - t0:.0f}s]",
            flush=True,
        )
    if args.plot:
        plot(results, table.best, target, Path(args.plot))
        print(f"plot: {args.plot}")
    if args.pending and len(results) > 1:
        first, *rest = results
        for name in rest:
            ratio = statistics.median(results[name]["counts"]) / statistics.median(results[first]["counts"])
            print(
                f"{name} / {first} median trials to within {args.within:.0%} of the grid's best: {ratio:.2f}"
            )
    if "ax" in results and "random" in results:
        ratio = statistics.median(results["ax"]["counts"]) / statistics.median(results["random"]["counts"])
        print(f"ax / random median trials to within {args.within:.0%} of the grid's best: {ratio:.2f}")


def warm_start_study(table: Table, config, baseline: Params, target: float, args) -> None:
    """Paired by seed: trials to target of a cold search vs one warm-started from an earlier
    search over a narrower space (the earlier search's trials are not counted: they were paid)."""
    narrow = {"search.parameters.lora.r": {"type": "choice", "values": [4, 8, 16]}}
    cold, warm, earlier_best = [], [], []
    t0 = time.monotonic()
    for seed in range(args.seeds):
        cold.append(
            trials_to_target(run_ax(table, config, baseline, seed, args.budget, target), target, args.budget)
        )
        losses, earlier = run_ax_warm(
            table, config, baseline, seed, args.budget, target, narrow, args.warm_start
        )
        warm.append(trials_to_target(losses, target, args.budget))
        earlier_best.append(min(earlier))
        print(
            f"seed {seed}: cold {cold[-1]}, warm {warm[-1]} (earlier search's best {earlier_best[-1]:.4f}) "
            f"[{time.monotonic() - t0:.0f}s]",
            flush=True,
        )
    mc, mw = statistics.median(cold), statistics.median(warm)
    print(
        f"cold: median {mc:.1f} trials to within {args.within:.0%} (per seed {cold})\n"
        f"warm from {args.warm_start} trials over lora.r in [4, 8, 16]: median {mw:.1f} (per seed {warm}); "
        f"earlier searches' best median {statistics.median(earlier_best):.4f} (target {target:.4f})\n"
        f"warm / cold median trials to within {args.within:.0%} of the grid's best: {mw / mc:.2f}; "
        f"counting the earlier search's trials too: {(mw + args.warm_start) / mc:.2f}"
    )


def early_stopping_study(table: Table, config, baseline: Params, args) -> None:
    """Per progression unit and percentile: training steps saved and best eval loss lost, paired
    by seed against the same search without the rule."""
    t0 = time.monotonic()
    plain = [
        run_ax_early_stopping(table, config, baseline, s, args.es_trials, None) for s in range(args.seeds)
    ]
    full_steps = sum(sum(steps) for _, steps in plain)
    print(
        f"no early stopping: {args.seeds} searches of {args.es_trials} trials, {full_steps} steps [{time.monotonic() - t0:.0f}s]"
    )
    summary = []
    for unit in args.progression.split(","):
        for pct in (float(x) for x in args.early_stopping.split(",")):
            t0 = time.monotonic()
            saved, lost = [], []
            for seed, (plain_losses, plain_steps) in enumerate(plain):
                losses, steps = run_ax_early_stopping(
                    table, config, baseline, seed, args.es_trials, pct, args.es_min_curves, unit
                )
                saved.append(1 - sum(steps) / sum(plain_steps))
                lost.append(100 * (min(losses) - min(plain_losses)) / min(plain_losses))
            summary.append((unit, pct, statistics.mean(saved) * 100, statistics.median(lost), max(lost)))
            print(
                f"progression in {unit}, percentile {pct:g}: steps saved {summary[-1][2]:.1f}% (mean), best "
                f"eval_loss {summary[-1][3]:+.2f}% (median; mean {statistics.mean(lost):+.2f}%; worst seed "
                f"{summary[-1][4]:+.2f}%) [{time.monotonic() - t0:.0f}s]",
                flush=True,
            )
    ok = [row for row in summary if row[2] >= 30 and row[3] <= 1]
    pick = max(ok, key=lambda r: r[2]) if ok else None
    print(
        f"early stopping: progression in {pick[0]}, percentile {pick[1]:g} saves {pick[2]:.1f}% of steps at "
        f"{pick[3]:+.2f}% best eval_loss"
        if pick
        else "early stopping: no setting saves >= 30% at <= 1% worse best eval_loss"
    )


def plot(results: dict[str, dict], best: float, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, r in results.items():
        curves = r["curves"]
        xs = range(1, len(curves[0]) + 1)
        med = [statistics.median(c[i] for c in curves) for i in range(len(curves[0]))]
        lo = [sorted(c[i] for c in curves)[len(curves) // 4] for i in range(len(curves[0]))]
        hi = [sorted(c[i] for c in curves)[(3 * len(curves)) // 4] for i in range(len(curves[0]))]
        (line,) = ax.plot(xs, med, label=f"{method} (median of {len(curves)} seeds)")
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    ax.axhline(best, color="black", lw=0.8, label=f"grid best {best:.3f}")
    ax.axhline(target, color="gray", ls=":", lw=0.8, label="within 1%")
    ax.set_xlabel("trials (the baseline is trial 1)")
    ax.set_ylabel("best eval_loss so far")
    ax.set_title("Search efficiency on the tabular LoRA benchmark (IQR shaded)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    with console.muted():  # Ax's notes (a duplicate proposal) would drown the tables
        main()
