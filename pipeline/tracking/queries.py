"""Reading runs: `RunRecord`s (plain data, not MLflow objects) from queries named by what they
are for. No other module writes an MLflow filter string or reads an MLflow run object."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.core import names
from pipeline.core.errors import PipelineError
from pipeline.core.stats import ExampleScores


@dataclass(frozen=True)
class RunRecord:
    """What the pipeline reads of a run: its identity, status, tags, final metrics and params."""

    run_id: str
    name: str
    experiment_id: str
    status: str  # RUNNING | FINISHED | FAILED | KILLED (MLflow's)
    start_time: int
    end_time: int | None
    tags: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)

    @property
    def role(self) -> str | None:
        return self.tags.get(names.ROLE)

    @property
    def eval_fingerprint(self) -> str | None:
        return self.tags.get(names.EVAL_FINGERPRINT)

    @property
    def eval_loss(self) -> float | None:
        return self.metrics.get(names.EVAL_LOSS)

    @property
    def trial_index(self) -> int | None:
        """The Ax trial index of a search trial's run."""
        value = self.tags.get(names.AX_TRIAL_INDEX)
        return int(value) if value is not None else None

    @property
    def examples_per_step(self) -> int:
        """Training examples per optimizer step (runs from before it was logged: from params)."""
        logged = self.metrics.get(names.TRAIN_EXAMPLES_PER_STEP)
        if logged:
            return int(logged)
        batch = int(self.params.get("train.batch_size", 1))
        return batch * int(self.params.get("train.gradient_accumulation_steps", 1))


def _record(run: Any) -> RunRecord:
    return RunRecord(
        run_id=run.info.run_id,
        name=run.info.run_name or "",
        experiment_id=run.info.experiment_id,
        status=run.info.status,
        start_time=run.info.start_time or 0,
        end_time=run.info.end_time,
        tags=dict(run.data.tags),
        metrics=dict(run.data.metrics),
        params=dict(run.data.params),
    )


def get_run(run_id: str) -> RunRecord | None:
    """The run, or None when no run has this id."""
    try:
        return _record(MlflowClient().get_run(run_id))
    except MlflowException:
        return None


def require_search_run(run_id: str, option: str) -> RunRecord:
    """The search parent run `run_id`; PipelineError naming `option` (resume, from_search) if not."""
    run = get_run(run_id)
    if run is None:
        raise PipelineError(f"{option}: no run {run_id!r} in the tracking store")
    if run.role != names.ROLE_SEARCH:
        raise PipelineError(f"{option}: run {run_id} is not a search run (pipeline.role={run.role!r})")
    return run


def _find(
    experiment_ids: list[str], filter_string: str, order_by: list[str] | None = None, limit: int | None = None
) -> list[RunRecord]:
    """Runs matching an MLflow search filter (all pages, or the first `limit`)."""
    client, runs, token = MlflowClient(), [], None
    while True:
        page = client.search_runs(
            experiment_ids, filter_string, order_by=order_by, max_results=limit or 1000, page_token=token
        )
        runs.extend(_record(r) for r in page)
        token = page.token
        if not token or limit:
            return runs


