"""Which configurations must run out of memory because a smaller one already did.

Memory is monotone in a few keys: more rank, a larger micro-batch or longer sequences never use
less. A proposal at least as large as an out-of-memory trial in each of those keys, and equal to
it in every other key that can change memory, would run out too: the search records it as
infeasible without running it (`dominated`). Keys that cannot change memory (learning rate,
alpha, dropout, schedule) do not matter for that comparison.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Keys whose larger values never need less memory.
GROWS_WITH = ("lora.r", "train.batch_size", "data.max_seq_len", "eval.batch_size")
# Keys that do not change a trial's memory (what the optimizer keeps does not depend on them).
NEUTRAL = (
    "train.learning_rate",
    "lora.alpha",
    "lora.alpha_ratio",
    "lora.dropout",
    "lora.init",
    "lora.pissa_iterations",
    "train.warmup_ratio",
    "train.weight_decay",
    "train.scheduler",
    "train.max_grad_norm",
    "train.loraplus_lr_ratio",
    "train.gradient_accumulation_steps",
    "train.seed",
)


def dominated(
    parameters: Mapping[str, Any], out_of_memory: Mapping[int, tuple[Mapping[str, Any], float]]
) -> tuple[int, float, str] | None:
    """(the out-of-memory trial, the memory it asked for, why) when `parameters` need at least
    as much memory as that trial's, else None."""
    for index, (oom, memory_gb) in out_of_memory.items():
        keys = (set(parameters) | set(oom)) - set(NEUTRAL)
        if any(k not in parameters or k not in oom for k in keys):
            continue  # a conditional key present in one only: not comparable
        grows = sorted(k for k in keys if k in GROWS_WITH)
        same = all(parameters[k] == oom[k] for k in keys if k not in GROWS_WITH)
        if grows and same and all(_at_least(parameters[k], oom[k]) for k in grows):
            return index, memory_gb, ", ".join(f"{k} {parameters[k]} >= {oom[k]}" for k in grows)
    return None


def _at_least(a: Any, b: Any) -> bool:
    try:
        return float(a) >= float(b)
    except (TypeError, ValueError):
        return False
