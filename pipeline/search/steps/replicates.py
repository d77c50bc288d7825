"""Seed replicates: after the trials, the best configurations and the baseline trained again on
fresh `train.seed` values (`search.replicates`), so that what the search recommends, the
improvement it reports and what the registry promotes carry the seed noise of a LoRA run.

Which configurations: Ax's model-predicted best first (its GP pools the neighbours of a point,
so one lucky seed moves it less than it moves the observed ranking), then the best observed
completed trials, until `top_k` distinct ones. Each is trained on seeds train.seed + 1 ...
train.seed + seeds, and so is the baseline: the same seeds on both sides, so the comparison
pairs by seed. Replicates are nested runs of the search (`trial.replicate_of`,
`trial.replicate_seed`), never early-stopped, not counted in n_trials, run by the search's
executor (in parallel on Ray), inside its budgets, and resumable: a replicate that did not end
runs again when the search resumes.

Ax is then given each replicated configuration's mean and standard error, and every other
observation the pooled seed noise as its standard error, so its model (and a resumed search's
next proposals) see the noise.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline import tracking
from pipeline.config import PipelineConfig, noise_key, trial_config
from pipeline.core import console, names
from pipeline.core.stats import mean_sem, pooled_sd
from pipeline.core.timing import PhaseTimer
from pipeline.model.adapter import discard_local_adapter
from pipeline.search import race
from pipeline.search.ax.optimizer import Optimizer
from pipeline.search.executors.local import InFlight, JobOutcome, TrialJob
from pipeline.search.records import (
    BASELINE,
    COMPLETED,
    KILLED,
    RUNNING,
    ReplicateRecord,
    SearchState,
    TrialRecord,
)
from pipeline.search.stopping import progression
from pipeline.trial.run import RunSpec


def replicate_seeds(config: PipelineConfig) -> list[int]:
    """The fresh seeds: train.seed + 1 ... train.seed + search.replicates.seeds."""
    spec = config.search.replicates
    return [config.train.seed + i for i in range(1, spec.seeds + 1)] if spec else []


def choose(config: PipelineConfig, state: SearchState, optimizer: Optimizer) -> list[ReplicateRecord]:
    """The replicates to run: the chosen configurations and the baseline, on every fresh seed."""
    search = config.search
    objective = search.objectives[0]
    sign = 1 if objective.minimize else -1
    candidates = state.contenders(search)
    by_index = {t.index: t for t in candidates}
    chosen: list[tuple[TrialRecord, str]] = []
    predicted = optimizer.predicted_best()
    if predicted in by_index:
        chosen.append((by_index[predicted], "Ax's model-predicted best"))
    ranked = sorted(candidates, key=lambda t: sign * t.metrics[objective.metric])
    for rank, t in enumerate(ranked, 1):
        if len(chosen) >= search.replicates.top_k:
            break
        if all(t is not c for c, _ in chosen):
            chosen.append((t, "best observed" if rank == 1 else f"{_ordinal(rank)} best observed"))
    records = []
    seeds = replicate_seeds(config)
    for seed in seeds[:1] if search.replicates.mode == "race" else seeds:  # a race adds rounds
        if state.baseline is not None:
            records.append(
                ReplicateRecord(
                    of=BASELINE,
                    seed=seed,
                    parameters=dict(state.baseline.parameters),
                    chosen_by="the baseline",
                )
            )
        records += [
            ReplicateRecord(of=str(t.index), seed=seed, parameters=dict(t.parameters), chosen_by=why)
            for t, why in chosen
        ]
    return records


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def job(record: ReplicateRecord, number: int, base: PipelineConfig, parent_run_id: str) -> TrialJob:
    """The replicate as an executor job: the replicated values plus its seed (index -2, -3 ...:
    not an Ax trial; the baseline's job is -1)."""
    parameters = {**record.parameters, "train.seed": record.seed}
    if record.of == BASELINE:
        parameters = {"train.seed": record.seed}
    tags = {names.TRIAL_REPLICATE_OF: record.of, names.TRIAL_REPLICATE_SEED: record.seed}
    role = names.ROLE_BASELINE if record.of == BASELINE else names.ROLE_TRIAL
    name = f"replicate of {'baseline' if record.of == BASELINE else 'trial ' + record.of} seed={record.seed}"
    return TrialJob(-2 - number, base, parameters, RunSpec(role, name, parent_run_id, tags))


@dataclass
class Runner:
    """What running replicates takes from the search: its jobs in flight (its executor and clock,
    which the device budget counts), its budget check, and how it saves the records."""

    flight: InFlight
    budget_spent: Callable[[], str | None]
    save: Callable[[], None]


def replicate(
    config: PipelineConfig,
    state: SearchState,
    optimizer: Optimizer,
    parent_run_id: str,
    runner: Runner,
    timer: PhaseTimer,
) -> None:
    """Choose the replicates (once: a resumed search keeps its choice), run those not done, give
    Ax the results. A budget spent on the way stops them: `state.stop_reason` says so."""
    racing = config.search.replicates.mode == "race"
    if state.replicates is None:
        with timer.phase("ax"):
            state.replicates = choose(config, state, optimizer)
        if racing:
            state.race_prior = _remembered(config, parent_run_id)
        runner.save()
        chosen = dict.fromkeys(f"{r.of} ({r.chosen_by})" for r in state.replicates)
        seeds = ", ".join(map(str, replicate_seeds(config)))
        if racing:
            console.say(f"race: {', '.join(chosen)} and the baseline, one seed a round, up to seeds {seeds}")
        else:
            console.say(f"replicates: {', '.join(chosen)} on seeds {seeds}")
    base = trial_config(config)
    with timer.phase("trials"):
        if racing:
            spent = _race(config, state, base, parent_run_id, runner)
        else:
            spent = run(state.replicates, base, parent_run_id, runner)
    if spent:
        state.stop_reason = f"{spent} (during the seed replicates)"
        console.say(f"stopping: {state.stop_reason}")
    with timer.phase("ax"):
        tell_ax(config, state, optimizer)


def _race(
    config: PipelineConfig, state: SearchState, base: PipelineConfig, parent_run_id: str, runner: Runner
) -> str | None:
    """Run the race's rounds until it ends (`search.race`): each round's runs at once, then its
    decision, said in one line. Returns why it stopped early (a spent budget), or None."""
    said = len(race.decide(config, state).rounds)
    while True:
        spent = run(state.replicates, base, parent_run_id, runner)
        if spent:
            return spent
        decided = race.decide(config, state)
        for r in decided.rounds[said:]:
            console.say(f"race: {r.text()}")
        said = len(decided.rounds)
        if not race.next_round(state, decided, replicate_seeds(config)):
            if decided.failed:
                console.say(f"race: out after a failed replicate: {', '.join(decided.failed)}")
            noise = race.measured(config, state)
            if noise is not None:  # for the next search of this model, data and eval set
                tracking.tag_run(
                    parent_run_id, {names.RACE_NOISE: json.dumps({"sd_pct": noise.sd_pct, "df": noise.df})}
                )
            return None
        runner.save()


def _remembered(config: PipelineConfig, parent_run_id: str) -> dict | None:
    """The seed noise earlier races of this model, data and eval set measured, pooled; said."""
    parent = tracking.get_run(parent_run_id)
    earlier = tracking.remembered_noise(parent.experiment_id, noise_key(config), exclude=parent_run_id)
    prior = race.remembered(earlier)
    if prior is None:
        console.say(
            "race: no seed noise remembered for this model, data and eval set (one seed decides nothing)"
        )
    else:
        console.say(
            f"race: remembered seed noise of a paired difference {prior['sd_pct']:.2f} % "
            f"({prior['df']} degrees of freedom, {prior['source']})"
        )
    return prior


def run(
    records: list[ReplicateRecord], base: PipelineConfig, parent_run_id: str, runner: Runner
) -> str | None:
    """Run every replicate not yet done, as many at once as the executor takes; save the records
    after each one. Returns why it stopped early (a spent budget), or None when all ran."""
    flight = runner.flight
    todo = [(i, r) for i, r in enumerate(records) if not r.done]
    total, done = len(records), len(records) - len(todo)
    while todo or flight:
        spent = runner.budget_spent()
        if spent and not flight:
            return spent
        while todo and not spent and flight.executor.idle() > 0:
            number, record = todo.pop(0)
            record.status, record.run_id = RUNNING, None
            runner.save()
            flight.submit(job(record, number, base, parent_run_id), record)
        if not flight:
            continue
        record, outcome, device_seconds = flight.wait()
        record.device_seconds = device_seconds
        _record(record, outcome)
        done += 1
        value = f"eval_loss {record.eval_loss:.4f}" if record.eval_loss is not None else record.status
        console.say(f"[replicate {done}/{total}] {outcome.job.spec.name} | {value}")
        runner.save()
        if record.status == KILLED:
            raise outcome.error if isinstance(outcome.error, KeyboardInterrupt) else KeyboardInterrupt()
    return None


def _record(record: ReplicateRecord, outcome: JobOutcome) -> None:
    record.run_id = outcome.run_id
    record.wall_seconds = outcome.wall_seconds
    if outcome.result is None:
        record.status, record.failure_reason = outcome.status, outcome.reason
        return
    result = outcome.result
    record.status, record.eval_loss, record.metrics = result.status, result.eval_loss, dict(result.metrics)
    discard_local_adapter(result.adapter_dir)  # on its run; the registry takes the selection run's


def values(state: SearchState, metric: str) -> dict[str, list[float]]:
    """Each replicated configuration's values of `metric`: the selection run's first (the trial,
    or the baseline), then its replicates'."""
    out: dict[str, list[float]] = {}
    for r in state.replicates or []:
        if r.status != COMPLETED or metric not in r.metrics:
            continue
        if r.of not in out:
            first = state.replicated(r)
            out[r.of] = [first.metrics[metric]] if first is not None and metric in first.metrics else []
        out[r.of].append(r.metrics[metric])
    return out


def tell_ax(config: PipelineConfig, state: SearchState, optimizer: Optimizer) -> dict[str, Any]:
    """Give Ax every replicated configuration's (mean, sem), and every other completed
    observation the pooled seed noise as its sem. Returns what was attached, by Ax index."""
    metrics = optimizer.ax_metric_names()
    groups = {m: values(state, m) for m in metrics}
    state.noise_sd = {
        m: sd
        for m in metrics
        if (sd := pooled_sd([v for v in groups[m].values() if len(v) >= 2])) is not None
    }
    if not state.noise_sd:
        return {}
    attached: dict[int, dict[str, tuple[float, float]]] = {}
    baseline_index = optimizer.baseline_index()
    records = [(str(t.index), t.index, t) for t in state.scored()]
    if state.baseline is not None and baseline_index is not None:
        records.append((BASELINE, baseline_index, state.baseline))
    for key, index, rec in records:
        data = {}
        for m, sd in state.noise_sd.items():
            vals = groups[m].get(key)
            if vals and len(vals) >= 2:
                data[m] = mean_sem(vals)
            elif m in rec.metrics:
                data[m] = (float(rec.metrics[m]), sd)
        if data:
            steps = getattr(rec, "steps", 0) or int(rec.metrics.get(names.TRAIN_STEPS, 0))
            at = progression(config, steps, rec.examples_per_step)
            optimizer.attach_observation(index, data, at)
            attached[index] = data
    return attached
