"""The search's config and its mapping onto Ax, without training anything."""

from __future__ import annotations

import math

import pytest

from pipeline.config import load_config, with_overrides
from pipeline.errors import ConfigError
from pipeline.search.baseline import baseline_parameters
from pipeline.search.space import (
    Optimizer,
    build_client,
    build_parameters,
    early_stopping_strategy,
    objective_string,
    outcome_constraints,
)
from pipeline.search.summary import best_trial, trial_name

from .conftest import DEMO_CONFIG, ROOT


def demo(**values):
    config = load_config(DEMO_CONFIG)
    return with_overrides(config, values) if values else config


def test_parameters_map_one_to_one_onto_ax():
    config = demo(
        **{
            "search.parameters": {
                "lora.r": {"type": "choice", "values": [8, 16, 32, 48, 64]},
                "train.learning_rate": {"type": "range", "bounds": [5e-5, 5e-4], "log": True},
                "train.warmup_ratio": {"type": "range", "bounds": [0.0, 0.1]},
                "train.gradient_accumulation_steps": {"type": "range", "bounds": [1, 8]},
                "train.scheduler": {"type": "choice", "values": ["linear", "cosine", "constant"]},
                "lora.use_rslora": {"type": "choice", "values": [True, False]},
                "lora.dropout": {"type": "fixed", "value": 0.1},
            }
        }
    )
    params = {p.name: p for p in build_parameters(config.search)}
    r = params["lora.r"]
    assert (r.parameter_type, r.values, r.is_ordered) == ("int", [8, 16, 32, 48, 64], True)
    lr = params["train.learning_rate"]
    assert (lr.parameter_type, lr.bounds, lr.scaling) == ("float", (5e-5, 5e-4), "log")
    assert params["train.warmup_ratio"].scaling is None
    assert params["train.gradient_accumulation_steps"].parameter_type == "int"
    sched = params["train.scheduler"]
    assert (sched.parameter_type, sched.is_ordered) == ("str", False)
    assert params["lora.use_rslora"].parameter_type == "bool"
    assert params["lora.dropout"].values == [0.1]


def test_qwen_space_is_the_seeds_and_its_next_steps():
    config = load_config(ROOT / "configs" / "qwen2.5-7b-qlora.yaml")
    p = config.search.parameters
    assert p["lora.r"].values == [8, 16, 32, 48, 64]
    assert p["lora.alpha"].values == [16, 32, 64, 96, 128]
    assert (p["train.learning_rate"].bounds, p["train.learning_rate"].log) == ([5e-5, 5e-4], True)
    assert p["train.batch_size"].values == [1, 2, 4]
    client = build_client(config.search)
    assert set(client._experiment.search_space.parameters) >= {
        "lora.r",
        "lora.alpha",
        "train.learning_rate",
        "train.batch_size",
    }


def test_objectives_and_constraints_strings():
    config = demo(
        **{
            "search.objectives": [
                {"metric": "eval_loss", "minimize": True, "threshold": 6.0},
                {"metric": "train_tokens_per_second", "minimize": False, "threshold": 10.0},
            ],
            "search.outcome_constraints": ["peak_rss_gb <= 15"],
        }
    )
    assert objective_string(config.search) == "-eval_loss, train_tokens_per_second"
    assert outcome_constraints(config.search) == [
        "peak_rss_gb <= 15",
        "eval_loss <= 6.0",
        "train_tokens_per_second >= 10.0",
    ]
    build_client(config.search)  # Ax accepts them


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            {"search.parameters.lora.r": {"type": "range", "bounds": [64, 8]}},
            "bounds are inverted or empty: [64.0, 8.0]",
        ),
        (
            {"search.parameters.train.learning_rate": {"type": "range", "bounds": [0, 1e-3], "log": True}},
            "log scale needs a positive lower bound",
        ),
        (
            {"search.parameters.lora.r": {"type": "choice", "values": []}},
            "a choice needs a non-empty list of values",
        ),
        (
            {"search.parameters.lora.rank": {"type": "choice", "values": [8]}},
            "'lora.rank' names no config key",
        ),
        ({"search.constraints": ["lora.alpha <= 2 * lora.rank"]}, "uses lora.rank, not a searched parameter"),
        ({"search.n_trials": 0}, "search.n_trials: Input should be greater than 0"),
        ({"search.objectives": [{"metric": "accuracy"}]}, "'accuracy' is not a metric that trials log"),
        ({"search.outcome_constraints": ["gpu_mem < 15"]}, "must read `metric <= number`"),
        (
            {"search.parameters.lora.r": {"type": "choice", "values": [8], "bounds": [1, 2]}},
            "bounds does not apply to a choice",
        ),
    ],
)
def test_bad_search_config_names_the_key(values, expected):
    with pytest.raises(ConfigError) as e:
        demo(**values)
    assert expected in str(e.value)
    assert "search." in str(e.value)


