"""One LoRA fine-tune, fully tracked. Baseline, every search trial and retrain go through here.

Two steps, as in litgpt's recipes:

- `setup(config)`: device plan -> tokenizer -> data -> generation metric -> base model. All that
  can fail on bad input fails here, before any MLflow run exists.
- `fit(trial, spec)`: MLflow run -> LoRA -> train -> metrics -> adapter (logged, and kept in
  `train.output_dir/adapters/<run id>/`) -> the run tags its own `trial.status`.

`run_trial(config, spec)` is both in one call. A failure inside the run ends the run FAILED and
raises `TrialFailed` (with the run id and whether the trial failed or was abandoned); Ctrl-C or
SIGTERM while training ends it KILLED and raises `TrialInterrupted`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import __version__, tracking
from pipeline.config import PipelineConfig, config_fingerprint, flatten, to_dict, to_yaml, values_at
from pipeline.core import console, names
from pipeline.core.errors import TrialFailed, TrialInterrupted
from pipeline.core.events import EvalHook
from pipeline.core.provenance import git_commit, package_versions
from pipeline.core.stats import ExampleScores
from pipeline.core.timing import PhaseTimer
from pipeline.data.prepare import example_ids
from pipeline.model.adapter import generate, save_adapter
from pipeline.model.device import plan_device
from pipeline.model.load import BaseModel, attach_lora, count_parameters, detach_lora
from pipeline.training import lmeval, packing
from pipeline.training.metrics import (
    MemoryMonitor,
    device_tags,
    generation_scores,
    load_generation_metric,
    perplexity,
)
from pipeline.training.train import TrainInputs, TrainReport, init_batches, train
from pipeline.trial.failures import tag_failure
from pipeline.trial.resources import Resources
from pipeline.trial.resume import checkpoint_plan, discard_checkpoints, once_per_step

log = logging.getLogger("pipeline")


@dataclass(frozen=True)
class RunSpec:
    """Who a trial's MLflow run is: its role, name, parent run (a search) and extra tags."""

    role: str = names.ROLE_BASELINE
    name: str | None = None  # None: tracking.run_name, else derived from the config
    parent_run_id: str | None = None
    tags: Mapping[str, Any] = field(default_factory=dict)
    resume: str | None = None  # continue this (interrupted) run from its last checkpoint
    checkpoint_store: bool = False  # copy checkpoints to the run's artifacts (a Ray worker's)


@dataclass
class TrialResult:
    """The outcome of one trial, with the MLflow run that holds everything about it."""

    run_id: str
    status: str  # completed | early_stopped
    eval_loss: float
    metrics: dict[str, float]
    steps: int
    max_steps: int
    config: PipelineConfig
    config_fingerprint: str
    data_fingerprint: str
    eval_fingerprint: str
    adapter_uri: str  # runs:/<run id>/adapter
    adapter_dir: Path  # the same adapter on local disk (the registry takes it from here)
    wall_seconds: float
    examples_per_step: int  # progression of step s is s x examples_per_step training examples
    evals: list[tuple[int, float]] = field(default_factory=list)
    # Exclusive seconds per phase (load, tracking, lora, train, eval_hook, generation, adapter,
    # finish, other), also logged as `time_<phase>_s`; the run's end is not in them.
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class TrialSetup:
    """Everything a trial needs before its run starts (what `setup` built)."""

    job: TrainInputs
    base: BaseModel
    reused: bool  # the base model came from an earlier trial
    metric: Any | None  # the generation metric (an `evaluate` module), or None
    timer: PhaseTimer
    started: float  # perf_counter() when setup began: the trial's wall time counts from here

    @property
    def config(self) -> PipelineConfig:
        return self.job.config


def setup(config: PipelineConfig, resources: Resources | None = None, quiet: bool = False) -> TrialSetup:
    """Resolve the device, load tokenizer, data, metric and base model (raises PipelineError on
    bad input, before any run exists). Near instant when `resources` already hold them."""
    timer, started = PhaseTimer(), time.perf_counter()
    resources = resources or Resources()
    if config.eval.lm_eval is not None:
        lmeval.require()  # an optional extra: say how to install it before any run starts
    with timer.phase("load"):
        plan = plan_device(config.model, config.train)
        for line in plan.fallbacks:
            console.warn_once(line)
        tokenizer = resources.tokenizer(config)
        data = resources.data(config)
        gen = config.eval.generation_metric
        metric = load_generation_metric(gen) if gen else None
        base, reused = resources.base_model(config, plan)
    return TrialSetup(TrainInputs(config, plan, tokenizer, data, quiet), base, reused, metric, timer, started)


