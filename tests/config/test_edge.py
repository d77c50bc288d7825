"""The edge: a config mistake is answered before any run exists, in one line naming the key and
where its value came from (`file:line` or `--set`), with exit 2.

The mistakes here are the ones that used to get through (issue 34): values a search space allows
but the key refuses, combinations the rules refuse, duplicate YAML keys, and lines that read like
pydantic's internals. Each is run through `search` itself, in one process that refuses to import
torch, transformers, mlflow or ax: a mistake that slipped past the edge would reach them (and
train), and fails here at once instead.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from pipeline.config import load_config
from pipeline.core.errors import ConfigError

from ..conftest import DEMO_CONFIG, ROOT, run_cli, tiny_overrides, venv_env

DEMO = DEMO_CONFIG.read_text()
PARAMETERS = "  parameters:\n"


def _with(params: str = "", replace: tuple[str, str] | None = None, append: str = "") -> str:
    """The demo config with search parameters added, a line replaced, or text appended."""
    text = DEMO.replace(PARAMETERS, PARAMETERS + params) if params else DEMO
    if replace:
        assert replace[0] in text
        text = text.replace(*replace)
    return text + append


def _line(text: str, needle: str, nth: int = 1) -> int:
    """The line number of the nth line of `text` that contains `needle`."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    return hits[nth - 1]


# (name, config text, --set overrides, where the line must point (a file line or "--set"), what it says)
CASES = [
    (
        "a choice value the key refuses",
        _with("    lora.init: {type: choice, values: [default, pisa]}\n"),
        [],
        ("lora.init: {type", 1),
        "search.parameters.lora.init: value 'pisa': Input should be 'default', 'gaussian'",
    ),
    (
        "a target-modules choice that is no named set",
        _with("    lora.target_modules: {type: choice, values: [all-linear, attn]}\n"),
        [],
        ("lora.target_modules: {type", 1),
        "search.parameters.lora.target_modules: value 'attn': must be all-linear, attention or mlp",
    ),
    (
        "a LoRA+ ratio below its minimum",
        _with("    train.loraplus_lr_ratio: {type: choice, values: [0, 4, 16]}\n"),
        [],
        ("train.loraplus_lr_ratio", 1),
        "search.parameters.train.loraplus_lr_ratio: value 0: Input should be greater than or equal to 1",
    ),
    (
        "a range bound below the key's minimum",
        _with("    lora.eva_rho: {type: range, bounds: [0.5, 3.0]}\n"),
        [],
        ("lora.eva_rho", 1),
        "search.parameters.lora.eva_rho: bound 0.5: Input should be greater than or equal to 1",
    ),
    (
        "pissa_iterations beside init without dependents",
        _with(
            "    lora.init: {type: choice, values: [default, pissa]}\n"
            "    lora.pissa_iterations: {type: choice, values: [4, 16]}\n"
        ),
        [],
        ("lora.pissa_iterations", 1),
        "search.parameters.lora.pissa_iterations: value 4: needs init: pissa (init is 'default'); "
        "or lora.init dependents: {pissa: [lora.pissa_iterations]}",
    ),
    (
        "pissa_iterations with init fixed at default",
        _with("    lora.pissa_iterations: {type: choice, values: [4, 16]}\n"),
        [],
        ("lora.pissa_iterations", 1),
        "search.parameters.lora.pissa_iterations: value 4: needs init: pissa (init is 'default')",
    ),
    (
        "a key twice in a section",
        _with(replace=("  r: 8\n", "  r: 8\n  r: 16\n")),
        [],
        ("  r: 16", 1),
        "lora.r: defined twice (first at line 15)",
    ),
    (
        "a section twice",
        _with(append="train:\n  max_steps: 10\n"),
        [],
        ("train:", 2),
        "train: defined twice (first at line 19)",
    ),
    (
        "a search parameter twice",
        _with("    lora.r: {type: choice, values: [2, 4]}\n"),
        [],
        ("lora.r: {type", 2),
        "search.parameters.lora.r: defined twice (first at line",
    ),
    (
        "a --set value that fits no member of a union",
        DEMO,
        ["--set", "lora.target_modules=attn"],
        "--set",
        "--set lora.target_modules: must be all-linear, attention or mlp (a named set), or a list of "
        "module names (got 'attn')",
    ),
    (
        "an outcome constraint written as a mapping",
        _with(
            replace=("  early_stopping:\n", "  outcome_constraints: [{peak_rss_gb: 8}]\n  early_stopping:\n")
        ),
        [],
        ("outcome_constraints", 1),
        "search.outcome_constraints.0: write a constraint as text, e.g. 'peak_rss_gb <= 8'",
    ),
    (
        "a named set inside a list",
        _with(replace=("  target_modules: all-linear\n", "  target_modules: [attention]\n")),
        [],
        ("target_modules: [attention]", 1),
        "lora.target_modules: ['attention'] puts the named set attention in a list: write "
        "`target_modules: attention`",
    ),
    (
        "a race whose seed cap is below 1",
        DEMO,
        ["--set", "search.replicates.mode=race", "--set", "search.replicates.seeds=0"],
        "--set",
        "--set search.replicates.seeds: Input should be greater than 0",
    ),
    (
        "a race confidence outside (0, 1)",
        DEMO,
        ["--set", "search.replicates.mode=race", "--set", "search.replicates.confidence=95"],
        "--set",
        "--set search.replicates.confidence: Input should be less than 1",
    ),
    (
        "a replicates mode that does not exist",
        _with(replace=("replicates: {top_k: 2, seeds: 2}", "replicates: {top_k: 2, seeds: 2, mode: racing}")),
        [],
        ("replicates: {top_k", 1),
        "search.replicates.mode: Input should be 'fixed' or 'race'",
    ),
]

