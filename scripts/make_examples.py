"""Regenerate the committed example reports from real runs, as a user makes them.

    .venv/bin/python scripts/make_examples.py        # about 10 minutes on 2 CPU cores

On a fresh store (outputs/examples/mlflow.db), runs the README's main job, `mlflow run . -e search
--env-manager local`, then `mlflow run . -e retrain --env-manager local`, and copies their reports
and plots to docs/example-search/ and docs/example-retrain/, with docs/example-search/trials.json:
the trials, package versions and CPU kernels that tests/test_reproducibility.py compares a rerun
with. Run it after moving a pinned dependency (constraints.txt), in the same commit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.provenance import package_versions  # noqa: E402
from pipeline.model.device import cpu_kernels  # noqa: E402
from tests.reproduce import EXAMPLE, summarize  # noqa: E402


def mlflow_run(entry_point: str, env: dict[str, str]) -> str:
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", entry_point, "--env-manager", "local"]
    print("$", " ".join(cmd[2:]), flush=True)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"error: {entry_point} failed:\n{p.stderr[-3000:]}")
    print(p.stdout, flush=True)
    return p.stdout


def copy_report(folder: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.suffix in (".md", ".png"):
            shutil.copy2(f, dest / f.name)


def main() -> None:
    store = ROOT / "outputs" / "examples"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{store / 'mlflow.db'}")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_RUN_ID", None)

    out = mlflow_run("search", env)
    search_id = re.search(r"^search run (\w+): best", out, re.M).group(1)
    search_dir = ROOT / "outputs" / "search" / search_id
    copy_report(search_dir / "report", ROOT / "docs" / "example-search")
    state = json.loads((search_dir / "search_state" / "trials.json").read_text())
    record = summarize(state, package_versions(), cpu_kernels())
    EXAMPLE.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote docs/example-search ({search_id})")

    out = mlflow_run("retrain", env)
    retrain_id = re.search(r"^retrain run (\w+):", out, re.M).group(1)
    copy_report(ROOT / "outputs" / "retrain" / retrain_id, ROOT / "docs" / "example-retrain")
    print(f"wrote docs/example-retrain ({retrain_id}); the store: {env['MLFLOW_TRACKING_URI']}")
    print("screenshots of it: MLFLOW_TRACKING_URI=... .venv/bin/python scripts/ui_screenshots.py")


if __name__ == "__main__":
    main()
