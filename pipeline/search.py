"""Search: Bayesian optimization with Ax over any config keys. The only module that imports ax.

One MLflow parent run holds the search; the baseline and every trial are nested child runs made
by `run_trial`. After every trial the Ax state and the trial records are saved locally and on
the parent run, so a crashed or interrupted search resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ax.api import ChoiceParameterConfig, Client, RangeParameterConfig
from ax.core.trial_status import TrialStatus
from ax.early_stopping.strategies import PercentileEarlyStoppingStrategy
from ax.utils.common.logger import set_ax_logger_levels

from pipeline import names, registry, report, tracking
from pipeline.config import (
    PipelineConfig,
    SearchConfig,
    config_field,
    config_fingerprint,
    load_config,
    to_dict,
    to_yaml,
    with_overrides,
)
from pipeline.errors import ConfigError, PipelineError
from pipeline.provenance import git_commit, hardware, package_versions
from pipeline.results import (
    ABANDONED,
    COMPLETED,
    EARLY_STOPPED,
    FAILED,
    KILLED,
    BaselineRecord,
    SearchState,
    TrialRecord,
)
from pipeline.timing import PhaseTimer
from pipeline.train import STOP_REQUESTED
from pipeline.trial import Resources, TrialResult, run_trial

log = logging.getLogger("pipeline.search")
set_ax_logger_levels(logging.WARNING)

SHORT_NAMES = {"lora.r": "r", "lora.alpha": "a", "train.learning_rate": "lr", "train.batch_size": "bs"}


class SearchAborted(Exception):
    """The search stopped itself (failure-rate cap). Its state is saved: fix and resume."""


# ---------------------------------------------------------------------------------------------
# Config -> Ax


def _ax_type(path: str, values: list[Any]) -> str:
    """Ax parameter type from the config field's type (int, float, bool or str)."""
    field = config_field(path)
    annotation = field.annotation
    args = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
    if args and all(isinstance(a, type) for a in args):
        annotation = args[0]
    for kind, name in ((bool, "bool"), (int, "int"), (float, "float")):
        if annotation is kind:
            return name
    if all(isinstance(v, bool) for v in values):
        return "bool"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "int"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return "float"
    return "str"


def build_parameters(search: SearchConfig) -> list[Any]:
    """Ax parameter configs, one per search dimension (fixed values are one-value choices)."""
    params: list[Any] = []
    problems = []
    for name, spec in search.parameters.items():
        if spec.type == "range":
            kind = _ax_type(name, list(spec.bounds))
            low, high = spec.bounds
            if kind == "int":
                if low != int(low) or high != int(high):
                    problems.append(
                        f"search.parameters.{name}: {name} is an integer; bounds must be integers"
                    )
                    continue
                low, high = int(low), int(high)
            elif kind != "float":
                problems.append(f"search.parameters.{name}: a range needs a numeric key, {name} is {kind}")
                continue
            params.append(
                RangeParameterConfig(
                    name=name, bounds=(low, high), parameter_type=kind, scaling="log" if spec.log else None
                )
            )
        else:
            values = spec.values if spec.type == "choice" else [spec.value]
            kind = _ax_type(name, values)
            cast = {"int": int, "float": float, "bool": bool, "str": str}[kind]
            if kind == "int" and any(float(v) != int(v) for v in values if not isinstance(v, str)):
                problems.append(f"search.parameters.{name}: {name} is an integer; values {values} are not")
                continue
            ordered = spec.ordered if spec.ordered is not None else kind != "str"
            params.append(
                ChoiceParameterConfig(
                    name=name,
                    values=[cast(v) for v in values],
                    parameter_type=kind,
                    is_ordered=ordered if len(values) > 1 else None,
                )
            )
    if problems:
        raise ConfigError("search.parameters", problems)
    return params


def objective_string(search: SearchConfig) -> str:
    return ", ".join(("-" if o.minimize else "") + o.metric for o in search.objectives)


