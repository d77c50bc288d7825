"""The MLflow UI, for real: a tiny search + retrain, a real `mlflow server`, headless Chromium.

Reads the pages a user reads: the experiment's runs table with the trials nested under the
search, the compare view of the trials (hyperparameters and eval_loss), the registered model
with its `champion` alias, and the search run's description and report artifact.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.core import names
from pipeline.retrain import run_retrain
from pipeline.search import run_search, search_config

from . import browser
from .conftest import DEMO_CONFIG, tiny_overrides

MODEL = "ui-lora"
# Set to a folder (e.g. docs/images) to keep the screenshots; scripts/ui_screenshots.py makes the
# ones in the docs from the full demo search.
SCREENSHOTS = os.environ.get("UI_TEST_SCREENSHOTS")


@pytest.fixture
def searched_store(tmp_path):
    """A 3-trial search whose winner became champion, then a retrain that beat it."""
    overrides = tiny_overrides(
        tmp_path,
        **{
            "search.output_dir": str(tmp_path / "search"),
            "registry.model_name": MODEL,
            "search.early_stopping.enabled": False,
            "search.initialization_trials": 3,
            "tracking.experiment_name": "ui-test",
            "train.max_steps": 6,  # short trials, so that the longer retrain wins the champion
            "train.eval_steps": 3,
        },
    )
    search = run_search(search_config(DEMO_CONFIG, overrides, n_trials=3), quiet=True)
    retrain_overrides = [o for o in overrides if not o.startswith("train.max_steps")]  # retrain.* rules
    retrain = run_retrain(
        str(DEMO_CONFIG), [*retrain_overrides, "retrain.max_steps=60", "retrain.eval_steps=10"], quiet=True
    )
    return search, retrain


@pytest.mark.browser
@pytest.mark.slow  # trains a search and a retrain first, then starts a server and a browser
def test_mlflow_ui_shows_the_search_the_trials_and_the_champion(searched_store, tmp_path):
    search, retrain = searched_store
    client = MlflowClient()
    parent = client.get_run(search.parent_run_id)
    experiment = parent.info.experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{search.parent_run_id}'")
    trials = sorted(
        (c for c in children if c.data.tags[names.ROLE] == names.ROLE_TRIAL), key=lambda r: r.info.run_name
    )
    assert len(children) == 4 and len(trials) == 3  # the baseline (status-quo arm) + 3 trials
    trial_names = [c.info.run_name for c in children]
    champion = client.get_registered_model(MODEL).aliases[names.CHAMPION_ALIAS]
    shots = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path / "shots"
    shots.mkdir(parents=True, exist_ok=True)

    store = os.environ["MLFLOW_TRACKING_URI"]
    with browser.mlflow_server(store, tmp_path / "server.log") as base, browser.chromium() as driver:
        # 1. The runs table: the search parent, then its trials nested under it once expanded.
        body = browser.open_page(driver, browser.experiment_runs_url(base, experiment), parent.info.run_name)
        assert not any(n in body for n in trial_names), "trials should be folded under the search"
        browser.expand_run(driver, search.parent_run_id)
        body = browser.wait_for_text(driver, *trial_names)
        assert parent.info.run_name in body and client.get_run(retrain.result.run_id).info.run_name in body
        driver.save_screenshot(str(shots / "ui-runs.png"))

        # 2. Compare view of the trials: their hyperparameters and eval_loss, per trial.
        body = browser.open_page(
            driver,
            browser.compare_url(base, experiment, [t.info.run_id for t in trials]),
            "lora.r",
            "train.learning_rate",
            names.EVAL_LOSS,
            timeout_s=90,
        )
        for t in trials:
            assert t.info.run_name in body
            assert f"{t.data.metrics[names.EVAL_LOSS]:.5f}"[:5] in body  # eval_loss value shown
        ranks = " ".join(t.data.params["lora.r"] for t in trials)
        assert f"lora.r {ranks}" in body, "each trial's rank in the params table"
        # The parallel-coordinates plot, switched to eval_loss, draws an axis per hyperparameter.
        browser.choose_parallel_coordinates(driver, ["train.learning_rate"], names.EVAL_LOSS)
        browser.settle()
        axes = {e.text for e in driver.find_elements("css selector", "svg text")}
        assert {"lora.r", "lora.alpha", "train.batch_size", "train.learning_rate", names.EVAL_LOSS} <= axes, (
            axes
        )
        driver.save_screenshot(str(shots / "ui-compare.png"))

        # 3. The registered model: the retrained version holds `champion`, v1 `previous`.
        body = browser.open_page(driver, browser.model_url(base, MODEL), f"Version {champion}")
        assert f"@ {names.CHAMPION_ALIAS}" in body and f"@ {names.PREVIOUS_ALIAS}" in body
        version_block = body.split(f"Version {champion}", 1)[1].split("Version ", 1)[0]
        assert retrain.result.run_id in version_block and f"@ {names.CHAMPION_ALIAS}" in version_block
        driver.save_screenshot(str(shots / "ui-model.png"))

        # 4. The search run page: its one-paragraph description names the best trial.
        best = client.get_run(parent.data.tags[names.SEARCH_BEST_RUN])
        body = browser.open_page(
            driver, browser.run_url(base, experiment, search.parent_run_id), "Description"
        )
        assert best.info.run_name in body, "the description should name the best trial"
        assert "improvement" in body.lower()
        driver.save_screenshot(str(shots / "ui-search-run.png"))

    for shot in ("ui-runs.png", "ui-compare.png", "ui-model.png", "ui-search-run.png"):
        assert (shots / shot).stat().st_size > 20_000, f"{shot} looks blank"
