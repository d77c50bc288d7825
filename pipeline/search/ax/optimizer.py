"""The one place that talks to Ax after it is built (`space.py`): the `Optimizer` wraps the
`ax.api.Client` in the verbs the search loop uses. The reads of Ax's private state
(`Client._experiment`, `Client._random_seed`) are all here: ax.api 1.3 has no public way to read
a trial's status, generation method, arm or data, nor to seed a client loaded from JSON."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from ax.api import Client
from ax.core.trial_status import TrialStatus

from pipeline.config import PipelineConfig
from pipeline.core import console, names
from pipeline.core.errors import SearchAborted
from pipeline.search.ax.memory import dominated
from pipeline.search.ax.outcomes import from_ax, to_ax
from pipeline.search.ax.space import build_client, early_stopping_strategy

ES_LOGGER = "ax.early_stopping.strategies.base"  # where Ax 1.3 says early stopping gave up
MAX_DUPLICATE_PROPOSALS = 5


class Proposal(NamedTuple):
    """A trial Ax proposes: its index, the parameters, and how they were generated (Sobol, BoTorch,
    retry)."""

    index: int
    parameters: dict[str, Any]
    method: str


class Optimizer:
    """The search's Ax Client, in the verbs the loop needs. One owner: the search's driver."""

    def __init__(self, client: Client, config: PipelineConfig):
        self.client = client
        self.config = config
        self.early_stopping = early_stopping_strategy(config)
        if self.early_stopping is not None:
            client.set_early_stopping_strategy(self.early_stopping)
        self.notes: list[str] = []  # what went wrong on Ax's side, for the report
        # Set when Ax's early stopping could not decide (it only logs a warning, then never stops
        # a trial again): the loop ends the search loudly instead of running on without it.
        self.broken: str | None = None
        # Seed noise by metric, once replicates measured it (SearchState.noise_sd): every later
        # observation goes to Ax with it as its standard error. BoTorch refuses a metric whose
        # observations mix known and unknown standard errors, so it is all or none per metric.
        self.noise_sd: dict[str, float] = {}

    @classmethod
    def create(cls, config: PipelineConfig) -> Optimizer:
        return cls(build_client(config.search, name=config.tracking.experiment_name), config)

    @classmethod
    def load(cls, path: Path, config: PipelineConfig) -> Optimizer:
        client = Client.load_from_json_file(str(path))
        client._random_seed = config.search.seed  # not kept in Ax's JSON
        return cls(client, config)

    def save(self, path: Path) -> None:
        """Ax's JSON, written atomically (a crash mid-write leaves the previous file whole)."""
        tmp = path.with_name(path.name + ".tmp")
        self.client.save_to_json_file(str(tmp))
        os.replace(tmp, path)

    # --- trials ---------------------------------------------------------------------------

    def ask(self) -> Proposal:
        """The next trial Ax proposes."""
        proposed = self.ask_batch(1)
        if not proposed:
            raise SearchAborted("Ax proposed no trial: the search space has no configuration left to try")
        return proposed[0]

    def ask_batch(self, n: int) -> list[Proposal]:
        """Up to `n` trials from one `get_next_trials(max_trials=n)` (for `n` idle workers: with
        BoTorch, a joint batch that knows of the pending trials); fewer when Ax has no more now.

        A proposal whose parameters were measured already (Ax deduplicates against every arm but
        those of failed trials) is abandoned and Ax asked again: a second trial of one arm would
        make Ax's early stopping give up for the rest of the search. A proposal that would run out
        of memory as a smaller trial did (`memory.dominated`) is told to Ax as that, not run."""
        out: list[Proposal] = []
        for _ in range(MAX_DUPLICATE_PROPOSALS):
            proposed = self.client.get_next_trials(max_trials=n - len(out))
            for index, params in proposed.items():
                if not self._skip(index, params):
                    out.append(Proposal(index, dict(params), self.generation_method(index)))
            if len(out) == n or not proposed:
                return out
        if out:
            return out
        raise SearchAborted(
            f"Ax proposed already-measured parameters {MAX_DUPLICATE_PROPOSALS} times in a row: the "
            "space is exhausted or the search converged; widen search.parameters or stop here"
        )

    def retry(self, parameters: dict[str, Any]) -> int:
        """A new trial for the parameters of an interrupted one (whose partial data is gone)."""
        index = self.client.attach_trial(parameters=parameters)
        twin = self._measured_twin(index)
        if twin is not None:
            raise SearchAborted(f"retry of trial {twin}'s parameters as trial {index}: trial {twin} has data")
        return index

    def attach_baseline(
        self, parameters: dict[str, Any], metrics: dict[str, float], progression: int | None
    ) -> bool:
        """The baseline as Ax's status-quo arm, with its results; False when Ax cannot take it."""
        if self.config.search.parents():
            self.note(
                "baseline not given to Ax: Ax 1.3 takes no status quo in a space with conditional parameters"
            )
            return False
        index = self.client.attach_baseline(parameters=parameters)
        self.client.attach_data(index, metrics, progression=progression)
        self.client.complete_trial(index)
        return True

    def ax_metric_names(self) -> list[str]:
        """The metrics Ax is given: those it optimizes or constrains, and eval_loss."""
        return list(dict.fromkeys([*self.config.search.required_metrics(), names.EVAL_LOSS]))

    def ax_metrics(self, metrics: Mapping[str, float]) -> dict[str, float | tuple[float, float]]:
        """What Ax is given of a trial's metrics: each value, or (value, standard error) where the
        error is known: the seed noise replicates measured, else a task metric's harness stderr
        (`<metric>_stderr`, which every trial of the task logs)."""
        out: dict[str, float | tuple[float, float]] = {}
        for k in self.ax_metric_names():
            if k not in metrics:
                continue
            value, sem = to_ax(k, metrics[k], self.noise_sd.get(k, metrics.get(f"{k}_stderr")))
            out[k] = (value, float(sem)) if sem is not None else value
        return out

    def attach_observation(
        self, index: int, metrics: dict[str, tuple[float, float]], progression: int | None
    ) -> None:
        """Replace a finished trial's final observation (its replicates' mean and sem)."""
        data = {m: to_ax(m, mean, sem) for m, (mean, sem) in metrics.items()}
        self.client.attach_data(index, data, progression=progression)

    def predicted_best(self) -> int | None:
        """The trial whose arm Ax's model predicts best (single objective), or None when the
        model cannot say (too few trials, a random search)."""
        if len(self.config.search.objectives) > 1:
            return None
        try:
            _, _, index, _ = self.client.get_best_parameterization(use_model_predictions=True)
        except Exception:
            return None
        return int(index) if index is not None else None

    def baseline_index(self) -> int | None:
        """The Ax trial of the baseline (the status-quo arm), when it was attached."""
        experiment = self.client._experiment
        quo = experiment.status_quo
        if quo is None:
            return None
        measured = experiment.data.trial_indices
        return next(
            (i for i, t in experiment.trials.items() if t.arm.name == quo.name and i in measured), None
        )

    def attach_measured(
        self,
        parameters: dict[str, Any],
        curve: list[tuple[int, float]],
        metrics: dict[str, float],
        at: int,
        early_stopped: bool,
    ) -> int:
        """A trial measured elsewhere (warm start): its eval-loss curve, then its final metrics at
        progression `at`, as a finished trial. A configuration that already has data here (a warm
        start saved by Ax but not by the records before a crash) keeps its trial."""
        measured = self.client._experiment.data.trial_indices
        for index, trial in self.client._experiment.trials.items():
            if index in measured and dict(trial.arm.parameters) == parameters:
                return index
        index = self.client.attach_trial(parameters=parameters)
        for progress, loss in curve:
            self.client.attach_data(index, {names.EVAL_LOSS: loss}, progression=progress)
        self.complete(index, metrics, at, early_stopped)
        return index

    def report_evaluation(self, index: int, progression: int, eval_loss: float) -> bool:
        """Give Ax one evaluation of a running trial; True when the trial should stop early."""
        self.client.attach_data(index, {names.EVAL_LOSS: eval_loss}, progression=progression)
        if self.early_stopping is None or self.broken:
            return False
        with console.Captured(ES_LOGGER) as warnings:
            try:
                stop = bool(self.client.should_stop_trial_early(index))
            except Exception as e:  # a rule that cannot decide must not fail the trial
                self.note(f"early stopping off for the rest of the search: {type(e).__name__}: {e}")
                self.early_stopping = None
                return False
        given_up = [w for w in warnings if "Cannot proceed with early stopping" in w]
        if given_up:
            self.broken = f"Ax's early stopping gave up at trial {index}: {given_up[0]}"
        return stop

    def complete(self, index: int, metrics: dict[str, float], progression: int, early_stopped: bool) -> None:
        self.client.attach_data(index, metrics, progression=progression)
        if early_stopped:
            self.client.mark_trial_early_stopped(index)
        else:
            self.client.complete_trial(index)

    def fail(self, index: int, reason: str) -> None:
        """The trial failed; its partial data goes (Ax may propose its parameters again)."""
        self.client.mark_trial_failed(index, failed_reason=reason)
        self._drop_data(index)

    def abandon(self, index: int) -> None:
        """Ax will not propose this configuration again."""
        self.client.mark_trial_abandoned(index)
        self._drop_data(index)

    def out_of_memory(self, index: int, memory_gb: float | None) -> bool:
        """The trial ran out of memory. With a memory metric among the outcome constraints and the
        memory it asked for known, Ax gets that as the trial's memory peaks: a measured
        infeasible point, from which its constraint model learns where memory runs out (and avoids
        the neighbours too). Otherwise the trial is abandoned: Ax only skips that one point.
        True when Ax learned from it."""
        constrained = [m for m in self.ax_metric_names() if m in names.MEMORY_METRICS]
        if memory_gb is None or not constrained:
            self.abandon(index)
            return False
        self._drop_data(index)  # evaluations before it ran out are not a result
        self.client.complete_trial(index, self.ax_metrics(dict.fromkeys(constrained, memory_gb)))
        return True

    def out_of_memory_trials(self) -> dict[int, tuple[dict[str, Any], float]]:
        """Trials Ax knows ran out of memory (memory data, no objective): parameters, GiB."""
        experiment = self.client._experiment
        df = experiment.lookup_data().df
        scored = set(df[df.metric_name.isin([o.metric for o in self.config.search.objectives])].trial_index)
        rows = df[df.metric_name.isin(names.MEMORY_METRICS) & ~df.trial_index.isin(scored)].itertuples()
        trials = experiment.trials
        return {
            int(r.trial_index): (trials[int(r.trial_index)].arm.parameters, from_ax(r.metric_name, r.mean))
            for r in rows
        }

    def _skip(self, index: int, params: Mapping[str, Any]) -> bool:
        """A proposal not to run: measured already (abandoned), or bound to run out of memory as
        a smaller trial did (`memory.dominated`; told to Ax as that trial's memory)."""
        twin = self._measured_twin(index)
        oom = dominated(params, self.out_of_memory_trials()) if twin is None else None
        if twin is not None:
            self.note(f"Ax proposed trial {twin}'s parameters again as trial {index}; not run")
            self.client.mark_trial_abandoned(index)
        elif oom is not None:
            self.note(f"trial {index} not run: it would run out of memory as trial {oom[0]} did ({oom[2]})")
            self.out_of_memory(index, oom[1])
        return twin is not None or oom is not None

    def note(self, message: str) -> None:
        console.say(message)
        self.notes.append(message)

    def _drop_data(self, index: int) -> None:
        """Forget a trial's (partial) data, so that one arm never has data from two trials."""
        experiment = self.client._experiment
        if index in experiment.data.trial_indices:
            keep = [i for i in experiment.data.trial_indices if i != index]
            experiment.data = experiment.data.filter(trial_indices=keep)

    def _measured_twin(self, index: int) -> int | None:
        """Another trial with data for the same arm as trial `index`, if any."""
        trials = self.client._experiment.trials
        arm = trials[index].arm.signature
        measured = self.client._experiment.data.trial_indices
        return next((i for i in measured if i != index and trials[i].arm.signature == arm), None)

    def running(self) -> dict[int, dict[str, Any]]:
        """Trials Ax sees as running, with their parameters (after a crash: none really is)."""
        return {
            i: dict(t.arm.parameters)
            for i, t in self.client._experiment.trials.items()
            if t.status == TrialStatus.RUNNING
        }

    def parameter_names(self) -> set[str]:
        """The keys Ax searches (the config's dimensions, as Ax holds them)."""
        return set(self.client._experiment.search_space.parameters)

    def statuses(self) -> dict[int, str]:
        """What Ax believes of each trial, by index: COMPLETED, EARLY_STOPPED, FAILED, ABANDONED,
        RUNNING, ..."""
        return {i: t.status.name for i, t in self.client._experiment.trials.items()}

    def observations(self, metric: str) -> dict[int, tuple[float, float | None]]:
        """The (mean, sem) Ax's model learns from for `metric`, by trial index: each trial's last
        attached value, in Ax's units (log-memory for a memory metric; sem None when unknown)."""
        df = self.client._experiment.lookup_data().df
        if df.empty:
            return {}
        last = df[df.metric_name == metric].groupby("trial_index").last()
        return {
            int(i): (float(row["mean"]), None if row["sem"] != row["sem"] else float(row["sem"]))
            for i, row in last.iterrows()
        }

    def generation_method(self, index: int) -> str:
        return self.client._experiment.trials[index].generation_method_str or "Manual"

    def in_search_space(self, parameters: dict[str, Any]) -> bool:
        try:
            return bool(self.client._experiment.search_space.check_membership(parameters, raise_error=False))
        except Exception:
            return False

    # --- analysis -------------------------------------------------------------------------

    def analysis(self) -> dict[str, Any]:
        """Ax's view: sensitivity of the objective to each parameter (the Pareto frontier is
        computed from the records, see ``summary.pareto_front``)."""
        search = self.config.search
        out: dict[str, Any] = {"sensitivity": {}, "pareto": [], "notes": list(self.notes)}
        try:
            from ax.analysis.plotly import SensitivityAnalysisPlot

            metric = search.objectives[0].metric
            cards = self.client.compute_analyses(
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
