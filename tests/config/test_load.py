"""Config: every shipped YAML loads; bad input is reported with key path and line, all at once."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.config import (
    PipelineConfig,
    config_fingerprint,
    flatten,
    load_config,
    parse_overrides,
    to_dict,
    to_yaml,
    validate,
    with_overrides,
)
from pipeline.core.errors import ConfigError

from ..conftest import DEMO_CONFIG, ROOT, tiny_overrides

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_says_how_to_run_it(path: Path):
    config = load_config(path)
    assert isinstance(config, PipelineConfig)
    head = path.read_text().splitlines()
    assert head[0].startswith("# "), f"{path.name} must start with a comment saying what it is for"
    comment = "\n".join(line for line in head if line.startswith("#"))
    assert re.search(r"(mlflow run \.|python -m pipeline)", comment), f"{path.name}: no command in header"
    assert path.name in comment or "default" in comment, f"{path.name}: the command must name the file"


def test_expected_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"demo-cpu.yaml", "smollm2-cpu.yaml", "qwen2.5-7b-qlora.yaml"} <= names


def test_qwen_config_is_the_seed_baseline():
    c = load_config(ROOT / "configs" / "qwen2.5-7b-qlora.yaml")
    assert c.model.name_or_path == "Qwen/Qwen2.5-7B-Instruct"
    assert c.model.load_in_4bit and c.model.quant_type == "nf4" and c.model.double_quant
    assert (c.lora.r, c.lora.alpha, c.train.learning_rate, c.train.batch_size) == (16, 32, 2e-4, 1)
    assert c.lora.target_modules == "all-linear"


def test_overrides_parse_yaml_scalars_and_several_per_item():
    pairs = parse_overrides(
        ["train.learning_rate=1e-4 lora.r=32", "lora.use_rslora=true", "data.system_prompt='a b'"]
    )
    assert pairs == [
        ("train.learning_rate", "1e-4"),  # YAML 1.1 reads 1e-4 as text; pydantic makes it a float
        ("lora.r", 32),
        ("lora.use_rslora", True),
        ("data.system_prompt", "a b"),
    ]
    c = load_config(
        DEMO_CONFIG, ["train.learning_rate=1e-4 lora.r=32", "lora.target_modules='[q_proj, v_proj]'"]
    )
    assert c.train.learning_rate == pytest.approx(1e-4)
    assert c.lora.r == 32
    assert c.lora.target_modules == ["q_proj", "v_proj"]


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(DEMO_CONFIG, ["lora.r"])


def test_override_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match=r"lora.r is a value, not a section"):
        load_config(DEMO_CONFIG, ["lora.r.x=1"])


def _bad(tmp_path: Path, text: str) -> str:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "\n" not in msg, "an error is one line"
    return msg


BASE = """\
model:
  name_or_path: models/pydoc-llama
data:
  path: data/pydoc_qa.jsonl
"""


def test_all_problems_reported_together_with_key_paths_and_lines(tmp_path):
    msg = _bad(
        tmp_path,
        BASE
        + """\
lora:
  r: 0
  dropout: 1.0
  colour: blue
train:
  learning_rate: 0
  batch_size: many
