"""The tracking layer's store handling: where artifacts go, how the UI is served."""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.config import TrackingConfig
from pipeline.core import names

from ..conftest import run_cli


def test_a_new_experiment_keeps_its_artifacts_beside_the_sqlite_store(tmp_path, monkeypatch):
    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # not where the store is: MLflow's default would use ./mlruns here
    cfg = TrackingConfig(experiment_name="my exp/1", log_system_metrics=False)
    with tracking.start_run(cfg, "r", {}) as run:
        run.log_text("hello", "a.txt")
    experiment = mlflow.get_experiment_by_name("my exp/1")
    assert experiment.artifact_location == (store / "mlruns" / "my_exp_1").as_uri()
    assert (store / "mlruns" / "my_exp_1").is_dir() and not (tmp_path / "mlruns").exists()
    # The MLflow 3 UI opens experiments with this tag on their runs table.
    assert experiment.tags[names.EXPERIMENT_KIND] == names.EXPERIMENT_KIND_TRAINING
    tracking.setup(cfg)  # an existing experiment is reused, not recreated
    assert len(MlflowClient().search_experiments()) == 2  # Default + ours


def test_ui_serves_the_store_on_loopback(tmp_path, monkeypatch, capsys):
    cmd = tracking.server_command("sqlite:///x.db")
    assert (
        cmd[cmd.index("--host") + 1] == "127.0.0.1"
        and cmd[cmd.index("--backend-store-uri") + 1] == "sqlite:///x.db"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///nothing-here.db")
    config = Path(__file__).resolve().parents[2] / "configs" / "demo-cpu.yaml"
    code, _, err = run_cli(["ui", "--config", str(config)], capsys)
    assert code == 2 and "error: tracking store sqlite:///nothing-here.db: no such file here" in err


def test_system_metrics_without_a_gpu_monitor_still_log_cpu_and_memory():
    """GPU system metrics need nvidia-ml-py (the `gpu` extra) and a GPU; without either the run
    still logs MLflow's CPU, memory and disk metrics and nothing fails."""
    import importlib.util
    import time

    import torch

    cfg = TrackingConfig(experiment_name="sys", log_system_metrics=True, system_metrics_interval_s=0.2)
    wanted = {f"system/{k}" for k in ("cpu_utilization_percentage", "system_memory_usage_megabytes")}
    with tracking.start_run(cfg, "r", {}) as run:
        # MLflow's monitor logs from its own thread: wait for its first batch, not a fixed time.
        deadline = time.monotonic() + 30
        while not wanted <= MlflowClient().get_run(run.run_id).data.metrics.keys():
            assert time.monotonic() < deadline, "no system metrics within 30 s"
            time.sleep(0.05)
    metrics = MlflowClient().get_run(run.run_id).data.metrics
    for key in ("cpu_utilization_percentage", "system_memory_usage_megabytes", "disk_usage_percentage"):
        assert f"system/{key}" in metrics, sorted(metrics)
    gpu = {k for k in metrics if k.startswith("system/gpu_")}
    if importlib.util.find_spec("pynvml") and torch.cuda.is_available():
        assert {"system/gpu_0_utilization_percentage", "system/gpu_0_memory_usage_megabytes"} <= gpu
    else:
        assert not gpu
