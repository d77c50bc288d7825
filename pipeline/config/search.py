"""The search section: dimensions (one per config key), objectives, outcome constraints, early
stopping. Value types are checked against the config field each dimension varies, so
`config check` reports a bad search space with every other problem, before any trial runs."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_serializer, model_validator

from pipeline.config.keys import config_field, value_kind
from pipeline.config.parameters import ParameterSpec, dependency_problems
from pipeline.config.sections import PROBLEM_SEPARATOR, Section
from pipeline.core.names import MEMORY_METRICS, is_trial_metric


class ObjectiveSpec(Section):
    metric: str = Field("eval_loss", description="A metric every trial logs (see names.TRIAL_METRICS).")
    minimize: bool = Field(True, description="Minimize (true) or maximize (false).")
    threshold: float | None = Field(
        None,
        description="Multi-objective only: the worst acceptable value (reference point). Give it for "
        "every objective or for none.",
    )


CONSTRAINT = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_./]*)\s*(<=|>=)\s*(\S+)\s*")


class OutcomeConstraint(Section):
    """A bound on a trial metric, written `metric <= number` or `metric >= number` in YAML.

    Parsed once, here; the search hands it to Ax and the report checks trials against it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str
    op: Literal["<=", ">="]
    bound: int | float

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, data: Any) -> Any:
        if isinstance(data, dict) and not set(data) <= set(cls.model_fields):
            # `{peak_rss_gb: 8}`: a bound written as a mapping; say how it is written instead.
            metric, bound = next(iter(data.items()))
            raise ValueError(
                f"write a constraint as text, e.g. '{metric} <= {bound}' (`metric <= number` or `metric >= number`), not a mapping"
            )
        if not isinstance(data, str):
            return data
        m = CONSTRAINT.fullmatch(data)
        bound = _number(m.group(3)) if m else None
        if bound is None:
            raise ValueError(f"{data!r} must read `metric <= number` or `metric >= number`")
        if not is_trial_metric(m.group(1)):
            raise ValueError(f"{data!r}: {m.group(1)!r} is not a metric that trials log")
        if m.group(1) in MEMORY_METRICS and bound <= 0:
            raise ValueError(f"{data!r}: a memory bound must be positive")
        return {"metric": m.group(1), "op": m.group(2), "bound": bound}

    @model_serializer
    def _as_text(self) -> str:
        return str(self)

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.bound}"

    def holds(self, value: float | None) -> bool:
        """Whether a trial's value meets the bound (a missing value does not)."""
        if value is None:
            return False
        return value <= self.bound if self.op == "<=" else value >= self.bound


def _number(text: str) -> int | float | None:
    """An int when written as one (so `<= 15` prints back as 15), else a float; None if neither."""
    try:
        return int(text) if re.fullmatch(r"-?\d+", text) else float(text)
    except ValueError:
        return None


class EarlyStoppingSpec(Section):
    enabled: bool | None = Field(
        None,
        description="Stop clearly bad trials early. Null (auto): on when a trial evaluates at "
        "least 3 times (train.eval_steps set, max_steps >= 3 * eval_steps).",
    )
    percentile: float = Field(
        50.0, gt=0, lt=100, description="Stop a trial whose eval_loss is in this bottom percentile."
    )
    progression: Literal["auto", "steps", "examples"] = Field(
        "auto",
        description="What trials are compared at: optimizer `steps`, or training `examples` seen "
        "(step x batch_size x gradient_accumulation_steps). `auto`: steps when trials train "
        "train.max_steps steps, examples when they train epochs, so every trial is compared at the "
        "same share of its own training (docs/search.md has the measurements behind this).",
    )
    min_progression: int | None = Field(
        None,
        gt=0,
        description="Never stop a trial before this progression (in the unit above); null: a third "
        "of the config's own training.",
    )
    min_curves: int = Field(3, gt=0, description="Completed trials needed before any trial is stopped.")


