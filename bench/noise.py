"""Seed noise and what replicates buy: measured runs, then searches replayed with noisy observations.

Two parts (either alone with `--part`):

- `seeds`: the baseline and one other configuration of a config, trained on several
  `train.seed` values (nothing else changes): each one's spread, and the spread of their
  difference paired by seed.

      python bench/noise.py --part seeds --config configs/demo-cpu.yaml --seeds 42,1,2,3,4 \\
          --other lora.r=32,lora.alpha=8,train.learning_rate=0.01,train.batch_size=16
      python bench/noise.py --part seeds --config configs/smollm2-cpu.yaml --seeds 42,1,2,3,4 \\
          --other lora.r=16,lora.alpha=32,train.learning_rate=1e-3

- `replay`: the demo search (the pipeline's Ax setup, its 10 trials and baseline) replayed on the
  grid of real runs (bench/data/lora_grid.csv) with noise: a configuration in the replicated
  slice (bench/data/lora_grid_seeds.csv, its best points on 5 more seeds) is observed as one
  of its seeds' runs drawn at random; any other point as its grid value plus the pooled seed
  noise. A point's truth is the mean of all its seeds. For each replay seed, the same search is
  judged without replicates (the best observed trial) and with each replicate setting
  (`replicates.choose`, the pipeline's own choice: Ax's model-predicted best, then the best
  observed, and the baseline, each on fresh seeds; the best fresh mean is recommended); the
  search without replicates is also given the compute the replicates cost as extra trials.

      python bench/noise.py --part replay --replays 20
      python bench/noise.py --part replay --replays 1 --settings 1x2 --extra-trials 1   # CI smoke size
      python bench/noise.py --part seeds --seeds 1,2 --set train.max_steps=6 --set train.eval_steps=3

Replicates are paired by seed as the pipeline pairs them: replicate seed train.seed + i is the
slice's seed i for the baseline and every replicated configuration (a configuration outside the
slice gets its grid value plus the pooled noise, unpaired); the search's own observations draw
from the slice's other seeds.

Reported: how often the recommendation is truly within 1 % of the truly best point, the
winner's-curse bias (selection value minus truth; replicate mean minus truth), compute relative
to the search without replicates (each run costs its grid point's train_seconds), and the
coverage of the reported 95 % interval: the share of replays whose interval of the improvement
over the baseline (`core.stats.improvement` on the fresh seeds, as the report computes it from
scalar losses) holds the recommendation's true improvement (truth: the mean of all its seeds).
"""

from __future__ import annotations

import argparse
import csv
import math
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline.config import load_config, with_overrides  # noqa: E402
from pipeline.core import console  # noqa: E402

KEYS = ["lora.r", "lora.alpha", "train.learning_rate", "train.batch_size"]
GRID_SEED = 42  # the grid's runs' train.seed; the replicated slice adds seeds 1-5
REPLICATE_SLOTS = frozenset({1, 2, 3})  # the slice's seeds replicates take (3: the largest setting's)
VERBOSE = False  # --verbose: each race round
BASE_PARAMS = dict(zip(KEYS, (8, 16.0, 1e-3, 8), strict=True))  # the demo config's values


# ---------------------------------------------------------------------------------------------
# seeds


