"""MLflow tracking: runs, params, batched metrics, tags, artifacts. The only module (with the
registry) that imports mlflow.

Metrics are buffered and sent with ``MlflowClient.log_batch`` (one request per flush, not one per
value). A run started here always ends: FINISHED, FAILED (with a one-line ``pipeline.error`` tag)
or KILLED on Ctrl-C/SIGTERM, so no run is left RUNNING by an error.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import names
from pipeline.config import PipelineConfig, TrackingConfig, load_config
from pipeline.errors import PipelineError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
BATCH = 100  # params per log_batch call (MLflow's limit)


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """`MLFLOW_TRACKING_URI` (set by `mlflow run`) > config > sqlite:///mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri or DEFAULT_TRACKING_URI


def server_command(uri: str, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """`mlflow server` over the store at `uri`, bound to `host` (loopback by default).

    Runs logged by the pipeline keep their own artifact locations (a local folder by default),
    which the server reads directly; `--default-artifact-root` only concerns experiments the
    server itself creates, so it points at the same `./mlruns` folder the pipeline uses.
    """
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    cmd += ["--host", host, "--port", str(port)]
    if uri.startswith("sqlite:") or "://" not in uri:
        cmd += ["--default-artifact-root", Path("mlruns").resolve().as_uri(), "--no-serve-artifacts"]
    return cmd


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
    if not os.environ.get("MLFLOW_RUN_ID") and mlflow.active_run() is None:
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


def _one_line(text: str, limit: int = 500) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class TrackedRun:
    """An active MLflow run with batched metric logging."""

    def __init__(self, run_id: str, flush_every_s: float = 5.0):
        self.run_id = run_id
        self.client = MlflowClient()
        self.flush_every_s = flush_every_s
        self._buffer: list[Metric] = []
        self._last_flush = time.monotonic()

    @property
    def experiment_id(self) -> str:
        return self.client.get_run(self.run_id).info.experiment_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [
            Param(k, (json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:MAX_PARAM_LEN])
            for k, v in params.items()
        ]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + BATCH], synchronous=True)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, tags=items[i : i + BATCH], synchronous=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int, flush: bool = False) -> None:
        """Buffer finite metric values at `step`; send when the buffer is old enough."""
        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            if v is not None and math.isfinite(float(v)):
                self._buffer.append(Metric(k, float(v), ts, int(step)))
        if flush or time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
        self._last_flush = time.monotonic()

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def artifact_uri(self, path: str = "") -> str:
        return f"runs:/{self.run_id}/{path}"


@contextmanager
def start_run(
    cfg: TrackingConfig,
    run_name: str,
    tags: Mapping[str, Any],
    parent_run_id: str | None = None,
    description: str | None = None,
    resume_run_id: str | None = None,
) -> Iterator[TrackedRun]:
    """Start (or, under `mlflow run`, resume) a run; always end it with the right status.

    Without a parent, the run that `mlflow run` created (``MLFLOW_RUN_ID``) is resumed, so the
    entry point logs into it. With a parent, a nested child run is created. With
    `resume_run_id`, that earlier run is reopened (a resumed search); a run that `mlflow run`
    created for this invocation is then tagged with where the work went.
    """
    setup(cfg)
    if resume_run_id:
        outer = os.environ.pop("MLFLOW_RUN_ID", None)
        if outer and outer != resume_run_id:
            MlflowClient().set_tag(outer, names.SEARCH_RESUMED_INTO, resume_run_id)
            MlflowClient().set_tag(
                outer, "mlflow.note.content", f"This invocation resumed search run {resume_run_id}."
            )
    if cfg.log_system_metrics:
        mlflow.set_system_metrics_sampling_interval(cfg.system_metrics_interval_s)
        mlflow.set_system_metrics_samples_before_logging(1)
    kwargs: dict[str, Any] = {
        "run_name": run_name,
        "tags": {k: str(v) for k, v in tags.items() if v is not None},
        "description": description,
        "log_system_metrics": cfg.log_system_metrics,
    }
    if parent_run_id:
        parent_experiment = MlflowClient().get_run(parent_run_id).info.experiment_id
        kwargs.update(nested=True, parent_run_id=parent_run_id, experiment_id=parent_experiment)
    if resume_run_id:
        kwargs.update(run_id=resume_run_id)
        kwargs.pop("description")
    active = mlflow.start_run(**kwargs)
    run = TrackedRun(active.info.run_id, cfg.log_every_s)
    _mark_training_experiment(active.info.experiment_id)
    try:
        yield run
    except BaseException as e:
        status = "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED"
        try:
            run.flush()
            run.set_tags(
                {names.ERROR: _one_line(f"{type(e).__name__}: {e}") if status == "FAILED" else "interrupted"}
            )
        finally:
            mlflow.end_run(status)
        raise
    else:
        try:
            run.flush()
        finally:
            mlflow.end_run("FINISHED")


