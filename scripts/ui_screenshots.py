"""Screenshots of the MLflow UI for the docs (docs/images/ui-*.png), from a real store.

    mlflow run . -e search --env-manager local && mlflow run . -e retrain --env-manager local
    .venv/bin/python scripts/ui_screenshots.py            # the store of configs/demo-cpu.yaml

Starts `mlflow server` on a free loopback port over the store, opens the latest search run's
experiment in headless Chromium (Debian's chromium + chromium-driver), and saves the runs table
with the trials expanded, the compare view of the trials, the search run page and the
registered model page. The same browser code drives tests/test_ui.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import tracking  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.core import names  # noqa: E402
from tests import browser  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo-cpu.yaml"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"))
    args = parser.parse_args()
    config = load_config(args.config)
    uri = tracking.use_store(config.tracking)
    search = tracking.latest_finished_search()
    if search is None:
        sys.exit(f"error: no finished search run in {uri}; run `mlflow run . -e search` first")
    experiment = search.experiment_id
    trials = tracking.trials_of(search)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Path(tempfile.mkdtemp()) / "server.log"
    with browser.mlflow_server(uri, log) as base, browser.chromium(1500, 900) as d:
        browser.open_page(d, browser.experiment_runs_url(base, experiment), search.name)
        browser.expand_run(d, search.run_id)
        browser.wait_for_text(d, trials[0].name)
        browser.settle()
        d.save_screenshot(str(out / "ui-runs.png"))

        ids = [t.run_id for t in trials]
        browser.open_page(d, browser.compare_url(base, experiment, ids), "lora.r", timeout_s=90)
        browser.settle()
        browser.choose_parallel_coordinates(d, ["train.learning_rate"], names.EVAL_LOSS)
        browser.settle(3)
        d.save_screenshot(str(out / "ui-compare.png"))

        browser.open_page(d, browser.run_url(base, experiment, search.run_id), "Description")
        browser.settle()
        d.save_screenshot(str(out / "ui-search-run.png"))

        model = config.registry.model_name
        browser.open_page(d, browser.model_url(base, model), f"@ {names.CHAMPION_ALIAS}")
        browser.settle()
        d.save_screenshot(str(out / "ui-model.png"))
    for png in sorted(out.glob("ui-*.png")):
        print(f"{png} ({png.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
