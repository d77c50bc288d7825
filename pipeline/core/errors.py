"""Errors. User errors (bad input) print as one line and exit with code 2; a trial that ran and
failed is a TrialFailed (exit code 1), and one stopped by Ctrl-C/SIGTERM a TrialInterrupted."""

from __future__ import annotations

USER_ERROR_EXIT_CODE = 2


class PipelineError(Exception):
    """Bad input: a config key, a data file, a model path. ``str(err)`` is the one line shown."""


class ConfigError(PipelineError):
    """The config failed validation. Holds every problem, each with its key path."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        n = len(problems)
        # The file is named once: in the head, unless every problem leads with its line.
        named = all(p.startswith(f"{source}:") for p in problems)
        head = "invalid config" + ("" if named else f" {source}") + (f" ({n} problems)" if n > 1 else "")
        super().__init__(f"{head}: " + "; ".join(problems))


class DataError(PipelineError):
    """A data file is missing, malformed or yields no examples."""


class ModelError(PipelineError):
    """The base model, its tokenizer or the LoRA target modules cannot be used."""


class SearchAborted(Exception):
    """The search stopped itself (failure-rate cap, broken early stopping, an exhausted space).
    Its state is saved: fix the cause and resume."""


class SearchFinished(Exception):
    """A resumed search has nothing left to do: every trial ran and it ended. Not an error."""


class TrialFailed(Exception):
    """A trial's run failed: a NaN loss, out of memory, an error while training.

    `run_id` is the failed run, `status` what the trial ended as (`failed`, or `abandoned` when
    it ran out of memory: the same config would again), `reason` one line for logs and tags.
    The original error, when there was one, is ``__cause__``.
    """

    def __init__(
        self,
        reason: str,
        run_id: str | None = None,
        status: str = "failed",
        traceback_file: str | None = None,
        memory_gb: float | None = None,
    ):
        super().__init__(reason)
        self.memory_gb = memory_gb  # out of memory: what the trial asked for (model.oom_memory_gb)
        self.reason = reason
        self.run_id = run_id
        self.status = status
        self.traceback_file = traceback_file  # an artifact of the run: the error's full traceback

    def where(self) -> str:
        """Where the full traceback is, for the end of a one-line error ('' when there is none)."""
        if not (self.traceback_file and self.run_id):
            return ""
        return f" (traceback: {self.traceback_file} of run {self.run_id}, or rerun with -v)"


class TrialInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a trial while it trained; its run ended KILLED."""

    def __init__(self, run_id: str):
        super().__init__(f"trial interrupted (run {run_id})")
        self.run_id = run_id


def one_line(text: object, limit: int = 500) -> str:
    """`text` on one line, at most `limit` characters (tags, progress lines, error messages)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
