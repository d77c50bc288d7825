"""Reading runs (`pipeline/tracking/queries.py`) on a real sqlite store: a search's children by
role and status, its baseline and best trial, reusable baselines, per-example scores."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.config import TrackingConfig
from pipeline.core import names
from pipeline.core.errors import PipelineError
from pipeline.core.stats import ExampleScores

CFG = TrackingConfig(experiment_name="queries", log_system_metrics=False)


def _child(parent, name, tags, metrics=None, status=None):
    """A finished child run of `parent` with the given tags and final metrics."""
    with tracking.start_run(CFG, name, tags, parent_run_id=parent.run_id) as run:
        if metrics:
            run.log_metrics(metrics, step=1, flush=True)
    if status:
        MlflowClient().set_terminated(run.run_id, status)
    return run.run_id


def _trial(index, loss, status=names.COMPLETED, **tags):
    return {names.ROLE: names.ROLE_TRIAL, names.AX_TRIAL_INDEX: index, names.TRIAL_STATUS: status, **tags}, {
        names.EVAL_LOSS: loss
    }


@pytest.fixture
def search():
    """A search run with a baseline, three trials (one failed), a replicate and a RUNNING child."""
    with tracking.start_run(CFG, "search", {names.ROLE: names.ROLE_SEARCH}) as parent:
        ids = {
            "baseline": _child(parent, "baseline", {names.ROLE: names.ROLE_BASELINE}, {names.EVAL_LOSS: 3.0}),
            "t0": _child(parent, "trial-01", *_trial(0, 2.5)),
            "t1": _child(parent, "trial-02", *_trial(1, 2.0)),
            "t2": _child(parent, "trial-03", *_trial(2, 9.0, names.FAILED), status="FAILED"),
            "rep": _child(parent, "trial-02 seed 43", *_trial(1, 1.0, **{names.TRIAL_REPLICATE_OF: "1"})),
        }
        client = MlflowClient()
        running = client.create_run(
            parent.experiment_id, tags={names.PARENT_RUN_ID: parent.run_id, names.ROLE: names.ROLE_TRIAL}
        )
        ids["running"] = running.info.run_id
        parent.set_tags({names.SEARCH_BASELINE_RUN: ids["baseline"]})
    return tracking.get_run(parent.run_id), ids


def test_a_search_reads_as_its_children_by_role_and_status(search):
    run, ids = search
    assert [r.run_id for r in tracking.children_of(run)] == [
        ids["baseline"], ids["t0"], ids["t1"], ids["t2"], ids["rep"], ids["running"]
    ]  # fmt: skip
    # Trials without the replicates, oldest first; with a status, only those.
    assert [r.run_id for r in tracking.trials_of(run.run_id)] == [
        ids["t0"],
        ids["t1"],
        ids["t2"],
        ids["running"],
    ]
    assert [r.trial_index for r in tracking.trials_of(run, names.COMPLETED)] == [0, 1]
    assert [r.run_id for r in tracking.running_children(run.run_id)] == [ids["running"]]
    assert tracking.baseline_of(run).eval_loss == 3.0
    # No best-run tag (an older search): the best completed trial, never the replicate's 1.0.
    assert tracking.best_trial_of(run).run_id == ids["t1"]
    MlflowClient().set_tag(run.run_id, names.SEARCH_BEST_RUN, ids["t0"])
    assert tracking.best_trial_of(tracking.get_run(run.run_id)).run_id == ids["t0"]  # the tag wins
    assert tracking.children_of("no-such-run") == []


def test_a_run_id_that_is_not_a_search_is_named_as_the_option_at_fault(search):
    run, ids = search
    assert tracking.require_search_run(run.run_id, "resume").run_id == run.run_id
    with pytest.raises(PipelineError, match=r"^from_search: no run 'nope' in the tracking store$"):
        tracking.require_search_run("nope", "from_search")
    with pytest.raises(
        PipelineError, match=r"^resume: run \w+ is not a search run \(pipeline.role='trial'\)$"
    ):
        tracking.require_search_run(ids["t0"], "resume")
    assert tracking.get_run("nope") is None
    assert tracking.latest_finished_search().run_id == run.run_id
    with pytest.raises(PipelineError, match=r"^from_search: run \w+ has no best_config.yaml"):
        tracking.download_run_file(run.run_id, names.BEST_CONFIG_FILE, ".", "from_search")


def test_reusable_baselines_are_finished_runs_of_the_same_config_newest_first():
    def baseline(fingerprint, fail=False):
        tags = {names.ROLE: names.ROLE_BASELINE, names.CONFIG_FINGERPRINT: fingerprint}
        try:
            with tracking.start_run(CFG, "baseline", tags) as run:
                if fail:
                    raise RuntimeError("diverged")
        except RuntimeError:
            pass
        return run

    old, other, _failed, new = baseline("fp"), baseline("other"), baseline("fp", fail=True), baseline("fp")
    found = tracking.finished_baselines(new.experiment_id, "fp")
    assert [r.run_id for r in found] == [new.run_id, old.run_id]
    assert [r.run_id for r in tracking.finished_baselines(other.experiment_id, "other")] == [other.run_id]


def test_example_scores_and_curves_come_back_as_logged():
    scores = ExampleScores(("a", "b"), (2.0, 6.0), (1.0, 3.0), "eval-fp", seed=7)
    with tracking.start_run(CFG, "scored", {}) as run:
        run.log_dict(scores.to_json(), names.EVAL_EXAMPLES_FILE)
        run.log_metrics({names.EVAL_LOSS: 2.5}, step=10)
        run.log_metrics({names.EVAL_LOSS: 2.0}, step=20)
    back = tracking.example_scores(run.run_id)
    assert back.ids == ("a", "b") and back.value == 2.0 and back.seed == 7 and back.run_id == run.run_id
    assert tracking.example_scores(run.run_id, "eval_rougeL") is None  # no per-example scores for it
    assert tracking.example_scores(run.run_id, "lm_eval/arc_easy/acc") is None  # none logged
    assert tracking.metric_history(run.run_id, names.EVAL_LOSS) == [(10, 2.5), (20, 2.0)]


def test_examples_per_step_of_a_run_from_before_it_was_logged():
    with tracking.start_run(CFG, "old", {}) as run:
        run.log_params({"train.batch_size": 4, "train.gradient_accumulation_steps": 2})
    assert tracking.get_run(run.run_id).examples_per_step == 8
    with tracking.start_run(CFG, "new", {}) as run:
        run.log_metrics({names.TRAIN_EXAMPLES_PER_STEP: 16}, step=1, flush=True)
    assert tracking.get_run(run.run_id).examples_per_step == 16
