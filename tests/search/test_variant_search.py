"""`mlflow run . -e search` over a variant space, as docs/search.md writes it: DoRA and the init as
dimensions, PiSSA's iteration count conditional on PiSSA; every trial trains the variant Ax
asked for, the report shows each variant as a dimension, and the champion generates."""

from __future__ import annotations

import mlflow
import pytest

from ..conftest import mlflow_search, tiny_overrides

# The exact form docs/search.md gives: keys set one by one, a YAML value quoted where it has spaces.
VARIANT_SPACE = (
    "search.parameters.lora.use_dora.type=choice search.parameters.lora.use_dora.values=[false,true] "
    "search.parameters.lora.init.type=choice search.parameters.lora.init.values=[default,pissa,eva] "
    "search.parameters.lora.init.dependents='{pissa: [lora.pissa_iterations]}' "
    "search.parameters.lora.pissa_iterations.type=choice search.parameters.lora.pissa_iterations.values=[2,8]"
)


@pytest.mark.e2e
def test_a_variant_search_through_mlflow_run(tmp_path):
    values = {
        "search.output_dir": str(tmp_path / "search"),
        "search.early_stopping.enabled": False,
        "search.initialization_trials": 5,
        "registry.model_name": "variant-lora",
    }
    sets = " ".join(tiny_overrides(tmp_path, **values)) + " " + VARIANT_SPACE
    found = mlflow_search(tmp_path, "variants", 5, sets)
    trials, report = found.trials, found.report
    assert len(trials) == 5
    inits = {r.data.params["lora.init"] for r in trials}
    assert len(inits) > 1 and {r.data.params["lora.use_dora"] for r in trials} == {"False", "True"}
    for r in trials:  # the conditional key is the config's default where PiSSA is off
        if r.data.params["lora.init"] != "pissa":
            assert r.data.params["lora.pissa_iterations"] == "None"
    assert "- **lora.use_dora**: eval_loss by value:" in report
    assert "- **lora.init**: eval_loss by value:" in report
    pissa_line = next(line for line in report.splitlines() if line.startswith("- **lora.pissa_iterations**"))
    assert "Conditional: only when lora.init = pissa" in pissa_line

    mlflow.set_tracking_uri(found.tracking_uri)
    answers = mlflow.pyfunc.load_model("models:/variant-lora@champion").predict(
        ["What does `json.dumps` do?"], params={"max_new_tokens": 4}
    )
    assert len(answers) == 1 and isinstance(answers[0], str)
