"""Where trials run: the seam between the search loop and the machines that train.

The loop hands an executor `TrialJob`s and collects `JobOutcome`s; it never trains anything
itself. While a trial trains, each evaluation goes back to the loop as an `EvalEvent` stamped
with the trial's Ax index, through `on_eval(event) -> stop?`, so early stopping stays with the one
owner of the Ax state.

`LocalExecutor` runs one trial at a time in this process, with one shared `Resources` (the base
model is loaded once): the search's behaviour since the start. An executor that runs trials in
parallel implements the same four methods, and its workers call the same `run_job`.

Ax could generate the next candidate while a local trial trains, but BoTorch would then propose
it without the running trial's result (a different, worse informed sequence than the documented
seed-for-seed one), and Ax seeds and restores torch's process-wide RNG around every generation,
which would change the dropout masks of a trial training in another thread. The local executor
keeps the two in turn (docs/benchmarks.md, pipeline overhead).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Protocol, TypeVar

from pipeline.config import PipelineConfig, values_at, with_overrides
from pipeline.core import console, names
from pipeline.core.errors import PipelineError, TrialFailed, TrialInterrupted, one_line
from pipeline.core.events import EvalEvent, EvalHook
from pipeline.model.load import release
from pipeline.trial.resources import Resources
from pipeline.trial.run import RunSpec, TrialResult, run_trial


@dataclass(frozen=True)
class TrialJob:
    """One trial to run: the search's base config with the trial's parameters, and its run."""

    index: int  # the Ax trial index (the baseline's job has none: -1)
    base: PipelineConfig  # the search's config without its search section
    parameters: dict[str, Any]  # values of the searched keys ({} for the baseline)
    spec: RunSpec = field(default_factory=RunSpec)


@dataclass
class JobOutcome:
    """How a job ended. `result` when it trained to the end or was stopped early."""

    job: TrialJob
    status: str  # completed | early_stopped | failed | abandoned | killed
    result: TrialResult | None = None
    run_id: str | None = None  # None when it failed before its run started
    reason: str | None = None  # one line, for failures
    error: BaseException | None = None  # the error itself (the baseline's caller re-raises it)
    wall_seconds: float = 0.0
    where: str = ""  # where a failure's full traceback is (TrialFailed.where), for progress lines
    memory_gb: float | None = None  # out of memory: what the trial asked for (model.oom_memory_gb)


class Executor(Protocol):
    """What the search loop needs from wherever trials run."""

    devices_per_trial: float  # what search.budget_gpu_hours counts per trial-second (a packed trial: a share)

    def idle(self) -> int:
        """How many more jobs it takes now."""

    def submit(self, job: TrialJob, on_eval: EvalHook | None) -> None:
        """Start a job (or queue it); `on_eval` hears its evaluations."""

    def wait_any(self) -> JobOutcome:
        """Block until a submitted job ends; its outcome."""

    def close(self) -> None:
        """Release workers and resources; jobs not yet started are dropped."""


R = TypeVar("R")


class InFlight(Generic[R]):
    """The jobs a search has submitted and not yet heard back from: each one's record and when it
    started (the device budget counts running jobs). The trials' loop and the seed replicates
    run their jobs through it, so the bookkeeping of what runs is written once."""

    def __init__(self, executor: Executor, clock: Callable[[], float]) -> None:
        self.executor = executor
        self.clock = clock
        self.records: dict[int, R] = {}  # by job index (an Ax trial's; replicates: -2, -3, ...)
        self.started: dict[int, float] = {}  # clock() when each was submitted

    def __len__(self) -> int:
        return len(self.records)

    def __contains__(self, index: object) -> bool:
        return index in self.records

    def submit(self, job: TrialJob, record: R, on_eval: EvalHook | None = None) -> None:
        """Start `job` (its record already saved: it survives a crash from here on)."""
        self.records[job.index], self.started[job.index] = record, self.clock()
        self.executor.submit(job, on_eval)

    def wait(self) -> tuple[R, JobOutcome, float]:
        """The next job to end: its record, its outcome, and the device-seconds it held."""
        outcome = self.executor.wait_any()
        index = outcome.job.index
        device_seconds = (self.clock() - self.started.pop(index)) * self.executor.devices_per_trial
        return self.records.pop(index), outcome, device_seconds

    def clear(self) -> list[R]:
        """Forget every job still running (the search stops): their records."""
        records = list(self.records.values())
        self.records.clear()
        self.started.clear()
        return records


def run_job(
    job: TrialJob, resources: Resources, on_eval: EvalHook | None = None, quiet: bool = False
) -> JobOutcome:
    """Train one job here and say how it ended; never raises for the job's own failure."""
    t0 = time.perf_counter()

    def outcome(status: str, **kw: Any) -> JobOutcome:
        return JobOutcome(job, status, wall_seconds=time.perf_counter() - t0, **kw)

    def stamped(event: EvalEvent) -> bool:  # the trainer does not know which Ax trial it trains
        return on_eval(event.of_trial(job.index))

    config, spec = job.base, job.spec
    for attempt in range(2):  # a second only to retry out of memory with a split batch
        try:
            if attempt == 0:
                config = with_overrides(job.base, job.parameters) if job.parameters else job.base
                _check_trains_what_was_asked(config, job.parameters)
            result = run_trial(
                config, spec, resources=resources, on_eval=stamped if on_eval else None, quiet=quiet
            )
            ended = outcome(result.status, result=result, run_id=result.run_id)
        except KeyboardInterrupt as e:  # Ctrl-C/SIGTERM while training: the run ended KILLED
            run_id = e.run_id if isinstance(e, TrialInterrupted) else None
            return outcome(names.KILLED, run_id=run_id, reason="interrupted", error=e)
        except TrialFailed as e:
            ended = outcome(
                e.status, run_id=e.run_id, reason=e.reason, error=e, where=e.where(), memory_gb=e.memory_gb
            )
        except Exception as e:  # failed before its run started (this config's data or model)
            ended = outcome(names.FAILED, reason=one_line(f"{type(e).__name__}: {e}"), error=e)
        if ended.error is not None:  # out of the except block: its frames can go now
            release(ended.error)
        retry = split_batch(config) if ended.status == names.ABANDONED and attempt == 0 else None
        if retry is None:
            return ended
        config, how = retry
        console.say(f"trial {job.index} ran out of memory; once more with {how} (train.oom_retry)")
        tags = {**spec.tags, names.TRIAL_OOM_RETRY: f"{how} (after run {ended.run_id})"}
        spec = replace(spec, tags=tags, resume=None)  # a new run: the OOM run stays as it ended
    return ended


