"""The committed example search as data, and how a new run of the README's main job compares.

`docs/example-search/trials.json` holds what decides whether a rerun reproduced the example: the
baseline's and every trial's parameters, status and eval-loss curve, with the package versions and
the CPU kernels it was made with. `scripts/make_examples.py` writes it; the reproducibility test
(tests/test_reproducibility.py) reruns the job and compares.

Measured (docs/example-search/README.md): the same machine gives the same floats, bit for bit,
across runs and installs; another machine of the same kind gave the first runs one float32 ulp
off (hence REL_TOL); a CPU with other vector kernels (AVX2 instead of AVX-512, in MKL
or torch) gives the same baseline and Sobol trials 1-3, and other BoTorch proposals from trial 5
on (the GP fit and the acquisition optimizer amplify last-bit differences).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "example-search" / "trials.json"
# Trials whose parameters do not come from a model fit: the same on any CPU (measured).
MACHINE_INDEPENDENT = 3


def summarize(state: dict[str, Any], versions: dict[str, str], cpu_kernels: str) -> dict[str, Any]:
    """The example's record from a search's saved state (search_state/trials.json)."""
    base = state["baseline"]
    return {
        "search_run_id": state["parent_run_id"],
        "cpu_kernels": cpu_kernels,
        "versions": versions,
        "baseline": {
            "parameters": base["parameters"],
            "eval_loss": base["eval_loss"],
            "evals": base["evals"],
        },
        "trials": [
            {
                "index": t["index"],
                "generation_method": t["generation_method"],
                "parameters": t["parameters"],
                "status": t["status"],
                "eval_loss": t["eval_loss"],
                "evals": t["evals"],
            }
            for t in state["trials"]
        ],
        "replicates": [
            {"of": r["of"], "seed": r["seed"], "status": r["status"], "eval_loss": r["eval_loss"]}
            for r in state.get("replicates") or []
        ],
    }


def load_state(search_dir: Path) -> dict[str, Any]:
    """The saved state of the one search under a search.output_dir."""
    (path,) = list(search_dir.glob("*/search_state/trials.json"))
    return json.loads(path.read_text())


# Losses agree to this relative tolerance: a few float32 ulps (measured 2026-12-07: this machine
# kind and CI's gave the example's baseline and trials 1-3 one ulp off, 3e-8 to 7e-8 relative, at
# the example's own commit; trials 4-10 and the replicates bit for bit). Parameters, statuses and
# generation methods compare exactly: a model-based proposal that moved is a real difference.
REL_TOL = 1e-6


def differences(expected: dict[str, Any], got: dict[str, Any], trials: int | None = None) -> list[str]:
    """Where `got` differs from `expected` (floats within REL_TOL): the baseline, then the first
    `trials` trials (all when None), in order; empty when it reproduces."""
    out = []
    for key in ("parameters", "eval_loss", "evals"):
        if not same(expected["baseline"][key], got["baseline"][key], _tolerance(key)):
            out.append(f"baseline {key}: {expected['baseline'][key]} != {got['baseline'][key]}")
    want, have = expected["trials"][:trials], got["trials"][:trials]
    if len(have) < len(want):
        out.append(f"{len(have)} trials ran, the example has {len(want)}")
    for a, b in zip(want, have, strict=False):
        for key in ("generation_method", "parameters", "status", "eval_loss", "evals"):
            if not same(a[key], b[key], _tolerance(key)):
                out.append(f"trial {a['index']} {key}: example {a[key]} != rerun {b[key]}")
    # Which configurations are replicated follows the model-based trials: compared with them.
    if trials is None and not same(expected.get("replicates", []), got.get("replicates", [])):
        out.append(f"replicates: example {expected.get('replicates')} != rerun {got.get('replicates')}")
    return out


def _tolerance(key: str) -> float:
    return 0.0 if key == "parameters" else REL_TOL


def same(a: Any, b: Any, rel_tol: float = REL_TOL) -> bool:
    """Equal after a JSON round trip (tuples and lists alike), floats within rel_tol."""
    return _same(json.loads(json.dumps(a)), json.loads(json.dumps(b)), rel_tol)


def _same(a: Any, b: Any, tol: float) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=tol) if tol else a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], tol) for k in a)
    return a == b


def children(parent_id: str) -> list:
    """The child runs of a run (a search's baseline, trials and replicates), oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs(
        [exp], f"tags.mlflow.parentRunId = '{parent_id}'", order_by=["attributes.start_time ASC"]
    )


def summary_numbers(report: str) -> dict[str, str]:
    """The bold rows of a report's summary table: {label: value}."""
    rows = {}
    for line in report.splitlines():
        if line.startswith("| **"):
            key, value = line.split("|")[1:3]
            rows[key.strip(" *")] = value.strip()
    return rows
