"""What the search benchmarks share: their command line and a throwaway store for the runs."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(doc: str) -> argparse.Namespace:
    """--config (the demo), --trials (10) and repeatable --set overrides."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo-cpu.yaml"))
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    return ap.parse_args()


def fresh_store(prefix: str, args: argparse.Namespace) -> tuple[Path, list[str]]:
    """A temp folder holding a new sqlite store (set as MLFLOW_TRACKING_URI before MLflow is
    used), and the overrides every benchmark search needs: scratch there, no system metrics, no
    seed replicates (these benchmarks measure the trials; bench/noise.py measures replicates),
    then the command line's --set."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    overrides = [
        f"train.output_dir={tmp / 'out'}",
        "tracking.log_system_metrics=false",
        "search.replicates=null",
        *" ".join(args.overrides).split(),
    ]
    return tmp, overrides
