"""Trials in parallel on Ray core (`search.executor: ray`), behind the same seam as the local executor.

The driver (the search's own process) stays the one owner of the Ax client, the parent run and
the records. Each worker is a Ray actor with its own `Resources` (the base model is loaded once
per worker) that runs trial after trial through `run_job`, the local executor's code. While a
trial trains, each evaluation goes to the driver through the `Reports` actor (`mailbox.py`) and the worker waits
for the answer (stop early?), so Ax's early stopping sees every curve as it is drawn, exactly as
in a local search. Ray Tune is not the route: its Ax searcher wraps Ax's deprecated `AxClient`
(broken with ax-platform 1.3) and reports final results only.

MLflow from many processes, each trap reproduced with mlflow 3.17:

- the driver makes the experiment, the parent run and so the store's schema before any worker
  starts (four processes migrating a fresh sqlite file at once failed three times in four);
- workers get the store's absolute URI and create child runs naming their parent and its
  experiment; they never call `set_experiment` (concurrent calls on a new name put runs into
  `Default`);
- `MLFLOW_RUN_ID` (set by `mlflow run`) is hidden from the workers (`outer_run.hide_driver_env`):
  there it makes `start_run` resume the parent instead of creating a child;
- a sqlite or file store is refused on a cluster of more than one node: use a tracking server.

Each sealed checkpoint of a worker's trial is also copied to its run's artifacts (`checkpoint/`):
a worker that dies (killed, segfault, node lost) after its trial's first evaluation hands the
trial to a new worker in its slot, which continues it from that checkpoint in the same run
(`RunSpec.resume`), up to `HANDOFFS` times; before its first checkpoint, or past that, the trial
fails (its run ended FAILED here). Ctrl-C stops every worker; their runs end KILLED and a resumed
search continues them from their checkpoints (or runs their configs again).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import pickle
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.config import PipelineConfig
from pipeline.core import console, interrupt, names, outer_run
from pipeline.core.errors import PipelineError, one_line
from pipeline.core.events import EvalEvent, EvalHook
from pipeline.model.device import quiet_libraries, use_cpu_threads
from pipeline.search.executors.local import JobOutcome, TrialJob, run_job
from pipeline.search.executors.mailbox import Reports
from pipeline.search.executors.packed import run_in_pack
from pipeline.training.packing import Pack
from pipeline.trial.resources import Resources
from pipeline.trial.resume import in_store

INSTALL = "search.executor: ray needs Ray: pip install -e '.[distributed]'"
POLL_S = 1.0  # how often the driver looks up from waiting (Ctrl-C, a spent budget)
HANDOFFS = 2  # a trial whose workers keep dying (a segfault of its own) fails after this many


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise PipelineError(INSTALL) from None
    return ray


def absolute_store_uri(uri: str) -> str:
    """The store's URI as a worker in another directory must see it (sqlite and file paths made
    absolute; a server's URI as it is)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    if "://" not in uri:
        return str(Path(uri).resolve())
    return uri


class _Worker:
    """One Ray actor: trial after trial, sharing its tokenizer, data and base model."""

    def __init__(self, worker_id: str, env: dict[str, str], cwd: str, threads: int, pack: int = 1) -> None:
        outer_run.hide_driver_env()
        os.environ.update(env)
        if os.path.isdir(cwd):  # relative paths in the config mean what they mean to the driver
            os.chdir(cwd)
        use_cpu_threads(threads)
        quiet_libraries()  # several workers share one console
        self.worker_id = worker_id
        self.resources = Resources()
        # search.pack > 1: up to `pack` calls at once (a threaded actor), trained as one pack.
        self.pack = Pack(pack) if pack > 1 else None

    def where(self) -> tuple[int, str]:
        return os.getpid(), socket.gethostname()

    def run(self, job: TrialJob, reports: Any, flight: int, streams: bool) -> JobOutcome:
        ray, asked = _ray(), itertools.count()

        def on_eval(event: EvalEvent) -> bool:
            return ask_driver(ray, reports, (flight, next(asked)), event)

        me = {
            names.TRIAL_WORKER: self.worker_id,
            names.TRIAL_WORKER_PID: os.getpid(),
            names.TRIAL_WORKER_HOST: socket.gethostname(),
        }
        job = replace(job, spec=replace(job.spec, tags={**job.spec.tags, **me}))
        if self.pack is not None:
            ask = on_eval if streams else None
            outcome = run_in_pack(self.pack, job, self.resources, ask, name=f"{self.worker_id}.")
        else:
            outcome = run_job(job, self.resources, on_eval if streams else None, quiet=True)
        if outcome.run_id:
            with contextlib.suppress(Exception):  # a tag must not cost the trial
                tracking.tag_run(outcome.run_id, {names.TRIAL_WORKER_BASE_LOADS: self.resources.base_loads})
        return _portable(outcome)


