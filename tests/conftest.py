"""Shared fixtures. Every test runs offline, on CPU, against a tracking store in its own temp dir."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.core import outer_run

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "models" / "pydoc-llama"
DEMO_DATA = ROOT / "data" / "pydoc_qa.jsonl"
DEMO_CONFIG = ROOT / "configs" / "demo-cpu.yaml"

# No hub at test time, on any machine: a test that reaches for the network fails loudly.
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ[var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under `pytest -n N` the workers share the cores: each trains on its share of the threads,
    # and so do the `mlflow run` / CLI subprocesses it starts (they inherit the variables). Two
    # trainings with a thread per core each slow each other ~10x; the demo model trains 150
    # steps in 20 s on one thread against 18 s on two, to the same float (measured), so the
    # share costs a test little and the suite runs two at a time.
    import torch

    _share = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(_share)
    torch.set_num_threads(_share)


def in_ci() -> bool:
    """CI=true (as .ci/run sets it): every test must run; a missing system dependency fails."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _chromium() -> bool:
    from . import browser

    return bool(shutil.which(browser.CHROMIUM) and shutil.which(browser.CHROMEDRIVER))


def _distributed() -> bool:
    import importlib.util

    from . import servers

    modules = ("ray", "psycopg", "moto", "boto3")
    as_postgres = os.geteuid() != 0 or shutil.which("runuser")  # root runs PostgreSQL as `postgres`
    return bool(
        servers.postgres_binaries() and as_postgres and all(importlib.util.find_spec(m) for m in modules)
    )


# Markers whose tests need more than Python: what to check, and the one line that says what to
# install. Without it such a test is skipped with that line, unless CI is set: there it fails.
SYSTEM_NEEDS = {
    "browser": (_chromium, "needs Chromium and ChromeDriver: apt-get install chromium chromium-driver"),
    "lmeval": (
        lambda: importlib.util.find_spec("lm_eval") is not None,
        "needs lm-evaluation-harness (pip install -e '.[lmeval]')",
    ),
    "distributed": (
        _distributed,
        "needs PostgreSQL 15 (apt-get install postgresql) and the distributed extra "
        "(pip install -e '.[distributed]')",
    ),
}
# Markers of tests that cost a minute or more each: they run when CI is set, or when asked for
# (`-m e2e`), not in the quick default run a newcomer starts with.
COSTLY = {
    "e2e": "end to end through `mlflow run` (a minute or more)",
    "slow": "slow (a minute or more)",
    "bench": "benchmark smoke test",
    "distributed": "starts a cluster or a team tracking server (PostgreSQL, S3, MLflow)",
    "gpu_kit": "builds the GPU kit from PyPI (about 90 MB of downloads)",
}


def pytest_collection_modifyitems(config, items):
    """Outside CI: tests whose system needs are missing skip with what to install; costly tests
    skip with how to run them."""
    if in_ci():
        return
    asked = config.getoption("markexpr") or ""
    for item in items:
        marks = [m for m in (*SYSTEM_NEEDS, *COSTLY) if m in item.keywords]
        missing = [how for m, (available, how) in SYSTEM_NEEDS.items() if m in marks and not available()]
        costly = [m for m in COSTLY if m in marks]
        if missing:
            item.add_marker(pytest.mark.skip(reason=missing[0]))
        elif costly and not any(m in asked for m in marks):  # `-m e2e`, `-m browser`: asked for
            reason = f"{COSTLY[costly[0]]}: runs when CI is set (CI=true) or with -m {costly[0]}"
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_runtest_setup(item):
    """In CI a missing system dependency is a failure, reported before any fixture runs."""
    if not in_ci():
        return
    for marker, (available, how) in SYSTEM_NEEDS.items():
        if marker in item.keywords and not available():
            pytest.fail(f"CI is set and this {marker} test {how}", pytrace=False)


@pytest.fixture(scope="session")
def _empty_store(tmp_path_factory) -> Path:
    """An empty sqlite tracking store, its schema migrated, made once per worker: MLflow's
    migrations cost 2.7 s per new database (measured: a tiny trial spent 2.7 of its 6 s there),
    a copy of the file 0.05 s. Every test still gets its own store, a copy of this one."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the tables and `Default`
    return path


@pytest.fixture(autouse=True)
def _isolated_store(request, tmp_path, monkeypatch, _empty_store):
    """A fresh sqlite tracking store per test; no run id leaks in from the environment, and no
    store from an earlier test's `mlflow.set_tracking_uri` (MLflow keeps it process-wide)."""
    import sqlite3

    import mlflow

    db = tmp_path / "mlflow.db"
    if request.node.get_closest_marker("no_store") is None:
        shutil.copyfile(_empty_store, db)
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:
            # `Default` keeps its artifacts in this test's folder, where a new store would put
            # them for a process started there (`mlflow run` with cwd=tmp_path).
            conn.execute(
                "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                (str(tmp_path / "mlruns" / "0"),),
            )
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    for var in outer_run.DRIVER_ONLY_ENV:
        monkeypatch.delenv(var, raising=False)
    yield

    while mlflow.active_run():
        mlflow.end_run()


