"""Config -> Ax (ax-platform 1.3, `ax.api`): the search space's parameters, the objectives and
outcome constraints, the configured Client and the early-stopping rule. `optimizer.py` is the one
place that talks to the Client afterwards."""

from __future__ import annotations

import logging
from typing import Any

from ax.api import ChoiceParameterConfig, Client, RangeParameterConfig
from ax.early_stopping.strategies import PercentileEarlyStoppingStrategy
from ax.utils.common.logger import set_ax_logger_levels

from pipeline.config import PipelineConfig, SearchConfig, value_kind
from pipeline.core import names
from pipeline.core.errors import ConfigError
from pipeline.search.ax.outcomes import objective_string, outcome_constraints
from pipeline.search.stopping import stopping_plan

set_ax_logger_levels(logging.WARNING)

CASTS = {"int": int, "float": float, "bool": bool, "str": str}


def build_parameters(search: SearchConfig) -> list[Any]:
    """Ax parameter configs, one per search dimension (fixed values are one-value choices; a
    choice's `dependents` become Ax's `dependent_parameters`, a hierarchical search space).

    The config validated the value types already; here they only become Ax's."""
    params: list[Any] = []
    for name, spec in search.parameters.items():
        if spec.type == "range":
            kind = value_kind(name, list(spec.bounds))
            low, high = (int(b) for b in spec.bounds) if kind == "int" else spec.bounds
            scaling = "log" if spec.log else None
            params.append(
                RangeParameterConfig(name=name, bounds=(low, high), parameter_type=kind, scaling=scaling)
            )
        else:
            values = spec.choices()
            kind = value_kind(name, values)
            ordered = spec.ordered if spec.ordered is not None else kind != "str"
            dependents = {CASTS[kind](v): list(c) for v, c in spec.dependents_by_value().items()}
            params.append(
                ChoiceParameterConfig(
                    name=name,
                    values=[CASTS[kind](v) for v in values],
                    parameter_type=kind,
                    is_ordered=ordered if len(values) > 1 else None,
                    dependent_parameters=dependents or None,
                )
            )
    return params


def build_client(search: SearchConfig, name: str = "lora-search") -> Client:
    """A configured Ax Client; settings Ax rejects become one ConfigError."""
    client = Client(random_seed=search.seed)
    try:
        client.configure_experiment(
            parameters=build_parameters(search), parameter_constraints=search.constraints or None, name=name
        )
    except Exception as e:  # Ax raises UserInputError / ValueError with a clear text
        raise ConfigError("search", [f"search.parameters / search.constraints: {e}"]) from None
    try:
        client.configure_optimization(
            objective=objective_string(search), outcome_constraints=outcome_constraints(search) or None
        )
    except Exception as e:
        raise ConfigError("search", [f"search.objectives / search.outcome_constraints: {e}"]) from None
    client.configure_generation_strategy(
        method="random_search" if search.method == "random" else "fast",
        initialization_budget=search.initialization_trials,
        initialization_random_seed=search.seed,
        # When failed trials leave too little data for BoTorch, keep exploring with Sobol
        # instead of refusing to propose a trial.
        allow_exceeding_initialization_budget=True,
    )
    return client


def early_stopping_strategy(config: PipelineConfig) -> PercentileEarlyStoppingStrategy | None:
    """Ax's percentile rule on eval_loss, as `stopping.stopping_plan` plans it; None when off."""
    plan = stopping_plan(config)
    if not plan.enabled:
        return None
    return PercentileEarlyStoppingStrategy(
        metric_signatures=[names.EVAL_LOSS],
        percentile_threshold=plan.percentile,
        min_progression=plan.min_progression,
        min_curves=plan.min_curves,
    )