class DriverLost(KeyboardInterrupt):
    """The search's driver is gone (killed, its node lost): the trial stops as if interrupted."""


def ask_driver(ray: Any, reports: Any, key: Any, event: EvalEvent) -> bool:
    """Send one evaluation to the driver and wait for its answer: stop this trial early?

    Without a driver to answer, the trial ends KILLED (DriverLost is a KeyboardInterrupt), not
    FAILED: a resumed search then runs its config again instead of counting it as a failure.
    """
    try:
        return bool(ray.get(reports.ask.remote(key, event)))
    except Exception as e:
        raise DriverLost(f"the search's driver is gone ({type(e).__name__})") from None


def _portable(outcome: JobOutcome) -> JobOutcome:
    """The outcome with an error that survives the trip to the driver (pickled by Ray)."""
    if outcome.error is None:
        return outcome
    try:
        pickle.loads(pickle.dumps(outcome.error))
        return outcome
    except Exception:
        return replace(outcome, error=PipelineError(outcome.reason or type(outcome.error).__name__))


@dataclass
class _Flight:
    """A job on a worker."""

    flight: int
    slot: int
    job: TrialJob
    on_eval: EvalHook | None
    started: float
    handoffs: int = 0  # times its trial was continued on a new worker after its worker died
    actor: Any = None  # the worker it was sent to


