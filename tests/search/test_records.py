"""The search's plain records: which trials can be the answer, what a replicate repeats
(`pipeline/search/records.py`; their life on disk is tests/search/test_journal.py's)."""

from __future__ import annotations

from pipeline.search.records import BASELINE, ReplicateRecord, SearchState, feasible

from .common import baseline_record, demo, record


def test_contenders_are_completed_scored_feasible_trials():
    # One rule, used by the best trial, the replicates' finalists and the report: a second copy
    # once sat in the replicates with the same three conditions.
    search = demo(**{"search.outcome_constraints": ["peak_rss_gb <= 2"]}).search
    state = SearchState("p", 5)
    state.trials = [
        record(0, "completed", 2.0, peak_rss_gb=3.0),  # infeasible
        record(1, "early_stopped", 1.0, peak_rss_gb=1.0),  # partial training
        record(2, "completed", 2.5, peak_rss_gb=1.5),
        record(3, "completed", float("nan"), peak_rss_gb=1.0),  # not scored
        record(4, "failed"),
        record(5, "completed", 2.7),  # constraint metric missing: not met
    ]
    assert [t.index for t in state.contenders(search)] == [2]
    assert feasible(state.trials[2], search.outcome_constraints)
    assert not feasible(state.trials[5], search.outcome_constraints)
    assert [t.index for t in state.contenders(demo().search)] == [0, 2, 5]  # no constraints


def test_a_replicate_knows_the_run_it_repeats():
    state = SearchState("p", 2)
    state.trials = [record(0, "completed", 2.0), record(1, "completed", 1.5)]
    state.baseline = baseline_record(3.0, {"eval_loss": 3.0})
    of_trial = ReplicateRecord(of="1", seed=43, parameters={})
    of_baseline = ReplicateRecord(of=BASELINE, seed=43, parameters={})
    assert state.replicated(of_trial) is state.trials[1]
    assert state.replicated(of_baseline) is state.baseline
    assert state.replicated(ReplicateRecord(of="7", seed=43, parameters={})) is None
