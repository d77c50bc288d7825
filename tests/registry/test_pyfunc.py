"""Serving the champion over REST: `mlflow models serve -m models:/<name>@champion`, a real
server process answering `/invocations`."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import mlflow
import pytest

from pipeline.registry import versions as registry
from pipeline.trial.run import run_trial

from ..browser import free_port, stop_group
from ..conftest import venv_env

MODEL = "serve-lora"


def _wait_for_ping(url: str, proc: subprocess.Popen, log, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/ping", timeout=2) as r:
            if r.status == 200:
                return
        if time.monotonic() > deadline:
            pytest.fail(f"mlflow models serve not up after {timeout_s:.0f}s:\n{log.read_text()[-4000:]}")
        time.sleep(1)


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:  # the server's error body says why
        return e.code, {"error": e.read().decode(errors="replace")}


@pytest.mark.e2e
def test_the_champion_answers_rest_invocations(tiny_config, tmp_path):
    result = run_trial(tiny_config, quiet=True)
    mlflow.set_experiment("tests")
    with mlflow.start_run():
        offer = registry.Candidate(
            result.run_id, result.eval_loss, result.eval_fingerprint, result.adapter_dir
        )
        assert registry.promote(MODEL, offer).promoted

    port, log = free_port(), tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion"]
    cmd += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    env = {**venv_env(tmp_path), "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_ping(url, proc, log)
        # A DataFrame's records, with max_new_tokens passed through as a param.
        body = {
            "dataframe_records": [{"prompt": "What does `json.dumps` do?"}, {"prompt": "What is `re.sub`?"}],
            "params": {"max_new_tokens": 8},
        }
        status, answer = _post(url + "/invocations", body)
        assert status == 200, f"{answer}\n{log.read_text()[-3000:]}"
        predictions = answer["predictions"]
        assert len(predictions) == 2 and all(isinstance(p, str) for p in predictions), answer
        # The `inputs` form: a list of prompts; no params: the signature's default.
        status, answer = _post(url + "/invocations", {"inputs": ["What does `os.path.join` do?"]})
        assert status == 200 and len(answer["predictions"]) == 1, answer
        assert isinstance(answer["predictions"][0], str)
        # A param of the wrong type is refused.
        status, answer = _post(url + "/invocations", {**body, "params": {"max_new_tokens": "many"}})
        assert status == 400, answer
    finally:
        stop_group(proc)


def test_load_adapter_uses_the_recorded_dtype_and_places_weights_at_load(tiny_config, tmp_path):
    """The base under a served adapter is loaded in the dtype it was trained in (recorded in
    pipeline_base.json) and, on a GPU, straight onto it (not loaded on CPU, then moved)."""
    import json

    import torch

    from pipeline.core import names
    from pipeline.model.adapter import load_adapter
    from pipeline.model.device import plan_device
    from pipeline.model.load import from_pretrained_kwargs
    from pipeline.trial.run import run_trial

    result = run_trial(tiny_config, quiet=True)
    reference = result.adapter_dir / names.BASE_REFERENCE_FILE
    recorded = json.loads(reference.read_text())
    assert recorded["dtype"] == "float32"
    reference.write_text(json.dumps({**recorded, "dtype": "bfloat16"}))  # as if trained in bf16
    model, _ = load_adapter(result.adapter_dir)
    assert model.get_base_model().dtype == torch.bfloat16
    gpu = plan_device(
        tiny_config.model, tiny_config.train, cuda=True, bf16_supported=True, gpu_name="A100", gpu_count=1
    )
    assert from_pretrained_kwargs(tiny_config.model, gpu, for_training=False)["device_map"] == {"": 0}
    assert "device_map" not in from_pretrained_kwargs(tiny_config.model, gpu, for_training=True)
