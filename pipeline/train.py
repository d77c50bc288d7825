"""Training: the Hugging Face Trainer driven by our config, with a callback that streams metrics.

The callback hands every logging step's metrics (``train_loss``, ``learning_rate``,
``tokens_per_second``, memory peaks) and every evaluation's ``eval_loss`` to a sink (the tracking
layer), stops training on a non-finite loss, and asks an optional ``on_eval`` hook whether to stop
(the search's early stopping).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from pipeline import names
from pipeline.batching import (
    LabelPositions,
    TokenDataset,
    build_collator,
    completion_loss,
    takes_position_mask,
)
from pipeline.config import EvalConfig, PipelineConfig, TrainConfig
from pipeline.data import PreparedData
from pipeline.device import DevicePlan
from pipeline.interrupt import STOP_REQUESTED
from pipeline.metrics import EvalLosses, MemoryMonitor, eval_losses, perplexity

MetricSink = Callable[[dict[str, float], int], None]

# (step, training examples seen, eval_loss) -> stop? The search compares trials at one or the
# other: at step 50 a batch-16 trial has seen four times a batch-4 trial's data.
EvalHook = Callable[[int, int, float], bool]
Evaluator = Callable[[Any], EvalLosses]  # model -> eval loss, overall and per example


def build_training_args(
    train: TrainConfig, eval_cfg: EvalConfig, plan: DevicePlan, output_dir: str, quiet: bool = False
) -> TrainingArguments:
    """TrainingArguments from our train and eval sections."""
    return TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.scheduler,
        lr_scheduler_kwargs={"min_lr_rate": 0.1} if train.scheduler == "cosine_with_min_lr" else None,
        warmup_steps=train.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=plan.optimizer,  # what runs on this device (a paged optimizer is unpaged on CPU)
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",
        activation_checkpointing=train.gradient_checkpointing,
        use_liger_kernel=train.use_liger_kernel,
        # Explicit: torch warns without it (and means to refuse); non-reentrant is the recommended
        # variant and works with frozen inputs.
        activation_checkpointing_kwargs={"use_reentrant": False} if train.gradient_checkpointing else None,
        logging_strategy="steps",
        logging_steps=train.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN loss must reach the callback, not be averaged away
        eval_strategy="no",  # we evaluate in StreamingCallback: token-weighted, see metrics.eval_loss
        save_strategy="no",
        report_to="none",  # we track ourselves: one run per trial, batched
        seed=train.seed,
        data_seed=train.seed,
        use_cpu=plan.device == "cpu",
        disable_tqdm=quiet,
        log_level="error" if quiet else "warning",
        train_sampling_strategy="group_by_length" if train.batching == "length_grouped" else "random",
        # A padding-free batch has no padding and no attention mask: every position is a token
        # (counting "not the pad id" would drop real EOS tokens where pad == eos).
        include_num_input_tokens_seen="all" if train.batching == "padding_free" else "non_padding",
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_pin_memory=plan.device == "cuda",
    )


def pin_to_plan(args: TrainingArguments, plan: DevicePlan) -> TrainingArguments:
    """No DataParallel over more GPUs than the plan gives the trial (transformers wraps a model in
    it whenever it sees several); `_n_gpu` is the attribute its `n_gpu` reads (transformers 5)."""
    if plan.device == "cuda" and args.n_gpu > plan.gpus:
        args._n_gpu = plan.gpus
    return args


def examples_per_optimizer_step(args: TrainingArguments) -> int:
    """Training examples one optimizer step consumes: the unit of progression across trials."""
    return int(args.train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size))


class StreamingCallback(TrainerCallback):
    """Streams metrics to a sink, evaluates every `eval_steps`, watches for divergence and for
    early-stopping requests."""

    def __init__(
        self,
        sink: MetricSink,
        memory: MemoryMonitor,
        evaluate: Evaluator | None = None,
        eval_steps: int | None = None,
        at_start: bool = False,
        on_eval: EvalHook | None = None,
        patience: int | None = None,
        min_delta: float = 0.0,
        restore_best: bool = False,
        examples_per_step: int = 1,
    ):
        self.sink = sink
        self.examples_per_step = examples_per_step
        self.memory = memory
        self.evaluate = evaluate
        self.eval_steps = eval_steps
        self.at_start = at_start
        self.on_eval = on_eval
        self.step_seconds = 0.0  # time inside optimizer steps (excludes eval and logging)
        self.eval_seconds = 0.0
        self._window_seconds = 0.0
        self._window_tokens = 0
        self._step_start = 0.0
        self.diverged: tuple[int, float] | None = None
        self.stopped_early_at: int | None = None
        self.evals: list[tuple[int, float]] = []
        self.patience = patience
        self.min_delta = min_delta
        self.restore_best = restore_best
        self.best: tuple[int, float] | None = None  # (step, eval_loss): the lowest eval_loss
        # Per-example losses of the last evaluation and of the best (what restore_best keeps).
        self.last_scores: EvalLosses | None = None
        self.best_scores: EvalLosses | None = None
        self._reference: float | None = None  # the loss later evaluations must beat by min_delta
        self._best_weights: dict[str, Any] | None = None
        self._bad_evals = 0
        self.plateau_at: int | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.memory.start()
        if self.at_start and self.evaluate is not None:
            self.run_eval(model, state, control)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if STOP_REQUESTED.is_set():
            raise KeyboardInterrupt(f"stop requested at step {state.global_step}")
        dt = time.perf_counter() - self._step_start
        self.step_seconds += dt
        self._window_seconds += dt
        self.memory.sample()
        if self.evaluate is not None and self.eval_steps and state.global_step % self.eval_steps == 0:
            self.run_eval(model, state, control)

    def run_eval(self, model, state, control=None, final: bool = False) -> float:
        """Evaluate now, stream the result, stop on NaN or when the early-stopping hook says so."""
        t0 = time.perf_counter()
        self.last_scores = self.evaluate(model)
        loss = float(self.last_scores.loss)
        self.eval_seconds += time.perf_counter() - t0
        step = state.global_step
        self.evals.append((step, loss))
        self.sink({names.EVAL_LOSS: loss, names.EVAL_PERPLEXITY: perplexity(loss)}, step)
        if control is None:
            return loss
        if not math.isfinite(loss):
            self.diverged = (step, loss)
            control.should_training_stop = True
            return loss
        self._track_best(model, step, loss, control)
        examples = step * self.examples_per_step
        if (
            not final
            and self.on_eval is not None
            and step < state.max_steps
            and self.on_eval(step, examples, loss)
        ):
            self.stopped_early_at = step
            control.should_training_stop = True
        return loss

    def _track_best(self, model, step: int, loss: float, control) -> None:
        """Remember the best evaluation (and its adapter weights); stop on a plateau.

        As in HF's EarlyStoppingCallback, patience counts evaluations that do not beat the last
        counted improvement by `min_delta`; the weights kept are those of the lowest eval_loss.
        """
        if self.best is None or loss < self.best[1]:
            self.best = (step, loss)
            self.best_scores = self.last_scores
            if self.restore_best and model is not None:
                # Only the trainable (adapter) weights change: a few MB even for large models.
                self._best_weights = {
                    n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
                }
        if self._reference is None or loss < self._reference - self.min_delta:
            self._reference = loss
            self._bad_evals = 0
        else:
            self._bad_evals += 1
            if self.patience and self._bad_evals >= self.patience:
                self.plateau_at = step
                control.should_training_stop = True

    def restore(self, model) -> tuple[int, float] | None:
        """Put the best evaluation's adapter weights back; returns (step, loss) of that evaluation."""
        if not (self.restore_best and self._best_weights and self.best and self.evals):
            return None
        if self.best[0] == self.evals[-1][0]:
            return None  # the last evaluation is the best: nothing to restore
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self._best_weights.items():
                params[name].copy_(value)
        return self.best

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:
            return  # the end-of-training summary is not a step
        step = state.global_step
        loss = float(logs["loss"])
        metrics = {names.TRAIN_LOSS: loss, names.EPOCH: float(state.epoch or 0)}
        for key, name in (("learning_rate", names.LEARNING_RATE), ("grad_norm", names.GRAD_NORM)):
            if key in logs:
                metrics[name] = float(logs[key])
        tokens = int(state.num_input_tokens_seen)
        if self._window_seconds > 0 and tokens > self._window_tokens:
            metrics[names.TOKENS_PER_SECOND] = (tokens - self._window_tokens) / self._window_seconds
        self._window_tokens, self._window_seconds = tokens, 0.0
        metrics.update(self.memory.peaks())
        self.sink(metrics, step)
        if not math.isfinite(loss):
            self.diverged = (step, loss)
            control.should_training_stop = True