def outcome_constraints(search: SearchConfig) -> list[str]:
    out = list(search.outcome_constraints)
    if len(search.objectives) > 1:
        out += [
            f"{o.metric} {'<=' if o.minimize else '>='} {o.threshold}"
            for o in search.objectives
            if o.threshold is not None
        ]
    return out


def required_metrics(search: SearchConfig) -> list[str]:
    """Metrics every trial must report to Ax: objectives, then constrained metrics."""
    metrics = [o.metric for o in search.objectives]
    for c in search.outcome_constraints:
        m = c.split("<=")[0].split(">=")[0].strip()
        if m not in metrics:
            metrics.append(m)
    return metrics


def build_client(search: SearchConfig, name: str = "lora-search") -> Client:
    """A configured Ax Client; bad search settings become one ConfigError."""
    client = Client(random_seed=search.seed)
    try:
        client.configure_experiment(
            parameters=build_parameters(search), parameter_constraints=search.constraints or None, name=name
        )
    except ConfigError:
        raise
    except Exception as e:  # Ax raises UserInputError / ValueError with a clear text
        raise ConfigError("search", [f"search.parameters / search.constraints: {e}"]) from None
    try:
        client.configure_optimization(
            objective=objective_string(search), outcome_constraints=outcome_constraints(search) or None
        )
    except Exception as e:
        raise ConfigError("search", [f"search.objectives / search.outcome_constraints: {e}"]) from None
    client.configure_generation_strategy(
        method="random_search" if search.method == "random" else "fast",
        initialization_budget=search.initialization_trials,
        initialization_random_seed=search.seed,
        # When failed trials leave too little data for BoTorch, keep exploring with Sobol
        # instead of refusing to propose a trial.
        allow_exceeding_initialization_budget=True,
    )
    return client


def early_stopping_strategy(config: PipelineConfig) -> PercentileEarlyStoppingStrategy | None:
    """Ax's percentile rule on eval_loss, when enabled (auto: trials evaluate at least 3 times)."""
    es = config.search.early_stopping
    tr = config.train
    evals_per_trial = tr.max_steps // tr.eval_steps if tr.eval_steps and tr.max_steps > 0 else 0
    enabled = es.enabled if es.enabled is not None else evals_per_trial >= 3
    if not enabled or names.EVAL_LOSS not in [o.metric for o in config.search.objectives]:
        return None
    if not tr.eval_steps:
        raise ConfigError("search.early_stopping", ["search.early_stopping.enabled needs train.eval_steps"])
    min_progression = es.min_progression or max(
        tr.eval_steps, tr.max_steps // 3 if tr.max_steps > 0 else tr.eval_steps
    )
    return PercentileEarlyStoppingStrategy(
        metric_signatures=[names.EVAL_LOSS],
        percentile_threshold=es.percentile,
        min_progression=min_progression,
        min_curves=es.min_curves,
    )


def generation_method(client: Client, index: int) -> str:
    return client._experiment.trials[index].generation_method_str or "Manual"


def in_search_space(client: Client, parameters: dict[str, Any]) -> bool:
    try:
        return bool(client._experiment.search_space.check_membership(parameters, raise_error=False))
    except Exception:
        return False


def baseline_parameters(config: PipelineConfig) -> dict[str, Any]:
    """The base config's value of every search dimension."""
    data = to_dict(config)
    out = {}
    for key in config.search.parameters:
        node: Any = data
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


def trial_name(index: int, params: dict[str, Any], method: str = "") -> str:
    """`trial-07 r=32 a=64 lr=1.2e-04 bs=2`: the trial and its key params."""
    parts = [f"trial-{index:02d}"]
    for key, value in params.items():
        short = SHORT_NAMES.get(key, key.rsplit(".", 1)[-1])
        if isinstance(value, float):
            text = (
                f"{value:.1e}" if (value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4)) else f"{value:g}"
            )
        else:
            text = str(value)
        parts.append(f"{short}={text}")
    return " ".join(parts) + (f" ({method})" if method == "retry" else "")


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class SearchResult:
    parent_run_id: str
    state: SearchState
    best: TrialRecord | None
    report_dir: Path
    best_config_path: Path | None
    promotion: registry.Promotion | None