def run_trial(
    config: PipelineConfig,
    spec: RunSpec | None = None,
    *,
    resources: Resources | None = None,
    on_eval: EvalHook | None = None,
    on_complete: Callable[[tracking.TrackedRun, TrialResult], None] | None = None,
    quiet: bool = False,
) -> TrialResult:
    """`setup` then `fit`: fine-tune a LoRA adapter with `config` in its own MLflow run."""
    return fit(setup(config, resources, quiet), spec or RunSpec(), on_eval, on_complete)


def fit(
    trial: TrialSetup,
    spec: RunSpec,
    on_eval: EvalHook | None = None,
    on_complete: Callable[[tracking.TrackedRun, TrialResult], None] | None = None,
) -> TrialResult:
    """Train in a new MLflow run and return the result.

    `on_eval(event) -> stop?` hears every evaluation (the search's early stopping).
    `on_complete(run, result)` runs inside the run, after the adapter is logged (the retrain
    writes its report and registers the adapter there).
    """
    config, timer = trial.config, trial.timer
    tags = _run_tags(trial, spec)
    name = spec.name or config.tracking.run_name or default_run_name(config, spec.role)
    run_id: str | None = None
    failure: tuple[str, str, float | None] | None = None  # (status, reason, OOM GiB) inside the run
    try:
        with (
            timer.phase("tracking"),
            tracking.start_run(
                config.tracking, name, tags, parent_run_id=spec.parent_run_id, resume_run_id=spec.resume
            ) as run,
            timer.phase("other"),
        ):
            run_id = run.run_id
            try:
                result = _result(
                    run, trial, tags[names.CONFIG_FINGERPRINT], *_train_in_run(run, trial, spec, on_eval)
                )
                if on_complete is not None:
                    with timer.phase("finish"):  # the retrain's report and registration
                        on_complete(run, result)
            except BaseException as e:
                failure = tag_failure(run, e)
                if failure[0] != names.KILLED:  # a killed run continues from its checkpoint
                    discard_checkpoints(config.train, run_id)
                raise
            discard_checkpoints(config.train, run_id)  # only now: a kill before this continues
            with timer.phase("tracking"):
                run.set_tags({names.TRIAL_STATUS: result.status})
                run.log_metrics(timer.metrics(), result.steps, flush=True)
            result.timings = dict(timer.seconds)
            result.wall_seconds = time.perf_counter() - trial.started
    except KeyboardInterrupt as e:
        if run_id is None:
            raise
        raise TrialInterrupted(run_id) from e
    except Exception as e:
        if run_id is None or failure is None:  # the store itself failed: nothing to attribute
            raise
        if isinstance(e, TrialFailed):  # raised inside the run (divergence): it has its reason
            e.run_id, e.status = run_id, failure[0]
            raise
        raise TrialFailed(
            failure[1], run_id, failure[0], traceback_file=names.ERROR_FILE, memory_gb=failure[2]
        ) from e
    return result


def _run_tags(trial: TrialSetup, spec: RunSpec) -> dict[str, Any]:
    """What a trial's run is tagged with when it starts: role, provenance, data, device."""
    config, job = trial.config, trial.job
    return {
        names.ROLE: spec.role,
        names.BASE_MODEL: config.model.name_or_path
        + (f"::{config.model.gguf_file}" if config.model.gguf_file else ""),
        names.DATA_FINGERPRINT: job.data.fingerprint,
        names.EVAL_FINGERPRINT: job.data.eval_fingerprint,
        names.CONFIG_FINGERPRINT: config_fingerprint(config),
        names.GIT_COMMIT: git_commit(Path(__file__).parent),
        names.PACKAGE_VERSIONS: json.dumps(package_versions(), sort_keys=True),
        names.DEVICE: job.plan.name,
        **device_tags(),
        names.PRECISION: job.plan.precision,
        **job.plan.tags(),
        names.PIPELINE_VERSION: __version__,
        **spec.tags,
    }