def tiny_overrides(tmp_path: Path, **extra: object) -> list[str]:
    """Overrides that make the demo config a few-second trial writing into tmp_path."""
    values = {
        "train.max_steps": 12,
        "train.eval_steps": 6,
        "train.logging_steps": 2,
        "train.batch_size": 4,
        "train.output_dir": str(tmp_path / "out"),
        "data.max_eval_examples": 24,
        "data.max_train_examples": 200,
        "eval.generation_samples": 4,
        "eval.max_new_tokens": 8,
        "tracking.log_system_metrics": False,
        "tracking.experiment_name": "tests",
        # The demo's seed replicates cost six more runs per search; tests that check them ask.
        "search.replicates": "null",
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture
def tiny_config(tmp_path):
    """The demo config shrunk to a few seconds of training."""
    from pipeline.config import load_config

    return load_config(DEMO_CONFIG, tiny_overrides(tmp_path))


@pytest.fixture(scope="session")
def demo_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_MODEL)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """A random-init Qwen2ForCausalLM folder shaped like the seed's target (Qwen2.5-7B-Instruct):
    grouped-query attention (4 query heads, 2 key/value heads), biases on q/k/v, tied embeddings,
    the demo tokenizer's ChatML template. Stands in for the 7B model in the seed config's tests."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("tiny-qwen2")
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def venv_env(tmp_path: Path) -> dict[str, str]:
    """Environment for subprocesses: this interpreter's bin first on PATH (`mlflow run` calls
    `python` from PATH with --env-manager local), the temp store, offline hub."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for var in outer_run.DRIVER_ONLY_ENV:
        env.pop(var, None)  # set by in-process runs of the same test; `mlflow run` takes its own
    env["PYTHONUNBUFFERED"] = "1"
    return env


def mlflow_run_command(entry_point: str, experiment: str, *params: str) -> list[str]:
    """`mlflow run <repo> -e <entry point> --env-manager local` with `-P` params."""
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(ROOT),
        "-e",
        entry_point,
        "--env-manager",
        "local",
        "--experiment-name",
        experiment,
    ]
    for p in params:
        cmd += ["-P", p]
    return cmd


@dataclass
class SearchRuns:
    """What `mlflow run . -e search` left in its store: the search run, its trials, its report."""

    client: Any
    tracking_uri: str
    parent: Any
    trials: list
    report: str  # the search report's markdown


def mlflow_search(
    tmp_path: Path, experiment: str, n_trials: int, sets: str, timeout: int = 1500
) -> SearchRuns:
    """`mlflow run . -e search -P n_trials=.. -P set=..` into a fresh store; asserts it succeeds."""
    from mlflow.tracking import MlflowClient

    from pipeline.core import names

    env = venv_env(tmp_path)
    cmd = mlflow_run_command("search", experiment, f"n_trials={n_trials}", "set=" + sets)
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get(names.ROLE) == names.ROLE_SEARCH]
    trials = [r for r in runs if r.data.tags.get(names.ROLE) == names.ROLE_TRIAL]
    path = client.download_artifacts(
        parent.info.run_id, f"{names.REPORT_DIR}/{names.REPORT_FILE}", str(tmp_path)
    )
    return SearchRuns(client, env["MLFLOW_TRACKING_URI"], parent, trials, Path(path).read_text())


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """`python -m pipeline <args>` in-process: (exit code, stdout, stderr)."""
    from pipeline.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


PROBE = [[5, 17, 99, 400, 1023, 7, 8]]


@pytest.fixture
def trained_logits(monkeypatch):
    """Logits on PROBE of the trained model as it is when run_trial detaches its adapter."""
    import torch

    from pipeline.trial import run as trial

    captured: dict[str, object] = {}
    real_detach = trial.detach_lora

    def capture(model):
        model.eval()
        with torch.no_grad():
            captured["logits"] = model(input_ids=torch.tensor(PROBE)).logits.clone()
        return real_detach(model)

    monkeypatch.setattr(trial, "detach_lora", capture)
    return captured
