"""The CLI: every bad input is one line naming the field or file, exit code 2, no run RUNNING."""

from __future__ import annotations

import json
import subprocess
import sys

from mlflow.tracking import MlflowClient

from .conftest import DEMO_CONFIG, ROOT, run_cli, tiny_overrides, venv_env


def no_run_left_running() -> bool:
    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    return all(r.info.status != "RUNNING" for r in client.search_runs(exps)) if exps else True


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GOOD = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(10)]


def bad_cases(tmp_path):
    """(name, overrides, expected start of the error line)."""
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text(json.dumps(GOOD[0]) + "\n{not json}\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    long = jsonl(tmp_path / "long.jsonl", [{"instruction": "q", "output": "w " * 300}, *GOOD])
    control = tmp_path / "control.jsonl"
    control.write_text('{"instruction": "a\tb", "output": "x"}\n')
    return [
        ("missing data file", ["data.path=" + str(tmp_path / "none.jsonl")], "data.path: file not found"),
        ("malformed jsonl", [f"data.path={malformed}"], f"{malformed}:2: malformed JSON line"),
        ("empty data set", [f"data.path={empty}"], "data.path: "),
        (
            "record without fields",
            [f"data.path={jsonl(tmp_path / 'f.jsonl', [*GOOD, {'instruction': 'x'}])}"],
            "record has no 'output'",
        ),
        (
            "no record has the fields: named at line 1, with the keys it has",
            [f"data.path={jsonl(tmp_path / 'g.jsonl', [{'prompt': 'q', 'response': 'a'}] * 20)}"],
            f"{tmp_path / 'g.jsonl'}:1: record has no 'instruction, output' (format alpaca needs "
            "instruction, output); no record has it: the records' keys are prompt, response",
        ),
        (
            "a control character inside a JSON string",
            [f"data.path={control}"],
            f"{control}:1: malformed JSON line (Invalid control character at column 19)",
        ),
        (
            "too long, rejected",
            [f"data.path={long}", "data.truncation=error", "data.max_seq_len=64"],
            f"{long}:1: example has",
        ),
        ("unknown config key", ["lora.rank=8"], "invalid config"),
        ("wrong type", ["train.batch_size=big"], "invalid config"),
        ("r <= 0", ["lora.r=0"], "invalid config"),
        ("learning rate <= 0", ["train.learning_rate=0"], "invalid config"),
        ("dropout >= 1", ["lora.dropout=1"], "invalid config"),
        (
            "unknown target module",
            ["lora.target_modules=[q_proj,attn_c]"],
            "lora.target_modules: attn_c not in the model",
        ),
        (
            "model path missing",
            ["model.name_or_path=" + str(tmp_path / "no-model")],
            "model.name_or_path: no such folder",
        ),
        (
            "gguf file missing",
            [f"model.name_or_path={ROOT / 'models' / 'pydoc-llama'}", "model.gguf_file=x.gguf"],
            "model.gguf_file: x.gguf not found",
        ),
    ]


def test_every_bad_input_is_one_line_exit_2_and_no_run_running(tmp_path, capsys):
    for name, overrides, expected in bad_cases(tmp_path):
        code, _out, err = run_cli(
            [
                "baseline",
                "--config",
                str(DEMO_CONFIG),
                "--quiet",
                *[f"--set={o}" for o in tiny_overrides(tmp_path)],
                *[f"--set={o}" for o in overrides],
            ],
            capsys,
        )
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert code == 2, name
        assert len(lines) == 1, f"{name}: {err}"
        assert expected in lines[0], f"{name}: {lines[0]}"
        assert no_run_left_running(), name
    # Bad config values are named by their key path.
    code, _, err = run_cli(
        ["baseline", "--set", "lora.r=0 train.learning_rate=0 lora.dropout=1 lora.rank=3"], capsys
    )
    for key in ("lora.r", "train.learning_rate", "lora.dropout", "lora.rank: unknown key"):
        assert key in err


def test_4bit_without_bitsandbytes_exits_2(tmp_path):
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "from pipeline.cli import main\n"
        f"main(['baseline', '--quiet', '--config', {str(DEMO_CONFIG)!r}, '--set', 'model.load_in_4bit=true'])\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=venv_env(tmp_path), cwd=ROOT
    )
    assert p.returncode == 2
    assert (
        p.stderr.strip()
        .splitlines()[-1]
        .startswith("error: model.load_in_4bit: 4-bit loading needs bitsandbytes")
    )


def test_help_lists_the_commands():
    p = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0
    assert "baseline" in p.stdout and "config" in p.stdout


