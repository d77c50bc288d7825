"""What becomes of a trial that was interrupted (Ctrl-C, SIGTERM, a SIGKILLed search, a lost
worker): it continues from its last checkpoint, or it runs again from step 0.

A trial with a sealed checkpoint keeps its Ax trial running and its MLflow run: a resumed search
resubmits it first, with `RunSpec.resume`, and it goes on from that checkpoint in the same run
under the same Ax index, so early stopping sees one curve per trial. A trial killed before its
first checkpoint is failed in Ax and its configuration runs again first, as a new trial.
"""

from __future__ import annotations

from pipeline import tracking
from pipeline.config import PipelineConfig
from pipeline.core import names
from pipeline.search.ax.optimizer import Optimizer
from pipeline.search.executors.local import TrialJob
from pipeline.search.records import KILLED, RUNNING, SearchState, TrialRecord
from pipeline.trial.resume import has_checkpoint
from pipeline.trial.run import RunSpec


def can_continue(config: PipelineConfig, record: TrialRecord) -> bool:
    """Has the trial's run a checkpoint to continue from?"""
    return record.run_id is not None and has_checkpoint(config.train, record.run_id)


def mark_killed(
    config: PipelineConfig, records: SearchState, optimizer: Optimizer, record: TrialRecord
) -> None:
    """An interrupted trial: to be continued from its checkpoint (Ax keeps it running), or failed
    in Ax (its partial data dropped) with its config first in line to run again."""
    record.status, record.failure_reason = KILLED, "interrupted"
    if record.run_id is None:  # killed with the search (a Ray worker's): its run tells
        runs = [r for r in tracking.trials_of(records.parent_run_id) if r.trial_index == record.index]
        record.run_id = runs[-1].run_id if runs else None
    if can_continue(config, record):
        if record.index not in records.resumable:
            records.resumable.append(record.index)
        return
    optimizer.fail(record.index, "interrupted")
    if record.parameters not in records.retry:
        records.retry.insert(0, record.parameters)


def continuation(records: SearchState, index: int, base: PipelineConfig) -> TrialJob:
    """The job that continues trial `index` in its own run (taken off the resumable list)."""
    record = records.record(index)
    records.resumable.remove(index)
    record.status, record.failure_reason = RUNNING, None
    tags = {names.AX_TRIAL_INDEX: index, names.AX_GENERATION_METHOD: record.generation_method}
    spec = RunSpec(names.ROLE_TRIAL, record.run_name, records.parent_run_id, tags, resume=record.run_id)
    return TrialJob(index, base, record.parameters, spec)
