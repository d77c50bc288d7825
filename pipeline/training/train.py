"""Training: the Hugging Face Trainer driven by our config, with the callbacks of `callbacks.py`.

Every logging step's metrics (``train_loss``, ``learning_rate``, ``tokens_per_second``, memory
peaks) and every evaluation's ``eval_loss`` go to a sink (the tracking layer); a non-finite loss
stops training; an optional ``on_eval`` hook (the search's early stopping) hears every evaluation
as an `EvalEvent` and answers whether to stop.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from pipeline.config import EvalConfig, PipelineConfig, TrainConfig
from pipeline.core.events import EvalHook
from pipeline.data.collate import (
    LabelPositions,
    TokenDataset,
    build_collator,
    completion_loss,
    takes_position_mask,
)
from pipeline.data.prepare import PreparedData
from pipeline.model.device import DevicePlan
from pipeline.model.variants import EVA_BATCHES, loraplus_optimizer
from pipeline.training import packing
from pipeline.training.callbacks import (
    AskToStop,
    KeepBest,
    MetricSink,
    PeriodicEval,
    StepBar,
    StopOnDivergence,
    StopOnRequest,
    StreamMetrics,
)
from pipeline.training.checkpoint import Checkpointer, Plan, ResumableTrainer, best_weights, restore
from pipeline.training.metrics import EvalLosses, MemoryMonitor, eval_losses


def checkpointing_name(fields: Any) -> str:
    """TrainingArguments' name for gradient checkpointing: `activation_checkpointing` since
    transformers 5.20 (the old name is a deprecated alias there), `gradient_checkpointing` before
    (5.17, the borrowed GPU machine's image, has only that one)."""
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


CHECKPOINTING = checkpointing_name(TrainingArguments.__dataclass_fields__)


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
        use_liger_kernel=train.use_liger_kernel,
        **{
            CHECKPOINTING: train.gradient_checkpointing,
            # Explicit: torch warns without it (and means to refuse); non-reentrant is the
            # recommended variant and works with frozen inputs.
            f"{CHECKPOINTING}_kwargs": {"use_reentrant": False} if train.gradient_checkpointing else None,
        },
        logging_strategy="steps",
        logging_steps=train.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN loss must reach the callback, not be averaged away
        eval_strategy="no",  # we evaluate in callbacks.PeriodicEval: token-weighted, see metrics.eval_loss
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


@dataclass(frozen=True)
class TrainInputs:
    """What training needs besides the model: the config, where it runs, tokenizer and data."""

    config: PipelineConfig
    plan: DevicePlan
    tokenizer: Any
    data: PreparedData
    quiet: bool = False


@dataclass
class TrainReport:
    """What training did (the trainer itself is returned alongside)."""

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
    checkpoints: int = 0  # checkpoints sealed by this process
    checkpoint_seconds: float = 0.0  # spent saving them


@dataclass
class Callbacks:
    """The callbacks one training run composes (each one job, see `callbacks.py`)."""

    stream: StreamMetrics
    evaluation: PeriodicEval
    divergence: StopOnDivergence
    best: KeepBest
    ask: AskToStop | None
    checkpointer: Checkpointer | None = None

    @classmethod
    def build(
        cls,
        job: TrainInputs,
        sink: MetricSink,
        on_eval: EvalHook | None,
        memory: MemoryMonitor,
        per_step: int,
        checkpoints: Plan | None = None,
    ) -> Callbacks:
        train_cfg, eval_cfg, plan = job.config.train, job.config.eval, job.plan

        def evaluate(model: Any) -> EvalLosses:
            return eval_losses(model, job.data.eval, job.tokenizer, eval_cfg.batch_size, plan.precision)

        stream, divergence = StreamMetrics(sink, memory), StopOnDivergence()
        best = KeepBest(
            train_cfg.early_stopping_patience, train_cfg.early_stopping_min_delta, train_cfg.restore_best
        )
        ask = AskToStop(on_eval) if on_eval is not None else None
        # The order listeners hear an evaluation: streamed, then a divergence ends it, then the
        # plateau rule, then the search, then a checkpoint (unless one of them ended the run).
        listeners = [stream, divergence, best, *([ask] if ask else [])]
        evaluation = PeriodicEval(
            evaluate, train_cfg.eval_steps, listeners, at_start=eval_cfg.at_start, examples_per_step=per_step
        )
        checkpointer = None
        if checkpoints is not None:
            parts = {"stream": stream, "evaluation": evaluation, "best": best}
            checkpointer = Checkpointer(checkpoints, parts, best_weights=lambda: best.weights)
            evaluation.listeners.append(checkpointer)
        return cls(stream, evaluation, divergence, best, ask, checkpointer)

    def for_trainer(self) -> list[Any]:
        """In the order the Trainer calls them at each event: a requested stop first."""
        extra = [self.checkpointer] if self.checkpointer is not None else []
        return [StopOnRequest(), self.stream, self.evaluation, self.divergence, *extra]

    def resume(self, trainer: ResumableTrainer) -> str | None:
        """Bind the checkpointer to the trainer; on a resume, put the callbacks' state back and
        say which checkpoint folder the Trainer continues from."""
        cp = self.checkpointer
        if cp is None:
            return None
        trainer.checkpointer, cp.trainer = cp, trainer
        resume = cp.plan.resume
        if resume is None:
            return None
        restore(resume, cp.parts)
        self.best.weights = best_weights(resume)
        return str(resume.path)


def train(
    model: Any,
    job: TrainInputs,
    sink: MetricSink,
    on_eval: EvalHook | None = None,
    memory: MemoryMonitor | None = None,
    checkpoints: Plan | None = None,
) -> tuple[Trainer, TrainReport]:
    """Train the LoRA model, evaluate at the end, and report what happened. With `checkpoints`,
    a resumable checkpoint is saved at every evaluation, and `checkpoints.resume` (if any) is
    where training continues from."""
    args = _training_args(model, job, checkpoints)
    per_step = examples_per_optimizer_step(args)
    callbacks = Callbacks.build(job, sink, on_eval, memory or MemoryMonitor(), per_step, checkpoints)
    trainer = _trainer(model, job, args, callbacks.for_trainer())
    slot = packing.current()  # in a pack: forwards and backwards shared with the other trials
    with slot.training_with(trainer) if slot is not None else contextlib.nullcontext():
        result = trainer.train(resume_from_checkpoint=callbacks.resume(trainer))
    return trainer, _report(model, trainer, float(result.training_loss), callbacks, per_step)


def init_batches(job: TrainInputs, n: int = EVA_BATCHES) -> list[dict[str, Any]]:
    """The first `n` training batches (input ids and attention mask, padded), for the adapter
    inits that read data (EVA)."""
    tokenizer, size = job.tokenizer, job.config.train.batch_size
    rows = [{"input_ids": e["input_ids"]} for e in job.data.train[: n * size]]
    return [dict(tokenizer.pad(rows[i : i + size], return_tensors="pt")) for i in range(0, len(rows), size)]


def _training_args(model: Any, job: TrainInputs, checkpoints: Plan | None) -> TrainingArguments:
    train_cfg, plan = job.config.train, job.plan
    # The Trainer writes its checkpoints into output_dir: the run's own checkpoint folder.
    out = str(checkpoints.folder) if checkpoints is not None else train_cfg.output_dir
    args = pin_to_plan(build_training_args(train_cfg, job.config.eval, plan, out, job.quiet), plan)
    if getattr(args, CHECKPOINTING) and getattr(model, f"is_{CHECKPOINTING}", False):
        # Already on (the 4-bit path enables it while preparing the base): enabling it a second
        # time would wrap the layers again.
        setattr(args, CHECKPOINTING, False)
    return args


def _trainer(model: Any, job: TrainInputs, args: TrainingArguments, callbacks: list[Any]) -> ResumableTrainer:
    """The Hugging Face Trainer with our collator, loss and callbacks, and our console."""
    train_cfg, plan, tokenizer = job.config.train, job.plan, job.tokenizer
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
    ratio = train_cfg.loraplus_lr_ratio
    trainer = ResumableTrainer(
        model=model,
        args=args,
        optimizers=(loraplus_optimizer(model, args, ratio) if ratio is not None else None, None),
        train_dataset=TokenDataset(job.data.train),
        data_collator=LabelPositions(collate) if response_only else collate,
        compute_loss_func=completion_loss if response_only else None,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    # The tracking store has every value: no log dicts printed between the bars, and no bars at
    # all with --quiet.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if not job.quiet:
        trainer.add_callback(StepBar())
    return trainer


def _report(model: Any, trainer: Trainer, train_loss: float, cb: Callbacks, per_step: int) -> TrainReport:
    """The final evaluation (unless the last step evaluated), the best weights put back with
    `restore_best`, and what training did."""
    state, evals, cp = trainer.state, cb.evaluation.evals, cb.checkpointer
    step = state.global_step
    if cb.divergence.diverged is not None:
        final_loss = float("nan")
    elif evals and evals[-1][0] == step:
        final_loss = evals[-1][1]
    else:
        final_loss = cb.evaluation.run(model, step, state.max_steps)
    restored = (
        cb.best.restore(model, evals[-1][0] if evals else None) if cb.divergence.diverged is None else None
    )
    if restored is not None:
        # The final model is the best evaluation's: its loss is the run's eval_loss from here on.
        final_loss = restored[1]
        cb.stream.stream_eval(final_loss, step)
    tokens, seconds = int(state.num_input_tokens_seen), cb.stream.step_seconds
    return TrainReport(
        steps=step,
        max_steps=state.max_steps,
        train_loss=train_loss,
        eval_loss=final_loss,
        eval_seconds=cb.evaluation.eval_seconds,
        step_seconds=seconds,
        tokens=tokens,
        tokens_per_second=tokens / seconds if seconds else 0.0,
        stopped_early_at=cb.ask.stopped_at if cb.ask else None,
        diverged=cb.divergence.diverged,
        evals=evals,
        examples_per_step=per_step,
        best_step=cb.best.best[0] if cb.best.best else None,
        plateau_at=cb.best.plateau_at,
        restored=restored is not None,
        example_losses=cb.best.best_scores if restored is not None else cb.evaluation.last_scores,
        checkpoints=len(cp.saved) if cp is not None else 0,
        checkpoint_seconds=cp.save_seconds if cp is not None else 0.0,
    )