class _StepBar(ProgressCallback):
    """The Trainer's step bar without the log dicts it prints between updates."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return


@dataclass(frozen=True)
class TrainJob:
    """What training needs besides the model: the config, where it runs, tokenizer and data."""

    config: PipelineConfig
    plan: DevicePlan
    tokenizer: Any
    data: PreparedData
    quiet: bool = False


@dataclass
class TrainOutcome:
    """What training produced (the trainer itself is returned alongside)."""

    steps: int
    max_steps: int
    train_loss: float
    eval_loss: float
    eval_seconds: float
    step_seconds: float
    tokens: int
    tokens_per_second: float
    stopped_early_at: int | None
    diverged: tuple[int, float] | None
    evals: list[tuple[int, float]]
    examples_per_step: int  # examples one optimizer step consumes (batch x accumulation x devices)
    best_step: int | None = None
    plateau_at: int | None = None
    restored: bool = False
    example_losses: EvalLosses | None = None  # of the evaluation whose loss is `eval_loss`


def train(
    model: Any,
    job: TrainJob,
    sink: MetricSink,
    on_eval: EvalHook | None = None,
    memory: MemoryMonitor | None = None,
) -> tuple[Trainer, TrainOutcome]:
    """Train the LoRA model, evaluate at the end, and report what happened."""
    train_cfg, eval_cfg, plan, tokenizer = job.config.train, job.config.eval, job.plan, job.tokenizer
    args = pin_to_plan(build_training_args(train_cfg, eval_cfg, plan, train_cfg.output_dir, job.quiet), plan)
    if args.activation_checkpointing and getattr(model, "is_activation_checkpointing", False):
        # Already on (the 4-bit path enables it while preparing the base): enabling it a second
        # time would wrap the layers again.
        args.activation_checkpointing = False

    def evaluate(m: Any) -> EvalLosses:
        return eval_losses(m, job.data.eval, tokenizer, eval_cfg.batch_size, plan.precision)

    examples_per_step = examples_per_optimizer_step(args)

    callback = StreamingCallback(
        sink,
        memory or MemoryMonitor(),
        evaluate,
        train_cfg.eval_steps,
        eval_cfg.at_start,
        on_eval,
        patience=train_cfg.early_stopping_patience,
        min_delta=train_cfg.early_stopping_min_delta,
        restore_best=train_cfg.restore_best,
        examples_per_step=examples_per_step,
    )
    collate = build_collator(
        train_cfg.batching,
        tokenizer,
        job.config.data.max_seq_len,
        pad_to_multiple_of=8 if plan.device == "cuda" else None,
        flash_attention=(job.config.model.attn_implementation or "").startswith("flash_attention"),
    )
    # Logits only where the loss reads them (the response): not with Liger, whose fused
    # linear + cross-entropy never materializes logits in the first place.
    response_only = not (train_cfg.prompt_logits or train_cfg.use_liger_kernel) and takes_position_mask(model)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=TokenDataset(job.data.train),
        data_collator=LabelPositions(collate) if response_only else collate,
        compute_loss_func=completion_loss if response_only else None,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    # The tracking store has every value: no log dicts printed between the bars, and no bars at
    # all with --quiet.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if not job.quiet:
        trainer.add_callback(_StepBar())
    result = trainer.train()
    step = trainer.state.global_step
    if callback.diverged is not None:
        final_loss = float("nan")
    elif callback.evals and callback.evals[-1][0] == step:
        final_loss = callback.evals[-1][1]
    else:
        final_loss = callback.run_eval(model, trainer.state, final=True)
    restored = callback.restore(model) if callback.diverged is None else None
    if restored is not None:
        # The final model is the best evaluation's: its loss is the run's eval_loss from here on.
        final_loss = restored[1]
        sink({names.EVAL_LOSS: final_loss, names.EVAL_PERPLEXITY: perplexity(final_loss)}, step)
    tokens = int(trainer.state.num_input_tokens_seen)
    outcome = TrainOutcome(
        steps=step,
        max_steps=trainer.state.max_steps,
        train_loss=float(result.training_loss),
        eval_loss=final_loss,
        eval_seconds=callback.eval_seconds,
        step_seconds=callback.step_seconds,
        tokens=tokens,
        tokens_per_second=tokens / callback.step_seconds if callback.step_seconds else 0.0,
        stopped_early_at=callback.stopped_early_at,
        diverged=callback.diverged,
        evals=callback.evals,
        examples_per_step=examples_per_step,
        best_step=callback.best[0] if callback.best else None,
        plateau_at=callback.plateau_at,
        restored=restored is not None,
        example_losses=callback.best_scores if restored is not None else callback.last_scores,
    )
    return trainer, outcome
