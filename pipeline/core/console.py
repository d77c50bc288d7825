"""Everything a person reads on the console: progress lines (`say`, the one voice of the search,
retrain, warm start, finish and the Ray executor); third-party noise silenced once, here (the
quiet mode: `silence_library_noise`); warnings said once per process; full tracebacks when asked
for (`-v`, `PIPELINE_DEBUG=1`). Diagnostics stay `logging`.

Light on purpose (no torch, mlflow or ax import): the CLI calls it before the heavy imports, so
the filters are in place when those libraries log at import time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

DEBUG_ENV = "PIPELINE_DEBUG"  # inherited by `mlflow run`'s process and by Ray workers

log = logging.getLogger("pipeline")
_said: set[str] = set()

# Library loggers whose info lines drown the progress lines.
CHATTY = ("transformers", "mlflow", "peft", "accelerate", "httpx", "urllib3", "absl", "ax", "botorch")


class _Drop(logging.Filter):
    """Drops records whose message contains any of the given texts."""

    def __init__(self, *texts: str) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(t in message for t in self.texts)


# Said on every command, true of no run the pipeline makes. Each: (logger, message fragment, why).
NOISE = (
    # bitsandbytes looks for a fused CPU inference kernel on the hub at import, on every command
    # (4-bit or not); offline it warns twice. Training never uses that kernel (model.keep_4bit_trainable).
    ("bitsandbytes.backends.cpu.ops", "kernels-community", "hub kernel for CPU 4-bit inference"),
    ("kernels._internals.hf_hub", "kernels-community", "the same lookup, from the kernels package"),
    # Ax announces its (unused) SQL storage at import, at info level, past its own log levels.
    ("ax.storage.sqa_store.with_db_settings_base", "Ax SQL storage initialized", "an unused Ax feature"),
)


_muted = False  # progress lines off: a benchmark replaying thousands of Ax steps prints its own


def say(line: str) -> None:
    """One progress line: stdout, flushed, also with --quiet (one line per trial is what CI logs
    want; --quiet silences the libraries and the progress bars, not these)."""
    if not _muted:
        print(line, flush=True)


@contextlib.contextmanager
def muted() -> Iterator[None]:
    """No progress lines inside the block (a benchmark driving the search's parts directly)."""
    global _muted
    before, _muted = _muted, True
    try:
        yield
    finally:
        _muted = before


def debug() -> bool:
    """Full tracebacks wanted (`-v` on the command line, or PIPELINE_DEBUG=1)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def set_debug(on: bool) -> None:
    """Turn tracebacks on for this process and the ones it starts (`mlflow run`, Ray workers)."""
    if on:
        os.environ[DEBUG_ENV] = "1"


def show_traceback(text: str) -> None:
    """Print a failure's full traceback to stderr when debugging is on."""
    if debug():
        print(text.rstrip(), file=sys.stderr, flush=True)


def warn_once(line: str) -> None:
    """A warning line, said once per process (a search's trials share one device plan)."""
    if line not in _said:
        _said.add(line)
        log.warning(line)


def silence_library_noise(quiet: bool = False) -> None:
    """Library loggers at warning level (error with --quiet), the known noise dropped, progress
    bars off with --quiet. Idempotent; call before importing the libraries."""
    level = logging.ERROR if quiet else logging.WARNING
    for name in CHATTY:
        logging.getLogger(name).setLevel(level)
    for name, text, _why in NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and text in f.texts for f in logger.filters):
            logger.addFilter(_Drop(text))
    # The same texts at the root's handlers too: a library that moves its message to another
    # logger (a child of the one named) stays silenced.
    texts = tuple(text for _, text, _ in NOISE)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _Drop) for f in handler.filters):
            handler.addFilter(_Drop(*texts))
    # Deprecations inside libraries are theirs to fix, not the user's to read.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # PEFT advising to convert a PiSSA/OLoRA adapter, which the pipeline does when it saves one.
    warnings.filterwarnings("ignore", message=r"(PiSSA|OLoRA) changes the base weights", module="peft")
    # BoTorch retrying its acquisition optimizer with other starting points: Ax's business.
    warnings.filterwarnings("ignore", message="Optimization failed", module="botorch")
    # MLflow and Ax configure their own loggers when first imported (after this): ask by env.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR" if quiet else "WARNING")
    if quiet:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TQDM_DISABLE", "1")


class Captured(logging.Handler):
    """Collects the warnings one logger emits inside a `with` block (what a library only logs,
    e.g. Ax's early stopping giving up)."""

    def __init__(self, logger: str) -> None:
        super().__init__(logging.WARNING)
        self.logger = logging.getLogger(logger)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> list[str]:
        self.logger.addHandler(self)
        return self.messages

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)


# Run names and durations, as progress lines and the MLflow runs table show them

# The keys a run name shows first, by their short names; any other key by its last part.
SHORT_NAMES = {"lora.r": "r", "lora.alpha": "a", "train.learning_rate": "lr", "train.batch_size": "bs"}


def run_name(label: str, params: Mapping[str, Any]) -> str:
    """`trial-07 r=32 a=64 lr=1.2e-04 bs=2`: a label and the key params, the one format of the
    baseline's, every trial's and the retrain's run names."""
    parts = [label]
    for key, value in params.items():
        short = SHORT_NAMES.get(key, key.rsplit(".", 1)[-1])
        if isinstance(value, float):
            small_or_big = value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4)
            text = f"{value:.1e}" if small_or_big else f"{value:g}"
        else:
            text = str(value)
        parts.append(f"{short}={text}")
    return " ".join(parts)


def duration(seconds: float) -> str:
    """`4m05s`, `1h02m`: elapsed time and ETA in progress lines."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
