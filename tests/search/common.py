"""What the search's tests share: the demo config with overrides, and hand-made records."""

from __future__ import annotations

from pipeline.config import load_config, with_overrides
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