class _Interrupted(KeyboardInterrupt):
    pass


@contextlib.contextmanager
def _graceful_stop() -> Iterator[None]:
    """Ctrl-C and SIGTERM (a scheduler's kill) set a flag instead of raising wherever the signal
    lands: the training in progress stops at its next step (the trial ends KILLED), and the loop
    stops at the next trial boundary, so a finished trial is always recorded."""
    STOP_REQUESTED.clear()

    def handler(signum, frame):
        STOP_REQUESTED.set()

    try:
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
        STOP_REQUESTED.clear()


class Search:
    """One search: owns the Ax client, the parent run and the state on disk."""

    def __init__(self, config: PipelineConfig, quiet: bool = False):
        if config.search is None:
            raise ConfigError("search", ["the config has no search section"])
        self.config = config
        self.search = config.search
        self.quiet = quiet
        self.trial_base = config.model_copy(update={"search": None})
        self.resources = Resources()
        self.required = required_metrics(self.search)
        self.es = early_stopping_strategy(config)
        # This session's time by phase (ax, trials, baseline, state, report, registry), logged on
        # the parent run as search_time_<phase>_s; each trial logs its own breakdown.
        self.timer = PhaseTimer()

    # --- persistence -----------------------------------------------------------------------

    def state_dir(self, parent_run_id: str) -> Path:
        d = Path(self.search.output_dir) / parent_run_id
        d.mkdir(parents=True, exist_ok=True)
        return d

    def save(self, run: tracking.TrackedRun, client: Client, state: SearchState) -> None:
        with self.timer.phase("state"):
            d = self.state_dir(state.parent_run_id) / names.STATE_DIR
            d.mkdir(exist_ok=True)
            client.save_to_json_file(str(d / names.AX_STATE_FILE))
            (d / names.TRIALS_FILE).write_text(json.dumps(state.to_json(), indent=1, default=float))
            run.log_artifacts(d, names.STATE_DIR)

    # --- running ---------------------------------------------------------------------------

    def run(self, resume: str | None = None) -> SearchResult:
        t_session = time.perf_counter()
        if resume:
            state, client = self._load(resume)
        else:
            client = build_client(self.search, name=self.config.tracking.experiment_name)
            state = None
        tags = {
            names.ROLE: names.ROLE_SEARCH,
            names.BASE_MODEL: self.config.model.name_or_path,
            names.CONFIG_FINGERPRINT: config_fingerprint(self.config),
            names.GIT_COMMIT: git_commit(Path(__file__).parent),
            names.PACKAGE_VERSIONS: json.dumps(package_versions(), sort_keys=True),
        }
        name = f"search {Path(self.config.model.name_or_path).name} {self.search.n_trials} trials seed={self.search.seed}"
        cfg_tracking = self.config.tracking.model_copy(update={"log_system_metrics": False})
        with (
            _graceful_stop(),
            tracking.start_run(cfg_tracking, name, tags, resume_run_id=resume) as run,
        ):
            if state is None:
                state = SearchState(parent_run_id=run.run_id, n_trials=self.search.n_trials)
                run.log_params({f"search.{k}": v for k, v in _flat_search(self.config).items()})
                run.log_text(
                    to_yaml(self.config, f"resolved config of search {run.run_id}"), names.CONFIG_FILE
                )
            else:
                state.n_trials = self.search.n_trials
                self._reconcile(run, client, state)
            state.sessions += 1
            if self.es is not None:
                client.set_early_stopping_strategy(self.es)
            try:
                if state.baseline is None:
                    with self.timer.phase("baseline"):
                        self._baseline(run, client, state)
                    self.save(run, client, state)
                self._loop(run, client, state, t_session)
            except (KeyboardInterrupt, SearchAborted) as e:
                state.stop_reason = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
                state.wall_seconds += time.perf_counter() - t_session
                self.save(run, client, state)
                raise
            state.wall_seconds += time.perf_counter() - t_session
            self.save(run, client, state)
            return self._finish(run, client, state)

    def _load(self, parent_run_id: str) -> tuple[SearchState, Client]:
        """State of an earlier search: the local copy if present, else the parent run's artifacts."""
        parent = tracking.get_run(parent_run_id)
        if parent is None:
            raise PipelineError(f"resume: no run {parent_run_id!r} in the tracking store")
        if parent.data.tags.get(names.ROLE) != names.ROLE_SEARCH:
            raise PipelineError(
                f"resume: run {parent_run_id} is not a search parent run (pipeline.role={parent.data.tags.get(names.ROLE)!r})"
            )
        tracking.setup(self.config.tracking)
        here = tracking.current_experiment_id(self.config.tracking)
        if parent.info.experiment_id != here:
            raise PipelineError(
                f"resume: run {parent_run_id} belongs to experiment {parent.info.experiment_id}, not to this one ({here})"
            )
        local = Path(self.search.output_dir) / parent_run_id / names.STATE_DIR
        if not (local / names.AX_STATE_FILE).is_file():
            tmp = Path(tempfile.mkdtemp())
            try:
                local = Path(tracking.download_artifacts(parent_run_id, names.STATE_DIR, tmp))
            except Exception:
                raise PipelineError(f"resume: run {parent_run_id} has no saved search state") from None
        client = Client.load_from_json_file(str(local / names.AX_STATE_FILE))
        client._random_seed = self.search.seed  # not kept in Ax's JSON
        state = SearchState.from_json(json.loads((local / names.TRIALS_FILE).read_text()))
        return state, client

    def _reconcile(self, run: tracking.TrackedRun, client: Client, state: SearchState) -> None:
        """After a crash: trials and child runs left RUNNING are killed; their configs rerun first."""
        for index, trial in client._experiment.trials.items():
            if trial.status == TrialStatus.RUNNING:
                client.mark_trial_failed(index, failed_reason="interrupted: the search process stopped")
                params = dict(trial.arm.parameters)
                rec = next((t for t in state.trials if t.index == index), None)
                if rec is not None:
                    rec.status, rec.failure_reason = KILLED, "interrupted: the search process stopped"
                if index != _baseline_index(state) and params not in state.retry:
                    state.retry.append(params)
        for child in tracking.find_runs(
            [run.experiment_id], f"tags.mlflow.parentRunId = '{run.run_id}' and attributes.status = 'RUNNING'"
        ):
            tracking.tag_run(
                child.info.run_id,
                {names.TRIAL_STATUS: KILLED, names.ERROR: "interrupted: the search process stopped"},
            )
            tracking.terminate_run(child.info.run_id, "KILLED")
            idx = child.data.tags.get(names.AX_TRIAL_INDEX)
            rec = next((t for t in state.trials if str(t.index) == idx), None)
            if rec is not None:
                rec.run_id = child.info.run_id

    def _baseline(self, run: tracking.TrackedRun, client: Client, state: SearchState) -> None:
        """Run (or reuse) the baseline and give it to Ax as the status-quo arm."""
        base_cfg = self.trial_base
        params = baseline_parameters(self.config)
        fp = config_fingerprint(base_cfg)
        reused = None
        if self.search.reuse_baseline:
            for r in tracking.find_runs(
                [run.experiment_id],
                f"tags.`{names.ROLE}` = '{names.ROLE_BASELINE}' and tags.`{names.CONFIG_FINGERPRINT}` = '{fp}' "
                "and attributes.status = 'FINISHED'",
                order_by=["attributes.start_time DESC"],
            ):
                if all(m in r.data.metrics for m in self.required):
                    reused = r
                    break
        if reused is not None:
            metrics = dict(reused.data.metrics)
            record = BaselineRecord(
                reused.info.run_id,
                params,
                metrics[names.EVAL_LOSS],
                metrics,
                True,
                False,
                tracking.metric_history(reused.info.run_id, names.EVAL_LOSS),
            )
            self._echo(
                f"baseline: reusing run {reused.info.run_id} (same config fingerprint {fp}), eval_loss {record.eval_loss:.4f}"
            )
        else:
            self._echo("baseline: training the baseline config")
            result = run_trial(
                base_cfg,
                role=names.ROLE_BASELINE,
                parent_run_id=run.run_id,
                resources=self.resources,
                quiet=self.quiet,
            )
            self._check_metrics(result, "the baseline")
            record = BaselineRecord(
                result.run_id, params, result.eval_loss, result.metrics, False, False, result.evals
            )
            self._echo(f"baseline: eval_loss {record.eval_loss:.4f} ({result.wall_seconds:.0f}s)")
        record.in_search_space = in_search_space(client, params)
        if record.in_search_space:
            index = client.attach_baseline(parameters=params)
            client.attach_data(index, self._raw(record.metrics), progression=_last_step(record.evals))
            client.complete_trial(index)
        state.baseline = record
        run.set_tags({names.SEARCH_BASELINE_RUN: record.run_id})
        run.log_metrics({names.BASELINE_EVAL_LOSS: record.eval_loss}, step=0, flush=True)

    def _raw(self, metrics: dict[str, float]) -> dict[str, float]:
        keys = dict.fromkeys([*self.required, names.EVAL_LOSS])
        return {k: float(metrics[k]) for k in keys if k in metrics}

    def _check_metrics(self, result: TrialResult, what: str) -> None:
        missing = [m for m in self.required if m not in result.metrics]
        if missing:
            raise PipelineError(
                f"search.objectives: {what} logged no {', '.join(missing)} (is it a metric of this setup? "
                "eval_<metric> needs eval.generation_metric; peak_gpu_* needs CUDA)"
            )

    def _loop(self, run: tracking.TrackedRun, client: Client, state: SearchState, t_session: float) -> None:
        while len(state.finished()) < state.n_trials:
            if STOP_REQUESTED.is_set():
                raise _Interrupted("stop requested between trials")
            elapsed = state.wall_seconds + time.perf_counter() - t_session
            if self.search.budget_minutes and elapsed >= self.search.budget_minutes * 60:
                state.stop_reason = f"wall-clock budget of {self.search.budget_minutes:g} minutes spent"
                self._echo(f"stopping: {state.stop_reason}")
                return
            with self.timer.phase("ax"):
                if state.retry:
                    params = state.retry[0]
                    index = client.attach_trial(parameters=params)  # Ax reuses the killed trial's arm
                    method = "retry"
                else:
                    ((index, params),) = client.get_next_trials(max_trials=1).items()
                    method = generation_method(client, index)
            params = dict(params)
            record = TrialRecord(index=index, parameters=params, generation_method=method)
            record.run_name = trial_name(len(state.finished()) + 1, params, method)
            state.trials.append(record)
            self.save(run, client, state)  # the trial's config survives a crash from here on
            self._run_one(run, client, state, record)
            if method == "retry":
                state.retry.pop(0)
            self.save(run, client, state)
            self._progress(run, state, record, t_session)
            self._check_failure_rate(state)

    def _run_one(
        self, run: tracking.TrackedRun, client: Client, state: SearchState, record: TrialRecord
    ) -> None:
        index = record.index

        def on_eval(step: int, loss: float) -> bool:
            if not math.isfinite(loss):
                return False
            client.attach_data(index, {names.EVAL_LOSS: loss}, progression=step)
            if self.es is None:
                return False
            try:
                return bool(client.should_stop_trial_early(index))
            except Exception as e:  # a rule that cannot decide must not fail the trial
                self._echo(f"early stopping off for the rest of the search: {type(e).__name__}: {e}")
                self.es = None
                return False

        tags = {names.AX_TRIAL_INDEX: index, names.AX_GENERATION_METHOD: record.generation_method}
        t0 = time.perf_counter()
        try:
            cfg = with_overrides(self.trial_base, record.parameters)
            with self.timer.phase("trials"):
                result = run_trial(
                    cfg,
                    role=names.ROLE_TRIAL,
                    run_name=record.run_name,
                    parent_run_id=run.run_id,
                    tags=tags,
                    resources=self.resources,
                    on_eval=on_eval,
                    quiet=self.quiet,
                )
        except KeyboardInterrupt as e:
            record.status, record.failure_reason = KILLED, "interrupted"
            record.run_id = getattr(e, "run_id", record.run_id)
            record.wall_seconds = time.perf_counter() - t0
            client.mark_trial_failed(index, failed_reason="interrupted")
            if record.parameters not in state.retry:
                state.retry.insert(0, record.parameters)
            if record.run_id:
                tracking.tag_run(record.run_id, {names.TRIAL_STATUS: KILLED})
            raise
        except Exception as e:  # any failure of one trial fails that trial, not the search
            record.wall_seconds = time.perf_counter() - t0
            record.run_id = getattr(e, "run_id", None)
            record.failure_reason = " ".join(f"{type(e).__name__}: {e}".split())[:500]
            if _is_out_of_memory(e):
                _free_memory()
                record.status = ABANDONED
                client.mark_trial_abandoned(index)  # the same config would run out of memory again
            else:
                record.status = FAILED
                client.mark_trial_failed(index, failed_reason=record.failure_reason)
            if record.run_id:
                tracking.tag_run(
                    record.run_id,
                    {names.TRIAL_STATUS: record.status, names.TRIAL_FAILURE_REASON: record.failure_reason},
                )
            return
        record.wall_seconds = time.perf_counter() - t0
        record.run_id = result.run_id
        self._check_metrics(result, f"trial {index}")
        record.eval_loss = result.eval_loss
        record.metrics = result.metrics
        record.steps, record.max_steps, record.evals = result.steps, result.max_steps, result.evals
        with self.timer.phase("ax"):
            client.attach_data(index, self._raw(result.metrics), progression=result.steps)
            if result.status == "early_stopped":
                record.status = EARLY_STOPPED
                client.mark_trial_early_stopped(index)
            else:
                record.status = COMPLETED
                client.complete_trial(index)
        tracking.tag_run(result.run_id, {names.TRIAL_STATUS: record.status})

    def _progress(
        self, run: tracking.TrackedRun, state: SearchState, record: TrialRecord, t_session: float
    ) -> None:
        done = state.finished()
        best = self.best_trial(state)
        n = len(done)
        metrics = {}
        if record.eval_loss is not None:
            metrics[names.TRIAL_EVAL_LOSS] = record.eval_loss
        if best is not None:
            metrics[names.BEST_EVAL_LOSS] = best.eval_loss
        run.log_metrics(metrics, step=n, flush=True)
        elapsed = state.wall_seconds + time.perf_counter() - t_session
        per_trial = elapsed / max(n, 1)
        eta = per_trial * (state.n_trials - n)
        loss = f"{record.eval_loss:.4f}" if record.eval_loss is not None else "-"
        best_text = f"best {best.eval_loss:.4f} ({best.run_name.split()[0]})" if best else "best -"
        self._echo(
            f"[{n}/{state.n_trials}] {record.run_name} | eval_loss {loss} {record.status} | {best_text} | "
            f"{_duration(elapsed)} elapsed, ETA {_duration(eta)}"
            + (f" | {record.failure_reason}" if record.failure_reason and record.status != COMPLETED else "")
        )

    def _check_failure_rate(self, state: SearchState) -> None:
        done = state.finished()
        bad = [t for t in done if t.status in (FAILED, ABANDONED)]
        if len(done) >= 3 and len(bad) / len(done) >= self.search.max_failure_rate:
            raise SearchAborted(
                f"search stopped: {len(bad)} of {len(done)} trials failed (search.max_failure_rate "
                f"{self.search.max_failure_rate:g}); last failure: {bad[-1].failure_reason}"
            )

    # --- the end ---------------------------------------------------------------------------

    def _finish(self, run: tracking.TrackedRun, client: Client, state: SearchState) -> SearchResult:
        out_dir = self.state_dir(state.parent_run_id)
        with self.timer.phase("ax"):
            analysis = self._analysis(client, state)
        best = self.best_trial(state, analysis)
        base_loss = state.baseline.eval_loss if state.baseline else None
        summary = {
            names.TRIALS_COMPLETED: sum(t.status == COMPLETED for t in state.trials),
            names.TRIALS_EARLY_STOPPED: sum(t.status == EARLY_STOPPED for t in state.trials),
            names.TRIALS_FAILED: sum(t.status == FAILED for t in state.trials),
            names.TRIALS_ABANDONED: sum(t.status == ABANDONED for t in state.trials),
            names.SEARCH_WALL_S: state.wall_seconds,
            names.STEPS_SAVED_PCT: report.steps_saved_pct(state),
        }
        if best is not None:
            summary[names.BEST_EVAL_LOSS] = best.eval_loss
            if base_loss:
                summary[names.IMPROVEMENT_PCT] = 100.0 * (base_loss - best.eval_loss) / base_loss
        run.log_metrics(summary, step=len(state.finished()), flush=True)

        best_config_path = None
        if best is not None:
            best_cfg = with_overrides(self.config, best.parameters)
            best_config_path = out_dir / names.BEST_CONFIG_FILE
            best_config_path.write_text(
                to_yaml(
                    best_cfg,
                    f"best config of search {run.run_id}: trial {best.index} (run {best.run_id}), "
                    f"eval_loss {best.eval_loss:.4f}. Retrain: mlflow run . -e retrain -P best_config=<this file>",
                )
            )
            run.log_text(best_config_path.read_text(), names.BEST_CONFIG_FILE)

        promotion = None
        if best is not None:
            with self.timer.phase("registry"):
                promotion = self._promote(run, best, summary)
            if promotion is not None:
                self._echo(f"registry: {promotion.message}")

        report_dir = out_dir / names.REPORT_DIR
        context = report.ReportContext(
            config=self.config,
            state=state,
            best=best,
            analysis=analysis,
            promotion=promotion,
            provenance={
                "git_commit": git_commit(Path(__file__).parent),
                "seed": str(self.search.seed),
                "config_fingerprint": config_fingerprint(self.config),
                **package_versions(),
                **hardware(),
            },
            experiment_id=run.experiment_id,
        )
        with self.timer.phase("report"):
            report.write_report(context, report_dir)
            run.log_artifacts(report_dir, names.REPORT_DIR)
        if best is not None:
            run.set_tags(
                {"mlflow.note.content": report.description(context), names.SEARCH_BEST_RUN: best.run_id}
            )
        self._echo(
            f"report: {report_dir / names.REPORT_FILE} (and artifact {names.REPORT_DIR}/ of run {run.run_id})"
        )
        run.log_metrics(self.timer.metrics("search_time_"), step=len(state.finished()), flush=True)
        return SearchResult(run.run_id, state, best, report_dir, best_config_path, promotion)

    def _promote(
        self, run: tracking.TrackedRun, best: TrialRecord, summary: dict[str, Any]
    ) -> registry.Promotion | None:
        """Register the winner; a registry failure is reported, it does not cost the report."""
        try:
            return registry.promote(
                model_name=self.config.registry.model_name,
                adapter_run_id=best.run_id,
                eval_loss=best.eval_loss,
                eval_fingerprint=tracking.get_run(best.run_id).data.tags[names.EVAL_FINGERPRINT],
                tags={"search_run_id": run.run_id, "improvement_pct": summary.get(names.IMPROVEMENT_PCT)},
                description=to_yaml(with_overrides(self.trial_base, best.parameters)),
            )
        except Exception as e:
            message = f"registration failed, nothing registered: {type(e).__name__}: {e}"
            self._echo(f"registry: {message}")
            run.set_tags({names.ERROR: message[:500]})
            return registry.Promotion(self.config.registry.model_name, "", False, message)

    def best_trial(self, state: SearchState, analysis: dict[str, Any] | None = None) -> TrialRecord | None:
        """Best scored trial by the first objective, among trials that meet the outcome
        constraints (and, with several objectives, among those on the Pareto frontier)."""
        objective = self.search.objectives[0]
        # An early-stopped trial's loss is from part of the training: it ranks, but does not win.
        candidates = [
            t
            for t in state.scored()
            if t.status == COMPLETED
            and objective.metric in t.metrics
            and _feasible(t, self.search.outcome_constraints)
        ]
        pareto = {p["index"] for p in (analysis or {}).get("pareto", [])}
        if pareto:
            candidates = [t for t in candidates if t.index in pareto] or candidates
        if not candidates:
            return None
        sign = 1 if objective.minimize else -1
        return min(candidates, key=lambda t: sign * t.metrics[objective.metric])

    def _analysis(self, client: Client, state: SearchState) -> dict[str, Any]:
        """Ax's view: sensitivity of the objective to each parameter, the Pareto frontier."""
        out: dict[str, Any] = {"sensitivity": {}, "pareto": [], "notes": []}
        if len(self.search.objectives) > 1:
            try:
                for params, outcome, index, _ in client.get_pareto_frontier(use_model_predictions=False):
                    out["pareto"].append(
                        {
                            "index": index,
                            "parameters": dict(params),
                            "metrics": {
                                k: float(v[0] if isinstance(v, tuple) else v) for k, v in outcome.items()
                            },
                        }
                    )
            except Exception as e:
                out["notes"].append(f"Pareto frontier not available: {type(e).__name__}: {e}")
        try:
            from ax.analysis.plotly import SensitivityAnalysisPlot

            metric = self.search.objectives[0].metric
            cards = client.compute_analyses(
                [SensitivityAnalysisPlot(metric_name=metric, order="total", top_k=None)], display=False
            )
            df = getattr(cards[0], "df", None)
            if df is not None and "sensitivity" in getattr(df, "columns", []):
                out["sensitivity"] = {str(r.parameter_name): float(r.sensitivity) for r in df.itertuples()}
            else:
                out["notes"].append(
                    f"Sensitivity analysis not available yet ({getattr(cards[0], 'title', '')})."
                )
        except Exception as e:
            out["notes"].append(f"Sensitivity analysis not available: {type(e).__name__}: {str(e)[:200]}")
        return out

    def _echo(self, message: str) -> None:
        """Progress lines go to stdout, also with --quiet: one line per trial is what CI logs want."""
        print(message, flush=True)


