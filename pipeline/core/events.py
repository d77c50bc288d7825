"""What travels from a training trial to whoever decides on it: one evaluation, as one typed event.

The trainer's evaluation callback makes an `EvalEvent`; the executor that runs the trial stamps it
with the trial's Ax index; locally it reaches the search loop as a function call, under Ray it
travels through the driver's mailbox (it pickles). Whoever hears it answers one bool, stop the
trial early?, by the same `EvalHook` signature everywhere.

Light on purpose (no torch, mlflow or ax): the Ray mailbox actor unpickles these.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

STEPS, EXAMPLES = "steps", "examples"
UNITS = (STEPS, EXAMPLES)  # what a trial's progression is counted in (config: these, or auto)


def progression(unit: str, step: int, examples_per_step: int) -> int:
    """A trial's progression at optimizer step `step` in `unit` (`steps` or `examples`): the one
    place it is computed. At step 50 a batch-16 trial has seen four times a batch-4 trial's data,
    so a search over batch sizes may compare trials at equal examples seen instead."""
    return step * examples_per_step if unit == EXAMPLES else step


@dataclass(frozen=True)
class EvalEvent:
    """One evaluation of a training run: when (step, examples seen) and what it measured."""

    step: int
    examples_per_step: int  # training examples one optimizer step consumes
    metrics: Mapping[str, float] = field(default_factory=dict)  # by name: eval_loss
    trial: int = -1  # the Ax trial index, stamped by the executor (-1: not a search trial)

    @property
    def examples(self) -> int:
        """Training examples seen when the evaluation ran."""
        return self.step * self.examples_per_step

    def at(self, unit: str) -> int:
        """The progression in the search's unit (`steps` or `examples`)."""
        return progression(unit, self.step, self.examples_per_step)

    def of_trial(self, index: int) -> EvalEvent:
        """The same event, stamped with the Ax trial it belongs to."""
        return replace(self, trial=index)


# Hears an evaluation of a running trial; answers: stop the trial early?
EvalHook = Callable[[EvalEvent], bool]
