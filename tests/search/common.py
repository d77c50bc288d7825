"""What the search's tests share: the demo config with overrides, and hand-made records."""

from __future__ import annotations

from pipeline.config import load_config, with_overrides
from pipeline.core import interrupt
from pipeline.search.records import BaselineRecord, TrialRecord

from ..conftest import DEMO_CONFIG, tiny_overrides


def demo(**values):
    """The demo config, with `values` (dotted keys) set."""
    config = load_config(DEMO_CONFIG)
    return with_overrides(config, values) if values else config


def search_overrides(tmp_path, **extra) -> list[str]:
    """--set overrides for a small search on the tiny model, without early stopping."""
    values = {
        "search.output_dir": str(tmp_path / "search"),
        "registry.model_name": "integrity",
        "search.early_stopping.enabled": False,
        "search.initialization_trials": 6,
        **extra,
    }
    return tiny_overrides(tmp_path, **values)


def record(index, status, loss=None, steps=150, max_steps=150, **metrics) -> TrialRecord:
    """A trial's record: r = 8 x (index + 1), eval_loss `loss`, and the given metrics."""
    m = {"eval_loss": loss, **metrics} if loss is not None else dict(metrics)
    return TrialRecord(
        index=index,
        parameters={"lora.r": 8 * (index + 1)},
        status=status,
        eval_loss=loss,
        metrics=m,
        steps=steps,
        max_steps=max_steps,
    )


def baseline_record(loss, metrics, parameters=None, evals=()) -> BaselineRecord:
    """A trained (not reused) baseline in the search space."""
    return BaselineRecord(
        run_id="b",
        parameters=parameters or {},
        eval_loss=loss,
        metrics=metrics,
        reused=False,
        in_search_space=True,
        evals=list(evals),
    )


class Watched:
    """An executor around another, through the seam the search runs every job by: `on_eval` runs
    before the search hears each evaluation, `on_done` before it hears each trial's outcome (the
    baseline's job, index -1, is not a trial). Tests move the search's clock, or end the process,
    at those points without reaching into the search."""

    def __init__(self, inner, on_eval=None, on_done=None):
        self.inner, self.on_eval, self.on_done = inner, on_eval, on_done
        self.devices_per_trial = inner.devices_per_trial

    def idle(self) -> int:
        return self.inner.idle()

    def submit(self, job, on_eval) -> None:
        def heard(event):
            self.on_eval(event)
            return on_eval(event)

        self.inner.submit(job, heard if on_eval is not None and self.on_eval else on_eval)

    def wait_any(self):
        outcome = self.inner.wait_any()
        if self.on_done and outcome.job.index >= 0:
            self.on_done(outcome)
        return outcome

    def close(self) -> None:
        self.inner.close()


def interrupt_at(trial: int, step: int):
    """An evaluation hook: Ctrl-C during trial `trial`, just after its evaluation at `step`."""

    def on_eval(event):
        if event.trial == trial and event.step == step:
            interrupt.request_stop()

    return on_eval
