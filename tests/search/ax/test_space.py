"""The search space and its mapping onto Ax (`pipeline/search/ax/space.py`), without training
anything."""

from __future__ import annotations

import math

import pytest

from pipeline.config import load_config, with_overrides
from pipeline.core.errors import ConfigError
from pipeline.search.ax.optimizer import Optimizer
from pipeline.search.ax.space import build_client, build_parameters, objective_string, outcome_constraints

from ...conftest import ROOT
from ..common import demo


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


def test_qwen_space_is_research_informed_and_the_seeds_is_one_override_away():
    """The GPU config's space: lr on a log scale around 10x a full fine-tune's, rank as an
    ordered choice (the seed's next step 48 included) with alpha = 2r, the variants as choices;
    the seed's alpha choice is the override its header gives."""
    config = load_config(ROOT / "configs" / "qwen2.5-7b-qlora.yaml")
    p = config.search.parameters
    assert p["lora.r"].values == [8, 16, 32, 48, 64] and config.lora.alpha_ratio == 2
    assert (p["train.learning_rate"].bounds, p["train.learning_rate"].log) == ([5e-5, 1e-3], True)
    assert p["train.batch_size"].values == [1, 2, 4]
    assert p["train.loraplus_lr_ratio"].values == [1, 4, 16]
    assert {k: p[k].values for k in ("lora.use_rslora", "lora.use_dora", "lora.init")} == {
        "lora.use_rslora": [False, True],
        "lora.use_dora": [False, True],
        "lora.init": ["default", "loftq"],
    }
    client = build_client(config.search)
    assert Optimizer(client, config).parameter_names() == set(p)
    header = (ROOT / "configs" / "qwen2.5-7b-qlora.yaml").read_text()
    line = next(x for x in header.splitlines() if "search.parameters.lora.alpha" in x)
    seed_space = line.split('-P set="')[1].split('"')[0]  # the documented override
    seed = load_config(ROOT / "configs" / "qwen2.5-7b-qlora.yaml", [seed_space])
    assert seed.search.parameters["lora.alpha"].values == [16, 32, 64, 96, 128]


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
        f"peak_rss_gb <= {math.log(15)!r}",  # Ax models memory as its logarithm
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
        methods = [Optimizer(client, config).generation_method(i) for i in range(5)]
        assert methods[:3] != methods[3:] and "BoTorch" in methods[3:]
        return out

    a, b, c = sequence(0), sequence(0), sequence(1)
    assert a == b
    assert a != c


def test_alpha_ratio_derives_alpha():
    # (Without a search section: the demo searches lora.alpha, which alpha_ratio would override.)
    config = demo(**{"search": None, "lora.alpha_ratio": 2.0, "lora.r": 16})
    assert config.lora.alpha == 32
    assert with_overrides(config, {"lora.r": 64}).lora.alpha == 128
