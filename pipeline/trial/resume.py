"""A run's checkpoints as its trial sees them: where they go, and, for a run that is continued
(`RunSpec.resume`), the checkpoint it continues from.

The checkpoint is looked for on this machine first (`train.output_dir/checkpoints/<run id>/`),
then in the run's artifacts (`checkpoint/`), where a Ray worker copies each one it seals: its
disk may go with it, and the replacement worker may be on another node. A continued run is
tagged with the step it continued from and how many times it was continued; the metrics it
streamed before the interruption are not logged again.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.config import PipelineConfig, TrainConfig, config_fingerprint
from pipeline.core import console, names
from pipeline.core.errors import one_line
from pipeline.data.prepare import PreparedData
from pipeline.training.checkpoint import MANIFEST, PREFIX, Checkpoint, Identity, Plan, folder_for, latest

log = logging.getLogger("pipeline")


def checkpoint_plan(
    run: tracking.TrackedRun, config: PipelineConfig, data: PreparedData, *, resume: bool, to_store: bool
) -> Plan | None:
    """The run's checkpoint plan (None with `train.checkpoints: false`). `resume`: find the
    checkpoint to continue from and tag the run; `to_store`: copy each checkpoint to the run's
    artifacts."""
    train = config.train
    if not train.checkpoints:
        return None
    identity = Identity.of(config_fingerprint(config), data.fingerprint, data.eval_fingerprint)
    folder = folder_for(train.output_dir, run.run_id)
    found = _find(run.run_id, folder, identity) if resume else None
    if resume:
        if found is not None:
            console.say(f"run {run.run_id}: continuing from its checkpoint at step {found.step}")
        earlier = tracking.get_run(run.run_id)
        times = int((earlier.tags if earlier else {}).get(names.TRIAL_RESUMES, 0)) + 1
        run.set_tags({names.TRIAL_RESUMES: times, names.TRIAL_RESUMED_FROM_STEP: found.step if found else 0})
    mirror = (lambda path: _copy_to_store(run, path)) if to_store else None
    return Plan(folder, identity, found, mirror)


def discard_checkpoints(train: TrainConfig, run_id: str) -> None:
    """A run that ended (or failed: it is not continued) needs its checkpoints no more, unless
    `train.keep_checkpoints`."""
    if not train.keep_checkpoints:
        shutil.rmtree(folder_for(train.output_dir, run_id), ignore_errors=True)


def has_checkpoint(train: TrainConfig, run_id: str) -> bool:
    """Can the run continue from a sealed checkpoint (here, or in its artifacts; never with
    `train.checkpoints: false`)? Whether it is usable is for the run that continues to find out
    (it falls back to step 0)."""
    if not train.checkpoints:
        return False
    return any(folder_for(train.output_dir, run_id).glob(f"{PREFIX}*/{MANIFEST}")) or in_store(run_id)


def in_store(run_id: str) -> bool:
    """Has the run a sealed checkpoint's copy in its artifacts (a Ray worker's)?"""
    return tracking.has_artifact(run_id, f"{names.CHECKPOINT_ARTIFACT}/{MANIFEST}")


def _find(run_id: str, folder: Path, identity: Identity) -> Checkpoint | None:
    """The checkpoint to continue from: here, else the run's artifact copy, else None."""
    found = latest(folder, identity)
    if found is None and not any(folder.glob(f"{PREFIX}*")):
        _fetch_from_store(run_id, folder)
        found = latest(folder, identity)
    return found


def _copy_to_store(run: tracking.TrackedRun, path: Path) -> None:
    """The sealed checkpoint into the run's `checkpoint/` artifact, its manifest last (a copy cut
    short then fails its hashes and is refused, not continued)."""
    with tempfile.TemporaryDirectory() as tmp:
        files = Path(tmp) / "files"
        shutil.copytree(path, files, ignore=shutil.ignore_patterns(MANIFEST))
        run.log_artifacts(files, names.CHECKPOINT_ARTIFACT)
    run.log_artifact(path / MANIFEST, names.CHECKPOINT_ARTIFACT)


def _fetch_from_store(run_id: str, folder: Path) -> None:
    """The run's artifact copy of its latest checkpoint, into `folder/checkpoint-<step>/`."""
    if not in_store(run_id):
        return  # none (not on a Ray worker, or killed before its first checkpoint): step 0
    with tempfile.TemporaryDirectory() as tmp:
        try:
            got = Path(tracking.download_artifacts(run_id, names.CHECKPOINT_ARTIFACT, tmp, quiet=True))
            step = int(json.loads((got / MANIFEST).read_text())["step"])
        except Exception as e:  # an unreachable store, a copy cut short: from step 0
            log.warning(
                f"run {run_id}: its checkpoint copy could not be fetched ({one_line(e, 120)}); training from step 0"
            )
            return
        folder.mkdir(parents=True, exist_ok=True)
        shutil.move(str(got), folder / f"{PREFIX}{step}")
        console.say(f"checkpoint at step {step} of run {run_id} fetched from the tracking store")


def once_per_step(run_id: str, sink: Any) -> Any:
    """`sink(metrics, step)` for a continued run: a metric at a step the run has logged already
    (before its interruption) is not logged again, so each curve has one point per step."""
    logged = tracking.last_steps(run_id)

    def new_only(metrics: dict[str, float], step: int) -> None:
        fresh = {k: v for k, v in metrics.items() if step > logged.get(k, -1)}
        if fresh:
            sink(fresh, step)

    return new_only
