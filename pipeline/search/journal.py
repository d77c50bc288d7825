"""The search's journal: its records (`records.py`) on disk.

After every change the search saves them with
Ax's own JSON, locally (each file written to a temporary name, then moved into place, so a crash
mid-write leaves the previous file whole) and on the parent run (`search_state/`). A resumed
search loads the local copy, or the run's when this machine has none, and reconciles both with
MLflow: trials and runs a crash left running are ended KILLED and their configs run again.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.config import (
    ADDED_AT_DEFAULT,
    NO_RESULT_KEYS,
    RESULT_SECTIONS,
    PipelineConfig,
    flatten,
    load_config,
    to_dict,
)
from pipeline.core import names
from pipeline.core.errors import PipelineError, SearchFinished
from pipeline.core.files import write_atomic
from pipeline.search.ax.optimizer import Optimizer
from pipeline.search.records import (
    ABANDONED,
    CRASHED,
    EARLY_STOPPED,
    KILLED,
    RUNNING,
    SearchState,
    TrialRecord,
)
from pipeline.search.stopping import progression

# ---------------------------------------------------------------------------------------------
# On disk


def search_dir(config: PipelineConfig, parent_run_id: str) -> Path:
    """`search.output_dir/<search run id>/`: the state, the report and best_config.yaml."""
    d = Path(config.search.output_dir) / parent_run_id
    d.mkdir(parents=True, exist_ok=True)
    return d


def save(run: tracking.TrackedRun, optimizer: Optimizer, state: SearchState, directory: Path) -> None:
    """Ax's JSON and the records, locally (atomically) and as artifacts of the search run."""
    d = directory / names.STATE_DIR
    d.mkdir(parents=True, exist_ok=True)
    optimizer.save(d / names.AX_STATE_FILE)
    write_atomic(d / names.TRIALS_FILE, json.dumps(state.to_json(), indent=1, default=float))
    run.log_artifacts(d, names.STATE_DIR)


def load(parent_run_id: str, config: PipelineConfig) -> tuple[Optimizer, SearchState]:
    """An earlier search's state: the local copy if present, else the parent run's artifacts.

    The run must be a search parent of the experiment this invocation logs to."""
    tracking.setup(config.tracking)
    parent = tracking.require_search_run(parent_run_id, "resume")
    here = tracking.current_experiment_id(config.tracking)
    if parent.experiment_id != here:
        raise PipelineError(
            f"resume: run {parent_run_id} belongs to experiment {parent.experiment_id}, not to this one ({here})"
        )
    local = Path(config.search.output_dir) / parent_run_id / names.STATE_DIR
    if not (local / names.AX_STATE_FILE).is_file():
        try:
            local = Path(tracking.download_artifacts(parent_run_id, names.STATE_DIR, tempfile.mkdtemp()))
        except Exception:
            raise PipelineError(f"resume: run {parent_run_id} has no saved search state") from None
    state = SearchState.from_json(json.loads((local / names.TRIALS_FILE).read_text()))
    _refuse_changed_settings(parent_run_id, state, config)
    optimizer = Optimizer.load(local / names.AX_STATE_FILE, config)
    return optimizer, state


# What a resumed search may not change: its Ax state and its trials were made with these.
FROZEN_ON_RESUME = (
    *(f"{section}." for section in RESULT_SECTIONS),
    "search.parameters.",
    "search.constraints",
    "search.objectives",
    "search.outcome_constraints",
    "search.method",
    "search.initialization_trials",
    "search.early_stopping.progression",  # Ax's data would mix units
    "search.warm_start",  # attached once, when the search started
)


def refuse_finished(run_id: str, records: SearchState, n_trials: int) -> None:
    """SearchFinished, before any run is opened, when the search ran all its trials and ended
    (a search interrupted while finishing, or given more --n-trials, goes on)."""
    done = len(records.finished())
    run = tracking.get_run(run_id)
    if done >= n_trials and run is not None and run.status == "FINISHED":
        raise SearchFinished(
            f"search run {run_id} has finished ({done} of {n_trials} trials); nothing to do (give "
            "--n-trials more than that to run more trials)"
        )


def frozen_settings(config: PipelineConfig) -> dict[str, Any]:
    """The config's values of the keys a resume may not change, flat (`train.max_steps`): the
    records keep them from the search's start, so a resume checks without loading that config."""
    return {
        k: v
        for k, v in flatten(to_dict(config)).items()
        if k.startswith(FROZEN_ON_RESUME) and k not in NO_RESULT_KEYS
    }


