"""Racing the finalists (`search.replicates.mode: race`): the configurations `replicates.choose`
picks and the baseline get one shared fresh seed per round (train.seed + 1, + 2, ...); after each
round `core.race.race_round` drops a finalist worse than the leader beyond the confidence, and
ends the race when one is left, when those left are equivalent within `margin`, or at `seeds`.

The rounds are not stored: they are decided again from the replicate records whenever they are
needed (the next round to run, a resumed search, the report), so a kill between a round's runs
and its decision loses nothing, and the report shows exactly what the search decided. The
remembered noise the race uses is fixed in the records when it starts (`SearchState.race_prior`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import PipelineConfig
from pipeline.core.race import NoisePrior, Round, measured_noise, pool, race_round
from pipeline.search.records import BASELINE, COMPLETED, ReplicateRecord, SearchState


@dataclass
class Race:
    """The race so far: its finalists in the order chosen, its decided rounds, and the finalists
    whose replicate failed (out of the race, said in the report)."""

    finalists: list[str]
    confidence: float  # search.replicates.confidence, or registry.confidence where it is null
    rounds: list[Round] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    prior: NoisePrior | None = None

    @property
    def alive(self) -> list[str]:
        alive = list(self.rounds[-1].alive) if self.rounds else list(self.finalists)
        return [k for k in alive if k not in self.failed]

    @property
    def stop(self) -> str | None:
        if self.rounds and self.rounds[-1].stop:
            return self.rounds[-1].stop
        return "no finalist left (their replicates failed)" if not self.alive else None

    def dropped_at(self) -> dict[str, int]:
        """Each dropped finalist and the seeds after which it was dropped."""
        return {k: r.seeds for r in self.rounds for k in r.dropped}


def remembered(earlier: list[dict]) -> dict | None:
    """The prior a race starts with: earlier races' measured noise pooled (`core.race.pool`)."""
    prior = pool([NoisePrior(float(e["sd_pct"]), int(e["df"])) for e in earlier])
    return None if prior is None else {"sd_pct": prior.sd_pct, "df": prior.df, "source": prior.source}


def prior_of(state: SearchState) -> NoisePrior | None:
    p = state.race_prior
    return NoisePrior(float(p["sd_pct"]), int(p["df"]), str(p.get("source", ""))) if p else None


def decide(config: PipelineConfig, state: SearchState) -> Race:
    """The race's rounds, decided from the records: a round counts once every alive finalist's
    replicate on its seed has ended."""
    spec = config.search.replicates
    objective = config.search.objectives[0]
    records = state.replicates or []
    race = Race(
        list(dict.fromkeys(r.of for r in records if r.of != BASELINE)),
        confidence=spec.confidence or config.registry.confidence,
        prior=prior_of(state),
    )
    by: dict[tuple[str, int], ReplicateRecord] = {(r.of, r.seed): r for r in records}
    values: dict[str, list[float]] = {k: [] for k in race.finalists}
    seeds = sorted({r.seed for r in records})
    for seed in seeds:
        alive = race.alive
        ran = [by.get((k, seed)) for k in alive]
        if not alive or any(r is None or not r.done for r in ran):
            break
        for k, r in zip(alive, ran, strict=True):
            if r.status == COMPLETED and objective.metric in r.metrics:
                values[k].append(r.metrics[objective.metric])
            else:
                race.failed.append(k)
        alive = race.alive
        if not alive:
            break
        decided = race_round(
            {k: values[k] for k in alive},
            minimize=objective.minimize,
            confidence=race.confidence,
            min_improvement=spec.margin,
            max_seeds=spec.seeds,
            prior=race.prior,
        )
        race.rounds.append(decided)
        if decided.stop:
            break
    return race


def measured(config: PipelineConfig, state: SearchState) -> NoisePrior | None:
    """The seed noise this race measured (its finalists' per-seed differences from the leader),
    to remember for the next search of the same model, data and eval set."""
    metric = config.search.objectives[0].metric
    values: dict[str, list[float]] = {}
    for r in sorted(state.replicates or [], key=lambda r: r.seed):
        if r.of != BASELINE and r.status == COMPLETED and metric in r.metrics:
            values.setdefault(r.of, []).append(r.metrics[metric])
    return measured_noise(values, config.search.objectives[0].minimize)


def next_round(state: SearchState, race: Race, seeds: list[int]) -> list[ReplicateRecord]:
    """The records of the race's next round (the baseline and every alive finalist on the next
    seed), or [] when the race (`decide(config, state)`) has ended or its round is still running.
    Appends them to the state's records."""
    records = state.replicates or []
    if race.stop or len(race.rounds) >= len(seeds):
        return []
    seed = seeds[len(race.rounds)]
    have = {(r.of, r.seed) for r in records}
    template = {r.of: r for r in records}
    new = [
        ReplicateRecord(
            of=k, seed=seed, parameters=dict(template[k].parameters), chosen_by=template[k].chosen_by
        )
        for k in [BASELINE, *race.alive]
        if k in template and (k, seed) not in have
    ]
    records += new
    return new