def _baseline_index(state: SearchState) -> int | None:
    return 0 if state.baseline and state.baseline.in_search_space else None


def _last_step(evals: list[tuple[int, float]]) -> int | None:
    return int(evals[-1][0]) if evals else None


def _feasible(t: TrialRecord, constraints: list[str]) -> bool:
    for c in constraints:
        op = "<=" if "<=" in c else ">="
        metric, bound = (s.strip() for s in c.split(op))
        value = t.metrics.get(metric)
        if value is None or (value > float(bound) if op == "<=" else value < float(bound)):
            return False
    return True


def _is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def _flat_search(config: PipelineConfig) -> dict[str, Any]:
    from pipeline.config import flatten

    return flatten(config.search.model_dump(mode="json"))


def run_search(
    config_path: str,
    overrides: list[str],
    n_trials: int | None = None,
    resume: str | None = None,
    budget_minutes: float | None = None,
    quiet: bool = False,
) -> SearchResult:
    """The search entry point: load the config (the parent's own when resuming), search, report."""
    config = load_config(config_path, overrides)
    if resume:
        config = _config_of(resume, config, overrides)
    if config.search is None:
        raise ConfigError(
            config_path, ["search: the config has no search section (see configs/demo-cpu.yaml)"]
        )
    updates = {}
    if n_trials is not None:
        if n_trials <= 0:
            raise ConfigError("--n-trials", [f"n_trials: must be > 0 (got {n_trials})"])
        updates["search.n_trials"] = n_trials
    if budget_minutes is not None:
        updates["search.budget_minutes"] = budget_minutes
    if updates:
        config = with_overrides(config, updates)
    return Search(config, quiet=quiet).run(resume=resume)


def _config_of(parent_run_id: str, given: PipelineConfig, overrides: list[str]) -> PipelineConfig:
    """A resumed search continues with its own config (plus this call's overrides)."""
    tracking.setup(given.tracking)
    tracking.search_run(parent_run_id, "resume")
    return tracking.run_config(parent_run_id, names.CONFIG_FILE, overrides, "resume")
