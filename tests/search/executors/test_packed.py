"""`mlflow run . -e search -P set="search.pack=4"`: the demo search with four trials per training
step. Every trial is still its own nested run (tagged with its pack and slot), the report has the
same shape as an unpacked search's, and the quasi-random trials, which Ax chooses before it sees
any data, are the same trials with the same eval losses as in the unpacked search of that seed.
(From the first BoTorch trial on, Ax sees the packed search's results at other times, with other
trials pending, so its later candidates differ: docs/search.md#packed-trials.)"""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import pytest

from pipeline.core import names
from pipeline.search import run_search, search_config

from ...conftest import DEMO_CONFIG, mlflow_search, tiny_overrides

SOBOL = 4


def _values(tmp_path: Path, where: str) -> dict:
    return {
        "search.output_dir": str(tmp_path / where),
        "search.early_stopping.enabled": False,
        "search.initialization_trials": SOBOL,
        "registry.model_name": f"packed-{where}",
        "eval.generation_samples": 2,
    }


def _headings(report: str) -> list[str]:
    return [line for line in report.splitlines() if re.match(r"#+ ", line)]


@pytest.mark.e2e
def test_a_packed_search_through_mlflow_run(tmp_path):
    sets = " ".join(tiny_overrides(tmp_path, **_values(tmp_path, "packed"))) + " search.pack=4"
    found = mlflow_search(tmp_path, "packed", 6, sets)
    client, parent, trials, report = found.client, found.parent, found.trials, found.report
    assert len(trials) == 6
    for r in trials:
        assert r.data.tags[names.PARENT_RUN_ID] == parent.info.run_id
        assert r.info.status == "FINISHED" and r.data.tags[names.TRIAL_PACK_SLOT] in {"0", "1", "2", "3"}
        assert client.list_artifacts(r.info.run_id, names.ADAPTER_DIR)
    # The four quasi-random trials trained together: one pack, four places.
    packs: dict[str, set[str]] = {}
    for r in trials:
        packs.setdefault(r.data.tags[names.TRIAL_PACK], set()).add(r.data.tags[names.TRIAL_PACK_SLOT])
    assert max(len(places) for places in packs.values()) == 4
    report = Path(
        client.download_artifacts(
            parent.info.run_id, f"{names.REPORT_DIR}/{names.REPORT_FILE}", str(tmp_path)
        )
    ).read_text()

    # The same search unpacked, in this process, into the test's own store.
    mlflow.set_tracking_uri(found.tracking_uri)
    alone = run_search(
        search_config(str(DEMO_CONFIG), tiny_overrides(tmp_path, **_values(tmp_path, "alone")), n_trials=6),
        quiet=True,
    )
    assert _headings((alone.report_dir / names.REPORT_FILE).read_text()) == _headings(report)
    by_index = {int(r.data.tags[names.AX_TRIAL_INDEX]): r for r in trials}
    # The unpacked search's quasi-random trials (the baseline, done first, counts toward Ax's
    # initialization there, so it has one fewer: Ax, asked for four at once, gives four Sobol).
    sobol = [t for t in alone.state.trials if t.generation_method == "Sobol"]
    assert len(sobol) >= SOBOL - 1
    for record in sobol:
        packed = by_index[record.index]
        for key, value in record.parameters.items():
            assert packed.data.params[key] == str(value), key
        assert float(packed.data.metrics[names.EVAL_LOSS]) == pytest.approx(record.eval_loss, rel=1e-5)