def finished_baselines(experiment_id: str, config_fingerprint: str) -> list[RunRecord]:
    """Finished baseline runs of this config in the experiment, newest first: the candidates a
    search may reuse (it checks their data, eval set, device, precision and versions)."""
    return _find(
        [experiment_id],
        f"tags.`{names.ROLE}` = '{names.ROLE_BASELINE}' and "
        f"tags.`{names.CONFIG_FINGERPRINT}` = '{config_fingerprint}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )


def remembered_noise(experiment_id: str, noise_key: str, exclude: str = "") -> list[dict[str, Any]]:
    """The seed noise earlier races measured for this model, data, eval set and training length
    ({"sd_pct", "df", "run_id"} per finished search), newest first; `exclude`: this search's run."""
    runs = _find(
        [experiment_id],
        f"tags.`{names.ROLE}` = '{names.ROLE_SEARCH}' and tags.`{names.NOISE_KEY}` = '{noise_key}' "
        "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    out = []
    for run in runs:
        raw = run.tags.get(names.RACE_NOISE)
        if run.run_id != exclude and raw:
            out.append({**json.loads(raw), "run_id": run.run_id})
    return out


def children_of(parent: RunRecord | str) -> list[RunRecord]:
    """The runs nested under `parent` (a search: its baseline and trials), oldest first."""
    parent = parent if isinstance(parent, RunRecord) else get_run(parent)
    if parent is None:
        return []
    return _find(
        [parent.experiment_id],
        f"tags.`{names.PARENT_RUN_ID}` = '{parent.run_id}'",
        order_by=["attributes.start_time ASC"],
    )


def running_children(parent_run_id: str) -> list[RunRecord]:
    """Child runs still RUNNING: after a crash of the parent's process, nobody will end them."""
    return [r for r in children_of(parent_run_id) if r.status == "RUNNING"]


def trials_of(search: RunRecord | str, status: str | None = None) -> list[RunRecord]:
    """The trial runs of a search (not its seed replicates), oldest first; only those with
    `trial.status` = `status` if given."""
    return [
        r
        for r in children_of(search)
        if r.role == names.ROLE_TRIAL
        and names.TRIAL_REPLICATE_OF not in r.tags
        and (status is None or r.tags.get(names.TRIAL_STATUS) == status)
    ]


def baseline_of(search: RunRecord) -> RunRecord | None:
    """The baseline run a search compared against (trained in it, or reused)."""
    run_id = search.tags.get(names.SEARCH_BASELINE_RUN)
    return get_run(run_id) if run_id else None


def best_trial_of(search: RunRecord) -> RunRecord | None:
    """The search's winning trial run (its tag; for older searches, the best completed trial)."""
    run_id = search.tags.get(names.SEARCH_BEST_RUN)
    if run_id:
        return get_run(run_id)
    scored = [r for r in trials_of(search, names.COMPLETED) if r.eval_loss is not None]
    return min(scored, key=lambda r: r.eval_loss) if scored else None


def latest_finished_search() -> RunRecord | None:
    """The newest finished search run in any experiment of the store."""
    experiments = [e.experiment_id for e in MlflowClient().search_experiments()]
    newest = ["attributes.start_time DESC"]
    where = f"tags.`{names.ROLE}` = '{names.ROLE_SEARCH}' and attributes.status = 'FINISHED'"
    return next(iter(_find(experiments, where, newest, limit=1)), None)


PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def download_artifacts(run_id: str, path: str, dst: str | Path, quiet: bool = False) -> str:
    """Download an artifact file or folder of a run; returns the local path. `quiet`: without
    MLflow's progress bar (MLflow reads its variable at each call)."""
    with _no_progress_bar() if quiet else contextlib.nullcontext():
        return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst))


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    bar = os.environ.get(PROGRESS_BAR)
    os.environ[PROGRESS_BAR] = "false"
    try:
        yield
    finally:
        if bar is None:
            os.environ.pop(PROGRESS_BAR, None)
        else:
            os.environ[PROGRESS_BAR] = bar


def download_run_file(run_id: str, artifact: str, dst: str | Path, option: str) -> Path:
    """A file logged on a run (config.yaml, best_config.yaml); PipelineError naming `option` if
    the run has none."""
    try:
        return Path(download_artifacts(run_id, artifact, dst))
    except Exception:
        raise PipelineError(f"{option}: run {run_id} has no {artifact} (did the search finish?)") from None


def example_scores(run_id: str, metric: str = names.EVAL_LOSS) -> ExampleScores | None:
    """The run's per-example scores of `metric`: its eval losses (`eval_examples.json`) or a task
    metric's per-document scores (`lm_eval/examples/<metric>.json`); None when it has none (a run
    of an older version, or a metric without them)."""
    artifact = (
        names.EVAL_EXAMPLES_FILE if metric == names.EVAL_LOSS else names.LMEVAL_EXAMPLES_FILE.format(metric)
    )
    if metric != names.EVAL_LOSS and not metric.startswith(names.LMEVAL_PREFIX):
        return None
    try:  # one small file per run: no progress bar for it
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(download_artifacts(run_id, artifact, tmp, quiet=True))
            return ExampleScores.from_json(json.loads(path.read_text()), run_id)
    except Exception:
        return None


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key)]


def last_steps(run_id: str) -> dict[str, int]:
    """The last step each metric of a run was logged at (what a continued run must not log again)."""
    client = MlflowClient()
    run = client.get_run(run_id)
    return {
        key: max((m.step for m in client.get_metric_history(run_id, key)), default=-1)
        for key in run.data.metrics
    }


def has_artifact(run_id: str, path: str) -> bool:
    """Does the run have an artifact (file or folder) at `path`?"""
    parent = path.rpartition("/")[0]
    try:
        listed = MlflowClient().list_artifacts(run_id, parent or None)
    except Exception:  # an unreachable artifact store: as good as none
        return False
    return any(f.path == path for f in listed)
