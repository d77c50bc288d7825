"""The tracking store: which one (URI), its experiments, and `mlflow server` over it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import TrackingConfig
from pipeline.core import outer_run

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """`MLFLOW_TRACKING_URI` (set by `mlflow run`) > config > sqlite:///mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri or DEFAULT_TRACKING_URI


def server_command(
    uri: str, host: str = "127.0.0.1", port: int = 5000, artifacts_destination: str | None = None
) -> list[str]:
    """`mlflow server` over the store at `uri`, bound to `host` (loopback by default).

    Without `artifacts_destination` (one user's sqlite or file store): the server reads the
    pipeline's runs' own artifact folders; `--default-artifact-root` is only for experiments the
    server creates, so it points at the `./mlruns` the pipeline uses.

    With it (a team's server, e.g. PostgreSQL + `s3://bucket/path`): the server proxies artifacts
    to that destination, so clients log and read them through the server (`mlflow-artifacts:/`
    URIs) and need no storage credentials of their own; only the server does."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    cmd += ["--host", host, "--port", str(port)]
    if artifacts_destination:
        cmd += ["--artifacts-destination", artifacts_destination, "--serve-artifacts"]
    elif is_local_store(uri):
        cmd += ["--default-artifact-root", Path("mlruns").resolve().as_uri(), "--no-serve-artifacts"]
    return cmd


def is_local_store(uri: str) -> bool:
    """A store only processes of one machine can share: a sqlite file or a file path."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def use_store(cfg: TrackingConfig) -> str:
    """Point MLflow at the store only (no experiment is chosen or created)."""
    uri = resolve_tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    return uri


def setup(cfg: TrackingConfig) -> str:
    """Point MLflow at the store and the experiment. Returns the tracking URI."""
    uri = resolve_tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    # Under `mlflow run` the run (and so its experiment) already exists, and nested runs go to
    # their parent's experiment: only pick the configured experiment when neither holds.
    if not outer_run.outer_run_id() and mlflow.active_run() is None:
        _ensure_experiment(uri, cfg.experiment_name)
        mlflow.set_experiment(cfg.experiment_name)
    return uri


def _ensure_experiment(uri: str, name: str) -> None:
    """Create the experiment with its artifacts next to a sqlite store's file.

    MLflow's default is `./mlruns` of whatever directory the process runs in, which scatters one
    store's artifacts over several folders; keeping them beside `mlflow.db` keeps the store whole.
    """
    if not uri.startswith("sqlite:///") or mlflow.get_experiment_by_name(name) is not None:
        return
    db = Path(uri.removeprefix("sqlite:///")).resolve()
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    try:
        mlflow.create_experiment(name, artifact_location=(db.parent / "mlruns" / slug).as_uri())
    except MlflowException:
        if mlflow.get_experiment_by_name(name) is None:  # not a concurrent creation: a real error
            raise


def run_url(experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI: absolute on a tracking server (http/https), else relative
    to the UI's root (`#/experiments/...`), which the UI resolves wherever it is served."""
    uri = mlflow.get_tracking_uri()
    root = uri.rstrip("/") + "/" if uri.startswith(("http://", "https://")) else ""
    return f"{root}#/experiments/{experiment_id}/runs/{run_id}"


def current_experiment_id(cfg: TrackingConfig) -> str | None:
    """The experiment runs go to now: that of the run `mlflow run` made, else the configured one."""
    outer = outer_run.outer_run_id()
    if outer:
        return MlflowClient().get_run(outer).info.experiment_id
    exp = MlflowClient().get_experiment_by_name(cfg.experiment_name)
    return exp.experiment_id if exp else None
