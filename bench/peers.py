"""The training setups an ML engineer would pick instead of the pipeline, on the pipeline's own
work: the same base model (loaded fresh for every run), tokenized examples, LoRA config, batch
size, steps, optimizer, schedule, precision and thread count. Only batching and each library's own
defaults differ. Every variant is measured the same way: useful (non-padding) training tokens per
second inside optimizer steps, and the eval loss after training with the pipeline's token-weighted
`metrics.eval_loss` on the same eval set.

Peers:
- `hf_trainer`: transformers `Trainer` + PEFT, `DataCollatorForSeq2Seq` padding each batch to its
  longest example (or to `max_seq_len`, the notebook recipe), random order or `group_by_length`.
- `trl_sft`: TRL's `SFTTrainer` on the same prompt-masked examples (TRL keeps given `labels`, so the
  loss is completion-only like the pipeline's), with its defaults, `packing=True` or
  `padding_free=True`; optionally with gradient checkpointing off.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from pipeline.config import PipelineConfig
from pipeline.data.prepare import IGNORE_INDEX, PreparedData
from pipeline.model.device import DevicePlan
from pipeline.model.load import BaseModel, attach_lora
from pipeline.training.metrics import eval_loss
from pipeline.training.train import TrainInputs, train


@dataclass
class Measured:
    """One training run of one variant."""

    tokens_per_second: float
    eval_loss: float
    tokens: int
    seconds: float


class StepTimer(TrainerCallback):
    """Time inside optimizer steps, measured as the pipeline's callbacks.StreamMetrics measures it."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds += time.perf_counter() - self._t


class CountingCollator:
    """Wraps a collator and counts the real tokens of every batch it builds: the attention mask's
    ones where there is a mask, every position of a flattened (padding-free or packed) batch."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate
        self.tokens = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(features)
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return batch


def _eval(model: Any, config: PipelineConfig, plan: DevicePlan, tok: Any, data: PreparedData) -> float:
    eval_set = sorted(data.eval, key=lambda e: len(e["input_ids"]), reverse=True)
    return eval_loss(model, eval_set, tok, config.eval.batch_size, plan.precision)


def common_args(config: PipelineConfig, plan: DevicePlan, out: str) -> dict[str, Any]:
    """TrainingArguments every peer shares with the pipeline (pipeline.training.train.build_training_args)."""
    t = config.train
    return dict(
        output_dir=out,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",
        seed=t.seed,
        data_seed=t.seed,
        use_cpu=plan.device == "cpu",
        use_liger_kernel=t.use_liger_kernel,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
    )


def _run(trainer: Any, counter: CountingCollator, timer: StepTimer, model: Any, measure) -> Measured:
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    loss = measure(model)
    return Measured(counter.tokens / timer.seconds, loss, counter.tokens, timer.seconds)


def pipeline_run(
    config: PipelineConfig, plan: DevicePlan, tok: Any, data: PreparedData, base: BaseModel
) -> Measured:
    """The pipeline's own training path (`train.train`, as `run_trial` calls it)."""
    model = attach_lora(base.model, config.lora, config.train.seed)
    _, outcome = train(model, TrainInputs(config, plan, tok, data, quiet=True), sink=lambda m, s: None)
    return Measured(outcome.tokens_per_second, outcome.eval_loss, outcome.tokens, outcome.step_seconds)


def hf_trainer(
    config: PipelineConfig,
    plan: DevicePlan,
    tok: Any,
    data: PreparedData,
    base: BaseModel,
    group_by_length: bool = False,
    pad_to_max: bool = False,
) -> Measured:
    """transformers Trainer + PEFT with DataCollatorForSeq2Seq (dynamic padding unless `pad_to_max`)."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model = attach_lora(base.model, config.lora, config.train.seed)
    collate = DataCollatorForSeq2Seq(
        tok,
        padding="max_length" if pad_to_max else True,
        max_length=config.data.max_seq_len if pad_to_max else None,
        label_pad_token_id=IGNORE_INDEX,
    )
    counter, timer = CountingCollator(collate), StepTimer()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            **common_args(config, plan, out),
            train_sampling_strategy="group_by_length" if group_by_length else "random",
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=list(data.train), data_collator=counter, callbacks=[timer]
        )
        return _run(trainer, counter, timer, model, lambda m: _eval(m, config, plan, tok, data))


def trl_sft(
    config: PipelineConfig,
    plan: DevicePlan,
    tok: Any,
    data: PreparedData,
    base: BaseModel,
    mode: str = "defaults",
    checkpointing: bool | None = None,
) -> Measured:
    """TRL's SFTTrainer on the pipeline's tokenized, prompt-masked examples.

    `mode`: `defaults`, `packing` or `padding_free`. `checkpointing`: None keeps SFTConfig's
    default (gradient checkpointing on in TRL 1.x)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    extra: dict[str, Any] = {"max_length": config.data.max_seq_len}
    if mode == "packing":
        extra["packing"] = True
    elif mode == "padding_free":
        # Without packing, TRL refuses padding_free unless nothing is truncated on the fly; the
        # examples are already cut to max_seq_len.
        extra.update(padding_free=True, max_length=None)
    elif mode != "defaults":
        raise ValueError(f"unknown TRL mode {mode!r}")
    if checkpointing is not None:
        extra["gradient_checkpointing"] = checkpointing
    model = attach_lora(base.model, config.lora, config.train.seed)
    dataset = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in data.train])
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(**common_args(config, plan, out), dataset_text_field="text", **extra)
        timer = StepTimer()
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tok, callbacks=[timer]
        )
        counter = CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
        return _run(trainer, counter, timer, model, lambda m: _eval(m, config, plan, tok, data))