def test_ax_level_problems_become_config_errors():
    config = demo(
        **{
            "search.parameters.train.warmup_ratio": {"type": "range", "bounds": [0.0, 0.2]},
            "search.constraints": ["train.learning_rate <= train.warmup_ratio"],
        }
    )
    with pytest.raises(ConfigError, match=r"search.constraints: .*log scale"):
        build_client(config.search)
    with pytest.raises(ConfigError, match="integer; bounds must be integers"):
        build_parameters(demo(**{"search.parameters.lora.r": {"type": "range", "bounds": [4.5, 8]}}).search)


def test_same_seed_same_trial_sequence_other_seed_differs():
    """Sobol and BoTorch trials alike: the seed fixes the sequence (given the same results)."""

    def sequence(seed: int) -> list[dict]:
        config = demo(**{"search.seed": seed, "search.initialization_trials": 3})
        client = build_client(config.search)
        out = []
        for _ in range(5):
            ((index, params),) = client.get_next_trials(max_trials=1).items()
            out.append(dict(params))
            # A smooth stand-in for eval_loss, so BoTorch has something to model.
            loss = (math.log10(params["train.learning_rate"]) + 2.5) ** 2 + 0.01 * params["lora.r"]
            client.complete_trial(index, raw_data={"eval_loss": loss})
        methods = [client._experiment.trials[i].generation_method_str for i in range(5)]
        assert methods[:3] != methods[3:] and "BoTorch" in methods[3:]
        return out

    a, b, c = sequence(0), sequence(0), sequence(1)
    assert a == b
    assert a != c


def test_baseline_parameters_and_membership():
    config = demo()
    params = baseline_parameters(config)
    assert params == {"lora.r": 8, "lora.alpha": 16.0, "train.learning_rate": 1e-3, "train.batch_size": 8}
    optimizer = Optimizer(build_client(config.search), config)
    assert optimizer.in_search_space(params)
    assert not optimizer.in_search_space({**params, "lora.r": 12})


def test_early_stopping_auto_and_settings():
    assert early_stopping_strategy(demo()) is not None  # 150 steps, eval every 50: 3 evaluations
    assert early_stopping_strategy(demo(**{"train.eval_steps": 100})) is None
    assert early_stopping_strategy(demo(**{"search.early_stopping.enabled": False})) is None
    es = early_stopping_strategy(
        demo(**{"search.early_stopping.min_progression": 70, "search.early_stopping.percentile": 30})
    )
    assert (es.min_progression, es.percentile_threshold) == (70, 30)
    with pytest.raises(ConfigError, match="needs train.eval_steps"):
        early_stopping_strategy(demo(**{"train.eval_steps": None, "search.early_stopping.enabled": True}))


def test_trial_names_say_the_trial_and_its_params():
    name = trial_name(
        7, {"lora.r": 32, "lora.alpha": 64.0, "train.learning_rate": 1.2e-4, "train.batch_size": 2}
    )
    assert name == "trial-07 r=32 a=64 lr=1.2e-04 bs=2"


def test_alpha_ratio_derives_alpha():
    # (Without a search section: the demo searches lora.alpha, which alpha_ratio would override.)
    config = demo(**{"search": None, "lora.alpha_ratio": 2.0, "lora.r": 16})
    assert config.lora.alpha == 32
    assert with_overrides(config, {"lora.r": 64}).lora.alpha == 128


def test_best_trial_respects_status_constraints_and_direction():
    from pipeline.search.journal import SearchState, TrialRecord

    config = demo(**{"search.outcome_constraints": ["peak_rss_gb <= 2"]})
    state = SearchState(parent_run_id="p", n_trials=4)
    state.trials = [
        TrialRecord(
            index=0,
            parameters={},
            status="completed",
            eval_loss=2.0,
            metrics={"eval_loss": 2.0, "peak_rss_gb": 3.0},
        ),  # infeasible
        TrialRecord(
            index=1,
            parameters={},
            status="early_stopped",
            eval_loss=1.0,
            metrics={"eval_loss": 1.0, "peak_rss_gb": 1.0},
        ),
        TrialRecord(
            index=2,
            parameters={},
            status="completed",
            eval_loss=2.5,
            metrics={"eval_loss": 2.5, "peak_rss_gb": 1.5},
        ),
        TrialRecord(index=3, parameters={}, status="failed", failure_reason="x"),
    ]
    assert best_trial(state, config.search).index == 2
    maximize = demo(**{"search.objectives": [{"metric": "eval_rougeL", "minimize": False}]})
    state.trials[0].metrics["eval_rougeL"], state.trials[2].metrics["eval_rougeL"] = 0.4, 0.3
    assert best_trial(state, maximize.search).index == 0