HEAVY = ("torch", "transformers", "mlflow", "ax", "peft")
RUNNER = """
import io, json, sys, time, contextlib
from importlib.abc import MetaPathFinder

class Refuse(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError(f"{name} imported: the mistake got past the edge")

HEAVY = set(sys.argv[2].split(","))
sys.meta_path.insert(0, Refuse())
from pipeline.cli import main

out = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stderr(err):
        try:
            main(args)
            code = 0
        except SystemExit as e:
            code = e.code
        except ImportError as e:
            code, err = -1, io.StringIO(str(e))
    out.append({"code": code, "stderr": err.getvalue(), "seconds": time.perf_counter() - t})
print(json.dumps(out))
"""


@pytest.mark.no_store
def test_every_mistake_gets_one_line_naming_its_key_and_exit_2_before_any_run(tmp_path):
    # Run where a user would: the config beside the shipped model and data, named relatively.
    for folder in ("models", "data"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    calls, files = [], []
    for i, (_, text, sets, _, _) in enumerate(CASES):
        path = f"mistake{i}.yaml"
        (tmp_path / path).write_text(text)
        files.append(path)
        calls.append(["search", "--config", path, *sets])
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(calls), ",".join(HEAVY)],
        capture_output=True,
        text=True,
        env={**venv_env(tmp_path), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"},
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.splitlines()[-1])
    for (name, text, _, where, says), path, got in zip(CASES, files, results, strict=True):
        errors = [line for line in got["stderr"].splitlines() if line.startswith("error: ")]
        assert got["code"] == 2 and len(errors) == 1, (name, got)
        (line,) = errors
        assert len(line) <= 200, (name, len(line), line)
        assert says in line, (name, line)
        if where != "--set":
            assert f"{path}:{_line(text, *where)}: " in line, (name, line)
        assert "literal[" not in line and "list[str]" not in line, (name, line)
    assert not (tmp_path / "mlflow.db").exists()  # no run, no store


