"""Each trainer callback alone (`pipeline/training/callbacks.py`), driven with the Trainer's own state
objects and no model: what it streams, when it evaluates, when it stops and why."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainerControl, TrainerState

from pipeline.core import interrupt, names
from pipeline.core.events import EvalEvent, progression
from pipeline.training.callbacks import (
    AskToStop,
    EvalResult,
    KeepBest,
    PeriodicEval,
    StopOnDivergence,
    StopOnRequest,
    StreamMetrics,
)
from pipeline.training.metrics import EvalLosses, MemoryMonitor


def _state(step: int = 0, max_steps: int = 100) -> TrainerState:
    state = TrainerState()
    state.global_step, state.max_steps, state.epoch, state.num_input_tokens_seen = step, max_steps, 0.5, 0
    return state


def _result(step: int, loss: float, max_steps: int = 100, final: bool = False) -> EvalResult:
    return EvalResult(EvalEvent(step, 4, {names.EVAL_LOSS: loss}), EvalLosses(loss, (), ()), max_steps, final)


def test_an_eval_event_knows_its_progression_in_either_unit():
    event = EvalEvent(step=50, examples_per_step=16, metrics={names.EVAL_LOSS: 2.0})
    assert event.examples == 800 and event.at("examples") == 800 and event.at("steps") == 50
    assert event.trial == -1 and event.of_trial(7).trial == 7 and event.of_trial(7).step == 50
    assert progression("examples", 50, 16) == 800 and progression("steps", 50, 16) == 50


def test_stream_metrics_sends_train_metrics_throughput_memory_and_eval_losses():
    sent = []
    stream = StreamMetrics(lambda m, s: sent.append((s, m)), MemoryMonitor())
    state, control = _state(5), TrainerControl()
    stream.on_train_begin(None, state, control)
    stream.on_step_begin(None, state, control)
    stream.on_step_end(None, state, control)
    state.num_input_tokens_seen = 1000
    stream.on_log(None, state, control, logs={"loss": 1.5, "learning_rate": 1e-3, "grad_norm": 0.5})
    step, m = sent[-1]
    assert step == 5 and m[names.TRAIN_LOSS] == 1.5 and m[names.LEARNING_RATE] == 1e-3
    assert m[names.GRAD_NORM] == 0.5 and m[names.TOKENS_PER_SECOND] > 0 and m[names.PEAK_RSS_GB] > 0
    assert stream.step_seconds > 0
    stream.on_log(None, state, control, logs={"train_runtime": 3.0})  # the end-of-training summary
    assert len(sent) == 1
    stream.on_evaluation(_result(5, 1.0), None, control)
    assert sent[-1] == (5, {names.EVAL_LOSS: 1.0, names.EVAL_PERPLEXITY: pytest.approx(math.e)})


def test_periodic_eval_runs_every_n_steps_and_tells_its_listeners_in_order():
    heard = []

    class Listener:
        def __init__(self, name):
            self.name = name

        def on_evaluation(self, result, model, control):
            heard.append((self.name, result.step, result.event.examples, result.loss, result.final))

    losses = iter([3.0, 2.0, 1.0])
    evaluation = PeriodicEval(
        lambda model: EvalLosses(next(losses), (), ()),
        5,
        [Listener("a"), Listener("b")],
        at_start=True,
        examples_per_step=4,
    )
    state, control = _state(0), TrainerControl()
    evaluation.on_train_begin(None, state, control)  # at_start
    for step in range(1, 8):
        state.global_step = step
        evaluation.on_step_end(None, state, control)  # evaluates at step 5 only
    assert evaluation.run(None, 7, 100) == 1.0  # the final evaluation
    assert heard == [
        ("a", 0, 0, 3.0, False),
        ("b", 0, 0, 3.0, False),
        ("a", 5, 20, 2.0, False),
        ("b", 5, 20, 2.0, False),
        ("a", 7, 28, 1.0, True),
        ("b", 7, 28, 1.0, True),
    ]
    assert evaluation.evals == [(0, 3.0), (5, 2.0), (7, 1.0)] and evaluation.eval_seconds > 0


def test_divergence_stops_at_a_non_finite_train_or_eval_loss():
    guard, control = StopOnDivergence(), TrainerControl()
    guard.on_log(None, _state(3), control, logs={"loss": 2.0})
    guard.on_evaluation(_result(3, 2.0), None, control)
    assert guard.diverged is None and not control.should_training_stop
    guard.on_evaluation(_result(4, float("nan"), final=True), None, control)  # too late to stop
    assert guard.diverged is None
    guard.on_log(None, _state(11), control, logs={"loss": float("inf")})
    assert control.should_training_stop and guard.diverged == (11, float("inf"))
    other, control = StopOnDivergence(), TrainerControl()
    other.on_evaluation(_result(5, float("nan")), None, control)
    assert control.should_training_stop and other.diverged[0] == 5


def test_keep_best_stops_on_a_plateau_and_restores_the_best_weights():
    model = torch.nn.Linear(2, 2)
    best = KeepBest(patience=2, min_delta=0.1, restore=True)
    control = TrainerControl()
    for step, loss in [(10, 2.0), (20, 1.5), (30, 1.45), (40, 1.6)]:
        best.on_evaluation(_result(step, loss), model, control)
        with torch.no_grad():
            model.weight.add_(1.0)  # training moves the weights after every evaluation
    # 1.45 beat 1.5 but not by min_delta, 1.6 did not beat it: two bad evaluations.
    assert control.should_training_stop and best.plateau_at == 40 and best.best == (30, 1.45)
    weights_at_best = model.weight.detach().clone() - 2.0  # two steps of +1 since step 30's evaluation
    assert best.restore(model, last_step=40) == (30, 1.45)
    assert torch.allclose(model.weight, weights_at_best, atol=1e-6)
    keeper = KeepBest(restore=True)
    keeper.on_evaluation(_result(10, 1.0), model, TrainerControl())
    assert keeper.restore(model, last_step=10) is None  # the last evaluation is the best
    assert KeepBest().restore(model, last_step=10) is None  # restore off


def test_ask_to_stop_asks_the_hook_before_the_last_step_only():
    asked = []
    ask = AskToStop(
        lambda event: asked.append((event.step, event.examples)) or event.metrics[names.EVAL_LOSS] > 2
    )
    control = TrainerControl()
    ask.on_evaluation(_result(5, 1.0), None, control)
    assert not control.should_training_stop and ask.stopped_at is None
    ask.on_evaluation(_result(10, float("nan")), None, control)  # the divergence watch's business
    ask.on_evaluation(_result(100, 3.0, max_steps=100), None, control)  # the last step: nothing to stop
    ask.on_evaluation(_result(12, 3.0, final=True), None, control)
    assert asked == [(5, 20)] and not control.should_training_stop
    ask.on_evaluation(_result(15, 3.0), None, control)
    assert control.should_training_stop and ask.stopped_at == 15 and asked[-1] == (15, 60)


def test_a_requested_stop_ends_training_after_the_current_step():
    stop, state, control = StopOnRequest(), _state(3), TrainerControl()
    stop.on_step_end(None, state, control)  # nothing requested
    with interrupt.graceful_stop():
        interrupt.request_stop()
        assert interrupt.stop_requested()
        with pytest.raises(KeyboardInterrupt, match="stop requested at step 3"):
            stop.on_step_end(None, state, control)
    assert not interrupt.stop_requested()  # graceful_stop clears it on the way out
