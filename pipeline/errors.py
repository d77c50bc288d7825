"""Errors the user can fix. The CLI prints each as one line and exits with code 2."""

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
        head = f"invalid config {source}" + (f" ({n} problems)" if n > 1 else "")
        super().__init__(f"{head}: " + "; ".join(problems))


class DataError(PipelineError):
    """A data file is missing, malformed or yields no examples."""


class ModelError(PipelineError):
    """The base model, its tokenizer or the LoRA target modules cannot be used."""


class TrialFailed(Exception):
    """A trial ran but its result is unusable (for example a NaN loss). Not the user's input."""