def split_batch(config: PipelineConfig) -> tuple[PipelineConfig, str] | None:
    """`train.oom_retry: split_batch`: the config with half the micro-batch and twice the
    accumulation (the same effective batch), and how it changed; None when off or at batch 1."""
    train = config.train
    if train.oom_retry != "split_batch" or train.batch_size < 2:
        return None
    half, accumulate = train.batch_size // 2, train.gradient_accumulation_steps * 2
    how = (
        f"batch_size {train.batch_size} -> {half}, gradient_accumulation_steps "
        f"{train.gradient_accumulation_steps} -> {accumulate}"
    )
    split = with_overrides(
        config, {"train.batch_size": half, "train.gradient_accumulation_steps": accumulate}
    )
    return split, how


def _check_trains_what_was_asked(config: PipelineConfig, parameters: dict[str, Any]) -> None:
    """Ax records the values it asked for: refuse a trial whose config would train others."""
    held = values_at(config, parameters)
    wrong = [
        f"{k}: Ax asked for {v!r}, the trial's config holds {held[k]!r}"
        for k, v in parameters.items()
        if held[k] != v
    ]
    if wrong:
        raise PipelineError("; ".join(wrong))


class LocalExecutor:
    """One trial at a time, in this process, all sharing one `Resources`."""

    # A trial runs on one device: the first visible GPU (train.multi_gpu is off), or the CPU.
    devices_per_trial = 1

    def __init__(self, quiet: bool = False, resources: Resources | None = None) -> None:
        self.resources = resources or Resources()
        self.quiet = quiet
        self._queue: deque[tuple[TrialJob, EvalHook | None]] = deque()

    def idle(self) -> int:
        return 0 if self._queue else 1

    def submit(self, job: TrialJob, on_eval: EvalHook | None) -> None:
        self._queue.append((job, on_eval))

    def wait_any(self) -> JobOutcome:
        job, on_eval = self._queue.popleft()
        return run_job(job, self.resources, on_eval, self.quiet)

    def close(self) -> None:
        self._queue.clear()
