"""`run_trial(config) -> TrialResult`: one LoRA fine-tune, fully tracked. Baseline, every search
trial and retrain go through here.

Order: device plan -> tokenizer -> data -> base model (all of which can fail on bad input before
any run exists) -> MLflow run -> LoRA -> train -> metrics -> adapter artifact.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import __version__, names, tracking
from pipeline.config import PipelineConfig, config_fingerprint, fingerprint, flatten, to_dict, to_yaml
from pipeline.data import PreparedData, prepare_data
from pipeline.errors import TrialFailed
from pipeline.metrics import MemoryMonitor, generate, generation_scores, load_generation_metric, perplexity
from pipeline.model import (
    BaseModel,
    DevicePlan,
    attach_lora,
    count_parameters,
    detach_lora,
    load_base_model,
    load_tokenizer,
    plan_device,
)
from pipeline.provenance import git_commit, package_versions
from pipeline.timing import PhaseTimer
from pipeline.train import EvalHook, TrainOutcome, train

log = logging.getLogger("pipeline")


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
    adapter_uri: str
    wall_seconds: float
    evals: list[tuple[int, float]] = field(default_factory=list)
    # Exclusive seconds per phase (load, tracking, lora, train, eval_hook, generation, adapter,
    # finish, other), also logged as `time_<phase>_s`; the run's end is not in them.
    timings: dict[str, float] = field(default_factory=dict)


class Resources:
    """What consecutive trials can share: tokenizer, prepared data and the loaded base model.

    The search keeps one of these for all its trials, so the (possibly 4-bit) base model is loaded
    once and only the LoRA adapter changes between trials.
    """

    def __init__(self) -> None:
        self._tokenizers: dict[str, Any] = {}
        self._data: dict[str, PreparedData] = {}
        self._base: tuple[str, BaseModel] | None = None

    def tokenizer(self, config: PipelineConfig) -> Any:
        key = fingerprint(config.model.model_dump())
        if key not in self._tokenizers:
            self._tokenizers[key] = load_tokenizer(config.model)
        return self._tokenizers[key]

    def data(self, config: PipelineConfig) -> PreparedData:
        key = fingerprint([config.model.model_dump(), config.data.model_dump()])
        if key not in self._data:
            self._data[key] = prepare_data(config.data, self.tokenizer(config))
        return self._data[key]

    def base_model(self, config: PipelineConfig, plan: DevicePlan) -> tuple[BaseModel, bool]:
        """The base model and whether it was reused from an earlier trial."""
        key = fingerprint([config.model.model_dump(), plan.dtype, config.train.gradient_checkpointing])
        if self._base is not None and self._base[0] == key:
            return self._base[1], True
        self._base = None  # free the old base before loading another
        base = load_base_model(config.model, plan, config.train.gradient_checkpointing)
        self._base = (key, base)
        return base, False


def default_run_name(config: PipelineConfig, role: str) -> str:
    lora, tr = config.lora, config.train
    return f"{role} r={lora.r} a={lora.alpha:g} lr={tr.learning_rate:.1e} bs={tr.batch_size}"


def base_reference(config: PipelineConfig, plan: DevicePlan) -> dict[str, Any]:
    """What a loader needs to rebuild the base model under the adapter."""
    m = config.model
    local = Path(m.name_or_path).expanduser()
    return {
        "name_or_path": m.name_or_path,
        "resolved_path": str(local.resolve())
        if not m.name_or_path.startswith("pkg:") and local.exists()
        else None,
        "gguf_file": m.gguf_file,
        "revision": m.revision,
        "dtype": plan.dtype,
        "load_in_4bit": m.load_in_4bit,
        "quant_type": m.quant_type,
        "double_quant": m.double_quant,
        "trust_remote_code": m.trust_remote_code,
    }


def run_trial(
    config: PipelineConfig,
    *,
    role: str = names.ROLE_BASELINE,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    resources: Resources | None = None,
    on_eval: EvalHook | None = None,
    quiet: bool = False,
    on_complete: Callable[[tracking.TrackedRun, TrialResult], None] | None = None,
) -> TrialResult:
    """Fine-tune a LoRA adapter with `config` in its own MLflow run and return the result.

    `on_complete(run, result)` runs inside the run, after the adapter is logged (the retrain
    writes its report and registers the adapter there). Raises PipelineError on bad input (before the run starts where possible) and TrialFailed when
    the loss becomes NaN/inf; in both cases any run started here ends FAILED with its reason.
    """
    t0 = time.perf_counter()
    timer = PhaseTimer()
    resources = resources or Resources()
    with timer.phase("load"):  # near zero when the search's Resources already hold it all
        plan = plan_device(config.model, config.train)
        tokenizer = resources.tokenizer(config)
        data = resources.data(config)
        metric = (
            load_generation_metric(config.eval.generation_metric) if config.eval.generation_metric else None
        )
        base, reused = resources.base_model(config, plan)
    cfg_fp = config_fingerprint(config)

    run_tags = {
        names.ROLE: role,
        names.BASE_MODEL: config.model.name_or_path
        + (f"::{config.model.gguf_file}" if config.model.gguf_file else ""),
        names.DATA_FINGERPRINT: data.fingerprint,
        names.EVAL_FINGERPRINT: data.eval_fingerprint,
        names.CONFIG_FINGERPRINT: cfg_fp,
        names.GIT_COMMIT: git_commit(Path(__file__).parent),
        names.PACKAGE_VERSIONS: json.dumps(package_versions(), sort_keys=True),
        names.DEVICE: plan.name,
        names.PRECISION: plan.precision,
        names.PIPELINE_VERSION: __version__,
        **(tags or {}),
    }
    name = run_name or config.tracking.run_name or default_run_name(config, role)
    run = None
    try:
        with (
            timer.phase("tracking"),
            tracking.start_run(config.tracking, name, run_tags, parent_run_id=parent_run_id) as run,
            timer.phase("other"),
        ):
            status, outcome, final = _train_in_run(
                run, config, base, tokenizer, data, metric, plan, reused, name, on_eval, quiet, timer
            )
            result = TrialResult(
                run_id=run.run_id,
                status=status,
                eval_loss=outcome.eval_loss,
                metrics={k: float(v) for k, v in final.items() if math.isfinite(float(v))},
                steps=outcome.steps,
                max_steps=outcome.max_steps,
                config=config,
                config_fingerprint=cfg_fp,
                data_fingerprint=data.fingerprint,
                eval_fingerprint=data.eval_fingerprint,
                adapter_uri=run.artifact_uri(names.ADAPTER_DIR),
                wall_seconds=time.perf_counter() - t0,
                evals=outcome.evals,
            )
            if on_complete is not None:
                with timer.phase("finish"):  # the retrain's report and registration
                    on_complete(run, result)
            with timer.phase("tracking"):
                run.log_metrics(timer.metrics(), outcome.steps, flush=True)
            result.timings = dict(timer.seconds)
    except BaseException as e:  # KeyboardInterrupt too: the search tags the killed run
        if run is not None:
            e.run_id = run.run_id  # the caller (the search) records which run failed
        raise
    return result


def _train_in_run(
    run: tracking.TrackedRun,
    config: PipelineConfig,
    base: BaseModel,
    tokenizer: Any,
    data: PreparedData,
    metric: Any,
    plan: DevicePlan,
    reused: bool,
    name: str,
    on_eval: EvalHook | None,
    quiet: bool,
    timer: PhaseTimer,
) -> tuple[str, TrainOutcome, dict[str, float]]:
    """Inside the run: log the config, train, measure, save the adapter. Always detaches LoRA."""
    with timer.phase("tracking"):
        run.log_params(flatten(to_dict(config)))
        run.log_text(to_yaml(config, f"resolved config of run {run.run_id}"), names.CONFIG_FILE)
        run.log_dict(data.stats_dict(), names.DATA_STATS_FILE)
    with timer.phase("lora"):
        model = attach_lora(base.model, config.lora, config.train.seed)
    try:
        trainable, total = count_parameters(model)
        log.info(
            "%s: %d train / %d eval examples, %s of %s parameters trainable, %s on %s",
            name,
            data.stats.train_examples,
            data.stats.eval_examples,
            f"{trainable:,}",
            f"{total:,}",
            plan.precision,
            plan.name,
        )
        memory = MemoryMonitor()
        with timer.phase("train"):  # training steps and evaluations; the hooks are timed apart
            _, outcome = train(
                model,
                tokenizer,
                data,
                config.train,
                config.eval,
                config.data.max_seq_len,
                plan,
                sink=timer.wrap("tracking", run.log_metrics),
                on_eval=timer.wrap("eval_hook", on_eval) if on_eval is not None else None,
                quiet=quiet,
                memory=memory,
            )
        if outcome.diverged:
            step, value = outcome.diverged
            raise TrialFailed(f"loss became {value} at step {step} (learning rate too high?)")

        final: dict[str, float] = {
            names.EVAL_LOSS: outcome.eval_loss,
            names.EVAL_PERPLEXITY: perplexity(outcome.eval_loss),
            names.TRAIN_LOSS_MEAN: outcome.train_loss,
            names.TRAIN_RUNTIME_S: outcome.step_seconds,
            names.TRAIN_TOKENS: outcome.tokens,
            names.TRAIN_STEPS: outcome.steps,
            names.TRAIN_TOKENS_PER_SECOND: outcome.tokens_per_second,
            names.TRAINABLE_PARAMS: trainable,
            names.TOTAL_PARAMS: total,
            names.TRAINABLE_PCT: 100.0 * trainable / total,
            names.DATA_TRAIN_EXAMPLES: data.stats.train_examples,
            names.DATA_EVAL_EXAMPLES: data.stats.eval_examples,
            names.DATA_TRUNCATED: data.stats.truncated,
            names.DATA_DROPPED: data.stats.dropped,
            names.MODEL_LOAD_S: 0.0 if reused else base.load_seconds,
            **({names.BEST_EVAL_STEP: outcome.best_step} if outcome.best_step is not None else {}),
            **memory.peaks(),
        }
        if metric is not None and config.eval.generation_samples and data.generation:
            sample = data.generation[: config.eval.generation_samples]
            with timer.phase("generation"):
                predictions = generate(
                    model,
                    tokenizer,
                    [s["prompt"] for s in sample],
                    config.eval.max_new_tokens,
                    config.eval.batch_size,
                )
                final.update(generation_scores(metric, predictions, [s["reference"] for s in sample]))
            with timer.phase("tracking"):
                run.log_dict(
                    [{**s, "prediction": p} for s, p in zip(sample, predictions, strict=True)],
                    names.GENERATIONS_FILE,
                )
        # eval_loss and eval_perplexity at the last step were streamed by the callback already.
        streamed = {names.EVAL_LOSS, names.EVAL_PERPLEXITY}
        with timer.phase("tracking"):
            run.log_metrics({k: v for k, v in final.items() if k not in streamed}, outcome.steps, flush=True)

        with timer.phase("adapter"), tempfile.TemporaryDirectory() as tmp:
            adapter_dir = Path(tmp) / names.ADAPTER_DIR
            model.save_pretrained(adapter_dir)
            tokenizer.save_pretrained(adapter_dir)
            (adapter_dir / names.BASE_REFERENCE_FILE).write_text(
                json.dumps(base_reference(config, plan), indent=2)
            )
            run.log_artifacts(adapter_dir, names.ADAPTER_DIR)
    finally:
        base.model = detach_lora(model)
    status = "early_stopped" if outcome.stopped_early_at is not None else "completed"
    return status, outcome, final
