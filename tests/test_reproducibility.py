"""The README's main job, as a user runs it: `mlflow run . -e search --env-manager local` on the
default config (only the output folders moved to a temp dir). Its structure in MLflow (a parent,
the baseline and 10 nested trials, their params, curves and adapters, the report, best_config.yaml,
the registered champion) and its numbers: a fresh install reproduces the committed example,
docs/example-search/trials.json, exact floats, trial for trial. That is the guard that a
dependency moved on purpose comes with a regenerated example.

Where this CPU runs other vector kernels than the example's machine (recorded with it), only the
baseline and the Sobol trials, measured to be the same on any CPU, must match; the BoTorch trials
are listed as not comparable (docs/example-search/README.md has the measurements).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.core import names
from pipeline.core.provenance import package_versions
from pipeline.model.device import cpu_kernels
from pipeline.trial.resources import NUMERICS_PACKAGES

from .conftest import DEMO_CONFIG, in_ci, mlflow_run_command, venv_env
from .reproduce import (
    EXAMPLE,
    MACHINE_INDEPENDENT,
    children,
    differences,
    load_state,
    summarize,
    summary_numbers,
)

pytestmark = pytest.mark.e2e
EXPERIMENT = "readme-main-job"


def test_readme_main_job_reproduces_the_committed_example(tmp_path, capsys):
    sets = f"train.output_dir={tmp_path / 'out'} search.output_dir={tmp_path / 'search'}"
    env = venv_env(tmp_path)
    p = subprocess.run(
        mlflow_run_command("search", EXPERIMENT, f"set={sets}"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert lines[0].startswith("search run ") and "continue it with --resume" in lines[0]
    progress = [line for line in lines if line.startswith("[") and not line.startswith("[replicate")]
    assert len(progress) == 10 and "best" in progress[-1] and "ETA" in progress[-1]
    replicates = [line for line in lines if line.startswith("[replicate ")]
    assert len(replicates) == 6 and replicates[-1].startswith("[replicate 6/6] replicate of ")
    _check_what_mlflow_holds(env["MLFLOW_TRACKING_URI"], tmp_path)

    expected = json.loads(EXAMPLE.read_text())
    installed = package_versions()
    rerun = summarize(load_state(tmp_path / "search"), installed, cpu_kernels())
    moved = {
        k: (expected["versions"].get(k), installed.get(k))
        for k in (*NUMERICS_PACKAGES, "accelerate", "ax-platform", "botorch", "gpytorch", "numpy", "scipy")
        if expected["versions"].get(k) != installed.get(k)
    }
    if moved:
        assert not in_ci(), f"CI installs constraints.txt, yet these differ from the example's: {moved}"
        pytest.skip(f"installed versions differ from constraints.txt, the example's lock: {moved}")
    same_kernels = rerun["cpu_kernels"] == expected["cpu_kernels"]
    problems = differences(expected, rerun, None if same_kernels else MACHINE_INDEPENDENT)
    assert problems == [], "the rerun differs from docs/example-search:\n" + "\n".join(problems)
    if not same_kernels:
        with capsys.disabled():
            print(
                f"\nreproducibility: baseline and trials 1-{MACHINE_INDEPENDENT} match the example exactly; "
                f"later trials not compared: this CPU runs {rerun['cpu_kernels']!r}, the example's "
                f"machine ran {expected['cpu_kernels']!r}"
            )


def _check_what_mlflow_holds(uri: str, tmp_path: Path) -> None:
    """One parent; the baseline and 10 trials nested under it with their params, curves, memory and
    adapters; a report whose numbers are the runs'; best_config.yaml; the champion."""
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get(names.ROLE) == names.ROLE_SEARCH]
    assert parent.info.status == "FINISHED"
    everything = children(parent.info.run_id)
    # The demo's seed replicates: the 2 configurations chosen and the baseline, on seeds 43 and 44.
    replicates = [r for r in everything if names.TRIAL_REPLICATE_OF in r.data.tags]
    kids = [r for r in everything if names.TRIAL_REPLICATE_OF not in r.data.tags]
    assert sorted(r.data.tags[names.ROLE] for r in kids) == ["baseline"] + ["trial"] * 10
    assert len(replicates) == 6 and all(r.info.status == "FINISHED" for r in replicates)
    assert sorted(r.data.tags[names.TRIAL_REPLICATE_SEED] for r in replicates) == ["43"] * 3 + ["44"] * 3
    assert sum(r.data.tags[names.TRIAL_REPLICATE_OF] == "baseline" for r in replicates) == 2
    trials = [r for r in kids if r.data.tags[names.ROLE] == "trial"]
    for r in trials:
        assert r.info.status == "FINISHED"
        assert r.data.tags[names.TRIAL_STATUS] in ("completed", "early_stopped")
        assert r.data.tags[names.AX_GENERATION_METHOD] in ("Sobol", "BoTorch", "CenterOfSearchSpace")
        assert r.info.run_name.startswith("trial-") and " r=" in r.info.run_name and " lr=" in r.info.run_name
        for key in ("lora.r", "lora.alpha", "train.learning_rate", "train.batch_size"):
            assert key in r.data.params
        assert r.data.tags[names.OPTIMIZER_EFFECTIVE] == "adamw_torch"
        assert len(client.get_metric_history(r.info.run_id, names.TRAIN_LOSS)) >= 2
        assert len(client.get_metric_history(r.info.run_id, names.EVAL_LOSS)) >= 1
        assert names.PEAK_RSS_GB in r.data.metrics
        arts = {a.path for a in client.list_artifacts(r.info.run_id, names.ADAPTER_DIR)}
        assert f"{names.ADAPTER_DIR}/adapter_model.safetensors" in arts
    assert "BoTorch" in [r.data.tags[names.AX_GENERATION_METHOD] for r in trials]

    # The report's summary holds the numbers the runs hold.
    out = tmp_path / "rep"
    report = Path(
        mlflow.artifacts.download_artifacts(
            run_id=parent.info.run_id,
            artifact_path=f"{names.REPORT_DIR}/{names.REPORT_FILE}",
            dst_path=str(out),
        )
    ).read_text()
    nums = summary_numbers(report)
    baseline = next(r for r in kids if r.data.tags[names.ROLE] == "baseline")
    # The recommendation: a replicated trial (the best mean over its fresh seeds).
    replicated = {r.data.tags[names.TRIAL_REPLICATE_OF] for r in replicates} - {"baseline"}
    best = next(r for r in trials if r.info.run_id == parent.data.tags[names.SEARCH_BEST_RUN])
    assert best.data.tags[names.AX_TRIAL_INDEX] in replicated
    base_loss, best_loss = baseline.data.metrics[names.EVAL_LOSS], best.data.metrics[names.EVAL_LOSS]
    assert nums["Baseline eval_loss"] == f"{base_loss:.4f}"
    assert nums["Recommended eval_loss"].startswith(
        f"{best_loss:.4f} (trial {best.data.tags[names.AX_TRIAL_INDEX]}"
    )
    improvement = 100 * (base_loss - best_loss) / base_loss
    m = parent.data.metrics
    low, estimate, high = m[names.IMPROVEMENT_CI_LOW], m[names.IMPROVEMENT_PCT], m[names.IMPROVEMENT_CI_HIGH]
    assert nums["Improvement"] == (
        f"eval_loss: {estimate:.1f} % (95 % CI {low:.1f} to {high:.1f} %, 2 seeds, paired by seed, "
        f"paired on 200 eval examples); single-run {improvement:.1f} %"
    )
    n_stopped = sum(r.data.tags[names.TRIAL_STATUS] == "early_stopped" for r in trials)
    assert nums["Trials"].startswith(f"10: {10 - n_stopped} completed, {n_stopped} early-stopped, 0 failed")
    assert parent.data.metrics[names.BEST_EVAL_LOSS] == pytest.approx(best_loss)
    assert parent.data.metrics[names.BASELINE_EVAL_LOSS] == pytest.approx(base_loss)
    assert parent.data.metrics[names.IMPROVEMENT_SINGLE_RUN_PCT] == pytest.approx(improvement)
    trace = client.get_metric_history(parent.info.run_id, names.BEST_EVAL_LOSS)
    assert [m.step for m in trace] == [*range(1, 11), 10]  # one per trial, then the final summary
    for run_id in [r.info.run_id for r in kids]:
        assert run_id in report  # provenance: every trial's run id
    top = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {names.BEST_CONFIG_FILE, names.REPORT_DIR, names.STATE_DIR, names.CONFIG_FILE} <= top
    plots = {a.path: a.file_size for a in client.list_artifacts(parent.info.run_id, names.REPORT_DIR)}
    for png in ("optimization_trace.png", "eval_loss_curves.png", "parameter_slices.png"):
        assert plots[f"{names.REPORT_DIR}/{png}"] > 10_000, f"{png} is missing or blank"

    # best_config.yaml is a complete config the baseline entry point accepts, with the best params.
    best_cfg = load_config(
        mlflow.artifacts.download_artifacts(
            run_id=parent.info.run_id, artifact_path=names.BEST_CONFIG_FILE, dst_path=str(out)
        )
    )
    assert best_cfg.lora.r == int(best.data.params["lora.r"])
    assert best_cfg.train.learning_rate == pytest.approx(float(best.data.params["train.learning_rate"]))

    # Registered, champion, pointing at the best child.
    model = load_config(DEMO_CONFIG).registry.model_name
    mv = client.get_model_version_by_alias(model, names.CHAMPION_ALIAS)
    assert mv.tags["source_run_id"] == best.info.run_id
    assert mv.tags["search_run_id"] == parent.info.run_id
    assert float(mv.tags["eval_loss"]) == pytest.approx(best_loss, abs=1e-6)
    assert "improvement_pct" in mv.tags and "lora:" in (mv.description or "")
    # The version states its interval against the baseline and the rule that decided the alias.
    assert mv.tags[names.VERSION_IMPROVEMENT_CI].startswith(f"{low:.2f} to {high:.2f} % (2 seeds")
    assert mv.tags[names.VERSION_PROMOTION_RULE].startswith("champion moves when the lower bound")
    assert (
        "| promotion rule |" in mv.description
        and "**Promotion**: promoted: no champion yet" in mv.description
    )
