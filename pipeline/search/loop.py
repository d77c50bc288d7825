"""The search: ask Ax for trials, hand them to an executor, feed the results back; the budget and
the failure policy; then the end of a search (summary, best config, registry, report).

One MLflow parent run holds the search; the baseline and every trial are nested child runs made
by `run_trial` wherever the executor runs them. After every change the Ax state and the trial
records are saved (`journal.py`), so a crashed or interrupted search resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.config import PipelineConfig, config_fingerprint, flatten, noise_key, to_yaml, trial_config
from pipeline.core import console, interrupt, names
from pipeline.core.errors import SearchAborted
from pipeline.core.events import EvalEvent
from pipeline.core.provenance import git_commit, package_versions
from pipeline.core.timing import PhaseTimer
from pipeline.model.adapter import discard_local_adapter
from pipeline.search import budget, failure_rate, journal
from pipeline.search.ax.optimizer import Optimizer, Proposal
from pipeline.search.executors.local import Executor, InFlight, JobOutcome, TrialJob
from pipeline.search.executors.packed import local_executor
from pipeline.search.finish import SearchResult, finish
from pipeline.search.preflight import check_before_run
from pipeline.search.records import (
    ABANDONED,
    COMPLETED,
    EARLY_STOPPED,
    FAILED,
    KILLED,
    SearchState,
    TrialRecord,
)
from pipeline.search.report.summary import best_trial, trial_name
from pipeline.search.steps import baseline, interrupted, replicates, warm
from pipeline.search.stopping import progression, progression_unit, unreachable
from pipeline.trial.resources import Resources
from pipeline.trial.run import RunSpec


def run_search(
    config: PipelineConfig, resume: str | None = None, quiet: bool = False, executor: Executor | None = None
) -> SearchResult:
    """Search with a validated config (the CLI builds it): a new search, or `resume` the search
    run of that id; trials run where `search` says (`local_executor`, Ray) unless given one."""
    check_before_run(config, resume)
    resources = Resources()  # shared by the baseline check and the local executor's trials
    if executor is None and config.search.executor == "ray":
        from pipeline.search.executors.ray import RayExecutor

        executor = RayExecutor(config, tracking.resolve_tracking_uri(config.tracking))
    elif executor is None:
        executor = local_executor(config.search.pack, quiet, resources)
    return Search(config, executor, resources, resume=resume).run()


class Search:
    """One session of a search: owns the Ax optimizer, the records, and (while `run` runs) the
    parent run."""

    def __init__(
        self,
        config: PipelineConfig,
        executor: Executor,
        resources: Resources | None = None,
        clock: Callable[[], float] = time.perf_counter,
        resume: str | None = None,
    ):
        if config.search is None:
            raise ValueError("a search needs a config with a search section")
        self.config = config
        self.search = config.search
        self.executor = executor
        self.resources = resources or Resources()
        self.trial_base = trial_config(config)
        self.resume = resume
        # A resumed search's Ax state and records (refused here when it has nothing left to do),
        # or new ones; the parent run's id is theirs once `run` opens it.
        if resume:
            self.optimizer, self.records = journal.load(resume, config)
            journal.refuse_finished(resume, self.records, self.search.n_trials)
        else:
            self.optimizer = Optimizer.create(config)
            self.records = SearchState(
                parent_run_id="", n_trials=self.search.n_trials, settings=journal.frozen_settings(config)
            )
        self.parent_run: tracking.TrackedRun | None = None  # open while `run` runs
        # This session's time by phase (ax, trials, baseline, state, report, registry), logged on
        # the parent run as search_time_<phase>_s; each trial logs its own breakdown.
        self.timer = PhaseTimer()
        self.clock = clock  # the budgets' clock (tests drive a fake one)
        self.flight: InFlight[TrialRecord] = InFlight(executor, clock)  # submitted, by Ax index
        # Wall time is added to the records at every save, so a hard kill (SIGKILL, a lost node)
        # loses at most the time since the last save: the clock value counted up to is this.
        self.accounted_at = clock()

    @property
    def dir(self) -> Path:
        """This search's local folder (records, Ax state, report)."""
        return journal.search_dir(self.config, self.records.parent_run_id)

    # --- lifecycle, in order ---------------------------------------------------------------

    def run(self) -> SearchResult:
        """Open (or reopen) the parent run, then: baseline, warm start, trials, replicates, finish."""
        self.accounted_at = self.clock()
        with (
            interrupt.graceful_stop(),
            tracking.start_run(
                self._tracking(), self._run_name(), self._tags(), resume_run_id=self.resume
            ) as run,
        ):
            self.parent_run = run
            url = tracking.run_url(run.experiment_id, run.run_id)
            console.say(
                f"search run {run.run_id} {'resumed' if self.resume else 'started'}"
                + (f" ({url})" if url.startswith("http") else "")
                + f"; after an interruption, continue it with --resume {run.run_id}"
            )
            self._open(run)
            try:
                self._steps()
                failure_rate.require_a_score(self.records.finished())
            except (KeyboardInterrupt, SearchAborted) as e:
                self.records.stop_reason = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
                self._kill_pending()
                self._save()  # with the session's wall time
                raise
            finally:
                self.executor.close()
            self._save()  # with the session's wall time
            return self._finish()

    def _steps(self) -> None:
        """What a session does, each step skipped when an earlier session did it (and saved)."""
        records = self.records
        self._check_early_stopping()
        if records.baseline is None:
            with self.timer.phase("baseline"):
                self._baseline()
            self._save()
        if records.warm is None:
            with self.timer.phase("ax"):
                records.warm = warm.start(self.config, self.optimizer, self.parent_run, self.resources)
            self._save()
        self._loop()
        if self.search.replicates is not None and not records.stop_reason:
            self._replicate()

    def _open(self, run: tracking.TrackedRun) -> None:
        """A new search's config on its run, or a resumed one's records reconciled with MLflow."""
        records = self.records
        if self.resume is None:
            records.parent_run_id = run.run_id
            run.log_params(
                {f"search.{k}": v for k, v in flatten(self.search.model_dump(mode="json")).items()}
            )
            run.log_text(to_yaml(self.config, f"resolved config of search {run.run_id}"), names.CONFIG_FILE)
        else:
            records.n_trials = self.search.n_trials
            records.stop_reason = ""  # this session's own, if it stops early too
            journal.reconcile(self.optimizer, records, lambda r: interrupted.can_continue(self.config, r))
        records.sessions += 1
        self.optimizer.noise_sd = records.noise_sd

    def _check_early_stopping(self) -> None:
        """One warning line now (and a note in the report) when the early-stopping rule can never
        act in this search: too few trials for min_curves, or min_progression past every trial's
        last evaluation."""
        data = self.resources.data(self.trial_base)  # the baseline needs it next anyway
        in_space = self.optimizer.in_search_space(baseline.baseline_parameters(self.config))
        why = unreachable(self.config, data.stats.train_examples, in_space)
        if why:
            self.optimizer.note(f"warning: early stopping cannot act in this search: {why}")

    def _baseline(self) -> None:
        """Run (or reuse) the baseline; give it to Ax as the status-quo arm when Ax takes it."""
        record = baseline.find_or_train(self.config, self.parent_run, self.executor, self.resources)
        record.in_search_space = self.optimizer.in_search_space(record.parameters)
        if record.in_search_space:
            evals = record.evals
            last = progression(self.config, int(evals[-1][0]), record.examples_per_step) if evals else None
            ax = self.optimizer.ax_metrics(record.metrics)
            record.in_search_space = self.optimizer.attach_baseline(record.parameters, ax, last)
        self.records.baseline = record
        self.parent_run.set_tags({names.SEARCH_BASELINE_RUN: record.run_id})
        self.parent_run.log_metrics({names.BASELINE_EVAL_LOSS: record.eval_loss}, step=0, flush=True)

    def _loop(self) -> None:
        records = self.records
        while len(records.finished()) < records.n_trials:
            interrupt.raise_if_requested("stop requested between trials")
            spent = self._budget_spent()
            if spent:
                records.stop_reason = spent
                console.say(f"stopping: {records.stop_reason}")
                return
            self._fill()
            with self.timer.phase("trials"):
                record, outcome, device_seconds = self.flight.wait()
            record.device_seconds += device_seconds  # added: a continued trial's earlier sessions count too
            if outcome.result is not None:  # a trial without a metric the search needs ends it
                baseline.require_metrics(outcome.result.metrics, self.search, f"trial {record.index}")
            self._record(record, outcome)
            if outcome.status == KILLED:  # the trial's worker was interrupted: so is the search
                raise outcome.error if isinstance(outcome.error, KeyboardInterrupt) else KeyboardInterrupt()
            self._keep_best_adapter()
            # No save here: the next trial's submit saves (Ax's JSON is most of a save's cost, and
            # on short trials it showed), and so does every way out of the loop. A crash in
            # between loses nothing: the trial's run has ended with its status and metrics, and
            # resume takes it from there (journal.reconcile).
            self._progress(record, outcome.where)
            failure_rate.check(self.records.finished(), self.search.max_failure_rate)
            if self.optimizer.broken:
                raise SearchAborted(f"search stopped: {self.optimizer.broken}")

    def _replicate(self) -> None:
        """The seed replicates (`search.replicates`), then their means and sems to Ax."""
        runner = replicates.Runner(self.flight, self._budget_spent, self._save)
        replicates.replicate(
            self.config, self.records, self.optimizer, self.parent_run.run_id, runner, self.timer
        )
        self._save()

    def _fill(self) -> None:
        """Give every idle worker a trial: interrupted trials first (continued from their
        checkpoints, or their configs again), then one batch from Ax for the rest (locally: one
        trial at a time, as always)."""
        records = self.records
        want = min(self.executor.idle(), records.n_trials - len(records.finished()) - len(self.flight))
        if want <= 0:
            return
        for index in [i for i in records.resumable if i not in self.flight][:want]:
            job = interrupted.continuation(records, index, self.trial_base)
            self.flight.submit(job, records.record(index), self._on_eval)
            want -= 1
        running = [t.parameters for t in self.flight.records.values()]
        retries = [p for p in records.retry if p not in running][:want]
        with self.timer.phase("ax"):
            batch = [Proposal(self.optimizer.retry(p), dict(p), "retry") for p in retries]
            if want > len(batch):
                batch += self.optimizer.ask_batch(want - len(batch))
        if not batch and not self.flight:
            raise SearchAborted("search stopped: Ax proposed no trial (no configuration left to try)")
        for index, params, method in batch:
            self._submit(index, params, method)

    def _submit(self, index: int, params: dict[str, Any], method: str) -> None:
        """Record the trial (its config survives a crash from here on), then start it."""
        records = self.records
        record = TrialRecord(index=index, parameters=params, generation_method=method)
        record.run_name = trial_name(len(records.finished()) + len(self.flight) + 1, params, method)
        records.trials.append(record)
        self._save()
        tags = {names.AX_TRIAL_INDEX: index, names.AX_GENERATION_METHOD: method}
        spec = RunSpec(names.ROLE_TRIAL, record.run_name, self.parent_run.run_id, tags)
        self.flight.submit(TrialJob(index, self.trial_base, params, spec), record, self._on_eval)

    def _on_eval(self, event: EvalEvent) -> bool:
        """Each evaluation of a running trial goes to Ax at its progression (steps or examples
        seen, `search.early_stopping.progression`); Ax's answer: stop the trial early? A spent
        budget stops it too."""
        loss = event.metrics[names.EVAL_LOSS]
        if not math.isfinite(loss):
            return False
        stop = self.optimizer.report_evaluation(event.trial, event.at(progression_unit(self.config)), loss)
        if not stop and self._budget_spent():
            self.flight.records[event.trial].stopped_by = "budget"
            return True
        return stop

    def _budget_spent(self) -> str | None:
        """Why the search must stop now (a spent budget), or None."""
        return budget.spent(
            self.search,
            self.records,
            self.clock(),
            self.accounted_at,
            self.flight.started,
            self.executor.devices_per_trial,
        )

    def _record(self, record: TrialRecord, outcome: JobOutcome) -> None:
        """Feed a finished trial back to Ax and into its record (its run tagged itself)."""
        records, index = self.records, record.index
        # Added: a continued trial's earlier sessions count too.
        record.wall_seconds += outcome.wall_seconds
        record.run_id = outcome.run_id or record.run_id
        if outcome.status == KILLED:
            self._mark_killed(record)
            return
        if record.generation_method == "retry" and record.parameters in records.retry:
            records.retry.remove(record.parameters)
        if outcome.status in (FAILED, ABANDONED):
            record.status, record.failure_reason = outcome.status, outcome.reason
            if outcome.status == ABANDONED:  # Ax learns where memory runs out (or skips the point)
                record.metrics = {names.OOM_MEMORY_GB: outcome.memory_gb} if outcome.memory_gb else {}
                self.optimizer.out_of_memory(index, outcome.memory_gb)
            else:
                self.optimizer.fail(index, outcome.reason or "failed")
            return
        result = outcome.result
        if result.status != EARLY_STOPPED:
            record.stopped_by = None  # the budget asked at the last evaluation, which ends it anyway
        record.eval_loss, record.metrics, record.evals = result.eval_loss, result.metrics, result.evals
        record.steps, record.max_steps = result.steps, result.max_steps
        record.eval_fingerprint, record.adapter_dir = result.eval_fingerprint, str(result.adapter_dir)
        with self.timer.phase("ax"):
            at = progression(self.config, result.steps, result.examples_per_step)
            self.optimizer.complete(
                index, self.optimizer.ax_metrics(result.metrics), at, result.status == EARLY_STOPPED
            )
        record.status = result.status

    def _keep_best_adapter(self) -> None:
        """Keep the local adapter of the best trial so far (the registry takes it from there);
        the others are on their runs."""
        best = best_trial(self.records, self.search)
        for t in self.records.trials:
            if t.adapter_dir and t is not best:
                discard_local_adapter(t.adapter_dir)
                t.adapter_dir = None

    def _progress(self, record: TrialRecord, where: str = "") -> None:
        records = self.records
        n = len(records.finished())
        best = best_trial(records, self.search)
        metrics = {}
        if record.eval_loss is not None:
            metrics[names.TRIAL_EVAL_LOSS] = record.eval_loss
        if best is not None:
            metrics[names.BEST_EVAL_LOSS] = best.eval_loss
        self.parent_run.log_metrics(metrics, step=n, flush=True)
        elapsed = records.wall_seconds + self.clock() - self.accounted_at
        eta = elapsed / max(n, 1) * (records.n_trials - n)
        loss = f"{record.eval_loss:.4f}" if record.eval_loss is not None else "-"
        best_text = f"best {best.eval_loss:.4f} ({best.run_name.split()[0]})" if best else "best -"
        failure = (
            f" | {record.failure_reason}{where}"
            if record.failure_reason and record.status != COMPLETED
            else ""
        )
        console.say(
            f"[{n}/{records.n_trials}] {record.run_name} | eval_loss {loss} {record.status} | {best_text} | "
            f"{console.duration(elapsed)} elapsed, ETA {console.duration(eta)}{failure}"
        )

    def _kill_pending(self) -> None:
        """Trials still running when the search stops (in parallel, the others' workers are
        stopped with it): killed, and their configs run first when the search resumes."""
        for record in self.flight.clear():
            self._mark_killed(record)

    def _mark_killed(self, record: TrialRecord) -> None:
        interrupted.mark_killed(self.config, self.records, self.optimizer, record)

    def _finish(self) -> SearchResult:
        """The end: best trial, summary metrics, best_config.yaml, registry, report."""
        return finish(self.config, self.records, self.optimizer, self.parent_run, self.dir, self.timer)

    # --- helpers ---------------------------------------------------------------------------

    def _save(self) -> None:
        """The records and Ax's state, with this session's wall time up to now."""
        now = self.clock()
        self.records.wall_seconds += now - self.accounted_at
        self.accounted_at = now
        with self.timer.phase("state"):
            journal.save(self.parent_run, self.optimizer, self.records, self.dir)

    def _tracking(self) -> Any:
        return self.config.tracking.model_copy(update={"log_system_metrics": False})

    def _run_name(self) -> str:
        model = Path(self.config.model.name_or_path).name
        return f"search {model} {self.search.n_trials} trials seed={self.search.seed}"

    def _tags(self) -> dict[str, str]:
        return {
            names.ROLE: names.ROLE_SEARCH,
            names.BASE_MODEL: self.config.model.name_or_path,
            names.CONFIG_FINGERPRINT: config_fingerprint(self.config),
            names.NOISE_KEY: noise_key(self.config),
            names.GIT_COMMIT: git_commit(Path(__file__).parent),
            names.PACKAGE_VERSIONS: json.dumps(package_versions(), sort_keys=True),
        }
