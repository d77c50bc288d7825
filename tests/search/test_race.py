"""A race's rounds decided from the replicate records (`pipeline/search/race.py`), and a real
search that races its finalists (`search.replicates.mode: race`)."""

from __future__ import annotations

import json

from pipeline import tracking
from pipeline.config import load_config
from pipeline.core import names
from pipeline.core.race import STOP_CAP, STOP_ONE_LEFT
from pipeline.search import race, run_search
from pipeline.search.records import COMPLETED, FAILED, RUNNING, ReplicateRecord, SearchState
from pipeline.search.report.noise import race_lines

from ..conftest import DEMO_CONFIG, tiny_overrides


def _config(tmp_path, **extra):
    values = {
        "search.replicates": "'{top_k: 2, seeds: 3, mode: race}'",
        "search.output_dir": str(tmp_path / "search"),
        **extra,
    }
    return load_config(DEMO_CONFIG, tiny_overrides(tmp_path, **values))


def _rec(of: str, seed: int, loss: float | None, status: str = COMPLETED) -> ReplicateRecord:
    metrics = {"eval_loss": loss} if loss is not None else {}
    return ReplicateRecord(
        of=of, seed=seed, parameters={"lora.r": 8}, status=status, eval_loss=loss, metrics=metrics
    )


def _state(records, prior=None) -> SearchState:
    state = SearchState("p", 3, replicates=records)
    state.race_prior = prior
    return state


def test_a_clear_race_with_remembered_noise_ends_after_one_round_and_adds_no_seed(tmp_path):
    config = _config(tmp_path)
    state = _state(
        [_rec("baseline", 43, 3.0), _rec("1", 43, 2.70), _rec("2", 43, 2.95)],
        prior={"sd_pct": 0.7, "df": 30, "source": "2 earlier searches"},
    )
    decided = race.decide(config, state)
    assert len(decided.rounds) == 1 and decided.stop == STOP_ONE_LEFT
    assert decided.alive == ["1"] and decided.dropped_at() == {"2": 1}
    assert race.next_round(state, race.decide(config, state), [43, 44, 45]) == []
    text = "\n".join(race_lines(config, state))
    assert "dropped 2" in text and "2 earlier searches" in text and STOP_ONE_LEFT in text


def test_a_close_race_adds_rounds_for_the_alive_and_the_baseline_until_the_cap(tmp_path):
    config = _config(tmp_path, **{"search.replicates.margin": 0})
    state = _state([_rec("baseline", 43, 3.0), _rec("1", 43, 2.70), _rec("2", 43, 2.701)])
    for seed, (a, b) in zip((44, 45), ((2.71, 2.705), (2.69, 2.70)), strict=True):
        new = race.next_round(state, race.decide(config, state), [43, 44, 45])
        assert [(r.of, r.seed) for r in new] == [("baseline", seed), ("1", seed), ("2", seed)]
        for r, v in zip(new, (3.0, a, b), strict=True):
            r.status, r.eval_loss, r.metrics = COMPLETED, v, {"eval_loss": v}
    decided = race.decide(config, state)
    assert decided.stop == STOP_CAP and len(decided.rounds) == 3 and sorted(decided.alive) == ["1", "2"]
    assert race.next_round(state, race.decide(config, state), [43, 44, 45]) == []


def test_a_round_waits_for_its_runs_and_a_failed_finalist_leaves_the_race(tmp_path):
    config = _config(tmp_path)
    running = _state([_rec("baseline", 43, 3.0), _rec("1", 43, 2.7), _rec("2", 43, None, status=RUNNING)])
    assert race.decide(config, running).rounds == []
    assert (
        race.next_round(running, race.decide(config, running), [43, 44, 45]) == []
    )  # its runs are not done: nothing new
    failed = _state([_rec("baseline", 43, 3.0), _rec("1", 43, 2.7), _rec("2", 43, None, status=FAILED)])
    decided = race.decide(config, failed)
    assert decided.failed == ["2"] and decided.alive == ["1"] and decided.stop == STOP_ONE_LEFT


def test_a_search_races_its_finalists_and_reports_the_race(tmp_path, capsys):
    small = {"search.n_trials": 3, "search.early_stopping.enabled": False}
    config = _config(tmp_path, **small)
    result = run_search(config, quiet=False)
    state = result.state
    decided = race.decide(config, state)
    assert decided.stop is not None and 1 <= len(decided.rounds) <= 3
    # Each round ran the baseline and the finalists alive at its start, on that round's seed.
    seeds = sorted({r.seed for r in state.replicates})
    assert seeds == [43, 44, 45][: len(decided.rounds)]
    reps = [r for r in tracking.children_of(result.parent_run_id) if names.TRIAL_REPLICATE_OF in r.tags]
    assert len(reps) == len(state.replicates) and all(r.status == COMPLETED for r in state.replicates)
    out = capsys.readouterr().out
    assert out.count("race: after ") == len(decided.rounds) and f"stop: {decided.stop}" in out
    report = (result.report_dir / names.REPORT_FILE).read_text()
    assert "**The race**" in report and f"Stopped: {decided.stop}." in report
    assert "no remembered seed noise" in report and state.race_prior is None

    # Without remembered noise one seed decides nothing: the race ran two rounds or more, and its
    # search run remembers what it measured, under its noise key.
    assert len(decided.rounds) >= 2
    noise = json.loads(tracking.get_run(result.parent_run_id).tags[names.RACE_NOISE])
    assert noise["df"] >= 1 and noise["sd_pct"] > 0
    # The next search of the same model, data and eval set starts its race with it.
    again = run_search(
        _config(tmp_path, **{**small, "search.output_dir": str(tmp_path / "again")}), quiet=True
    )
    assert again.state.race_prior == {
        "sd_pct": noise["sd_pct"],
        "df": noise["df"],
        "source": "1 earlier search",
    }
    assert "from 1 earlier search" in (again.report_dir / names.REPORT_FILE).read_text()
