"""The `retrain` entry point: the best config trained longer, registered, promoted if better.

`recipe.py` finds the config and trains it; `report.py` writes what it found."""

from pipeline.retrain.recipe import RetrainResult, RetrainSource, resolve_source, retrain_config, run_retrain

__all__ = ["RetrainResult", "RetrainSource", "resolve_source", "retrain_config", "run_retrain"]
