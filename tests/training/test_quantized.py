"""4-bit (QLoRA) training on CPU is the training the config asks for.

bitsandbytes 0.50 repacks a 4-bit layer for its CPU inference kernel on the first eval-mode,
no-grad forward (what every evaluation is) and never back: on AVX512-BF16 CPUs (this machine, CI)
later training steps then crashed in layers with a bias and got wrong gradients in the others.
These tests hold the fix: the gradients of one batch are the same before and after an
evaluation, on the demo model (no biases) and on a Qwen2-shaped model (q/k/v biases, GQA); the
seed's QLoRA config trains through evaluations; a bitsandbytes that repacks anyway is refused.
"""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch

from pipeline.config import load_config, with_overrides
from pipeline.core import names
from pipeline.core.errors import ModelError
from pipeline.data.collate import build_collator
from pipeline.data.prepare import prepare_data
from pipeline.model.device import plan_device
from pipeline.model.load import attach_lora, load_base_model, load_tokenizer
from pipeline.training.metrics import eval_loss

from ..conftest import DEMO_CONFIG, ROOT, run_cli, tiny_overrides

SEED_CONFIG = ROOT / "configs" / "qwen2.5-7b-qlora.yaml"
NO_AUTOGRAD = "an autograd kernel was not registered"  # torch, when backprop meets gemv_4bit


def _packed(model) -> list[str]:
    """4-bit layers in bitsandbytes' CPU inference layout (must stay empty while training)."""
    return [
        n
        for n, m in model.named_modules()
        if type(m).__name__ == "Linear4bit" and getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    ]


def _four_bit(config):
    plan = plan_device(config.model, config.train)
    tok = load_tokenizer(config.model)
    data = prepare_data(config.data, tok)
    base = load_base_model(config.model, plan, config.train.gradient_checkpointing)
    model = attach_lora(base.model, config.lora, config.train.seed)
    # B starts at zero, which would leave A (and every input) without a gradient to compare.
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return model, tok, data


def _gradients(model, batch) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # the same LoRA dropout masks each time
    model.train()
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("shape", ["demo llama (no biases)", "qwen2 (q/k/v biases, GQA)"])
def test_4bit_gradients_are_the_same_after_an_evaluation(shape, tiny_qwen2, tmp_path):
    config = load_config(DEMO_CONFIG, tiny_overrides(tmp_path))
    values = {"model.load_in_4bit": True, "data.max_train_examples": 8, "data.max_eval_examples": 8}
    if shape.startswith("qwen2"):
        values["model.name_or_path"] = str(tiny_qwen2)
    model, tok, data = _four_bit(with_overrides(config, values))
    assert [m for m in model.modules() if type(m).__name__ == "Linear4bit"], "the base must be 4-bit"
    batch = build_collator("length_grouped", tok, 128)(data.train[:4])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = _gradients(model, batch)
        loss = eval_loss(model, data.eval, tok, batch_size=4)  # what every evaluation runs
        after = _gradients(model, batch)

    assert math.isfinite(loss)
    assert _packed(model) == [], "an evaluation repacked 4-bit layers for inference"
    assert not [w for w in caught if NO_AUTOGRAD in str(w.message)]
    assert before.keys() == after.keys() and any(n.endswith("lora_A.default.weight") for n in before)
    different = [n for n in before if not torch.equal(before[n], after[n])]
    assert different == [], f"gradients changed after an evaluation: {different[:3]}"
    assert all(g.abs().sum() > 0 for g in before.values()), "every adapter matrix gets a gradient"


def test_seed_qlora_config_trains_through_evaluations_on_cpu(tiny_qwen2, tmp_path, capsys, caplog):
    """The user's real target, configs/qwen2.5-7b-qlora.yaml, with a Qwen2-shaped model: a 4-bit
    baseline with evaluations every 2 steps runs, and the run records what ran on this CPU."""
    import mlflow

    caplog.set_level(logging.INFO, logger="pipeline")
    sets = {
        "model.name_or_path": tiny_qwen2,
        "train.max_steps": 6,
        "train.eval_steps": 2,
        "train.output_dir": tmp_path / "out",
        "data.max_train_examples": 24,
        "data.max_eval_examples": 8,
        "eval.generation_samples": 2,
        "eval.max_new_tokens": 4,
        "tracking.log_system_metrics": False,
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run_cli(
            [
                "baseline",
                "--config",
                str(SEED_CONFIG),
                "--set",
                " ".join(f"{k}={v}" for k, v in sets.items()),
            ],
            capsys,
        )
    assert code == 0, err
    assert not [w for w in caught if NO_AUTOGRAD in str(w.message)]
    run_id = out.split("baseline run ")[1].split(":")[0]
    run = mlflow.MlflowClient().get_run(run_id)
    evals = mlflow.MlflowClient().get_metric_history(run_id, names.EVAL_LOSS)
    assert sorted({m.step for m in evals}) == [2, 4, 6] and all(math.isfinite(m.value) for m in evals)
    tags = run.data.tags
    # paged_adamw_8bit pages through CUDA memory: on CPU the same 8-bit AdamW runs unpaged, and says so.
    assert run.data.params["train.optimizer"] == "paged_adamw_8bit"
    assert tags[names.OPTIMIZER_EFFECTIVE] == "adamw_8bit"
    assert tags[names.QUANTIZATION_EFFECTIVE].startswith("nf4, double quant; compute float32; bitsandbytes ")
    assert "adamw_8bit runs instead" in tags[names.FALLBACKS]
    said = [r.getMessage() for r in caplog.records if "pages its state through CUDA" in r.getMessage()]
    assert len(said) == 1, said
    start = [r.getMessage() for r in caplog.records if "parameters trainable" in r.getMessage()]
    assert "base in 4-bit nf4, double quant" in start[0] and "optimizer adamw_8bit" in start[0]


def test_a_bitsandbytes_that_repacks_anyway_is_refused(tmp_path, monkeypatch):
    """Where turning the inference repacking off does not hold (another bitsandbytes), 4-bit
    training is refused with one line naming the key, never run with wrong gradients."""
    import bitsandbytes as bnb

    # Every 4-bit layer claims the inference kernel, whatever the pipeline sets.
    claims = property(lambda self: True, lambda self, value: None)
    monkeypatch.setattr(bnb.nn.Linear4bit, "support_avx512bf16_for_cpu", claims, raising=False)
    config = with_overrides(load_config(DEMO_CONFIG, tiny_overrides(tmp_path)), {"model.load_in_4bit": True})
    plan = plan_device(config.model, config.train)
    with pytest.raises(ModelError, match=r"^model\.load_in_4bit: bitsandbytes .* repacks 4-bit weights"):
        load_base_model(config.model, plan)