def _result(
    run: tracking.TrackedRun,
    trial: TrialSetup,
    fingerprint: str,
    outcome: TrainReport,
    final: dict[str, float],
    adapter_dir: Path,
) -> TrialResult:
    data = trial.job.data
    return TrialResult(
        run_id=run.run_id,
        status=names.COMPLETED if outcome.stopped_early_at is None else names.EARLY_STOPPED,
        eval_loss=outcome.eval_loss,
        metrics={k: float(v) for k, v in final.items() if math.isfinite(float(v))},
        steps=outcome.steps,
        max_steps=outcome.max_steps,
        config=trial.config,
        config_fingerprint=fingerprint,
        data_fingerprint=data.fingerprint,
        eval_fingerprint=data.eval_fingerprint,
        adapter_uri=run.artifact_uri(names.ADAPTER_DIR),
        adapter_dir=adapter_dir,
        wall_seconds=time.perf_counter() - trial.started,
        examples_per_step=outcome.examples_per_step,
        evals=outcome.evals,
    )


def _train_in_run(
    run: tracking.TrackedRun, trial: TrialSetup, spec: RunSpec, on_eval: EvalHook | None
) -> tuple[TrainReport, dict[str, float], Path]:
    """Inside the run: log the config, train (from a checkpoint when the run is continued),
    measure, save the adapter. Always detaches LoRA."""
    config, job, timer, base = trial.config, trial.job, trial.timer, trial.base
    if spec.resume is None:  # a continued run logged its inputs the first time
        _log_inputs(run, trial)
    with timer.phase("tracking"):
        plan = checkpoint_plan(
            run, config, job.data, resume=spec.resume is not None, to_store=spec.checkpoint_store
        )
    slot = packing.current()  # in a pack: the adapter goes on this trial's copy of the base
    with timer.phase("lora"):
        tree = slot.tree(base.model) if slot is not None else base.model
        model = attach_lora(tree, config.lora, config.train.seed, lambda: init_batches(job))
    try:
        trainable, total = count_parameters(model)
        stats = job.data.stats
        log.info(
            f"{run.run_id}: {stats.train_examples} train / {stats.eval_examples} eval examples, "
            f"{trainable:,} of {total:,} parameters trainable, {job.plan.describe()}"
        )
        # Evaluations reach the store at once (the UI, whoever decides on them); steps batch.
        sink = timer.wrap("tracking", lambda m, s: run.log_metrics(m, s, flush=names.EVAL_LOSS in m))
        memory = MemoryMonitor()
        with timer.phase("train"):  # training steps and evaluations; the hooks are timed apart
            _, outcome = train(
                model,
                job,
                sink=once_per_step(run.run_id, sink) if plan and plan.resume else sink,
                on_eval=timer.wrap("eval_hook", on_eval) if on_eval is not None else None,
                memory=memory,
                checkpoints=plan,
            )
        if outcome.diverged:
            step, value = outcome.diverged
            raise TrialFailed(f"loss became {value} at step {step} (learning rate too high?)")
        final = {**_final_metrics(trial, outcome, trainable, total), **memory.peaks()}
        _log_example_losses(run, trial, outcome)
        if trial.metric is not None and config.eval.generation_samples and job.data.generation:
            final.update(_generation_scores(run, trial, model))
        if config.eval.lm_eval is not None:
            final.update(lmeval.log_scores(run, model, job, timer))
        # eval_loss and eval_perplexity at the last step were streamed by the callback already.
        streamed = {names.EVAL_LOSS, names.EVAL_PERPLEXITY}
        with timer.phase("tracking"):
            run.log_metrics({k: v for k, v in final.items() if k not in streamed}, outcome.steps, flush=True)
        adapter_dir = _save_adapter(run, trial, model)
    finally:
        if slot is None:  # a pack trial's copy of the base just goes
            base.model = detach_lora(model)
    return outcome, final, adapter_dir


def _log_inputs(run: tracking.TrackedRun, trial: TrialSetup) -> None:
    """The resolved config (as params and as a file), the data's stats and the datasets."""
    config, data = trial.config, trial.job.data
    with trial.timer.phase("tracking"):
        run.log_params(flatten(to_dict(config)))
        run.log_text(to_yaml(config, f"resolved config of run {run.run_id}"), names.CONFIG_FILE)
        run.log_dict(data.stats_dict(), names.DATA_STATS_FILE)
        run.log_datasets(data.splits)  # the train and eval sets as the run's MLflow datasets


