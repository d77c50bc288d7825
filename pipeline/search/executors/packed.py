"""`search.pack: N`: up to N trials train at once in this process, packed over one base model.

Each trial runs `run_job` in its own thread, as a slot of one `packing.Pack`: its training
forwards and backwards are shared with the other trials', everything else is its own (its run,
curves, adapter, status). Threads take turns (see `packing`), and so does this, the search's
thread: it holds the turn whenever it is not waiting in `wait_any`, so Ax (which seeds and
restores torch's RNG around every generation) never runs beside a trial's step.

Continuous packing: when a trial ends its thread's outcome wakes `wait_any`; the loop then asks
Ax for the next candidate (with the running trials pending, as for Ray) and submits it, and the
new trial joins the pack at its next step. A trial the pack cannot hold (`packing.unpackable`,
or another base, data or target modules) waits until the pack has drained and runs alone, with a
line saying why. A trial's evaluations reach Ax through this thread, as Ray workers' do.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from dataclasses import replace
from typing import Any

from pipeline.config import with_overrides
from pipeline.core import console, interrupt, names
from pipeline.core.events import EvalEvent, EvalHook
from pipeline.search.executors.local import Executor, JobOutcome, LocalExecutor, TrialJob, run_job
from pipeline.training import packing


def local_executor(pack: int, quiet: bool, resources: Any) -> Executor:
    """Trials in this process: one at a time, or `pack` at once over the shared base."""
    return PackedExecutor(pack, resources) if pack > 1 else LocalExecutor(quiet, resources)


class PackedExecutor:
    """Up to `size` trials at once, trained in packs over the shared base (see the module)."""

    def __init__(self, size: int, resources: Any = None) -> None:
        from pipeline.trial.resources import Resources

        self.size = size
        # A pack's trials share one device: each trial-second is 1/size device-seconds when full.
        self.devices_per_trial = 1.0 / size
        self.resources = resources or Resources()
        self.pack = packing.Pack(size)
        self.messages: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.waiting: deque[tuple[TrialJob, EvalHook | None]] = deque()
        self.running: dict[int, threading.Thread] = {}
        self.key: tuple | None = None  # what the running trials share
        self.alone = False  # the running trial is one the pack cannot hold
        self.driver = object()  # this thread's place in the turns
        self.limit_gb = packing.memory_limit_gb()
        self.pack.enter(self.driver)
        if not packing.on_gpu():
            console.say(
                f"search.pack {size}: on a CPU the shared steps are arithmetic-bound; packed searches were "
                "slower than one trial at a time on the demo (docs/benchmarks.md#packed-trials)"
            )

    def idle(self) -> int:
        if self.waiting or self.alone:
            return 0
        # As many more as the pack holds and, by the memory measured so far, fits (one at least
        # when none runs).
        cap, n = min(self.size, self.pack.size), len(self.running)
        while n < cap and (n == 0 or self.pack.fits(n + 1, self.limit_gb)):
            n += 1
        return n - len(self.running)

    def submit(self, job: TrialJob, on_eval: EvalHook | None) -> None:
        self.waiting.append((job, on_eval))
        self._start()

    def wait_any(self) -> JobOutcome:
        """Serve the trials' evaluations (Ax's early stopping) until one ends; its outcome."""
        while True:
            message = self._message()
            if message[0] == "eval":
                _, event, on_eval, answer, answered = message
                try:
                    answer.append(bool(on_eval(event)) if on_eval is not None else False)
                except BaseException:
                    answer.append(True)  # the search is going down: the trial stops
                    raise
                finally:
                    answered.set()
                continue
            _, index, outcome = message
            self.running.pop(index).join()
            if not self.running:
                self.alone = False
            self._start()
            return outcome

    def close(self) -> None:
        """Running trials stop at their next step (their runs end KILLED, resumable); the ones
        not started are dropped."""
        self.waiting.clear()
        if self.running:
            interrupt.request_stop()
        while self.running:
            message = self._message()
            if message[0] == "eval":
                message[3].append(True)
                message[4].set()
            else:
                self.running.pop(message[1]).join()
        self.alone = False

    def _message(self) -> tuple[Any, ...]:
        """The next word from a trial's thread, waited for without the turn (taken back after)."""
        self.pack.release(self.driver)
        message = self.messages.get()
        self.pack.enter(self.driver)
        return message

    def _start(self) -> None:
        """Start the waiting jobs the pack can take now (an unpackable one when it is empty)."""
        while self.waiting and len(self.running) < max(1, min(self.size, self.pack.size)):
            job, on_eval = self.waiting[0]
            reason, key = _packing(job)
            if self.running and (reason is not None or self.alone or key != self.key):
                return  # runs once the pack has drained
            if not self.running:
                self.key = key
            self.waiting.popleft()
            self.alone = reason is not None
            thread = threading.Thread(
                target=self._trial,
                args=(job, on_eval),
                name=f"trial-{job.index}",
                daemon=True,
            )
            self.running[job.index] = thread
            thread.start()

    def _trial(self, job: TrialJob, on_eval: EvalHook | None) -> None:
        """A trial's thread: its run in the pack, its outcome to the search's thread."""
        outcome: JobOutcome | None = None
        try:
            outcome = run_in_pack(self.pack, job, self.resources, self._relay(on_eval) if on_eval else None)
        except BaseException as e:  # run_job reports a trial's own failures; this is ours
            outcome = JobOutcome(job, names.FAILED, reason=f"{type(e).__name__}: {e}", error=e)
        finally:
            self.messages.put(("done", job.index, outcome))

    def _relay(self, on_eval: EvalHook) -> EvalHook:
        """An evaluation asks the search's thread (the one owner of Ax) and waits for the answer."""

        def ask(event: EvalEvent) -> bool:
            answer: list[bool] = []
            answered = threading.Event()
            self.messages.put(("eval", event, on_eval, answer, answered))
            answered.wait()
            return answer[0]

        return ask


