"""The search: ask Ax for trials, hand them to an executor, feed the results back; the budget and
the failure policy; then the end of a search (summary, best config, registry, report).

One MLflow parent run holds the search; the baseline and every trial are nested child runs made
by `run_trial` wherever the executor runs them. After every change the Ax state and the trial
records are saved (`state.py`), so a crashed or interrupted search resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline import names, tracking
from pipeline.config import PipelineConfig, config_fingerprint, flatten, to_yaml
from pipeline.errors import SearchAborted, SearchFinished
from pipeline.interrupt import STOP_REQUESTED, graceful_stop
from pipeline.provenance import git_commit, package_versions
from pipeline.resources import Resources
from pipeline.search import baseline, replicates, warm
from pipeline.search import state as store
from pipeline.search.executor import Executor, LocalExecutor, TrialJob, TrialOutcome
from pipeline.search.finish import SearchResult, finish
from pipeline.search.preflight import check_before_run
from pipeline.search.space import Optimizer
from pipeline.search.state import (
    ABANDONED,
    COMPLETED,
    EARLY_STOPPED,
    FAILED,
    KILLED,
    SearchState,
    TrialRecord,
)
from pipeline.search.stopping import progression, progression_unit, unreachable
from pipeline.search.summary import best_trial, duration, trial_name
from pipeline.timing import PhaseTimer
from pipeline.trial import RunSpec, discard_local_adapter


def run_search(
    config: PipelineConfig, resume: str | None = None, quiet: bool = False, executor: Executor | None = None
) -> SearchResult:
    """Search with a validated config (the CLI builds it): a new search, or `resume` the search
    run of that id. Trials run one at a time in this process, or in parallel on Ray workers
    (`search.executor: ray`), unless another executor is given."""
    check_before_run(config, resume)
    resources = Resources()  # shared by the baseline check and the local executor's trials
    if executor is None and config.search.executor == "ray":
        from pipeline.search.distributed import RayExecutor  # Ray is an optional extra

        executor = RayExecutor(config, tracking.resolve_tracking_uri(config.tracking))
    return Search(config, executor or LocalExecutor(quiet, resources), resources).run(resume)


class _Interrupted(KeyboardInterrupt):
    pass


class Search:
    """One session of a search: owns the Ax optimizer, the parent run and the records."""

    def __init__(
        self,
        config: PipelineConfig,
        executor: Executor,
        resources: Resources | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if config.search is None:
            raise ValueError("a search needs a config with a search section")
        self.config = config
        self.search = config.search
        self.executor = executor
        self.resources = resources or Resources()
        self.trial_base = config.model_copy(update={"search": None})
        # This session's time by phase (ax, trials, baseline, state, report, registry), logged on
        # the parent run as search_time_<phase>_s; each trial logs its own breakdown.
        self.timer = PhaseTimer()
        self.pending: dict[int, TrialRecord] = {}  # submitted, not yet finished, by Ax index
        self.started: dict[int, float] = {}  # clock() when each pending trial was submitted
        self.clock = clock  # the budgets' clock (tests drive a fake one)

    # --- lifecycle, in order ---------------------------------------------------------------

    def run(self, resume: str | None = None) -> SearchResult:
        t_session = self.clock()
        if resume:
            self.optimizer, loaded = store.load(resume, self.config)
            self._refuse_finished(resume, loaded)
        else:
            self.optimizer, loaded = Optimizer.create(self.config), None
        with (
            graceful_stop(),
            tracking.start_run(self._tracking(), self._run_name(), self._tags(), resume_run_id=resume) as run,
        ):
            self.parent_run = run
            url = tracking.run_url(run.experiment_id, run.run_id)
            self._echo(
                f"search run {run.run_id} {'resumed' if resume else 'started'}"
                + (f" ({url})" if url.startswith("http") else "")
                + f"; after an interruption, continue it with --resume {run.run_id}"
            )
            self.state = state = self._open(run, loaded)
            self.dir = store.search_dir(self.config, run.run_id)
            try:
                self._check_early_stopping()
                if state.baseline is None:
                    with self.timer.phase("baseline"):
                        self._baseline()
                    self._save()
                if state.warm is None:
                    with self.timer.phase("ax"):
                        state.warm = warm.start(self.config, self.optimizer, run, self.resources, self._echo)
                    self._save()
                self._loop(t_session)
                if self.search.replicates is not None and not state.stop_reason:
                    self._replicate()
            except (KeyboardInterrupt, SearchAborted) as e:
                state.stop_reason = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
                self._kill_pending()
                state.wall_seconds += self.clock() - t_session
                self._save()
                raise
            finally:
                self.executor.close()
            state.wall_seconds += self.clock() - t_session
            self._save()
            return self._finish()

    def _refuse_finished(self, run_id: str, state: SearchState) -> None:
        """SearchFinished, before any run is opened, when the search ran all its trials and ended
        (a search interrupted while finishing, or given more --n-trials, goes on)."""
        done = len(state.finished())
        run = tracking.get_run(run_id)
        if done >= self.search.n_trials and run is not None and run.status == "FINISHED":
            raise SearchFinished(
                f"search run {run_id} has finished ({done} of {self.search.n_trials} trials); nothing to "
                "do (give --n-trials more than that to run more trials)"
            )

    def _open(self, run: tracking.TrackedRun, loaded: SearchState | None) -> SearchState:
        """A new search's records (and its config on the run), or a resumed one's, reconciled."""
        if loaded is None:
            state = SearchState(parent_run_id=run.run_id, n_trials=self.search.n_trials)
            run.log_params(
                {f"search.{k}": v for k, v in flatten(self.search.model_dump(mode="json")).items()}
            )
            run.log_text(to_yaml(self.config, f"resolved config of search {run.run_id}"), names.CONFIG_FILE)
        else:
            state = loaded
            state.n_trials = self.search.n_trials
            state.stop_reason = ""  # this session's own, if it stops early too
            store.reconcile(self.optimizer, state)
        state.sessions += 1
        self.optimizer.noise_sd = state.noise_sd
        return state

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
        """Run (or reuse) the baseline and give it to Ax as the status-quo arm."""
        record = baseline.find_or_train(
            self.config, self.parent_run, self.executor, self.resources, self._echo
        )
        record.in_search_space = self.optimizer.in_search_space(record.parameters)
        if record.in_search_space:
            last = (
                progression(self.config, int(record.evals[-1][0]), record.examples_per_step)
                if record.evals
                else None
            )
            self.optimizer.attach_baseline(record.parameters, self.optimizer.ax_metrics(record.metrics), last)
        self.state.baseline = record
        self.parent_run.set_tags({names.SEARCH_BASELINE_RUN: record.run_id})
        self.parent_run.log_metrics({names.BASELINE_EVAL_LOSS: record.eval_loss}, step=0, flush=True)

    def _loop(self, t_session: float) -> None:
        self.t_session = t_session
        state = self.state
        while len(state.finished()) < state.n_trials:
            if STOP_REQUESTED.is_set():
                raise _Interrupted("stop requested between trials")
            spent = self._budget_spent()
            if spent:
                state.stop_reason = spent
                self._echo(f"stopping: {state.stop_reason}")
                return
            self._fill()
            with self.timer.phase("trials"):
                outcome = self.executor.wait_any()
            record = self.pending.pop(outcome.job.index)
            self._record(record, outcome)
            # No save here: the next trial's submit saves (Ax's JSON is most of a save's cost, and
            # on short trials it showed), and so does every way out of the loop. A crash in
            # between loses nothing: the trial's run has ended with its status and metrics, and
            # resume takes it from there (store.reconcile).
            self._progress(record, t_session, outcome.where)
            self._check_failure_rate()
            if self.optimizer.broken:
                raise SearchAborted(f"search stopped: {self.optimizer.broken}")

    def _replicate(self) -> None:
        """The seed replicates (`search.replicates`), then their means and sems to Ax."""
        runner = replicates.Runner(
            self.executor, self.started, self.clock, self._budget_spent, self._save, self._echo
        )
        replicates.replicate(
            self.config, self.state, self.optimizer, self.parent_run.run_id, runner, self.timer
        )
        self._save()

    def _fill(self) -> None:
        """Give every idle worker a trial: interrupted trials' configs first, then one batch from
        Ax for the rest (locally: one trial at a time, as always)."""
        state = self.state
        want = min(self.executor.idle(), state.n_trials - len(state.finished()) - len(self.pending))
        if want <= 0:
            return
        running = [t.parameters for t in self.pending.values()]
        retries = [p for p in state.retry if p not in running][:want]
        with self.timer.phase("ax"):
            batch = [(self.optimizer.retry(p), dict(p), "retry") for p in retries]
            if want > len(batch):
                batch += self.optimizer.ask_batch(want - len(batch))
        if not batch and not self.pending:
            raise SearchAborted("search stopped: Ax proposed no trial (no configuration left to try)")
        for index, params, method in batch:
            self._submit(index, params, method)

    def _submit(self, index: int, params: dict[str, Any], method: str) -> None:
        """Record the trial (its config survives a crash from here on), then start it."""
        state = self.state
        record = TrialRecord(index=index, parameters=params, generation_method=method)
        record.run_name = trial_name(len(state.finished()) + len(self.pending) + 1, params, method)
        state.trials.append(record)
        self._save()
        tags = {names.AX_TRIAL_INDEX: index, names.AX_GENERATION_METHOD: method}
        spec = RunSpec(names.ROLE_TRIAL, record.run_name, self.parent_run.run_id, tags)
        self.pending[index], self.started[index] = record, self.clock()
        self.executor.submit(TrialJob(index, self.trial_base, params, spec), self._on_eval)

    def _on_eval(self, index: int, step: int, examples: int, loss: float) -> bool:
        """Each evaluation of a running trial goes to Ax at its progression (steps or examples
        seen, `search.early_stopping.progression`); Ax's answer: stop the trial early? A spent
        budget stops it too."""
        if not math.isfinite(loss):
            return False
        at = examples if progression_unit(self.config) == "examples" else step
        stop = self.optimizer.report_evaluation(index, at, loss)
        if not stop and self._budget_spent():
            self.pending[index].stopped_by = "budget"
            return True
        return stop

    def _budget_spent(self) -> str | None:
        """Why the search must stop now (a spent budget), or None."""
        search, now = self.search, self.clock()
        elapsed = self.state.wall_seconds + now - self.t_session
        if search.budget_minutes and elapsed >= search.budget_minutes * 60:
            return f"wall-clock budget of {search.budget_minutes:g} minutes spent"
        if search.budget_gpu_hours:
            running = sum(now - t for t in self.started.values()) * self.executor.devices_per_trial
            used = (self.state.device_seconds() + running) / 3600
            if used >= search.budget_gpu_hours:
                return f"device budget of {search.budget_gpu_hours:g} device-hours spent ({used:.3g} used)"
        return None

    def _record(self, record: TrialRecord, outcome: TrialOutcome) -> None:
        """Feed a finished trial back to Ax and into its record (its run tagged itself)."""
        state, index = self.state, record.index
        record.wall_seconds = outcome.wall_seconds
        record.device_seconds = (self.clock() - self.started.pop(index)) * self.executor.devices_per_trial
        record.run_id = outcome.run_id or record.run_id
        if outcome.status == KILLED:
            self._mark_killed(record)
            raise outcome.error if isinstance(outcome.error, KeyboardInterrupt) else _Interrupted()
        if record.generation_method == "retry" and record.parameters in state.retry:
            state.retry.remove(record.parameters)
        if outcome.status in (FAILED, ABANDONED):
            record.status, record.failure_reason = outcome.status, outcome.reason
            if outcome.status == ABANDONED:
                self.optimizer.abandon(index)  # the same config would run out of memory again
            else:
                self.optimizer.fail(index, outcome.reason or "failed")
            return
        result = outcome.result
        if result.status != EARLY_STOPPED:
            record.stopped_by = None  # the budget asked at the last evaluation, which ends it anyway
        baseline.require_metrics(result.metrics, self.search, f"trial {index}")
        record.eval_loss, record.metrics, record.evals = result.eval_loss, result.metrics, result.evals
        record.steps, record.max_steps = result.steps, result.max_steps
        record.eval_fingerprint, record.adapter_dir = result.eval_fingerprint, str(result.adapter_dir)
        with self.timer.phase("ax"):
            self.optimizer.complete(
                index, self.optimizer.ax_metrics(result.metrics), result.steps, result.status == EARLY_STOPPED
            )
        record.status = result.status
        self._keep_best_adapter()

    def _keep_best_adapter(self) -> None:
        """Keep the local adapter of the best trial so far (the registry takes it from there);
        the others are on their runs."""
        best = best_trial(self.state, self.search)
        for t in self.state.trials:
            if t.adapter_dir and t is not best:
                discard_local_adapter(t.adapter_dir)
                t.adapter_dir = None

    def _progress(self, record: TrialRecord, t_session: float, where: str = "") -> None:
        state = self.state
        n = len(state.finished())
        best = best_trial(state, self.search)
        metrics = {}
        if record.eval_loss is not None:
            metrics[names.TRIAL_EVAL_LOSS] = record.eval_loss
        if best is not None:
            metrics[names.BEST_EVAL_LOSS] = best.eval_loss
        self.parent_run.log_metrics(metrics, step=n, flush=True)
        elapsed = state.wall_seconds + self.clock() - t_session
        eta = elapsed / max(n, 1) * (state.n_trials - n)
        loss = f"{record.eval_loss:.4f}" if record.eval_loss is not None else "-"
        best_text = f"best {best.eval_loss:.4f} ({best.run_name.split()[0]})" if best else "best -"
        failure = (
            f" | {record.failure_reason}{where}"
            if record.failure_reason and record.status != COMPLETED
            else ""
        )
        self._echo(
            f"[{n}/{state.n_trials}] {record.run_name} | eval_loss {loss} {record.status} | {best_text} | "
            f"{duration(elapsed)} elapsed, ETA {duration(eta)}{failure}"
        )

    def _kill_pending(self) -> None:
        """Trials still running when the search stops (in parallel, the others' workers are
        stopped with it): killed, and their configs run first when the search resumes."""
        for record in self.pending.values():
            self._mark_killed(record)
        self.pending.clear()

    def _mark_killed(self, record: TrialRecord) -> None:
        """An interrupted trial: failed in Ax (its partial data dropped), its config first in
        line to run again."""
        record.status, record.failure_reason = KILLED, "interrupted"
        self.optimizer.fail(record.index, "interrupted")
        if record.parameters not in self.state.retry:
            self.state.retry.insert(0, record.parameters)

    def _check_failure_rate(self) -> None:
        done = self.state.finished()
        bad = [t for t in done if t.status in (FAILED, ABANDONED)]
        if len(done) >= 3 and len(bad) / len(done) >= self.search.max_failure_rate:
            raise SearchAborted(
                f"search stopped: {len(bad)} of {len(done)} trials failed (search.max_failure_rate "
                f"{self.search.max_failure_rate:g}); last failure: {bad[-1].failure_reason}"
            )

    def _finish(self) -> SearchResult:
        """The end: best trial, summary metrics, best_config.yaml, registry, report."""
        return finish(self.config, self.state, self.optimizer, self.parent_run, self.dir, self.timer)

    # --- helpers ---------------------------------------------------------------------------

    def _save(self) -> None:
        with self.timer.phase("state"):
            store.save(self.parent_run, self.optimizer, self.state, self.dir)

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
            names.GIT_COMMIT: git_commit(Path(__file__).parent),
            names.PACKAGE_VERSIONS: json.dumps(package_versions(), sort_keys=True),
        }

    def _echo(self, message: str) -> None:
        """Progress lines go to stdout, also with --quiet: one line per trial is what CI logs want."""
        print(message, flush=True)