class RayExecutor:
    """`search.workers` trials at once on Ray workers; the driver keeps Ax and the records."""

    def __init__(self, config: PipelineConfig, tracking_uri: str) -> None:
        ray, search = _ray(), config.search
        self.ray = ray
        self.running: dict[Any, _Flight] = {}  # Ray object ref -> the job it will return
        self.slots: list[Any] = []  # actor handles; None: a slot whose worker died
        self.reports: Any = None
        address = os.environ.get("RAY_ADDRESS") or search.ray_address
        self.started_cluster = not ray.is_initialized() and not address
        if not ray.is_initialized():
            try:
                ray.init(address=address or None, include_dashboard=False, logging_level="WARNING")
            except Exception as e:
                raise PipelineError(
                    f"search.ray_address: cannot join the Ray cluster at {address}: {one_line(e, 200)}"
                ) from None
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        uri = absolute_store_uri(tracking_uri)
        if len(nodes) > 1 and tracking.is_local_store(uri):
            self.close()
            raise PipelineError(
                f"tracking.tracking_uri: {tracking_uri} is a local store and the Ray cluster has "
                f"{len(nodes)} nodes; run a tracking server (docs/distributed.md) and point "
                "MLFLOW_TRACKING_URI (or tracking.tracking_uri) at it"
            )
        self.workers, self.gpus, self.cpus = _plan(search, ray.cluster_resources(), self.close)
        self.pack = search.pack
        # search.budget_gpu_hours counts a trial's time on each GPU it holds (a CPU trial: one device).
        # Packed trials share their worker's devices.
        self.devices_per_trial = max(1, math.ceil(self.gpus)) / search.pack
        self.env = {"MLFLOW_TRACKING_URI": uri}
        self.env.update({k: v for k, v in os.environ.items() if k.startswith(("HF_", "TRANSFORMERS_"))})
        self.reports = ray.remote(num_cpus=0)(Reports).remote()
        # Workers start now: their imports overlap the driver's set-up and the parent run. They
        # touch the store only when their first job comes, after the parent run made the schema.
        self.slots = [self._start_worker(i) for i in range(self.workers)]
        self.free = [w for w in range(self.workers) for _ in range(search.pack)]  # a place per trial
        self.flights = itertools.count()
        self._take: Any = None
        console.say(
            f"ray: {self.workers} workers x ({self.gpus:g} GPU, {self.cpus:g} CPU) on {len(nodes)} node(s)"
            + (" (local cluster)" if self.started_cluster else f" at {address}")
        )

    # --- the Executor protocol ---------------------------------------------------------------

    def idle(self) -> int:
        return len(self.free)

    def submit(self, job: TrialJob, on_eval: EvalHook | None, handoffs: int = 0) -> None:
        slot = self.free.pop(0)
        if self.slots[slot] is None:
            self.slots[slot] = self._start_worker(slot)
        flight = next(self.flights)
        # A worker's disk may not outlive it: its checkpoints go to the tracking store too.
        job = replace(job, spec=replace(job.spec, checkpoint_store=True))
        actor = self.slots[slot]
        ref = actor.run.remote(job, self.reports, flight, on_eval is not None)
        self.running[ref] = _Flight(flight, slot, job, on_eval, time.perf_counter(), handoffs, actor)

    def wait_any(self) -> JobOutcome:
        """The next job to end; meanwhile answer the workers' evaluations (the driver's thread is
        the one that talks to Ax)."""
        ray = self.ray
        while True:
            interrupt.raise_if_requested("stop requested")
            if self._take is None:
                self._take = self.reports.take.remote()
            ready, _ = ray.wait([*self.running, self._take], num_returns=1, timeout=POLL_S)
            # Ctrl-C may also have reached Ray's processes: what failed then is not a failure.
            interrupt.raise_if_requested("stop requested")
            if not ready:
                continue
            if ready[0] == self._take:
                self._take = None
                self._answer(ray.get(ready[0]))
                continue
            flight = self.running.pop(ready[0])
            self.free.append(flight.slot)
            outcome = self._outcome(ready[0], flight)
            if outcome is not None:
                return outcome

    def close(self) -> None:
        """Stop the workers; runs of trials still in flight end KILLED; a local cluster goes."""
        ray = self.ray
        actors = [a for a in (*self.slots, self.reports) if a is not None]
        for actor in actors:  # a cluster that is already gone (Ctrl-C reached it too) is fine
            with contextlib.suppress(Exception):
                ray.kill(actor)
        for flight in self.running.values():
            self._end_runs(flight, names.KILLED, "interrupted: the search stopped")
        self.running.clear()
        self.slots, self.reports = [None] * len(self.slots), None
        if self.started_cluster and ray.is_initialized():
            ray.shutdown()

    # --- helpers -----------------------------------------------------------------------------

    def _start_worker(self, slot: int) -> Any:
        options: dict[str, Any] = {"num_cpus": self.cpus, "num_gpus": self.gpus, "max_restarts": 0}
        if self.pack > 1:
            options["max_concurrency"] = self.pack
        actor = self.ray.remote(**options)(_Worker)
        threads = max(1, int(self.cpus))
        return actor.remote(f"w{slot + 1}", self.env, os.getcwd(), threads, self.pack)

    def _answer(self, items: list[tuple[Any, EvalEvent]]) -> None:
        for key, event in items:
            # A trial that ended meanwhile hears "go on": nobody is waiting for the answer.
            flight = next((f for f in self.running.values() if f.flight == key[0]), None)
            on_eval = flight.on_eval if flight is not None else None
            stop = bool(on_eval(event)) if on_eval is not None else False
            self.reports.answer.remote(key, stop)

    def _outcome(self, ref: Any, flight: _Flight) -> JobOutcome | None:
        """How the flight's job ended; None when its worker died and a new worker continues it."""
        ray = self.ray
        try:
            outcome = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            # The worker process died mid-trial: nobody else will end its run.
            if self.slots[flight.slot] is flight.actor:  # (its pack's other trials die with it)
                self.slots[flight.slot] = None  # the next job in this slot starts a new worker
            cause = one_line(str(e).splitlines()[0] if str(e) else type(e).__name__, 200)
            reason = f"worker w{flight.slot + 1} died mid-trial ({type(e).__name__}: {cause})"
            if self._hand_over(flight, reason):
                return None
            run_id = self._end_runs(flight, names.FAILED, reason)
            return JobOutcome(
                flight.job,
                names.FAILED,
                run_id=run_id,
                reason=reason,
                error=PipelineError(reason),
                wall_seconds=time.perf_counter() - flight.started,
            )
        if outcome.status == names.KILLED:  # the worker, not the search, was interrupted
            reason = f"worker w{flight.slot + 1} was interrupted (SIGINT/SIGTERM)"
            return replace(outcome, status=names.FAILED, reason=reason, error=PipelineError(reason))
        return outcome

    def _hand_over(self, flight: _Flight, reason: str) -> bool:
        """Continue a dead worker's trial on a new worker, from the checkpoint it left in the
        tracking store (its run reopened): True if it was handed over."""
        spec, done = flight.job.spec, flight.handoffs
        left = self._running_run(flight)
        if left is None or done >= HANDOFFS or not in_store(left):
            return False
        tracking.end_killed(left, reason)
        console.say(f"{reason}; its trial continues from its last checkpoint on a new worker")
        self.submit(replace(flight.job, spec=replace(spec, resume=left)), flight.on_eval, done + 1)
        return True

    def _running_run(self, flight: _Flight) -> str | None:
        """The run the flight's worker left RUNNING, if any (at most one per worker)."""
        parent, worker = flight.job.spec.parent_run_id, f"w{flight.slot + 1}"
        left = [r for r in tracking.running_children(parent) if r.tags.get(names.TRIAL_WORKER) == worker]
        if self.pack > 1:  # a packed worker runs several: this flight's is the one of its name
            left = [r for r in left if r.name == flight.job.spec.name]
        return left[0].run_id if left else None

    def _end_runs(self, flight: _Flight, status: str, reason: str) -> str | None:
        """End the run a lost worker left RUNNING (there is at most one per worker)."""
        left = self._running_run(flight)
        if left is not None:
            (tracking.end_failed if status == names.FAILED else tracking.end_killed)(left, reason)
        return left


def _plan(search: Any, cluster: dict[str, float], close: Any) -> tuple[int, float, float]:
    """(workers, GPUs per worker, CPUs per worker) from the config and what the cluster has;
    PipelineError when the cluster cannot hold them all at once."""
    gpus_total, cpus_total = float(cluster.get("GPU", 0)), float(cluster.get("CPU", 0))
    workers = search.workers or (int(gpus_total) if gpus_total >= 1 else 1)
    res = search.worker_resources
    gpus = res.gpus if res.gpus is not None else (1.0 if gpus_total >= 1 else 0.0)
    cpus = res.cpus if res.cpus is not None else max(1.0, math.floor(cpus_total / workers))
    short = []
    if workers * gpus > gpus_total:
        short.append(f"{workers * gpus:g} GPUs (the cluster has {gpus_total:g})")
    if workers * cpus > cpus_total:
        short.append(f"{workers * cpus:g} CPUs (the cluster has {cpus_total:g})")
    if short:
        close()
        raise PipelineError(
            f"search.workers: {workers} workers x ({gpus:g} GPU, {cpus:g} CPU) need {' and '.join(short)}; "
            "lower search.workers or search.worker_resources"
        )
    return workers, gpus, cpus
