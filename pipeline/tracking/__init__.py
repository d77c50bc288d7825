"""MLflow tracking: the only package (with `registry`) that imports mlflow.

- `store.py`: which store (URI), its experiments, `mlflow server` over it;
- `runs.py`: writing runs: `start_run` (always ended FINISHED, FAILED with a one-line
  `pipeline.error` tag, or KILLED on Ctrl-C/SIGTERM), batched metrics (`log_batch`), artifacts;
- `queries.py`: reading runs as `RunRecord`s, by intent (`finished_baselines`,
  `running_children`, `trials_of`, ...).
"""

from pipeline.tracking.queries import (
    RunRecord,
    baseline_of,
    best_trial_of,
    children_of,
    download_artifacts,
    download_run_file,
    example_scores,
    finished_baselines,
    get_run,
    has_artifact,
    last_steps,
    latest_finished_search,
    metric_history,
    remembered_noise,
    require_search_run,
    running_children,
    trials_of,
)
from pipeline.tracking.runs import (
    TrackedRun,
    discard_run,
    end_failed,
    end_killed,
    mark_failed,
    param_text,
    start_run,
    tag_run,
)
from pipeline.tracking.store import (
    DEFAULT_TRACKING_URI,
    current_experiment_id,
    is_local_store,
    resolve_tracking_uri,
    run_url,
    server_command,
    setup,
    use_store,
)

__all__ = [
    "DEFAULT_TRACKING_URI",
    "RunRecord",
    "TrackedRun",
    "baseline_of",
    "best_trial_of",
    "children_of",
    "current_experiment_id",
    "discard_run",
    "download_artifacts",
    "download_run_file",
    "end_failed",
    "end_killed",
    "example_scores",
    "finished_baselines",
    "get_run",
    "has_artifact",
    "is_local_store",
    "last_steps",
    "latest_finished_search",
    "mark_failed",
    "metric_history",
    "param_text",
    "remembered_noise",
    "require_search_run",
    "resolve_tracking_uri",
    "run_url",
    "running_children",
    "server_command",
    "setup",
    "start_run",
    "tag_run",
    "trials_of",
    "use_store",
]
