"""Trials lost to out-of-memory, with and without the search learning from them.

A simulated GPU on CPU: a trial needs 0.1 GiB x rank x batch of a 10 GiB device; past it, it
raises CUDA's out-of-memory error after allocating 8 GiB, and a trial that fits reports its need
as its memory peak (as `peak_rss_gb`, the memory metric a CPU run has). The demo search over rank
x batch x learning rate (the objective favours large batches) with `peak_rss_gb <= 9` runs twice
per seed, training for real:

- learns: OOM trials reach Ax as measured infeasible points (memory as its logarithm), and a
  proposal at least as large as an OOM trial is told to Ax as out of memory without running;
- abandons: the behaviour before: the OOM trial is abandoned (Ax skips that one point only).

    python bench/oom.py                  # seeds 0-4, 12 trials each
    python bench/oom.py --seeds 3 --trials 12
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core import console, names  # noqa: E402

GB_PER_RANK_EXAMPLE = 0.1
CAPACITY_GB = 10.0  # rank x batch > 100 does not fit
HELD_GB = 8.0  # what a trial holds when its next allocation fails
BOUND_GB = 9  # the user's constraint: a margin below the capacity (as `peak_gpu_mem_gb <= 15` on a T4)
SPACE = (
    "{lora.r: {type: choice, values: [2, 4, 8, 16, 32]}, train.batch_size: {type: choice, values: [2, 4, 8, 16]},"
    " train.learning_rate: {type: range, bounds: [3.0e-4, 1.0e-2], log: true}}"
)
Trial = tuple[int, int, bool, str]  # rank, batch, ran out of memory, how Ax proposed it


@contextlib.contextmanager
def simulated_gpu() -> Iterator[None]:
    """Trials in this process run on the simulated device described above."""
    import torch

    import pipeline.training.metrics as metrics
    import pipeline.trial.run as trial_mod

    real_train = trial_mod.train

    def train(model, job, *args, memory=None, **kwargs):
        need = GB_PER_RANK_EXAMPLE * job.config.lora.r * job.config.train.batch_size
        if need > CAPACITY_GB:
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {need - HELD_GB:.2f} GiB. GPU 0 has a total capacity "
                f"of {CAPACITY_GB:.2f} GiB of which 0.10 GiB is free. Of the allocated memory {HELD_GB:.2f} GiB "
                "is allocated by PyTorch"
            )
        memory.simulated = need
        return real_train(model, job, *args, memory=memory, **kwargs)

    def peaks(self) -> dict[str, float]:
        return {names.PEAK_RSS_GB: getattr(self, "simulated", 0.0)}

    with (
        mock.patch.object(trial_mod, "train", train),
        mock.patch.object(metrics.MemoryMonitor, "peaks", peaks),
    ):
        yield


@contextlib.contextmanager
def abandoning() -> Iterator[None]:
    """The search as before: an OOM trial only abandoned, no rule for larger configurations."""
    from pipeline.search.ax.optimizer import Optimizer

    with (
        mock.patch.object(Optimizer, "out_of_memory", lambda self, i, gb: self.abandon(i) or False),
        mock.patch.object(Optimizer, "out_of_memory_trials", lambda self: {}),
    ):
        yield


def run(work: Path, seed: int, trials: int, sets: list[str] = ()) -> list[Trial]:
    """One demo search on the simulated device; every trial as (rank, batch, OOM?, method)."""
    from pipeline.search import run_search, search_config

    overrides = [
        f"search.output_dir={work / 'search'}",
        f"train.output_dir={work / 'out'}",
        f"tracking.experiment_name=oom-{work.name}",
        f"registry.model_name=oom-{work.name}",
        "tracking.log_system_metrics=false",
        "search.replicates=null",
        "search.early_stopping.enabled=false",
        "search.initialization_trials=4",
        "search.max_failure_rate=1.0",
        f"search.seed={seed}",
        "train.max_steps=10",
        "train.eval_steps=5",
        "eval.generation_samples=0",
        shlex.quote(f"search.parameters={SPACE}"),
        shlex.quote(f"search.outcome_constraints=[peak_rss_gb <= {BOUND_GB}]"),
        *sets,
    ]
    config = search_config(ROOT / "configs" / "demo-cpu.yaml", overrides, n_trials=trials)
    state = run_search(config, quiet=True).state
    return [
        (
            t.parameters["lora.r"],
            t.parameters["train.batch_size"],
            t.status == names.ABANDONED,
            t.generation_method,
        )
        for t in state.trials
    ]


def model_ooms_after_the_second(trials: list[Trial]) -> list[tuple[int, int]]:
    """The BoTorch proposals after the search's second OOM that ran out of memory too."""
    ooms = [i for i, (_, _, out, _) in enumerate(trials) if out]
    later = trials[ooms[1] + 1 :] if len(ooms) >= 2 else []
    return [(r, b) for r, b, out, method in later if out and method == "BoTorch"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--trials", type=int, default=12)
    args = p.parse_args()
    console.silence_library_noise(quiet=True)
    store = tempfile.mkdtemp(prefix="oom-bench-")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"
    lost: dict[str, list[int]] = {"learns": [], "abandons": []}
    after: dict[str, list[int]] = {"learns": [], "abandons": []}
    for seed in range(args.seeds):
        for mode in ("learns", "abandons"):
            with (
                tempfile.TemporaryDirectory(prefix=f"oom-{mode}-{seed}-") as work,
                simulated_gpu(),
                abandoning() if mode == "abandons" else contextlib.nullcontext(),
            ):
                trials = run(Path(work), seed, args.trials)
            lost[mode].append(sum(out for _, _, out, _ in trials))
            after[mode].append(len(model_ooms_after_the_second(trials)))
            path = " ".join(f"{r}x{b}{'!' if out else ''}" for r, b, out, _ in trials)
            print(
                f"seed {seed} {mode:8s}: {lost[mode][-1]} of {len(trials)} trials out of memory | {path}",
                flush=True,
            )
    print(
        f"\ntrials lost to OOM per {args.trials}-trial search, over {args.seeds} seeds (rank x batch, ! = OOM):"
    )
    for mode in ("learns", "abandons"):
        print(
            f"  {mode:8s}: {', '.join(map(str, lost[mode]))} (mean {statistics.fmean(lost[mode]):.1f}); "
            f"BoTorch OOMs after the second OOM: {', '.join(map(str, after[mode]))}"
        )


if __name__ == "__main__":
    main()
