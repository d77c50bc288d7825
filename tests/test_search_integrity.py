"""Search integrity (issue 10): each test is named after what it guards, and failed on the code
before the fix (the note of the change says how)."""

from __future__ import annotations

import pytest

from pipeline.config import load_config, with_overrides
from pipeline.errors import ConfigError, SearchAborted
from pipeline.search.space import Optimizer

from .conftest import DEMO_CONFIG


def demo(**values):
    config = load_config(DEMO_CONFIG)
    return with_overrides(config, values) if values else config


def _curve(optimizer: Optimizer, index: int, losses: list[float], every: int = 400) -> bool:
    """Report a learning curve evaluation by evaluation; True if Ax stopped the trial."""
    # Stops at the first True, like the trainer does: any() short-circuits.
    return any(optimizer.report_evaluation(index, i * every, loss) for i, loss in enumerate(losses, 1))


def test_early_stopping_survives_a_resume(tmp_path):
    """A trial killed after its first evaluation is retried with the same parameters (the same
    Ax arm). Its partial data must not stay beside the retry's, or Ax's early stopping gives up
    ("Arm ... has multiple trial indices") for the rest of the search."""
    config = demo(
        **{
            "search.initialization_trials": 8,
            "search.early_stopping.enabled": True,
            "search.early_stopping.min_curves": 2,
            "search.early_stopping.min_progression": 400,
        }
    )
    optimizer = Optimizer.create(config)
    good = [3.6, 3.3, 3.2]
    for _ in range(2):
        index, _, _ = optimizer.ask()
        assert not _curve(optimizer, index, good)
        optimizer.complete(index, {"eval_loss": good[-1]}, 1200, early_stopped=False)
    killed, params, _ = optimizer.ask()
    assert not _curve(optimizer, killed, [3.5])  # one evaluation, then SIGTERM
    optimizer.fail(killed, "interrupted")
    optimizer.save(tmp_path / "ax.json")

    resumed = Optimizer.load(tmp_path / "ax.json", config)
    retry = resumed.retry(params)
    assert not _curve(resumed, retry, good)
    resumed.complete(retry, {"eval_loss": good[-1]}, 1200, early_stopped=False)
    bad, _, _ = resumed.ask()
    assert _curve(resumed, bad, [9.0, 9.0, 9.0]), "a clearly bad trial after the resume must stop"
    assert resumed.broken is None


def test_measured_parameters_are_never_a_new_trial_and_a_giving_up_rule_is_loud():
    """Ax re-proposes a failed trial's point (it deduplicates against every other arm); a point
    that has data is abandoned and Ax asked again, and if Ax's early stopping still gives up
    (it only logs a warning), the optimizer says so instead of never stopping a trial again."""
    config = demo(**{"search.early_stopping.enabled": True, "search.early_stopping.min_curves": 1})
    optimizer = Optimizer.create(config)
    first, params, _ = optimizer.ask()
    optimizer.complete(first, {"eval_loss": 3.0}, 1200, early_stopped=False)
    real = optimizer.client.get_next_trials
    calls = []

    def propose_the_measured_point_first(max_trials):
        calls.append(max_trials)
        if len(calls) == 1:
            return {optimizer.client.attach_trial(parameters=params): params}
        return real(max_trials=max_trials)

    optimizer.client.get_next_trials = propose_the_measured_point_first
    index, fresh, _ = optimizer.ask()
    assert len(calls) == 2 and fresh != params
    statuses = {i: t.status.name for i, t in optimizer.client._experiment.trials.items()}
    assert statuses[index - 1] == "ABANDONED" and "parameters again" in optimizer.notes[-1]
    with pytest.raises(SearchAborted, match="has data"):
        optimizer.retry(params)  # the loop only retries interrupted trials, whose data is gone

    # Two trials of one arm with data (bypassing the optimizer): Ax gives up; we notice.
    twin = optimizer.client.attach_trial(parameters=params)
    optimizer.client.attach_data(twin, {"eval_loss": 3.1}, progression=400)
    assert optimizer.report_evaluation(index, 400, 3.2) is False
    assert optimizer.broken and "multiple trial indices" in optimizer.broken


def test_a_searched_key_means_what_trains(tmp_path, capsys):
    """lora.alpha_ratio sets lora.alpha: searching alpha beside it trained r x ratio while Ax
    recorded the asked alpha. The config refuses it, naming both keys; and a trial whose built
    config does not hold the values Ax asked for never trains."""
    from pipeline.search.executor import TrialJob, run_job
    from pipeline.trial import Resources

    from .conftest import run_cli, tiny_overrides

    with pytest.raises(ConfigError) as e:
        demo(**{"lora.alpha_ratio": 2.0})
    assert "search.parameters" in str(e.value) and "lora.alpha_ratio" in str(e.value)
    code, _, err = run_cli(["search", "--config", str(DEMO_CONFIG), "--set", "lora.alpha_ratio=2"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "lora.alpha_ratio" in errors[0] and "lora.alpha" in errors[0]
    # Searching the ratio itself is fine: what Ax records (r, ratio) is what trains.
    space = {k: v.model_dump(exclude_none=True) for k, v in demo().search.parameters.items()}
    space["lora.alpha_ratio"] = {"type": "choice", "values": [1.0, 2.0]}
    del space["lora.alpha"]
    ratio = demo(**{"lora.alpha_ratio": 2.0, "search.parameters": space})
    assert set(ratio.search.parameters) == {
        "lora.r",
        "lora.alpha_ratio",
        "train.learning_rate",
        "train.batch_size",
    }

    base = load_config(DEMO_CONFIG, [*tiny_overrides(tmp_path), "lora.alpha_ratio=2", "search=null"])
    out = run_job(TrialJob(1, base, {"lora.r": 8, "lora.alpha": 8.0}), Resources())
    assert out.status == "failed" and out.run_id is None
    assert "lora.alpha: Ax asked for 8.0, the trial's config holds 16.0" in out.reason