def seeds_part(args: argparse.Namespace) -> None:
    import os
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="bench-noise-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    from pipeline.model.adapter import discard_local_adapter
    from pipeline.trial.resources import Resources
    from pipeline.trial.run import run_trial

    base = with_overrides(
        load_config(args.config),
        {"search": None, "tracking.log_system_metrics": False, "train.output_dir": str(tmp / "out"),
         "tracking.experiment_name": "bench-noise", "eval.generation_samples": 0},
    )  # fmt: skip
    base = with_overrides(base, dict(_pair(kv) for kv in args.overrides))
    other = dict(_pair(kv) for kv in args.other.split(",")) if args.other else {}
    seeds = [int(s) for s in args.seeds.split(",")]
    resources = Resources()
    losses: dict[str, list[float]] = {"baseline": [], "other": []}
    for seed in seeds:
        for label, values in (("baseline", {}), ("other", other)):
            t0 = time.perf_counter()
            r = run_trial(
                with_overrides(base, {**values, "train.seed": seed}), resources=resources, quiet=True
            )
            discard_local_adapter(r.adapter_dir)
            losses[label].append(r.eval_loss)
            print(
                f"{label:8s} seed {seed:3d}: eval_loss {r.eval_loss:.4f} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    diff = [b - o for b, o in zip(losses["baseline"], losses["other"], strict=True)]
    for label, v in losses.items():
        print(f"{label}: mean {statistics.fmean(v):.4f}, sd {statistics.stdev(v):.4f} "
              f"({100 * statistics.stdev(v) / statistics.fmean(v):.2f} % of the mean), range {min(v):.4f}-{max(v):.4f}")  # fmt: skip
    print(
        f"paired difference (baseline - other): mean {statistics.fmean(diff):.4f}, sd {statistics.stdev(diff):.4f}"
    )
    print(
        f"ratio sd(paired difference) / sd(baseline): {statistics.stdev(diff) / statistics.stdev(losses['baseline']):.2f}"
    )


def _pair(kv: str) -> tuple[str, object]:
    key, _, value = kv.partition("=")
    try:
        return key, int(value)
    except ValueError:
        return key, float(value)


# ---------------------------------------------------------------------------------------------
# replay


class NoisyTable:
    """The grid with seed noise: observations drawn from a point's seeds; truth = their mean."""

    def __init__(self, grid: Path, seeds: Path):
        from search_efficiency import Table

        self.table = Table(grid)
        self.runs: dict[tuple, list[float]] = {}
        self.cost: dict[tuple, float] = {}
        self.by_seed: dict[tuple, dict[int, float]] = {}  # the replicated slice's runs, by train.seed
        with grid.open() as f:
            for row in csv.DictReader(f):
                key = Table.key(row)
                self.runs[key] = [float(row["eval_loss"])]
                self.cost[key] = float(row["train_seconds"])
                self.by_seed[key] = {GRID_SEED: float(row["eval_loss"])}
        with seeds.open() as f:
            for row in csv.DictReader(f):
                self.runs[Table.key(row)].append(float(row["eval_loss"]))
                self.by_seed[Table.key(row)][int(row["train.seed"])] = float(row["eval_loss"])
        groups = [v for v in self.runs.values() if len(v) >= 2]
        self.replicated = len(groups)
        self.noise = math.sqrt(
            sum((len(v) - 1) * statistics.variance(v) for v in groups) / sum(len(v) - 1 for v in groups)
        )
        self.truth = {k: statistics.fmean(v) for k, v in self.runs.items()}
        self.best = min(self.truth.values())

    def key(self, params: dict) -> tuple:
        return self.table.key(self.table.snap(params))

    def draw(self, params: dict, rng: random.Random, exclude_seeds: frozenset[int] = frozenset()) -> float:
        """One run of the point: one of its measured seeds outside `exclude_seeds` (the seeds the
        replicates take), or, for a point measured once, its value plus the pooled seed noise."""
        runs = self.by_seed[self.key(params)]
        left = [v for seed, v in sorted(runs.items()) if seed not in exclude_seeds] if len(runs) > 1 else []
        return rng.choice(left) if left else self.fresh(params, rng)

    def fresh(self, params: dict, rng: random.Random) -> float:
        """A run the tables do not hold: the point's truth plus the pooled seed noise."""
        return self.truth[self.key(params)] + rng.gauss(0.0, self.noise)

    def at_seed(self, params: dict, seed: int, rng: random.Random) -> tuple[float, bool]:
        """The point's run at `seed` (paired: every replicated point has seeds 1-5), or, where it
        has none, its truth plus the pooled seed noise (unpaired). (value, paired?)"""
        runs = self.by_seed[self.key(params)]
        return (runs[seed], True) if seed in runs else (self.fresh(params, rng), False)


def replay_part(args: argparse.Namespace) -> None:
    from pipeline.search.ax.optimizer import Optimizer
    from pipeline.search.ax.space import build_client
    from pipeline.search.records import COMPLETED, BaselineRecord, SearchState, TrialRecord
    from pipeline.search.steps.replicates import choose

    noisy = NoisyTable(Path(args.table), Path(args.seeds_table))
    config = load_config(args.config)
    base_params = BASE_PARAMS
    settings = [s for s in args.settings.split(",")]
    n_trials = config.search.n_trials
    within = 1 + args.within
    print(f"grid: {len(noisy.runs)} points, {noisy.replicated} with seed replicates; pooled seed sd {noisy.noise:.4f}; "
          f"true best {noisy.best:.4f}; replays {args.replays}, {n_trials} trials each")  # fmt: skip
    prior = remembered_noise(noisy)
    print(f"remembered noise (the slice's per-seed differences from its best point): sd {prior.sd_pct:.2f} % "
          f"of the loss, {prior.df} degrees of freedom")  # fmt: skip
    rows: dict[str, list[tuple[bool, float, float, bool, bool]]] = {}  # label -> judge()
    extra = args.extra_trials
    for replay in range(args.replays):
        rng = random.Random(1000 + replay)
        cfg = with_overrides(config, {"search.seed": replay})
        opt = Optimizer(build_client(cfg.search, name=f"noise-{replay}"), cfg)
        b_obs = noisy.draw(base_params, rng, REPLICATE_SLOTS)
        opt.attach_baseline(base_params, {"eval_loss": b_obs}, None)
        state = SearchState("replay", n_trials)
        state.baseline = BaselineRecord(
            run_id="b",
            parameters=base_params,
            eval_loss=b_obs,
            metrics={"eval_loss": b_obs},
            reused=False,
            in_search_space=True,
        )
        cost0 = noisy.cost[noisy.key(base_params)]
        costs: list[float] = []
        picks: dict[str, tuple[dict[str, list[float]], float]] = {}
        for _ in range(n_trials + extra):
            index, params, _ = opt.ask_batch(1)[0]
            value = noisy.draw(params, rng, REPLICATE_SLOTS)
            opt.complete(index, {"eval_loss": value}, 150, False)
            state.trials.append(
                TrialRecord(index=index, parameters=dict(params), status=COMPLETED, run_id=f"r{index}",
                            eval_loss=value, metrics={"eval_loss": value})
            )  # fmt: skip
            costs.append(noisy.cost[noisy.key(params)])
            if len(state.trials) == n_trials:  # the search's end: its replicates, as the pipeline picks them
                selection = list(state.trials)
                base_cost = cost0 + sum(costs)
                for label in settings:
                    top_k, seeds, race, known = _setting(label)
                    rcfg = with_overrides(
                        cfg,
                        {
                            "search.replicates.top_k": top_k,
                            "search.replicates.seeds": seeds,
                            "search.replicates.mode": "race" if race else "fixed",
                            "search.replicates.margin": args.margin,
                        },
                    )
                    chosen = choose(rcfg, state, opt)
                    picks[label] = (
                        race_replicate(noisy, chosen, base_params, rcfg, rng, prior if known else None)
                        if race
                        else replicate(noisy, chosen, base_params, rcfg.train.seed, rng)
                    )

        out = rows.setdefault("none", [])
        out.append(judge(noisy, selection, 1.0, within))
        for k in range(1, extra + 1):
            extra_cost = sum(costs[n_trials : n_trials + k]) / base_cost
            rows.setdefault(f"none+{k}", []).append(
                judge(noisy, state.trials[: n_trials + k], 1 + extra_cost, within)
            )
        for label, (fresh, cost) in picks.items():
            rows.setdefault(label, []).append(judge(noisy, selection, 1 + cost / base_cost, within, fresh))
        print(f"replay {replay + 1}/{args.replays}: " + ", ".join(f"{k} {'best' if v[-1][4] else 'ok' if v[-1][0] else 'miss'}" for k, v in rows.items()), flush=True)  # fmt: skip
    print_table(rows, args.within)


def print_table(rows: dict[str, list[tuple]], within: float) -> None:
    """One line per setting, then each setting's ratio against no replicates."""
    print()
    print(
        f"{'setting':10s} {'right':>6s} {'exact':>6s} {'global':>7s} {'bias':>8s} {'bias sd':>8s} {'compute':>8s} "
        f"{'covered':>8s} {'width':>7s}"
    )
    for label, v in rows.items():
        right = sum(r[0] for r in v) / len(v)
        exact = sum(r[4] for r in v) / len(v)
        overall = sum(r[3] for r in v) / len(v)
        bias = [r[1] for r in v]
        cost = statistics.fmean(r[2] for r in v)
        judged = [r[5] for r in v if r[5] is not None]
        covered = f"{sum(c for c, _ in judged) / len(judged):7.0%}" if judged else f"{'-':>7s}"
        width = f"{statistics.fmean(w for _, w in judged):6.2f}%" if judged else f"{'-':>7s}"
        print(
            f"{label:10s} {right:6.0%} {exact:6.0%} {overall:7.0%} {statistics.fmean(bias):+8.4f} "
            f"{statistics.stdev(bias) if len(bias) > 1 else 0:8.4f} {cost:7.2f}x {covered} {width}"
        )
    print(
        f"right: the recommendation is truly within {within:.0%} of the truly best configuration the "
        "search tried; exact: it is that configuration; global: truly within "
        f"{within:.0%} of the grid's best; bias: reported value minus truth (negative: optimistic); "
        "covered: the share of replays whose reported 95 % interval of the improvement over the "
        "baseline (the pipeline's, paired by seed) holds the recommendation's true improvement "
        "(truth: the mean of all its recorded seeds); width: the interval's mean width"
    )
    none = rows["none"]
    for label, v in rows.items():
        if label != "none":
            print(
                f"ratio exact {label} / none: {sum(r[4] for r in v) / max(1, sum(r[4] for r in none)):.2f}x "
                f"at {statistics.fmean(r[2] for r in v):.2f}x the compute"
            )


def judge(noisy: NoisyTable, trials: list, cost: float, within: float, fresh: dict | None = None) -> tuple:
    """(truly within `within` of the truly best configuration the search tried?, reported value
    minus truth, relative compute, truly within `within` of the grid's best?, the truly best
    configuration tried itself?, (the reported interval holds the true improvement?, its width)
    or None) of a recommendation: the best fresh mean with replicates, else the best observed
    trial. `fresh`: each replicated configuration's {seed: value}, the baseline's under
    "baseline"."""
    interval = None
    if fresh:
        candidates = {k: v for k, v in fresh.items() if k != "baseline"}
        key = min(candidates, key=lambda k: statistics.fmean(candidates[k].values()))
        pick = next(t for t in trials if str(t.index) == key)
        value = statistics.fmean(candidates[key].values())
        # One fresh run a side has no seed spread to measure: the pipeline's interval there is the
        # eval set's bootstrap (per-example scores), which the grid's scalar losses cannot replay.
        if len(fresh.get("baseline", {})) >= 2 and len(candidates[key]) >= 2:
            interval = covers(noisy, pick.parameters, candidates[key], fresh["baseline"])
    else:
        pick = min(trials, key=lambda t: t.eval_loss)
        value = pick.eval_loss
    truth = noisy.truth[noisy.key(pick.parameters)]
    tried = min(noisy.truth[noisy.key(t.parameters)] for t in trials)
    return (
        truth <= tried * within,
        value - truth,
        cost,
        truth <= noisy.best * within,
        truth == tried,
        interval,
    )


def covers(
    noisy: NoisyTable, params: dict, runs: dict[int, float], base: dict[int, float]
) -> tuple[bool, float]:
    """The pipeline's interval of the recommendation's improvement over the baseline, from their
    fresh seeds (`core.stats.improvement`, scalar scores, paired where the seeds match), against
    the true improvement. (holds it?, width in points of percent)"""
    from pipeline.core.stats import improvement, scalar_scores

    def scores(values: dict[int, float]) -> list:
        return [scalar_scores(v, seed, "eval_loss") for seed, v in sorted(values.items())]

    gap = improvement(scores(runs), scores(base), minimize=True, confidence=0.95)
    truth_b = noisy.truth[noisy.key(BASE_PARAMS)]
    true_gap = 100.0 * (truth_b - noisy.truth[noisy.key(params)]) / truth_b
    return gap.low <= true_gap <= gap.high, gap.high - gap.low


def replicate(noisy: NoisyTable, records: list, base_params: dict, train_seed: int, rng: random.Random):
    """Each replicate's run at its seed: replicate seed train_seed + i is the table's seed i, the
    same for the baseline and every configuration (paired by seed, as the pipeline pairs them).
    Each replicated configuration's {seed: value} (the baseline's under "baseline") and the cost."""
    fresh: dict[str, dict[int, float]] = {}
    cost = 0.0
    for r in records:
        params = base_params if r.of == "baseline" else r.parameters
        slot = r.seed - train_seed
        fresh.setdefault(r.of, {})[slot] = noisy.at_seed(params, slot, rng)[0]
        cost += noisy.cost[noisy.key(params)]
    return fresh, cost


def _setting(label: str) -> tuple[int, int, bool, bool]:
    """`2x2`: top_k x seeds, fixed. `race3`: the two finalists raced up to 3 seeds, the baseline on
    each round's seed; `race3p`: the same with the remembered noise as the race's prior."""
    if label.startswith("race"):
        return 2, int(label[4:].rstrip("p")), True, label.endswith("p")
    top_k, seeds = (int(x) for x in label.split("x"))
    return top_k, seeds, False, False


def remembered_noise(noisy: NoisyTable):
    """What an earlier search of the demo would have remembered: the per-seed differences of the
    slice's configurations from its best one, over the seeds outside the replicates' slots."""
    from pipeline.core.race import measured_noise

    keep = sorted({1, 2, 3, 4, 5} - REPLICATE_SLOTS)
    values = {
        str(k): [runs[s] for s in keep] for k, runs in noisy.by_seed.items() if all(s in runs for s in keep)
    }
    return measured_noise(values, minimize=True)


def race_replicate(noisy: NoisyTable, records: list, base_params: dict, config, rng: random.Random, prior):
    """The race as the pipeline runs it (`pipeline.search.race`: each round decided from the
    records, the next one the baseline and the alive finalists on the next seed), each run's value
    drawn from the table as `replicate` draws it. Returns what `replicate` does, for the
    finalists still alive at the end."""
    from pipeline.search import race
    from pipeline.search.records import COMPLETED, SearchState
    from pipeline.search.steps.replicates import replicate_seeds

    state = SearchState("replay", 0, replicates=list(records))
    if prior is not None:
        state.race_prior = {"sd_pct": prior.sd_pct, "df": prior.df, "source": "the slice's seeds 4-5"}
    seeds, new, said, cost = replicate_seeds(config), list(records), 0, 0.0
    while new:
        for r in new:
            params = base_params if r.of == "baseline" else r.parameters
            value = noisy.at_seed(params, r.seed - config.train.seed, rng)[0]
            r.status, r.eval_loss, r.metrics = COMPLETED, value, {"eval_loss": value}
            cost += noisy.cost[noisy.key(params)]
        decided = race.decide(config, state)
        if VERBOSE:
            for done in decided.rounds[said:]:
                print(f"  race: {done.text()}")
        said = len(decided.rounds)
        new = race.next_round(state, decided, seeds)
    fresh: dict[str, dict[int, float]] = {}
    for r in state.replicates:
        if r.of == "baseline" or r.of in decided.alive:
            fresh.setdefault(r.of, {})[r.seed - config.train.seed] = r.eval_loss
    return fresh, cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["seeds", "replay", "all"], default="all")
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo-cpu.yaml"))
    ap.add_argument("--seeds", default="42,1,2,3,4", help="seeds: train seeds.")
    ap.add_argument("--other", default="lora.r=32,lora.alpha=8,train.learning_rate=0.01,train.batch_size=16")
    ap.add_argument(
        "--set", dest="overrides", action="append", default=[], help="seeds: key=value (repeatable)."
    )
    ap.add_argument("--table", default=str(ROOT / "bench" / "data" / "lora_grid.csv"))
    ap.add_argument("--seeds-table", default=str(ROOT / "bench" / "data" / "lora_grid_seeds.csv"))
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument(
        "--settings",
        default="1x1,1x2,2x1,2x2,3x2",
        help="replay: top_k x seeds (fixed) or raceN / raceNp (raced to N seeds, p: with remembered noise), "
        "comma-separated.",
    )
    ap.add_argument(
        "--extra-trials", type=int, default=4, help="replay: trials added to the no-replicate search."
    )
    ap.add_argument("--within", type=float, default=0.01)
    ap.add_argument(
        "--margin",
        type=float,
        default=0.0,
        help="replay: search.replicates.margin of the raced settings, in percent (the pipeline's default is "
        "1.0; 0 here: only a drop or the cap ends a race, as in docs/benchmarks.md's first race table).",
    )
    ap.add_argument("--verbose", action="store_true", help="replay: print each race round.")
    args = ap.parse_args()
    global VERBOSE
    VERBOSE = args.verbose
    if args.part in ("seeds", "all"):
        seeds_part(args)
    if args.part in ("replay", "all"):
        replay_part(args)


if __name__ == "__main__":
    with console.muted():  # Ax's notes (a duplicate proposal) would drown the tables
        main()