def run_in_pack(
    pack: packing.Pack, job: TrialJob, resources: Any, ask: EvalHook | None, name: str = ""
) -> JobOutcome:
    """Run a job in this thread as one of the pack's trials (a `PackedExecutor` thread, a Ray
    worker's call): admitted when the pack can take it, trained with its turn, its runs tagged
    with the pack (`name` + the pack's number) and its place. An evaluation's question (`ask`,
    which blocks) waits without the turn."""
    reason, key = _packing(job)
    if reason is not None:
        console.say(f"trial {job.index} runs alone, not packed: {reason}")
    pack.admit(key, alone=reason is not None)
    owner: Any = pack.join() if reason is None else object()
    pack.enter(owner)
    try:
        tags: dict[str, Any] = {names.TRIAL_PACK: f"{name}{pack.generation}"}
        if reason is None:
            tags[names.TRIAL_PACK_SLOT] = owner.number
        job = replace(job, spec=replace(job.spec, tags={**job.spec.tags, **tags}))

        def hook(event: EvalEvent) -> bool:
            pack.release(owner)
            try:
                return bool(ask(event)) if ask is not None else False
            finally:
                pack.enter(owner)

        # No progress bars: several trials step at once (the loop prints a line per trial).
        return run_job(job, resources, hook if ask is not None else None, quiet=True)
    finally:
        if reason is None:
            pack.leave(owner)
        else:
            pack.release(owner)
        pack.discharge()


def _packing(job: TrialJob) -> tuple[str | None, tuple | None]:
    """Why the job cannot share a pack (None: it can), and what its pack shares."""
    try:
        config = with_overrides(job.base, job.parameters) if job.parameters else job.base
    except Exception:  # run_job reports the bad parameters as the trial's failure
        return None, None
    return packing.unpackable(config), packing.pack_key(config)
