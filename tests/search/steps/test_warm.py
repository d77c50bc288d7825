"""Warm start: earlier searches' trials given to Ax first (search.warm_start).

Fast tests check which earlier trials are usable and why not, and that Ax does not propose an
attached configuration again; the slow one runs two real searches, the second warm-started from
the first over a shifted space."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.config import flatten, load_config, to_dict, with_overrides
from pipeline.core import names
from pipeline.core.errors import ConfigError
from pipeline.search import run_search, search_config
from pipeline.search.ax.optimizer import Optimizer
from pipeline.search.records import SearchState
from pipeline.search.steps.warm import match, parse_value
from pipeline.tracking import RunRecord, param_text

from ...conftest import DEMO_CONFIG, tiny_overrides

ME = {names.DATA_FINGERPRINT: "data-fp", names.EVAL_FINGERPRINT: "eval-fp", names.PRECISION: "float32"}


def overrides(tmp_path, **extra) -> list[str]:
    return tiny_overrides(
        tmp_path,
        **{
            "train.eval_steps": 4,
            "search.output_dir": str(tmp_path / "search"),
            "registry.model_name": "warm-lora",
            "search.early_stopping.enabled": False,
            **extra,
        },
    )


def trial_run(config, status=names.COMPLETED, tags=None, metrics=None, **values) -> RunRecord:
    """A finished trial run of `config` with `values` at searched keys, as MLflow returns it."""
    trial = with_overrides(config.model_copy(update={"search": None}), values)
    params = {k: param_text(v) for k, v in flatten(to_dict(trial)).items()}
    return RunRecord(
        run_id="r1",
        name="trial",
        experiment_id="1",
        status="FINISHED",
        start_time=0,
        end_time=1,
        tags={names.TRIAL_STATUS: status, **ME, **(tags or {})},
        metrics={names.EVAL_LOSS: 2.5, **(metrics or {})},
        params=params,
    )


@pytest.fixture
def config(tmp_path):
    return load_config(DEMO_CONFIG, overrides(tmp_path))


def test_a_trial_measured_the_same_way_in_this_space_is_usable(config):
    run = trial_run(
        config, **{"lora.r": 16, "lora.alpha": 32, "train.learning_rate": 1e-3, "train.batch_size": 8}
    )
    params, why = match(run, config, ME, lambda p: True)
    assert why is None
    assert params == {"lora.r": 16, "lora.alpha": 32, "train.learning_rate": 1e-3, "train.batch_size": 8}
    assert isinstance(params["lora.r"], int) and isinstance(params["train.learning_rate"], float)


def test_a_key_an_older_version_did_not_log_counts_as_its_default(config):
    """A trial run from before a config key existed (no param for it) ran as its default does:
    usable while this search keeps the default, skipped when it does not."""
    values = {"lora.r": 16, "train.learning_rate": 1e-3}
    run = trial_run(config, **values)
    del run.params["train.prompt_logits"]
    assert match(run, config, ME, lambda p: True)[1] is None
    changed = with_overrides(config, {"train.prompt_logits": True})
    _, why = match(run, changed, ME, lambda p: True)
    assert why == "train.prompt_logits is False there, True here"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"values": {"lora.r": 64}}, "outside this space: lora.r=64 not in [4, 8, 16, 32]"),
        (
            {"values": {"train.learning_rate": 0.5}},
            "outside this space: train.learning_rate=0.5 outside [0.0001, 0.01]",
        ),
        ({"values": {"train.max_steps": 99}}, "train.max_steps is 99 there, 12 here"),
        ({"values": {"model.dtype": "float32"}}, "model.dtype is float32 there, auto here"),
        ({"tags": {names.DATA_FINGERPRINT: "other"}}, "data differs (other there, data-fp here)"),
        ({"tags": {names.PRECISION: "bfloat16"}}, "precision differs (bfloat16 there, float32 here)"),
        ({"tags": {names.EVAL_FINGERPRINT: "other"}}, "eval set differs"),
        ({"status": names.FAILED}, "failed (no result to reuse)"),
        ({"status": names.KILLED}, "killed (no result to reuse)"),
    ],
)
def test_a_trial_measured_otherwise_is_skipped_with_why(config, change, expected):
    values = {"lora.r": 16, "train.learning_rate": 1e-3, **change.get("values", {})}
    run = trial_run(config, change.get("status", names.COMPLETED), change.get("tags"), **values)
    _, why = match(run, config, ME, lambda p: True)
    assert why is not None and why.startswith(expected), why


def test_a_trial_without_a_metric_this_search_optimizes_is_skipped(config):
    maximize = with_overrides(
        config,
        {
            "eval.generation_metric": "exact_match",
            "search.objectives": [{"metric": "eval_exact_match", "minimize": False}],
        },
    )
    run = trial_run(maximize, **{"lora.r": 16})
    assert match(run, maximize, ME, lambda p: True)[1] == "logged no eval_exact_match"
    run = trial_run(maximize, metrics={"eval_exact_match": 0.25}, **{"lora.r": 16})
    assert match(run, maximize, ME, lambda p: True)[1] is None


def test_constraints_and_new_dimensions(config):
    # A dimension the earlier search did not vary: its trials ran the config's value, read from
    # their params; a parameter constraint is checked by Ax's own membership test.
    opt = Optimizer.create(config)
    run = trial_run(config, **{"lora.r": 4, "lora.alpha": 64})
    params, why = match(run, config, ME, opt.in_search_space)
    assert why is None and params["train.batch_size"] == config.train.batch_size
    ranges = {
        "search.parameters.lora.r": {"type": "range", "bounds": [4, 32]},
        "search.parameters.lora.alpha": {"type": "range", "bounds": [8, 64]},
        "search.constraints": ["lora.alpha <= 4 * lora.r"],
    }
    narrow = with_overrides(config, ranges)
    _, why = match(run, narrow, ME, Optimizer.create(narrow).in_search_space)
    assert why == "outside this space: breaks search.constraints"


def test_parse_value_reads_params_as_the_dimension_types(config):
    dims = config.search.parameters
    assert parse_value("8", dims["lora.r"]) == 8 and parse_value("8.0", dims["lora.r"]) == 8
    assert parse_value("0.0003", dims["train.learning_rate"]) == 0.0003
    with pytest.raises(ValueError):
        parse_value("None", dims["train.learning_rate"])
    with pytest.raises(ValueError):
        parse_value(None, dims["lora.r"])


def test_ax_does_not_propose_an_attached_configuration_again(config):
    # A 2 x 2 space: with three points attached, the one Ax proposes next is the fourth.
    small = with_overrides(
        config,
        {
            "search.parameters": {
                "lora.r": {"type": "choice", "values": [4, 8]},
                "train.batch_size": {"type": "choice", "values": [4, 8]},
            },
            "search.initialization_trials": 2,
        },
    )
    opt = Optimizer.create(small)
    seen = [
        {"lora.r": 4, "train.batch_size": 4},
        {"lora.r": 8, "train.batch_size": 4},
        {"lora.r": 4, "train.batch_size": 8},
    ]
    indices = [
        opt.attach_measured(p, [(4, 3.0), (8, 2.9)], {names.EVAL_LOSS: 2.9 - i / 10}, 8, i == 2)
        for i, p in enumerate(seen)
    ]
    assert opt.attach_measured(seen[0], [], {names.EVAL_LOSS: 1.0}, 8, False) == indices[0]  # once only
    assert [opt.statuses()[i] for i in indices] == ["COMPLETED", "COMPLETED", "EARLY_STOPPED"]
    index, params, _ = opt.ask()
    assert params == {"lora.r": 8, "train.batch_size": 8}
    assert index not in indices


def test_warm_start_config_and_bad_run_ids(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"search.warm_start.*not a run id: 'a b'"):
        load_config(DEMO_CONFIG, [*overrides(tmp_path), "search.warm_start=['a b']"])
    with pytest.raises(ConfigError, match="a run id repeats"):
        load_config(DEMO_CONFIG, [*overrides(tmp_path), "search.warm_start=[abc,abc]"])
    digits = load_config(DEMO_CONFIG, [*overrides(tmp_path), "search.warm_start=[12345]"])
    assert digits.search.warm_start == ["12345"]
    missing = "0123456789abcdef0123456789abcdef"
    with pytest.raises(SystemExit) as e:
        main(
            [
                "search",
                "--config",
                str(DEMO_CONFIG),
                "--quiet",
                *[f"--set={o}" for o in overrides(tmp_path, **{"search.warm_start": f"[{missing}]"})],
            ]
        )
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == [f"error: search.warm_start: no run {missing!r} in the tracking store"]
    exp = MlflowClient().get_experiment_by_name("tests")
    assert exp is None or not MlflowClient().search_runs([exp.experiment_id])


@pytest.mark.slow
def test_a_search_warm_started_from_another_over_a_shifted_space(tmp_path):
    narrow = "search.parameters.lora.r='{type: choice, values: [4, 8]}'"
    first = run_search(search_config(DEMO_CONFIG, [*overrides(tmp_path), narrow], n_trials=4), quiet=True)
    earlier = {t.run_id: t for t in first.state.trials if t.scored}
    assert len(earlier) == 4
    shifted = "search.parameters.lora.r='{type: choice, values: [8, 16]}'"
    warm = run_search(
        search_config(
            DEMO_CONFIG,
            [*overrides(tmp_path), shifted, f"search.warm_start=[{first.parent_run_id}]"],
            n_trials=2,
        ),
        quiet=True,
    )
    state = warm.state
    assert len(state.finished()) == 2  # warm trials do not count toward n_trials
    assert {w.run_id for w in state.warm} == set(earlier)
    for w in state.warm:
        r = earlier[w.run_id].parameters["lora.r"]
        assert w.attached == (r == 8), (w.parameters, w.skipped)
        if not w.attached:
            assert w.skipped == "outside this space: lora.r=4 not in [8, 16]"
        else:
            assert w.eval_loss == earlier[w.run_id].eval_loss
    attached = [w for w in state.warm if w.attached]
    assert attached, "the narrow search's seed gives trials with r=8"
    # Ax holds the attached trials with their data; no new trial repeats one of them.
    client_path = warm.report_dir.parent / names.STATE_DIR / names.AX_STATE_FILE
    ax = Optimizer.load(client_path, load_config(DEMO_CONFIG))
    for w in attached:
        assert ax.statuses()[w.index] in ("COMPLETED", "EARLY_STOPPED")
        assert w.index in ax.observations(names.EVAL_LOSS)
    assert not [t for t in state.trials if t.parameters in [w.parameters for w in attached]]
    assert {t.index for t in state.trials}.isdisjoint(w.index for w in attached)
    # Linked from the parent run; listed in the report with the reasons.
    parent = MlflowClient().get_run(warm.parent_run_id)
    assert parent.data.tags[names.SEARCH_WARM_START] == first.parent_run_id
    assert f"runs/{first.parent_run_id})" in parent.data.tags[names.NOTE]
    report = (warm.report_dir / names.REPORT_FILE).read_text()
    assert "## Warm start" in report and f"{len(attached)} of 4 trials" in report
    # The records round-trip through the saved state (what a resume reads).
    saved = json.loads((warm.report_dir.parent / names.STATE_DIR / names.TRIALS_FILE).read_text())
    assert SearchState.from_json(saved).warm == state.warm


@pytest.mark.parametrize("key, value", [("train.keep_checkpoints", True), ("train.oom_retry", "split_batch")])
def test_a_trial_that_differs_only_in_a_setting_that_decides_no_result_is_usable(config, key, value):
    """Checkpoints kept and what an OOM retries decide no result: warm start takes the trial, as
    the fingerprint and resume do (all three read config.NO_RESULT_KEYS; warm start once had its
    own list of one and refused these)."""
    from pipeline.config import NO_RESULT_KEYS, config_fingerprint

    assert key in NO_RESULT_KEYS
    run = trial_run(config, **{"lora.r": 16, key: value})
    assert match(run, config, ME, lambda p: True)[1] is None
    assert config_fingerprint(with_overrides(config, {key: value})) == config_fingerprint(config)
