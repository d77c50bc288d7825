"""The trainer's callbacks, one job each (as in TRL's `trl/trainer/callbacks.py`), composed by
`train.train`:

- `StopOnRequest`: Ctrl-C / SIGTERM (`interrupt`) ends training after the current step;
- `StreamMetrics`: every logging step's metrics and every evaluation's loss go to a sink (the
  tracking layer), with step time, tokens per second and memory peaks;
- `PeriodicEval`: evaluates every `eval_steps` (and at the start) and hands each result to its
  listeners, in order;
- `StopOnDivergence`: a non-finite train or eval loss ends training;
- `KeepBest`: remembers the best evaluation (and its adapter weights), stops on a plateau;
- `AskToStop`: asks an `EvalHook` (the search's early stopping) whether to stop.

The last four hear evaluations through `EvalListener.on_evaluation`, and so does the checkpoint
at every evaluation (`checkpoint.Checkpointer`). Those with state a resumed run needs (the
evaluations so far, the plateau counter, the step clock) give it as `state_dict()` and take it
back with `load_state_dict()`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from pipeline.core import interrupt, names
from pipeline.core.events import EvalEvent, EvalHook
from pipeline.training.metrics import EvalLosses, MemoryMonitor, perplexity

MetricSink = Callable[[dict[str, float], int], None]
Evaluator = Callable[[Any], EvalLosses]  # model -> eval loss, overall and per example


@dataclass(frozen=True)
class EvalResult:
    """One evaluation as its listeners see it."""

    event: EvalEvent
    scores: EvalLosses
    max_steps: int
    final: bool = False  # the evaluation after training ended: nothing left to stop

    @property
    def loss(self) -> float:
        return float(self.scores.loss)

    @property
    def step(self) -> int:
        return self.event.step


class EvalListener(Protocol):
    def on_evaluation(self, result: EvalResult, model: Any, control: Any) -> None:
        """Hear one evaluation; may set `control.should_training_stop` (not when `result.final`)."""


class StopOnRequest(TrainerCallback):
    """Raise KeyboardInterrupt after the optimizer step during which a stop was requested: the
    trial's run then ends KILLED, its step finished."""

    def on_step_end(self, args, state, control, **kwargs):
        interrupt.raise_if_requested(f"stop requested at step {state.global_step}")


