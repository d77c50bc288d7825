"""The search's baseline: its parameters, and when an earlier run may stand in for it
(`pipeline/search/steps/baseline.py`)."""

from __future__ import annotations

import pytest

from pipeline.search.ax.optimizer import Optimizer
from pipeline.search.ax.space import build_client
from pipeline.search.steps.baseline import baseline_parameters

from ...conftest import DEMO_CONFIG
from ..common import demo, search_overrides


def test_baseline_parameters_and_membership():
    config = demo()
    params = baseline_parameters(config)
    assert params == {"lora.r": 8, "lora.alpha": 16.0, "train.learning_rate": 1e-3, "train.batch_size": 8}
    optimizer = Optimizer(build_client(config.search), config)
    assert optimizer.in_search_space(params)
    assert not optimizer.in_search_space({**params, "lora.r": 12})


def test_baseline_reuse_requires_the_same_data_eval_set_device_precision_and_versions(tmp_path):
    """A baseline is reused only when it was measured like this search measures: same config,
    data and eval set contents, device, precision and numerics package versions; the report
    says which baseline was used and why. Before, the config fingerprint alone decided, so a
    changed data file (same path) or a CPU baseline was compared against."""
    import json as _json

    from pipeline.core import names
    from pipeline.search.steps.baseline import reusable
    from pipeline.tracking import RunRecord

    me = {
        names.CONFIG_FINGERPRINT: "c",
        names.DATA_FINGERPRINT: "d",
        names.EVAL_FINGERPRINT: "e",
        names.DEVICE: "NVIDIA A100-SXM4-80GB",
        names.PRECISION: "bf16",
        names.PACKAGE_VERSIONS: _json.dumps(
            {"bitsandbytes": "0.50.2", "peft": "0.21.2", "torch": "2.13.0", "transformers": "5.24.0"},
            sort_keys=True,
        ),
    }
    versions = {
        "torch": "2.13.0",
        "transformers": "5.24.0",
        "peft": "0.21.2",
        "bitsandbytes": "0.50.2",
        "mlflow": "3.17.2",
    }

    def run(run_id, **tags):
        t = {**me, names.PACKAGE_VERSIONS: _json.dumps({**versions, **tags.pop("versions", {})}), **tags}
        return RunRecord(run_id, "b", "0", "FINISHED", 0, 1, t, {"eval_loss": 3.0})

    cpu = run("cpu", **{names.DEVICE: "cpu (2 threads)", names.PRECISION: "fp32"})
    old_torch = run("old", versions={"torch": "2.9.1"})
    other_mlflow = run("ok", versions={"mlflow": "3.1.0"})  # not a numerics package: still the same
    chosen, why = reusable([cpu, old_torch, other_mlflow], me, ["eval_loss"])
    assert chosen.run_id == "ok" and "same config, data, eval set, device, precision" in why
    chosen, why = reusable([cpu, old_torch], me, ["eval_loss"])
    assert chosen is None
    assert "run cpu differs (device cpu (2 threads) vs NVIDIA A100-SXM4-80GB; precision fp32 vs bf16)" in why
    assert "run old differs (versions" in why and "2.9.1" in why
    assert reusable([other_mlflow], me, ["eval_rougeL"])[1] == "run ok differs (no eval_rougeL)"


@pytest.mark.slow
def test_a_changed_data_file_gets_its_own_baseline(tmp_path):
    """For real: the same config on a data file whose contents changed is not the same baseline;
    an unchanged one is reused, and the report says which and why."""
    import json as _json

    from pipeline.core import names
    from pipeline.search import run_search, search_config

    from ...conftest import DEMO_DATA

    data = tmp_path / "qa.jsonl"
    data.write_text(DEMO_DATA.read_text())
    sets = [*search_overrides(tmp_path), f"data.path={data}"]
    first = run_search(search_config(DEMO_CONFIG, sets, n_trials=1), quiet=True)
    again = run_search(search_config(DEMO_CONFIG, sets, n_trials=1), quiet=True)
    assert again.state.baseline.reused and again.state.baseline.run_id == first.state.baseline.run_id
    report = (again.report_dir / names.REPORT_FILE).read_text()
    assert f"(run `{first.state.baseline.run_id}`, reused: same config, data, eval set" in report
    rows = [_json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(_json.dumps({**r, "output": r["output"] + " Done."}) + "\n" for r in rows))
    changed = run_search(search_config(DEMO_CONFIG, sets, n_trials=1), quiet=True)
    assert not changed.state.baseline.reused and changed.state.baseline.run_id != first.state.baseline.run_id
    assert f"run {first.state.baseline.run_id} differs (data " in changed.state.baseline.why
    assert "trained in this search (run " in (changed.report_dir / names.REPORT_FILE).read_text()
