"""The whole config: its sections, the checks that span sections, and lookups of a key's field.

Cross-section checks report each problem on its own, led by the key at fault, so that the
loader can point at that key's line in the YAML file.
"""

from __future__ import annotations

from pydantic import Field, ValidationError, model_validator

from pipeline.config import messages, points
from pipeline.config.search import SearchConfig
from pipeline.config.sections import (
    BASE_REWRITING_INITS,
    PROBLEM_SEPARATOR,
    DataConfig,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    RegistryConfig,
    RetrainConfig,
    Section,
    TrackingConfig,
    TrainConfig,
)
from pipeline.core.names import (
    CUDA_ONLY_METRIC_PREFIX,
    EVAL_LOSS,
    EVAL_PERPLEXITY,
    GENERATION_METRIC_KEYS,
    GENERATION_METRIC_PREFIX,
    LMEVAL_PREFIX,
)

__all__ = ["PROBLEM_SEPARATOR", "RESULT_SECTIONS", "PipelineConfig"]

# Sections that change a trial's result. Tracking and registry do not.
RESULT_SECTIONS = ("model", "data", "lora", "train", "eval")


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
        problems = []
        if self.model.gguf_file and self.model.load_in_4bit:
            problems.append("model.load_in_4bit: a GGUF model cannot also be loaded in 4-bit")
        if (self.train.early_stopping_patience or self.train.restore_best) and not self.train.eval_steps:
            problems.append(
                "train.eval_steps: must be set for train.early_stopping_patience and train.restore_best"
            )
        searched = set(self.search.parameters) if self.search is not None else set()
        if "lora.alpha" in searched and (self.lora.alpha_ratio is not None or "lora.alpha_ratio" in searched):
            # alpha would be replaced by r x ratio while Ax records the alpha it asked for
            problems.append(
                "search.parameters.lora.alpha: lora.alpha_ratio sets lora.alpha (alpha = ratio x r), so a "
                "searched lora.alpha would not be what trains; search lora.alpha with lora.alpha_ratio "
                "unset (null), or search lora.alpha_ratio instead"
            )
        if self.search is not None and self.search.early_stopping.enabled and not self.train.eval_steps:
            problems.append(
                "search.early_stopping.enabled: needs train.eval_steps (trials must evaluate while they train)"
            )
        problems += self.variant_problems()
        problems += self.unavailable_metrics()
        if not problems and self.search is not None:
            problems += self.space_problems(_validation_problems)
        if problems:
            raise ValueError(PROBLEM_SEPARATOR.join(problems))
        return self

    def variant_problems(self) -> list[str]:
        """LoRA variants PEFT refuses with this base (the values a search allows are checked the
        same way, as trial configs: `space_problems`), so that `config check` finds them, not trial 7."""
        init, four_bit = self.lora.init, self.model.load_in_4bit
        if init in BASE_REWRITING_INITS and four_bit:
            return [
                f"lora.init: {init} rewrites the base weights, which PEFT does only on an unquantized "
                "base, and model.load_in_4bit is true (4-bit: use init loftq)"
            ]
        if init == "loftq" and not four_bit:
            return [
                "lora.init: loftq fits the adapter to a 4-bit base's quantization error, and "
                "model.load_in_4bit is false"
            ]
        return []

    def space_problems(self, check: points.Check) -> list[str]:
        """What `check` (a trial config's dict -> its problems) finds at the points of the search
        space (`points.py`): every value it allows, and every pair, as a trial would get them."""
        search = self.search
        base = self.model_dump(mode="json", exclude={"search"})
        return points.problems(base, search.parameters, search.parents(), search.constraints, check)

    def unavailable_metrics(self, cuda: bool | None = None) -> list[str]:
        """Objectives and outcome constraints on a metric no trial of this config would log, each
        led by the key that names it: a task metric without its task, a generation metric
        without generation (or not among the shipped metric's keys), and with `cuda=False` a
        CUDA memory peak. `cuda=None` (validation: the machine is not known yet) skips the last."""
        if self.search is None:
            return []
        ev = self.eval
        tasks = ev.lm_eval.tasks if ev.lm_eval is not None else []
        shipped = GENERATION_METRIC_KEYS.get(ev.generation_metric or "")
        problems = []
        for key, metric in self.search.named_metrics():
            if metric.startswith(LMEVAL_PREFIX):
                if not any(metric.startswith(f"{LMEVAL_PREFIX}{t}_") for t in tasks):
                    problems.append(
                        f"{key}: {metric} is a task metric, but "
                        + (
                            f"no task of eval.lm_eval.tasks ({', '.join(tasks)}) logs it"
                            if tasks
                            else "eval.lm_eval is not set"
                        )
                    )
            elif metric.startswith(GENERATION_METRIC_PREFIX) and metric not in (EVAL_LOSS, EVAL_PERPLEXITY):
                if not ev.generation_metric or not ev.generation_samples:
                    problems.append(
                        f"{key}: {metric} is a generation metric, but eval."
                        + (
                            "generation_metric is null"
                            if not ev.generation_metric
                            else "generation_samples is 0"
                        )
                    )
                elif shipped is not None and metric.removeprefix(GENERATION_METRIC_PREFIX) not in shipped:
                    logs = ", ".join(GENERATION_METRIC_PREFIX + k for k in shipped)
                    problems.append(
                        f"{key}: {metric} is not logged by eval.generation_metric "
                        f"{ev.generation_metric} (it logs {logs})"
                    )
            elif metric.startswith(CUDA_ONLY_METRIC_PREFIX) and cuda is False:
                problems.append(
                    f"{key}: {metric} is measured only on a CUDA GPU, and this machine has none: no trial "
                    "here would log it (drop it, or run the search on a GPU)"
                )
        return problems


def _validation_problems(data: dict) -> list[str]:
    """A trial config's problems as plain lines (`lora.init: must be one of ...`)."""
    try:
        PipelineConfig.model_validate(data)
    except ValidationError as e:
        return messages.problems(PipelineConfig, e.errors(), {}, {}, "")
    return []