def test_config_check_and_show(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name_or_path: x\ndata:\n  path: y\nlora:\n  r: 0\n")
    code, out, err = run_cli(["config", "check", str(DEMO_CONFIG), str(bad)], capsys)
    assert code == 2 and f"ok: {DEMO_CONFIG}" in out and "bad.yaml:6: lora.r" in err
    code, out, _ = run_cli(["config", "show", "--config", str(DEMO_CONFIG), "--set", "lora.r=64"], capsys)
    assert code == 0 and "  r: 64\n" in out


HEAVY = ("torch", "transformers", "mlflow", "ax", "peft")


def test_bad_input_answers_before_the_heavy_imports(tmp_path):
    """A missing file, a bad key or a broken data file is answered from the config and the files
    alone: torch, transformers, mlflow and ax are never imported (so the answer takes a second,
    not a minute on a loaded machine)."""
    broken = jsonl(tmp_path / "broken.jsonl", [{"prompt": "q", "response": "a"}] * 3)
    cases = [
        (["search", "--config", "configs/does-not-exist.yaml"], "configs/does-not-exist.yaml: cannot read"),
        (["search", "--set", "lora.rank=8"], "lora.rank: unknown key"),
        (["search", "--set", f"data.path={broken}"], f"{broken}:1: record has no"),
        (["baseline", "--set", "data.path=nope.jsonl"], "data.path: file not found: nope.jsonl"),
        (["baseline", "--set", "model.name_or_path=./nope"], "model.name_or_path: no such folder"),
        (["retrain", "--set", "train.lr=1"], "train.lr: unknown key"),
    ]
    for args, expected in cases:
        code = (
            "import sys\nfrom pipeline.cli import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit as e:\n    code = e.code\n"
            f"print('imported:', sorted(m for m in {HEAVY!r} if m in sys.modules))\nsys.exit(code)\n"
        )
        p = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=venv_env(tmp_path), cwd=ROOT
        )
        errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
        assert p.returncode == 2, (args, p.stderr)
        assert len(errors) == 1 and expected in errors[0], (args, p.stderr)
        assert "imported: []" in p.stdout, (args, p.stdout)


def test_a_failed_trial_keeps_its_traceback(tmp_path, capsys, monkeypatch):
    """A failure while training: one line that says where the traceback is, the traceback as
    the run's error.txt, and on stderr with -v."""
    from pipeline.trial import run as trial

    def broken_train(*args, **kwargs):
        raise RuntimeError("a view of a leaf Variable that requires grad is used in an in-place op")

    monkeypatch.setattr(trial, "train", broken_train)
    args = ["baseline", "--quiet", *[f"--set={o}" for o in tiny_overrides(tmp_path)]]
    code, _out, err = run_cli(args, capsys)
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    assert code == 1
    assert line.startswith("error: trial failed: RuntimeError: a view of a leaf Variable")
    run_id = line.split("of run ")[1].split(",")[0]
    assert line.endswith(f"(traceback: error.txt of run {run_id}, or rerun with -v)")
    import mlflow

    text = mlflow.artifacts.load_text(f"runs:/{run_id}/error.txt")
    assert text.startswith("Traceback (most recent call last):") and "in broken_train" in text
    assert "Traceback" not in err  # without -v, one line
    assert MlflowClient().get_run(run_id).info.status == "FAILED"

    monkeypatch.delenv("PIPELINE_DEBUG", raising=False)
    code, _out, err = run_cli(["-v", *args], capsys)
    assert code == 1 and "Traceback (most recent call last):" in err and "in broken_train" in err
    monkeypatch.delenv("PIPELINE_DEBUG", raising=False)


def test_config_check_warns_about_what_this_machine_cannot_do(capsys):
    """The seed's GPU config is a valid file: `ok`, exit 0, and a warning naming the key that
    this machine (no CUDA) cannot satisfy."""
    seed = ROOT / "configs" / "qwen2.5-7b-qlora.yaml"
    code, out, err = run_cli(["config", "check", str(seed)], capsys)
    assert code == 0 and f"ok: {seed}" in out
    import torch

    if torch.cuda.is_available():
        assert "warning" not in err
    else:
        assert (
            f"warning: {seed}: on this machine: search.outcome_constraints: peak_gpu_mem_gb is measured "
            "only on a CUDA GPU"
        ) in err


def test_a_4bit_baseline_on_cpu_prints_no_library_noise(tmp_path):
    """What a user sees on stderr is the pipeline's own lines: the paged optimizer's fallback,
    once; not bitsandbytes' hub-kernel lookup, deprecations, or a backward through an inference
    kernel."""
    sets = [
        *tiny_overrides(tmp_path, **{"train.max_steps": 4, "train.eval_steps": 2}),
        "model.load_in_4bit=true",
    ]
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "baseline",
            "--quiet",
            "--set",
            " ".join(sets),
            "--set",
            "train.optimizer=paged_adamw_8bit",
        ],
        capture_output=True,
        text=True,
        env=venv_env(tmp_path),
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    for noise in ("kernels-community", "Warning", "Ax SQL storage", "autograd kernel"):
        assert noise not in p.stderr, p.stderr
    (line,) = [x for x in p.stderr.splitlines() if x.strip()]
    assert line.endswith(
        "WARNING pipeline: train.optimizer: paged_adamw_8bit pages its state through CUDA memory; on CPU "
        "adamw_8bit runs instead (the same update, not paged)"
    )
