"""Training throughput of the pipeline against a plain HF Trainer + PEFT script that pads every
batch to max_seq_len (the usual notebook recipe). Same model, data, LoRA config, batch size and
number of steps; only batching differs. Prints useful (non-padding) training tokens per second of
each, and the ratios last.

    python bench/throughput.py                                   # demo model, 60 steps
    python bench/throughput.py --config configs/smollm2-cpu.yaml --steps 8 --batch-size 4
    python bench/throughput.py --set model.load_in_4bit=true     # QLoRA: the base in 4-bit NF4
    python bench/throughput.py --steps 5 --quiet                 # the CI smoke size

Each variant trains `--repeats` times (fresh adapter, same seed); the median is reported.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import TrainerCallback

from pipeline.config import load_config, with_overrides
from pipeline.data import prepare_data
from pipeline.model import attach_lora, detach_lora, load_base_model, load_tokenizer, plan_device
from pipeline.train import TrainJob, train


def pipeline_tokens_per_second(config, plan, tok, data, base) -> float:
    """The pipeline's own training path (train.train), as run_trial uses it."""
    model = attach_lora(base.model, config.lora, config.train.seed)
    try:
        _, outcome = train(model, TrainJob(config, plan, tok, data, quiet=True), sink=lambda m, s: None)
    finally:
        base.model = detach_lora(model)
    return outcome.tokens / outcome.step_seconds


class StepTimer(TrainerCallback):
    """Sums the time inside optimizer steps, as the pipeline's own callback does."""

    seconds = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds += time.perf_counter() - self._t


def plain_tokens_per_second(config, plan, tok, data, base) -> float:
    """A plain script: Trainer + PEFT, every batch padded to max_seq_len, random order."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    torch.manual_seed(config.train.seed)
    lc = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base.model, lc)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=config.train.max_steps,
            per_device_train_batch_size=config.train.batch_size,
            learning_rate=config.train.learning_rate,
            report_to="none",
            save_strategy="no",
            use_cpu=plan.device == "cpu",
            bf16=plan.precision == "bf16",
            fp16=plan.precision == "fp16",
            disable_tqdm=True,
            seed=config.train.seed,
            include_num_input_tokens_seen="non_padding",
            remove_unused_columns=False,
            logging_strategy="no",
        )
        collator = DataCollatorForSeq2Seq(
            tok, padding="max_length", max_length=config.data.max_seq_len, label_pad_token_id=-100
        )
        timer = StepTimer()
        trainer = Trainer(
            model=model, args=args, train_dataset=data.train, data_collator=collator, callbacks=[timer]
        )
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        trainer.train()
        seconds = timer.seconds  # same measure as the pipeline: time inside optimizer steps
        tokens = int(trainer.state.num_input_tokens_seen)
    base.model = model.unload()
    return tokens / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo-cpu.yaml")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="Config overrides, e.g. --set model.load_in_4bit=true (the QLoRA path) or model.dtype=bfloat16.",
    )
    args = ap.parse_args()

    config = load_config(args.config, args.overrides)
    overrides = {
        "train.max_steps": args.steps,
        "train.eval_steps": None,
        "train.logging_steps": max(1, args.steps // 5),
        "train.output_dir": tempfile.mkdtemp(),
    }
    if args.batch_size:
        overrides["train.batch_size"] = args.batch_size
    config = with_overrides(config, overrides)
    plan = plan_device(config.model, config.train)
    tok = load_tokenizer(config.model)
    data = prepare_data(config.data, tok)
    base = load_base_model(config.model, plan)
    print(
        f"model {config.model.name_or_path} ({'4-bit ' if config.model.load_in_4bit else ''}{plan.precision}) "
        f"on {plan.name}; {args.steps} steps x batch {config.train.batch_size}; "
        f"mean example {data.stats.mean_len:.0f} tokens, max_seq_len {config.data.max_seq_len}"
    )

    results: dict[str, float] = {}
    variants = {
        "plain Trainer+PEFT, pad to max_seq_len": lambda: plain_tokens_per_second(
            config, plan, tok, data, base
        ),
        "pipeline, length_grouped (default)": lambda: pipeline_tokens_per_second(
            config, plan, tok, data, base
        ),
        "pipeline, padding_free": lambda: pipeline_tokens_per_second(
            with_overrides(config, {"train.batching": "padding_free"}), plan, tok, data, base
        ),
    }
    for name, fn in variants.items():
        runs = [fn() for _ in range(args.repeats)]
        results[name] = statistics.median(runs)
        print(f"{name:42s} {results[name]:10.0f} tokens/s  (runs: {', '.join(f'{r:.0f}' for r in runs)})")
    baseline = results["plain Trainer+PEFT, pad to max_seq_len"]
    for name, value in results.items():
        if not name.startswith("plain"):
            print(f"ratio {name} / plain pad-to-max: {value / baseline:.2f}x")


if __name__ == "__main__":
    main()
