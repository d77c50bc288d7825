"""How a trial's run says why it failed: its `trial.status` (failed, abandoned, killed), a one-line
reason, and the full traceback of an unexpected error as an artifact."""

from __future__ import annotations

import logging
import traceback

from pipeline import tracking
from pipeline.core import console, names
from pipeline.core.errors import TrialFailed, one_line
from pipeline.model.load import is_out_of_memory, oom_memory_gb

log = logging.getLogger("pipeline")


def tag_failure(run: tracking.TrackedRun, e: BaseException) -> tuple[str, str, float | None]:
    """Tag the run with why it failed (and keep the traceback of an unexpected error); returns
    (status, reason, the memory an out-of-memory trial asked for, logged as `oom_memory_gb`).
    Called inside the `except` block."""
    status, reason = failure(e)
    run.set_tags({names.TRIAL_STATUS: status, names.TRIAL_FAILURE_REASON: reason})
    memory = oom_memory_gb(e) if status == names.ABANDONED else None
    if memory is not None:
        run.log_metrics({names.OOM_MEMORY_GB: memory}, 0, flush=True)
    if status != names.KILLED and not isinstance(e, TrialFailed):
        _keep_traceback(run)
    return status, reason, memory


def _keep_traceback(run: tracking.TrackedRun) -> None:
    """The failure's full traceback: an artifact of its run, and on stderr with -v. Called inside
    the `except` block (the traceback is the one being handled)."""
    text = traceback.format_exc()
    console.show_traceback(text)
    try:
        run.log_text(text, names.ERROR_FILE)
    except Exception as e:  # the store may be what failed; the one-line reason is tagged already
        log.warning("could not keep the traceback on run %s: %s", run.run_id, one_line(e, 200))


def failure(e: BaseException) -> tuple[str, str]:
    """(trial status, one-line reason) of an error inside a trial's run."""
    if isinstance(e, (KeyboardInterrupt, SystemExit)):  # as tracking ends the run: KILLED
        return names.KILLED, "interrupted"
    if isinstance(e, TrialFailed):
        return names.FAILED, e.reason
    reason = one_line(f"{type(e).__name__}: {e}")
    if is_out_of_memory(e):
        return names.ABANDONED, reason  # the same config would run out of memory again
    return names.FAILED, reason
