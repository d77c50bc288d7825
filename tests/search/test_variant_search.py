"""`mlflow run . -e search` over a variant space, as docs/search.md writes it: DoRA and the init as
dimensions, PiSSA's iteration count conditional on PiSSA; every trial trains the variant Ax
asked for, the report shows each variant as a dimension, and the champion generates."""

from __future__ import annotations

import subprocess
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline import names

from ..conftest import mlflow_run_command, tiny_overrides, venv_env

# The exact form docs/search.md gives: keys set one by one, a YAML value quoted where it has spaces.
VARIANT_SPACE = (
    "search.parameters.lora.use_dora.type=choice search.parameters.lora.use_dora.values=[false,true] "
    "search.parameters.lora.init.type=choice search.parameters.lora.init.values=[default,pissa,eva] "
    "search.parameters.lora.init.dependents='{pissa: [lora.pissa_iterations]}' "
    "search.parameters.lora.pissa_iterations.type=choice search.parameters.lora.pissa_iterations.values=[2,8]"
)


@pytest.mark.e2e
def test_a_variant_search_through_mlflow_run(tmp_path):
    values = {
        "search.output_dir": str(tmp_path / "search"),
        "search.early_stopping.enabled": False,
        "search.initialization_trials": 5,
        "registry.model_name": "variant-lora",
    }
    sets = " ".join(tiny_overrides(tmp_path, **values)) + " " + VARIANT_SPACE
    env = venv_env(tmp_path)
    cmd = mlflow_run_command("search", "variants", "n_trials=5", "set=" + sets)
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("variants").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get(names.ROLE) == names.ROLE_SEARCH]
    trials = [r for r in runs if r.data.tags.get(names.ROLE) == names.ROLE_TRIAL]
    assert len(trials) == 5
    inits = {r.data.params["lora.init"] for r in trials}
    assert len(inits) > 1 and {r.data.params["lora.use_dora"] for r in trials} == {"False", "True"}
    for r in trials:  # the conditional key is the config's default where PiSSA is off
        if r.data.params["lora.init"] != "pissa":
            assert r.data.params["lora.pissa_iterations"] == "None"
    report = Path(
        client.download_artifacts(
            parent.info.run_id, f"{names.REPORT_DIR}/{names.REPORT_FILE}", str(tmp_path)
        )
    ).read_text()
    assert "- **lora.use_dora**: eval_loss by value:" in report
    assert "- **lora.init**: eval_loss by value:" in report
    pissa_line = next(line for line in report.splitlines() if line.startswith("- **lora.pissa_iterations**"))
    assert "Conditional: only when lora.init = pissa" in pissa_line

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    answers = mlflow.pyfunc.load_model("models:/variant-lora@champion").predict(
        ["What does `json.dumps` do?"], params={"max_new_tokens": 4}
    )
    assert len(answers) == 1 and isinstance(answers[0], str)