class ReplicatesSpec(Section):
    """After the trials: the best configurations and the baseline trained again on fresh seeds."""

    top_k: int = Field(
        2,
        gt=0,
        description="Configurations replicated: Ax's model-predicted best, then the best observed, "
        "until this many distinct ones.",
    )
    seeds: int = Field(
        2,
        gt=0,
        description="Fresh train.seed values each of them (and the baseline) is trained on: "
        "train.seed + 1 ... train.seed + seeds. With mode `race`: the most seeds a finalist gets.",
    )
    mode: Literal["fixed", "race"] = Field(
        "fixed",
        description="`fixed`: every chosen configuration gets all the seeds. `race`: they get one shared "
        "seed per round, and after each round one worse than the leader beyond `confidence` is dropped; "
        "the race ends when one is left, when those left are equivalent within `margin`, or at `seeds` "
        "(docs/search.md#racing).",
    )
    confidence: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Confidence at which a race drops a finalist. Null: registry.confidence.",
    )
    margin: float = Field(
        1.0,
        ge=0,
        description="Percent: raced finalists whose gap lies within +-margin beyond doubt are "
        "equivalent, and the race ends (the report then recommends the cheaper). 0: only a drop or "
        "the cap ends it.",
    )


class WorkerResources(Section):
    """What each Ray worker (one trial at a time) asks the cluster for."""

    gpus: float | None = Field(
        None,
        ge=0,
        description="GPUs per worker. Null: 1 when the Ray cluster has GPUs, else 0. Ray pins each worker "
        "to its own GPUs (CUDA_VISIBLE_DEVICES), so no trial sees another's.",
    )
    cpus: float | None = Field(
        None,
        gt=0,
        description="CPUs per worker (its torch threads on a CPU-only cluster). Null: the cluster's CPUs "
        "divided by search.workers, at least 1.",
    )


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
    outcome_constraints: list[OutcomeConstraint] = Field(
        default_factory=list,
        description="`metric <= number` or `metric >= number`, e.g. `peak_gpu_mem_gb <= 15`: trials "
        "that break one do not win.",
    )
    early_stopping: EarlyStoppingSpec = Field(default_factory=EarlyStoppingSpec)
    max_failure_rate: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Stop the search (exit 1, nothing registered) when this share of its trials failed: "
        "from 3 trials on, or from the first while no trial has a score (out-of-memory trials alone: "
        "from 3 on). A search whose every trial failed fails too.",
    )
    budget_minutes: float | None = Field(
        None,
        gt=0,
        description="Wall-clock budget of the search (over all its sessions): once spent, the running "
        "trial stops at its next evaluation (early-stopped, its data kept) and no new trial starts.",
    )
    budget_gpu_hours: float | None = Field(
        None,
        gt=0,
        description="Device-hours budget: the trials' time summed over the devices they ran on (one GPU "
        "each; a CPU-only trial counts as one device). Spent: as budget_minutes.",
    )
    replicates: ReplicatesSpec | None = Field(
        None,
        description="Seed replicates of the best configurations and the baseline after the trials, so "
        "the recommendation, the report's improvement and the promotion carry seed noise "
        "(docs/search.md#replicates). Null: none (intervals then cover eval-set noise only).",
    )
    reuse_baseline: bool = Field(
        True,
        description="Reuse a finished baseline run with the same config fingerprint in the "
        "experiment instead of training the baseline again.",
    )
    warm_start: list[str] = Field(
        default_factory=list,
        description="Search run ids whose completed and early-stopped trials are given to Ax before "
        "the first new trial (same base model, data and eval set; trials outside this space are "
        "skipped and listed in the report). See docs/search.md#warm-start.",
    )
    output_dir: str = Field("outputs/search", description="Local copy of reports and search state.")
    executor: Literal["local", "ray"] = Field(
        "local",
        description="Where trials run. `local`: one after another in this process. `ray`: in parallel "
        "on Ray workers (pip install -e '.[distributed]'), a local Ray cluster or RAY_ADDRESS's; see "
        "docs/distributed.md.",
    )
    workers: int | None = Field(
        None,
        gt=0,
        description="ray: workers (trials at once: one per worker, or `pack` per worker). Null: the GPUs "
        "Ray sees, else 1.",
    )
    worker_resources: WorkerResources = Field(default_factory=WorkerResources)
    ray_address: str | None = Field(
        None,
        description="ray: the cluster to join (e.g. `ray://head:10001` or `auto`); RAY_ADDRESS wins. "
        "Null and no RAY_ADDRESS: a local Ray cluster is started and shut down by the search.",
    )

    pack: int = Field(
        1,
        ge=1,
        le=64,
        description="Trials trained together in one forward and backward over the shared frozen base "
        "(in this process, or in each Ray worker; 1: one at a time). A trial the pack cannot hold (DoRA, PiSSA/OLoRA/LoftQ, "
        "other target modules or base, gradient checkpointing) runs alone. See docs/search.md#packed-trials.",
    )

    @field_validator("warm_start", mode="before")
    @classmethod
    def _run_ids(cls, value: Any) -> Any:
        # An all-digit run id reads as a number in YAML; a run id is text.
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            return value
        ids = [str(v).strip() for v in value]
        bad = [v for v in ids if not re.fullmatch(r"[0-9A-Za-z_-]+", v)]
        if bad:
            raise ValueError(f"not a run id: {bad[0]!r}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"a run id repeats: {ids}")
        return ids

    @model_validator(mode="after")
    def _pack_alone(self) -> SearchConfig:
        if self.pack == 1:
            return self
        memory = [c.metric for c in self.outcome_constraints if c.metric in MEMORY_METRICS]
        if memory:
            raise ValueError(
                f"pack: a packed trial's {memory[0]} is its pack's, so outcome constraints on memory need pack: 1"
            )
        return self

    @model_validator(mode="after")
    def _ray_settings_need_ray(self) -> SearchConfig:
        if self.executor == "ray":
            return self
        given = [k for k in ("workers", "ray_address") if getattr(self, k) is not None]
        given += [
            f"worker_resources.{k}" for k, v in self.worker_resources.model_dump().items() if v is not None
        ]
        if given:
            raise ValueError(f"{', '.join(given)} apply to search.executor: ray (it is {self.executor!r})")
        return self

    @field_validator("parameters")
    @classmethod
    def _known_keys_and_types(cls, v: dict[str, ParameterSpec]) -> dict[str, ParameterSpec]:
        if not v:
            raise ValueError("name at least one parameter to search")
        bad = [k for k in v if config_field(k) is None]
        if bad:
            raise ValueError(f"{', '.join(repr(k) for k in bad)} names no config key")
        problems = []
        for name, spec in v.items():
            values = list(spec.bounds or []) if spec.type == "range" else spec.choices()
            kind = value_kind(name, values)
            numbers = [x for x in values if not isinstance(x, (str, bool))]
            what = "an integer" if kind == "int" else "a number"
            # Each problem led by the parameter's name: the loader points at its line.
            if spec.type == "range" and kind not in ("int", "float"):
                problems.append(f"{name}: a range needs a numeric key; this one is {kind}")
            elif kind in ("int", "float") and len(numbers) < len(values):
                wrong = next(x for x in values if isinstance(x, (str, bool)))
                problems.append(f"{name}: the key is {what}; the value {wrong!r} is not")
            elif kind == "int" and any(float(x) != int(x) for x in numbers):
                problems.append(
                    f"{name}: the key is an integer; "
                    + ("bounds must be integers" if spec.type == "range" else f"values {values} are not")
                )
        problems += dependency_problems(v)
        if problems:
            raise ValueError(PROBLEM_SEPARATOR.join(problems))
        return v

    @field_validator("objectives")
    @classmethod
    def _known_metrics(cls, v: list[ObjectiveSpec]) -> list[ObjectiveSpec]:
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

    def parents(self) -> dict[str, tuple[str, Any]]:
        """Each conditional parameter's (parent parameter, the parent's value it exists under)."""
        return {
            child: (name, value)
            for name, spec in self.parameters.items()
            for value, children in spec.dependents_by_value().items()
            for child in children
        }

    def active(self, values: dict[str, Any]) -> dict[str, Any]:
        """`values` without the conditional parameters whose parent (or its parent) does not hold
        the value they exist under: what Ax expects of a trial with these values."""
        parents = self.parents()

        def on(name: str) -> bool:
            if name not in parents:
                return True
            parent, value = parents[name]
            return on(parent) and values.get(parent) == value

        return {k: v for k, v in values.items() if on(k)}

    def all_outcome_constraints(self) -> list[OutcomeConstraint]:
        """What Ax is told: the outcome constraints, and with several objectives their thresholds."""
        out = list(self.outcome_constraints)
        if len(self.objectives) > 1:
            out += [
                OutcomeConstraint(metric=o.metric, op="<=" if o.minimize else ">=", bound=o.threshold)
                for o in self.objectives
                if o.threshold is not None
            ]
        return out

    def required_metrics(self) -> list[str]:
        """Metrics every trial must report to Ax: the objectives, then the constrained metrics."""
        return list(dict.fromkeys(metric for _, metric in self.named_metrics()))

    def named_metrics(self) -> list[tuple[str, str]]:
        """(the key that names it, metric) for every objective and outcome constraint, in order:
        what an error about a metric points at."""
        named = [("search.objectives", o.metric) for o in self.objectives]
        return named + [("search.outcome_constraints", c.metric) for c in self.outcome_constraints]
