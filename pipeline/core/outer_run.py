"""The run `mlflow run` made for this invocation, which MLflow hands to the entry point's process
as `MLFLOW_RUN_ID`: the one module that reads it, takes it, or hides it from workers.

- The CLI reads it to mark that run failed when the command fails before resuming it, and to
  discard it when a resumed search had nothing to do.
- The tracking layer resumes it as the entry point's run (MLflow's `start_run` does so by itself),
  and takes it away when the work goes to an earlier search run instead (`--resume`).
- Ray workers must not see it: there it makes `start_run` resume the parent instead of creating
  a child run (reproduced with mlflow 3.17); nor the experiment the driver's environment names.

Light on purpose (only `os`): the CLI reads it before the heavy imports.
"""

from __future__ import annotations

import os

RUN_ID_ENV = "MLFLOW_RUN_ID"
# What a parallel search's workers must not inherit from the driver's environment.
DRIVER_ONLY_ENV = (RUN_ID_ENV, "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


def outer_run_id() -> str | None:
    """The id of the run `mlflow run` created for this invocation, if any."""
    return os.environ.get(RUN_ID_ENV) or None


def take_outer_run() -> str | None:
    """The outer run's id, removed from the environment: this process logs into another run
    from here on (a resumed search), and MLflow must not resume the outer one."""
    return os.environ.pop(RUN_ID_ENV, None) or None


def hide_driver_env() -> None:
    """In a worker process: forget the driver's outer run and experiment."""
    for key in DRIVER_ONLY_ENV:
        os.environ.pop(key, None)
