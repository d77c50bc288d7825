"""Writing runs: start one (always ended FINISHED, FAILED or KILLED), log params, batched
metrics, tags and artifacts to it; end a run someone else left running."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source_registry import get_dataset_source_from_json
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from pipeline.config import TrackingConfig
from pipeline.core import names, outer_run
from pipeline.core.errors import one_line
from pipeline.data.prepare import DataSplit
from pipeline.tracking.store import setup, use_store

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
BATCH = 100  # params per log_batch call (MLflow's limit)


class TrackedRun:
    """An active MLflow run with batched metric logging."""

    def __init__(self, run_id: str, experiment_id: str, flush_every_s: float = 5.0):
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.client = MlflowClient()
        self.flush_every_s = flush_every_s
        self._buffer: list[Metric] = []
        self._last_flush = time.monotonic()

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, param_text(v)) for k, v in params.items()]
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

    def log_datasets(self, splits: Iterable[DataSplit]) -> None:
        """The train and eval sets as the run's MLflow dataset inputs: name, digest, source and
        size (the data stays where it is), each tagged with its context (training, eval)."""
        self.client.log_inputs(
            self.run_id,
            datasets=[
                DatasetInput(_dataset(s), tags=[InputTag(MLFLOW_DATASET_CONTEXT, s.context)]) for s in splits
            ],
        )

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_artifact(self, local_file: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_file), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def artifact_uri(self, path: str = "") -> str:
        return f"runs:/{self.run_id}/{path}"


def _dataset(split: DataSplit) -> Dataset:
    """A split as MLflow's dataset entity: a metadata-only dataset whose source is the file (a
    `local` source) or the hub dataset (`hugging_face`), with its example count as the profile."""
    local = Path(split.source).is_absolute()
    source = get_dataset_source_from_json(
        json.dumps({"uri": split.source} if local else {"path": split.source}),
        "local" if local else "hugging_face",
    )
    meta = MetaDataset(source, name=split.name, digest=split.digest).to_dict()
    return Dataset(**meta, profile=json.dumps({"num_rows": split.examples}))


def param_text(value: Any) -> str:
    """A value as a run keeps it in its params: lists and dicts as JSON, cut at MLflow's limit."""
    return (json.dumps(value) if isinstance(value, (list, dict)) else str(value))[:MAX_PARAM_LEN]


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
    # A child run names its experiment (the parent's) itself: choosing one here would call
    # set_experiment in every worker of a parallel search, and concurrent set_experiment calls on
    # a new name put runs into `Default` (reproduced with mlflow 3.17).
    use_store(cfg) if parent_run_id else setup(cfg)
    if resume_run_id:
        outer = outer_run.take_outer_run()
        if outer and outer != resume_run_id:
            MlflowClient().set_tag(outer, names.SEARCH_RESUMED_INTO, resume_run_id)
            MlflowClient().set_tag(outer, names.NOTE, f"This invocation resumed run {resume_run_id}.")
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
    run = TrackedRun(active.info.run_id, active.info.experiment_id, cfg.log_every_s)
    _mark_training_experiment(active.info.experiment_id)
    try:
        yield run
    except BaseException as e:
        status = "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED"
        try:
            run.flush()
            run.set_tags(
                {names.ERROR: one_line(f"{type(e).__name__}: {e}") if status == "FAILED" else "interrupted"}
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
    client.set_tag(run_id, names.ERROR, one_line(message))
    client.set_terminated(run_id, "FAILED")


def discard_run(run_id: str) -> None:
    """End and delete a run that holds nothing (the run `mlflow run` made for an invocation that
    had nothing to do): it does not linger in the experiment. Ended first, so that `mlflow run`
    leaves its status alone."""
    client = MlflowClient()
    client.set_terminated(run_id, "FINISHED")
    client.delete_run(run_id)


def tag_run(run_id: str, tags: Mapping[str, Any]) -> None:
    MlflowClient().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items() if v is not None])


def end_failed(run_id: str, reason: str) -> None:
    """End a run left RUNNING by a worker that died mid-trial: tagged failed, status FAILED."""
    reason = one_line(reason)
    tag_run(
        run_id, {names.TRIAL_STATUS: names.FAILED, names.TRIAL_FAILURE_REASON: reason, names.ERROR: reason}
    )
    MlflowClient().set_terminated(run_id, "FAILED")


def end_killed(run_id: str, reason: str) -> None:
    """End a run left RUNNING by a process that died: tagged killed, with the reason, status KILLED."""
    tag_run(run_id, {names.TRIAL_STATUS: names.KILLED, names.ERROR: one_line(reason)})
    MlflowClient().set_terminated(run_id, "KILLED")