def _final_metrics(trial: TrialSetup, outcome: TrainReport, trainable: int, total: int) -> dict[str, float]:
    """The run's summary metrics at its last step."""
    stats = trial.job.data.stats
    return {
        names.EVAL_LOSS: outcome.eval_loss,
        names.EVAL_PERPLEXITY: perplexity(outcome.eval_loss),
        names.TRAIN_LOSS_MEAN: outcome.train_loss,
        names.TRAIN_RUNTIME_S: outcome.step_seconds,
        names.TRAIN_TOKENS: outcome.tokens,
        names.TRAIN_STEPS: outcome.steps,
        names.TRAIN_MAX_STEPS: outcome.max_steps,
        names.TRAIN_EXAMPLES_PER_STEP: outcome.examples_per_step,
        names.TRAIN_TOKENS_PER_SECOND: outcome.tokens_per_second,
        names.TRAINABLE_PARAMS: trainable,
        names.TOTAL_PARAMS: total,
        names.TRAINABLE_PCT: 100.0 * trainable / total,
        names.DATA_TRAIN_EXAMPLES: stats.train_examples,
        names.DATA_EVAL_EXAMPLES: stats.eval_examples,
        names.DATA_TRUNCATED: stats.truncated,
        names.DATA_DROPPED: stats.dropped,
        names.MODEL_LOAD_S: 0.0 if trial.reused else trial.base.load_seconds,
        names.CHECKPOINTS_SAVED: outcome.checkpoints,
        names.CHECKPOINT_SAVE_S: outcome.checkpoint_seconds,
        **({names.BEST_EVAL_STEP: outcome.best_step} if outcome.best_step is not None else {}),
    }


def _save_adapter(run: tracking.TrackedRun, trial: TrialSetup, model: Any) -> Path:
    """Save the adapter locally in adapters/<run id>/adapter/ and log it as the run's artifact."""
    job = trial.job
    with trial.timer.phase("adapter"):
        folder = Path(trial.config.train.output_dir) / names.ADAPTERS_DIR / run.run_id / names.ADAPTER_DIR
        save_adapter(model, job.tokenizer, trial.config.model, job.plan, folder)
        run.log_artifacts(folder, names.ADAPTER_DIR)
    return folder.resolve()


def _log_example_losses(run: tracking.TrackedRun, trial: TrialSetup, outcome: TrainReport) -> None:
    """The final evaluation's loss on each eval example, keyed by example id (see `stats`)."""
    scores = outcome.example_losses
    if scores is None or not any(scores.tokens):
        return
    data = trial.job.data
    record = ExampleScores(
        ids=example_ids(data.eval),
        sums=scores.nll,
        weights=tuple(float(t) for t in scores.tokens),
        fingerprint=data.eval_fingerprint,
        seed=trial.config.train.seed,
        run_id=run.run_id,
    )
    with trial.timer.phase("tracking"):
        run.log_dict(record.to_json(), names.EVAL_EXAMPLES_FILE)


def _generation_scores(run: tracking.TrackedRun, trial: TrialSetup, model: Any) -> dict[str, float]:
    """Answer held-out prompts greedily, score them with the generation metric, log the answers."""
    cfg, job = trial.config.eval, trial.job
    sample = job.data.generation[: cfg.generation_samples]
    with trial.timer.phase("generation"):
        predictions = generate(
            model, job.tokenizer, [s["prompt"] for s in sample], cfg.max_new_tokens, cfg.batch_size
        )
        scores = generation_scores(trial.metric, predictions, [s["reference"] for s in sample])
    with trial.timer.phase("tracking"):
        run.log_dict(
            [{**s, "prediction": p} for s, p in zip(sample, predictions, strict=True)], names.GENERATIONS_FILE
        )
    return scores


def default_run_name(config: PipelineConfig, role: str) -> str:
    """`baseline r=8 a=16 lr=1.0e-03 bs=4`: the role and the config's values of the keys a run name shows."""
    return console.run_name(role, values_at(config, console.SHORT_NAMES))