def test_duplicate_keys_are_refused_at_any_depth(tmp_path):
    cfg = tmp_path / "twice.yaml"
    cfg.write_text(
        "model:\n  name_or_path: models/pydoc-llama\ndata:\n  path: data/pydoc_qa.jsonl\n"
        "search:\n  parameters:\n    lora.r: {type: choice, values: [4, 8], values: [2]}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert str(e.value) == (
        f"invalid config: {cfg}:7: search.parameters.lora.r.values: defined twice (first at line 7)"
    )


def test_every_point_of_the_space_is_checked_not_only_its_first_value(tmp_path):
    """A bad value anywhere in a choice, and between a range's bounds (an integer range's midpoint),
    is found; a value that is never drawn would otherwise hide behind good ones."""
    cases = {
        "lora.init={type: choice, values: [default, gaussian, pisa]}": "value 'pisa'",
        "train.loraplus_lr_ratio={type: range, bounds: [0.5, 16]}": "bound 0.5",
    }
    for option, expected in cases.items():
        with pytest.raises(ConfigError) as e:
            load_config(DEMO_CONFIG, [shlex.quote(f"search.parameters.{option}")])
        assert expected in str(e.value), str(e.value)
    # A space that is fine passes: pissa_iterations made a dependent of lora.init=pissa.
    load_config(
        DEMO_CONFIG,
        [
            shlex.quote(
                "search.parameters.lora.init={type: choice, values: [default, pissa], "
                "dependents: {pissa: [lora.pissa_iterations]}}"
            ),
            shlex.quote("search.parameters.lora.pissa_iterations={type: choice, values: [4, 16]}"),
        ],
    )


def test_a_dependent_whose_parent_cannot_take_its_value_names_both_keys():
    with pytest.raises(ConfigError) as e:
        load_config(
            DEMO_CONFIG,
            [
                "model.load_in_4bit=true",
                shlex.quote(
                    "search.parameters.lora.init={type: choice, values: [default, pissa], "
                    "dependents: {pissa: [lora.pissa_iterations]}}"
                ),
                shlex.quote("search.parameters.lora.pissa_iterations={type: choice, values: [4, 16]}"),
            ],
        )
    text = str(e.value)
    assert "search.parameters.lora.init: value 'pissa'" in text
    assert (
        "search.parameters.lora.pissa_iterations: exists only under lora.init='pissa', a value lora.init cannot take"
        in text
    )


def test_an_unknown_key_that_looks_like_a_typo_names_the_key_it_resembles():
    with pytest.raises(
        ConfigError, match=r"--set train.learnig_rate: unknown key \(did you mean learning_rate\?\)"
    ):
        load_config(DEMO_CONFIG, ["train.learnig_rate=1e-3"])


def test_a_value_this_machine_cannot_run_is_refused_before_the_search_run_exists(
    tmp_path, capsys, monkeypatch
):
    """fp16 needs CUDA: on a CPU machine, a space that allows it would fail those trials. The local
    search refuses it before its run exists; `config check` warns (the file may be for a GPU)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA
    space = "search.parameters.train.precision={type: choice, values: [fp32, fp16]}"
    code, _, err = run_cli(
        ["search", "--quiet", *[f"--set={o}" for o in [*tiny_overrides(tmp_path), shlex.quote(space)]]],
        capsys,
    )
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    assert code == 2
    assert line == (
        "error: search.parameters.train.precision: value 'fp16': fp16 mixed precision needs a CUDA GPU; "
        "use fp32 or bf16"
    )
    from mlflow.tracking import MlflowClient

    assert not MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()]
    )  # no run of any kind
    config = tmp_path / "fp16.yaml"
    config.write_text(_with("    train.precision: {type: choice, values: [fp32, fp16]}\n"))
    code, out, err = run_cli(["config", "check", str(config)], capsys)
    assert code == 0 and f"ok: {config}" in out
    assert f"warning: {config}: on this machine: search.parameters.train.precision: value 'fp16'" in err