""",
    )
    assert "(5 problems)" in msg
    assert "bad.yaml:6: lora.r: Input should be greater than 0 (got 0)" in msg
    assert "bad.yaml:7: lora.dropout: Input should be less than 1 (got 1.0)" in msg
    assert "bad.yaml:8: lora.colour: unknown key" in msg
    assert "bad.yaml:10: train.learning_rate: Input should be greater than 0" in msg
    assert "bad.yaml:11: train.batch_size: Input should be a valid integer" in msg


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("lora:\n  r: -2\n", "lora.r: Input should be greater than 0"),
        ("train:\n  learning_rate: -1.0e-4\n", "train.learning_rate: Input should be greater than 0"),
        ("lora:\n  dropout: -0.1\n", "lora.dropout: Input should be greater than or equal to 0"),
        ("lora:\n  target_modules: []\n", "lora.target_modules"),
        ("trainer:\n  lr: 1\n", "trainer: unknown key"),
        (
            "data:\n  path: x.jsonl\n  format: sharegpt\n",
            "data.format: Input should be 'alpaca', 'chat' or 'text'",
        ),
        ("train:\n  epochs: 0\n", "train.epochs: Input should be greater than 0"),
        ("data:\n  path: x.jsonl\n  eval_fraction: 1.5\n", "data.eval_fraction: Input should be less than 1"),
    ],
)
def test_bad_values_name_the_key(tmp_path, extra, expected):
    text = BASE + extra if not extra.startswith("data:") else BASE.split("data:")[0] + extra
    assert expected in _bad(tmp_path, text)


def test_missing_required_section(tmp_path):
    msg = _bad(tmp_path, "model:\n  name_or_path: x\n")
    assert "data: required key is missing" in msg


def test_invalid_yaml_names_the_line(tmp_path):
    msg = _bad(tmp_path, "model:\n  name_or_path: [unclosed\ndata:\n  path: x\n")
    assert re.search(r"bad\.yaml:\d+: not valid YAML", msg)


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read the file"):
        load_config(tmp_path / "nope.yaml")


def test_not_a_mapping(tmp_path):
    assert "must hold a mapping" in _bad(tmp_path, "- a\n- b\n")


def test_gguf_and_4bit_together_rejected(tmp_path):
    msg = _bad(tmp_path, BASE.replace("models/pydoc-llama", "x\n  gguf_file: m.gguf\n  load_in_4bit: true"))
    assert "model.load_in_4bit" in msg


def test_round_trip_through_yaml_is_identical(tmp_path):
    c = load_config(DEMO_CONFIG)
    p = tmp_path / "resolved.yaml"
    p.write_text(to_yaml(c, "x"))
    assert load_config(p) == c


def test_flatten_gives_dotted_params():
    flat = flatten(to_dict(load_config(DEMO_CONFIG)))
    for key in ("lora.r", "lora.alpha", "train.learning_rate", "train.batch_size", "model.name_or_path"):
        assert key in flat
    assert not any(isinstance(v, dict) and v for v in flat.values())


def test_fingerprint_ignores_tracking_but_not_training():
    c = load_config(DEMO_CONFIG)
    same = with_overrides(c, {"tracking.experiment_name": "other", "registry.model_name": "x"})
    other = with_overrides(c, {"lora.r": c.lora.r * 2})
    assert config_fingerprint(c) == config_fingerprint(same)
    assert config_fingerprint(c) != config_fingerprint(other)


def test_with_overrides_validates():
    c = load_config(DEMO_CONFIG)
    with pytest.raises(ConfigError, match="lora.r"):
        with_overrides(c, {"lora.r": 0})


def test_validate_rejects_non_mapping():
    with pytest.raises(ConfigError):
        validate(["x"])


def test_select_overrides_splits_shared_set_strings():
    from pipeline.config import select_overrides

    items = ["train.max_steps=5 search.n_trials=2", "lora.r=4", "search.output_dir='/a b'"]
    assert select_overrides(items, "search.") == ["search.n_trials=2", "'search.output_dir=/a b'"]
    assert parse_overrides(select_overrides(items, "search."))[1] == ("search.output_dir", "/a b")
    assert select_overrides(items, "search.", keep=False) == ["train.max_steps=5", "lora.r=4"]


def test_search_problems_are_found_by_config_check_with_their_lines(tmp_path):
    """What the search used to find only when it ran: value types against the config field,
    early stopping without evaluations; now reported with every other problem, with lines."""
    text = DEMO_CONFIG.read_text()
    text = text.replace("  eval_steps: 50\n", "").replace(
        "  early_stopping:\n",
        "  outcome_constraints: ['peak_rss_gb <= 2', 'gpu < 3']\n  early_stopping:\n    enabled: true\n",
    )
    text = text.replace(
        "lora.r: {type: choice, values: [4, 8, 16, 32]}", "lora.r: {type: range, bounds: [4.5, 32]}"
    )
    path = tmp_path / "search.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    lines = {line.split(": ", 1)[0] for line in e.value.problems}
    msg = str(e.value)
    assert "search.parameters.lora.r: the key is an integer; bounds must be integers" in msg
    assert "search.outcome_constraints.1: 'gpu < 3' must read `metric <= number`" in msg
    row = next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith("    lora.r:"))
    assert f"{path}:{row}" in lines
    # The cross-section check runs once the sections themselves are valid, and points at its key.
    fixed = text.replace("[4.5, 32]", "[4, 32]").replace(", 'gpu < 3'", "")
    path.write_text(fixed)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    row = next(i for i, line in enumerate(fixed.splitlines(), 1) if line.strip() == "enabled: true")
    assert e.value.problems == [
        f"{path}:{row}: search.early_stopping.enabled: needs train.eval_steps "
        "(trials must evaluate while they train)"
    ]


def test_outcome_constraints_are_parsed_once_and_written_back_as_text():
    c = with_overrides(
        load_config(DEMO_CONFIG), {"search.outcome_constraints": ["peak_rss_gb<=15", "eval_rougeL >= 0.1"]}
    )
    first, second = c.search.outcome_constraints
    assert (first.metric, first.op, first.bound) == ("peak_rss_gb", "<=", 15)
    assert first.holds(15.0) and not first.holds(15.5) and not first.holds(None)
    assert second.holds(0.2) and not second.holds(0.05)
    assert to_dict(c)["search"]["outcome_constraints"] == ["peak_rss_gb <= 15", "eval_rougeL >= 0.1"]
    assert flatten(to_dict(c))["search.outcome_constraints"] == ["peak_rss_gb <= 15", "eval_rougeL >= 0.1"]
    assert c.search.required_metrics() == ["eval_loss", "peak_rss_gb", "eval_rougeL"]


def test_cli_options_are_validated_as_config_keys(tmp_path):
    from pipeline.search import search_config

    config = search_config(DEMO_CONFIG, ["lora.r=4"], n_trials=3, budget_minutes=1.5)
    assert (config.search.n_trials, config.search.budget_minutes, config.lora.r) == (3, 1.5, 4)
    with pytest.raises(ConfigError) as e:
        search_config(DEMO_CONFIG, [], n_trials=0, budget_minutes=-1)
    assert e.value.problems == [
        "--n-trials: Input should be greater than 0 (got 0)",
        "--budget-minutes: Input should be greater than 0 (got -1)",
    ]
    no_search = DEMO_CONFIG.read_text().split("# The search space")[0]
    path = tmp_path / "no-search.yaml"
    path.write_text(no_search)
    with pytest.raises(ConfigError, match="the config has no search section"):
        search_config(path, [], n_trials=2)


def test_every_section_but_search_can_be_searched():
    from pipeline.config import config_field
    from pipeline.config.sections import SECTIONS

    assert set(SECTIONS) == set(PipelineConfig.model_fields) - {"search"}
    assert config_field("lora.r") is not None and config_field("retrain.epochs") is not None
    for path in ("search.n_trials", "lora", "lora.rank", "lora.r.x", "nothing"):
        assert config_field(path) is None, path


SEED = ROOT / "configs" / "qwen2.5-7b-qlora.yaml"


def test_a_command_that_does_not_search_is_not_refused_over_search_rules():
    """`baseline` and `retrain` load with search=False: the search section and search.* overrides
    are dropped, so a rule only the search needs (early stopping needs eval_steps) does not stop
    a plain baseline of the seed config."""
    with pytest.raises(ConfigError, match="search.early_stopping.enabled: needs train.eval_steps"):
        load_config(SEED, ["train.eval_steps=null"])
    config = load_config(SEED, ["train.eval_steps=null", "search.n_trials=0"], search=False)
    assert config.search is None and config.train.eval_steps is None


def test_objectives_and_constraints_on_metrics_no_trial_logs():
    """Found by validation (config check), led by the key that names the metric."""
    cases = [
        (
            ["search.objectives='[{metric: eval_exact_match}]'"],
            "search.objectives: eval_exact_match is not logged",
        ),
        (
            ["eval.generation_metric=null", "search.outcome_constraints=\"['eval_rougeL >= 0.1']\""],
            "search.outcome_constraints: eval_rougeL is a generation metric, but eval.generation_metric is null",
        ),
        (
            ["eval.generation_samples=0", "search.objectives='[{metric: eval_rougeL, minimize: false}]'"],
            "search.objectives: eval_rougeL is a generation metric, but eval.generation_samples is 0",
        ),
    ]
    for sets, expected in cases:
        with pytest.raises(ConfigError) as e:
            load_config(DEMO_CONFIG, sets)
        assert expected in str(e.value), str(e.value)
    # A CUDA memory peak depends on the machine: valid, and refused only where there is no CUDA.
    config = load_config(DEMO_CONFIG, ["search.outcome_constraints=\"['peak_gpu_mem_gb <= 15']\""])
    assert config.unavailable_metrics() == [] and config.unavailable_metrics(cuda=True) == []
    (problem,) = config.unavailable_metrics(cuda=False)
    assert problem.startswith("search.outcome_constraints: peak_gpu_mem_gb is measured only on a CUDA GPU")


def test_a_wrongly_typed_choice_value_names_the_parameter_and_its_line(tmp_path):
    text = DEMO_CONFIG.read_text().replace("values: [4, 8, 16, 32]", "values: [4, big]")
    path = tmp_path / "typed.yaml"
    path.write_text(text)
    row = next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith("    lora.r:"))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.problems == [
        f"{path}:{row}: search.parameters.lora.r: the key is an integer; the value 'big' is not"
    ]


def _cli(tmp_path, capsys, *extra: str) -> tuple[int, list[str]]:
    args = [
        "search",
        "--config",
        str(DEMO_CONFIG),
        "--quiet",
        *[f"--set={o}" for o in tiny_overrides(tmp_path)],
    ]
    try:
        main([*args, *extra])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_bad_noise_settings_are_one_line_and_no_run(tmp_path, capsys):
    code, err = _cli(tmp_path, capsys, "--set", "search.replicates.seeds=0")
    assert code == 2 and len(err) == 1 and "search.replicates.seeds: Input should be greater than 0" in err[0]
    code, err = _cli(tmp_path, capsys, "--set", "registry.confidence=1.5")
    assert code == 2 and len(err) == 1 and "registry.confidence: Input should be less than 1" in err[0]
    store = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])  # this test's own store
    assert not [r for e in store.search_experiments() for r in store.search_runs([e.experiment_id])]


def test_a_config_file_is_parsed_once(tmp_path, monkeypatch):
    # The node tree gives the data, the lines and the duplicate keys: the file was parsed three
    # times (safe_load, compose for duplicates, compose again for a problem's line).
    import yaml

    from pipeline.config import load as load_module

    path = tmp_path / "c.yaml"
    path.write_text(DEMO_CONFIG.read_text() + "\nlora:\n  r: 0\n".replace("lora:\n", "extra_section:\n"))
    calls = []
    real = yaml.compose
    monkeypatch.setattr(load_module.yaml, "compose", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+: extra_section: unknown key"):
        load_config(path)
    assert calls == [1]


def test_a_search_config_the_cli_loaded_is_not_read_again(tmp_path):
    from pipeline.search import search_config

    # The CLI loads the file (before the heavy imports) and hands it on: the search's config was
    # read twice on every search, four times on a resume.
    loaded = load_config(DEMO_CONFIG, ["lora.r=4"])
    config = search_config(tmp_path / "moved-away.yaml", ["lora.r=4"], n_trials=3, loaded=loaded)
    assert config.search.n_trials == 3 and config.lora.r == 4