def _refuse_changed_settings(parent_run_id: str, state: SearchState, config: PipelineConfig) -> None:
    """PipelineError naming every search-space or trial key that differs from the config the
    search started with (kept in its records)."""
    old = state.settings
    if not old:  # records saved before they kept the settings: the config logged on the run
        with tempfile.TemporaryDirectory() as tmp:
            path = tracking.download_run_file(parent_run_id, names.CONFIG_FILE, tmp, "resume")
            old = frozen_settings(load_config(path))
    new = frozen_settings(config)
    # A key added to the config since the search started is unchanged at the value it adds.
    changed = sorted(
        k
        for k in old.keys() | new.keys()
        if old.get(k, ADDED_AT_DEFAULT.get(k)) != new.get(k, ADDED_AT_DEFAULT.get(k))
    )
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise PipelineError(
            f"resume: search run {parent_run_id} changed since it started ({diffs}); its Ax state and "
            "trials belong to the old settings. Start a new search with the new ones; it can reuse "
            f"this search's trials with search.warm_start: [{parent_run_id}]"
        )


def fetch_config(parent_run_id: str, config: PipelineConfig, dst: str | Path) -> Path:
    """The config.yaml a search logged when it started: a resumed search continues with it.

    `config` (the command line's) says which store to look in."""
    tracking.setup(config.tracking)
    tracking.require_search_run(parent_run_id, "resume")
    return tracking.download_run_file(parent_run_id, names.CONFIG_FILE, dst, "resume")


def reconcile(
    optimizer: Optimizer, state: SearchState, continuable: Callable[[TrialRecord], bool] = lambda r: False
) -> None:
    """After a crash, make the records and Ax agree with what MLflow saw happen.

    A trial that Ax or the records still call running, but whose run ended with a status
    (completed, early-stopped, failed, abandoned: the process died after the trial, before the
    save), is recorded from that run and not trained again. A trial with no such run was
    interrupted: killed; it continues from its checkpoint in its own run when it has one
    (`continuable`), else its config runs again first. Child runs left RUNNING end KILLED."""
    baseline_index = 0 if state.baseline and state.baseline.in_search_space else None
    for child in tracking.running_children(state.parent_run_id):
        tracking.end_killed(child.run_id, CRASHED)
        rec = state.record(child.trial_index) if child.trial_index is not None else None
        if rec is not None:
            rec.run_id = child.run_id
    ended = {
        r.trial_index: r
        for r in tracking.trials_of(state.parent_run_id)
        if r.trial_index is not None and r.tags.get(names.TRIAL_STATUS) in names.FINISHED_STATUSES
    }
    in_ax = optimizer.running()
    unsure = set(in_ax) | {t.index for t in state.trials if t.status == RUNNING}
    for index in sorted(unsure):
        rec = state.record(index)
        if index in ended and rec is not None:
            _from_run(rec, ended[index], optimizer if index in in_ax else None)
            if rec.generation_method == "retry" and rec.parameters in state.retry:
                state.retry.remove(rec.parameters)  # it ran again and ended: not a third time
            continue
        if rec is not None and rec.status == RUNNING:
            rec.status, rec.failure_reason = KILLED, CRASHED
        if index in in_ax and rec is not None and rec.run_id and continuable(rec):
            if index not in state.resumable:
                state.resumable.append(index)
            continue
        if index in state.resumable:
            state.resumable.remove(index)
        if index in in_ax:
            optimizer.fail(index, CRASHED)
        params = in_ax.get(index, rec.parameters if rec else None)
        if params is not None and index != baseline_index and params not in state.retry:
            state.retry.append(params)


def _from_run(rec: TrialRecord, run: tracking.RunRecord, optimizer: Optimizer | None) -> None:
    """Fill a record from its trial's finished run; tell Ax (when it still waits) how it ended."""
    rec.run_id, rec.status = run.run_id, run.tags[names.TRIAL_STATUS]
    rec.wall_seconds = ((run.end_time or run.start_time) - run.start_time) / 1000
    if rec.status in names.SCORED_STATUSES:
        m = dict(run.metrics)
        rec.eval_loss, rec.metrics, rec.eval_fingerprint = run.eval_loss, m, run.eval_fingerprint
        rec.steps, rec.max_steps = int(m.get(names.TRAIN_STEPS, 0)), int(m.get(names.TRAIN_MAX_STEPS, 0))
        rec.examples_per_step = run.examples_per_step
        rec.evals = tracking.metric_history(run.run_id, names.EVAL_LOSS)
        if optimizer is not None:
            at = progression(optimizer.config, rec.steps, rec.examples_per_step)
            optimizer.complete(rec.index, optimizer.ax_metrics(m), at, rec.status == EARLY_STOPPED)
    else:
        rec.failure_reason = run.tags.get(names.TRIAL_FAILURE_REASON, rec.status)
        if optimizer is not None and rec.status == ABANDONED:
            memory = run.metrics.get(names.OOM_MEMORY_GB)
            rec.metrics = {names.OOM_MEMORY_GB: memory} if memory is not None else {}
            optimizer.out_of_memory(rec.index, memory)
        elif optimizer is not None:
            optimizer.fail(rec.index, rec.failure_reason)
