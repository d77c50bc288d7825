"""The whole config: its sections, the checks that span sections, and lookups of a key's field.

Cross-section checks report each problem on its own, led by the key at fault, so that the
loader can point at that key's line in the YAML file.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from pipeline.config.search import SearchConfig
from pipeline.config.sections import (
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
from pipeline.names import LMEVAL_PREFIX

__all__ = ["PROBLEM_SEPARATOR", "RESULT_SECTIONS", "PipelineConfig"]

# Sections that change a trial's result. Tracking and registry do not.
RESULT_SECTIONS = ("model", "data", "lora", "train", "eval")
# Separates problems in one cross-check error (the loader splits them again).
PROBLEM_SEPARATOR = "\n"


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
        problems += self._task_metrics_configured()
        if problems:
            raise ValueError(PROBLEM_SEPARATOR.join(problems))
        return self

    def _task_metrics_configured(self) -> list[str]:
        """A `lmeval_<task>_...` objective or constraint needs that task in `eval.lm_eval.tasks`."""
        if self.search is None:
            return []
        named = [("search.objectives", o.metric) for o in self.search.objectives]
        named += [("search.outcome_constraints", c.metric) for c in self.search.outcome_constraints]
        tasks = self.eval.lm_eval.tasks if self.eval.lm_eval is not None else []
        return [
            f"{key}: {metric} is a task metric, but "
            + (
                f"no task of eval.lm_eval.tasks ({', '.join(tasks)}) logs it"
                if tasks
                else "eval.lm_eval is not set"
            )
            for key, metric in named
            if metric.startswith(LMEVAL_PREFIX)
            and not any(metric.startswith(f"{LMEVAL_PREFIX}{t}_") for t in tasks)
        ]