class StreamMetrics(TrainerCallback):
    """Every logging step's train metrics, and every evaluation's loss, to `sink(metrics, step)`.

    Also the clock of the optimizer steps (`step_seconds`, excluding evaluation and logging) and
    the memory monitor's sampler: tokens per second and peaks are per logging window."""

    def __init__(self, sink: MetricSink, memory: MemoryMonitor) -> None:
        self.sink = sink
        self.memory = memory
        self.step_seconds = 0.0
        self._window_seconds = 0.0
        self._window_tokens = 0
        self._step_start = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.memory.start()

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        dt = time.perf_counter() - self._step_start
        self.step_seconds += dt
        self._window_seconds += dt
        self.memory.sample()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:
            return  # the end-of-training summary is not a step
        metrics = {names.TRAIN_LOSS: float(logs["loss"]), names.EPOCH: float(state.epoch or 0)}
        for key, name in (("learning_rate", names.LEARNING_RATE), ("grad_norm", names.GRAD_NORM)):
            if key in logs:
                metrics[name] = float(logs[key])
        tokens = int(state.num_input_tokens_seen)
        if self._window_seconds > 0 and tokens > self._window_tokens:
            metrics[names.TOKENS_PER_SECOND] = (tokens - self._window_tokens) / self._window_seconds
        self._window_tokens, self._window_seconds = tokens, 0.0
        metrics.update(self.memory.peaks())
        self.sink(metrics, state.global_step)

    def on_evaluation(self, result: EvalResult, model: Any, control: Any) -> None:
        self.stream_eval(result.loss, result.step)

    def state_dict(self) -> dict[str, Any]:
        return {"step_seconds": self.step_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_seconds = float(state["step_seconds"])

    def stream_eval(self, loss: float, step: int) -> None:
        self.sink({names.EVAL_LOSS: loss, names.EVAL_PERPLEXITY: perplexity(loss)}, step)


class PeriodicEval(TrainerCallback):
    """Evaluate every `every` optimizer steps (and before the first with `at_start`); each result
    goes to the listeners in order."""

    def __init__(
        self,
        evaluate: Evaluator,
        every: int | None,
        listeners: Sequence[EvalListener],
        *,
        at_start: bool = False,
        examples_per_step: int = 1,
    ) -> None:
        self.evaluate = evaluate
        self.every = every
        self.listeners = list(listeners)
        self.at_start = at_start
        self.examples_per_step = examples_per_step
        self.eval_seconds = 0.0
        self.evals: list[tuple[int, float]] = []  # (step, eval_loss), in order
        self.last_scores: EvalLosses | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.at_start and state.global_step == 0:  # a resumed run evaluated its start already
            self.run(model, state.global_step, state.max_steps, control)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self.run(model, state.global_step, state.max_steps, control)

    def run(self, model: Any, step: int, max_steps: int, control: Any = None) -> float:
        """Evaluate now and tell the listeners; `control=None`: the final evaluation, after
        training, which nothing can stop any more. Returns the eval loss."""
        t0 = time.perf_counter()
        self.last_scores = self.evaluate(model)
        self.eval_seconds += time.perf_counter() - t0
        loss = float(self.last_scores.loss)
        self.evals.append((step, loss))
        event = EvalEvent(step, self.examples_per_step, {names.EVAL_LOSS: loss})
        result = EvalResult(event, self.last_scores, max_steps, final=control is None)
        for listener in self.listeners:
            listener.on_evaluation(result, model, control)
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {
            "evals": self.evals,
            "eval_seconds": self.eval_seconds,
            "last_scores": _scores_dict(self.last_scores),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.evals = [(int(s), float(v)) for s, v in state["evals"]]
        self.eval_seconds = float(state["eval_seconds"])
        self.last_scores = _scores(state["last_scores"])


class StopOnDivergence(TrainerCallback):
    """Stop at the first non-finite train loss (logged) or eval loss; `diverged` says where."""

    def __init__(self) -> None:
        self.diverged: tuple[int, float] | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._check(float(logs["loss"]), state.global_step, control)

    def on_evaluation(self, result: EvalResult, model: Any, control: Any) -> None:
        if not result.final:
            self._check(result.loss, result.step, control)

    def _check(self, loss: float, step: int, control: Any) -> None:
        if not math.isfinite(loss):
            self.diverged = (step, loss)
            control.should_training_stop = True


class KeepBest:
    """The best evaluation (and, with `restore`, its adapter weights); a stop on a plateau.

    As in HF's EarlyStoppingCallback, `patience` counts evaluations that do not beat the last
    counted improvement by `min_delta`; the weights kept are those of the lowest eval_loss."""

    def __init__(self, patience: int | None = None, min_delta: float = 0.0, restore: bool = False) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.restore_weights = restore
        self.best: tuple[int, float] | None = None  # (step, eval_loss): the lowest eval_loss
        self.best_scores: EvalLosses | None = None  # its per-example losses (what restore keeps)
        self.plateau_at: int | None = None
        self._reference: float | None = None  # the loss later evaluations must beat by min_delta
        self._bad_evals = 0
        self.weights: dict[str, Any] | None = None  # the best evaluation's adapter weights

    def on_evaluation(self, result: EvalResult, model: Any, control: Any) -> None:
        loss, step = result.loss, result.step
        if result.final or not math.isfinite(loss):
            return
        if self.best is None or loss < self.best[1]:
            self.best, self.best_scores = (step, loss), result.scores
            if self.restore_weights and model is not None:
                # Only the trainable (adapter) weights change: a few MB even for large models.
                self.weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if self._reference is None or loss < self._reference - self.min_delta:
            self._reference, self._bad_evals = loss, 0
            return
        self._bad_evals += 1
        if self.patience and self._bad_evals >= self.patience:
            self.plateau_at = step
            control.should_training_stop = True

    def state_dict(self) -> dict[str, Any]:
        """Everything but `weights` (tensors, saved apart)."""
        return {
            "best": self.best,
            "best_scores": _scores_dict(self.best_scores),
            "plateau_at": self.plateau_at,
            "reference": self._reference,
            "bad_evals": self._bad_evals,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = (int(state["best"][0]), float(state["best"][1])) if state["best"] else None
        self.best_scores = _scores(state["best_scores"])
        self.plateau_at = state["plateau_at"]
        self._reference, self._bad_evals = state["reference"], int(state["bad_evals"])

    def restore(self, model: Any, last_step: int | None) -> tuple[int, float] | None:
        """Put the best evaluation's adapter weights back unless the last evaluation (at
        `last_step`) is the best; returns (step, loss) of the restored evaluation."""
        if not (self.restore_weights and self.weights and self.best) or last_step is None:
            return None
        if self.best[0] == last_step:
            return None
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.weights.items():
                params[name].copy_(value)
        return self.best


class AskToStop:
    """Ask `hook` at every evaluation before the last step (the search's early stopping)."""

    def __init__(self, hook: EvalHook) -> None:
        self.hook = hook
        self.stopped_at: int | None = None

    def on_evaluation(self, result: EvalResult, model: Any, control: Any) -> None:
        if result.final or not math.isfinite(result.loss) or result.step >= result.max_steps:
            return
        if self.hook(result.event):
            self.stopped_at = result.step
            control.should_training_stop = True


def _scores_dict(scores: EvalLosses | None) -> dict[str, Any] | None:
    return None if scores is None else {"loss": scores.loss, "nll": scores.nll, "tokens": scores.tokens}


def _scores(data: dict[str, Any] | None) -> EvalLosses | None:
    if data is None:
        return None
    return EvalLosses(float(data["loss"]), tuple(map(float, data["nll"])), tuple(map(int, data["tokens"])))


class StepBar(ProgressCallback):
    """The Trainer's step bar without the log dicts it prints between updates."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return