def _mark_training_experiment(experiment_id: str) -> None:
    """Tag the experiment as model training, so the MLflow UI opens it on its runs table
    (MLflow 3 opens untagged experiments on its GenAI traces overview)."""
    client = MlflowClient()
    if names.EXPERIMENT_KIND not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, names.EXPERIMENT_KIND, names.EXPERIMENT_KIND_TRAINING)


def mark_failed(run_id: str, message: str, tracking_uri: str | None = None) -> None:
    """End a run FAILED with its reason (used when an entry point fails before its own run starts)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    client.set_tag(run_id, names.ERROR, _one_line(message))
    client.set_terminated(run_id, "FAILED")


def get_run(run_id: str) -> Any | None:
    """The run, or None when no run has this id."""
    try:
        return MlflowClient().get_run(run_id)
    except MlflowException:
        return None


def search_run(run_id: str, option: str) -> Any:
    """The search parent run `run_id`; PipelineError naming `option` (resume, from_search) if not."""
    run = get_run(run_id)
    if run is None:
        raise PipelineError(f"{option}: no run {run_id!r} in the tracking store")
    role = run.data.tags.get(names.ROLE)
    if role != names.ROLE_SEARCH:
        raise PipelineError(f"{option}: run {run_id} is not a search run (pipeline.role={role!r})")
    return run


def run_config(run_id: str, artifact: str, overrides: list[str], option: str) -> PipelineConfig:
    """A config file logged on a run (config.yaml, best_config.yaml), loaded with overrides."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = download_artifacts(run_id, artifact, tmp)
        except Exception:
            raise PipelineError(
                f"{option}: run {run_id} has no {artifact} (did the search finish?)"
            ) from None
        return load_config(path, overrides)


def current_experiment_id(cfg: TrackingConfig) -> str | None:
    """The experiment runs go to now: that of the run `mlflow run` made, else the configured one."""
    outer = os.environ.get("MLFLOW_RUN_ID")
    if outer:
        run = get_run(outer)
        return run.info.experiment_id if run else None
    return experiment_id(cfg.experiment_name)


def experiment_id(name: str) -> str | None:
    exp = MlflowClient().get_experiment_by_name(name)
    return exp.experiment_id if exp else None


def find_runs(
    experiment_ids: list[str], filter_string: str = "", order_by: list[str] | None = None
) -> list[Any]:
    """Runs matching an MLflow search filter (all pages)."""
    client, runs, token = MlflowClient(), [], None
    while True:
        page = client.search_runs(
            experiment_ids, filter_string, order_by=order_by, max_results=1000, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def tag_run(run_id: str, tags: Mapping[str, Any]) -> None:
    MlflowClient().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items() if v is not None])


def terminate_run(run_id: str, status: str) -> None:
    MlflowClient().set_terminated(run_id, status)


def download_artifacts(run_id: str, path: str, dst: str | Path) -> str:
    """Download an artifact file or folder of a run; returns the local path."""
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst))


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key)]


def run_url(run: Any) -> str:
    """A link to the run in the MLflow UI, relative to the UI's root."""
    return f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
