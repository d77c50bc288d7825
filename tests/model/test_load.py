"""Model: device/precision planning, sources, builders and their errors."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from pipeline.config import LoraConfig, ModelConfig, TrainConfig
from pipeline.core.errors import ModelError
from pipeline.data.inputs import model_source
from pipeline.model.device import plan_device
from pipeline.model.load import (
    attach_lora,
    build_lora_config,
    build_quantization_config,
    count_parameters,
    detach_lora,
    linear_module_names,
    load_base_model,
    load_tokenizer,
)

from ..conftest import DEMO_MODEL

M = ModelConfig(name_or_path=str(DEMO_MODEL))


@pytest.mark.parametrize(
    ("cuda", "bf16", "precision", "dtype", "want"),
    [
        (False, None, "auto", "auto", ("cpu", "float32", "fp32")),
        (True, True, "auto", "auto", ("cuda", "bfloat16", "bf16")),  # A100 / H100
        (True, False, "auto", "auto", ("cuda", "float16", "fp16")),  # T4
        (True, True, "fp32", "auto", ("cuda", "float32", "fp32")),
        (False, None, "bf16", "auto", ("cpu", "float32", "bf16")),  # CPU autocast
        (True, True, "auto", "float32", ("cuda", "float32", "bf16")),
    ],
)
def test_plan_device(cuda, bf16, precision, dtype, want):
    plan = plan_device(
        ModelConfig(name_or_path="x", dtype=dtype),
        TrainConfig(precision=precision),
        cuda=cuda,
        bf16_supported=bf16,
        gpu_name="GPU",
    )
    assert (plan.device, plan.dtype, plan.precision) == want


def test_plan_device_rejects_what_the_hardware_cannot_do():
    with pytest.raises(ModelError, match="train.precision: fp16 mixed precision needs a CUDA GPU"):
        plan_device(ModelConfig(name_or_path="x"), TrainConfig(precision="fp16"), cuda=False)
    with pytest.raises(ModelError, match="train.precision: bf16 is not supported by Tesla T4"):
        plan_device(
            ModelConfig(name_or_path="x"),
            TrainConfig(precision="bf16"),
            cuda=True,
            bf16_supported=False,
            gpu_name="Tesla T4",
        )
    with pytest.raises(ModelError, match="model.dtype: float16"):
        plan_device(ModelConfig(name_or_path="x", dtype="float16"), TrainConfig(), cuda=False)


def test_gpu_kernels_are_refused_on_cpu_and_checked_on_cuda(monkeypatch):
    """Liger and FlashAttention-2 are GPU kernels: on CPU the key at fault is named before any
    model loads; on a GPU a missing Liger package is named too."""
    with pytest.raises(ModelError, match="train.use_liger_kernel: Liger's Triton kernels need a CUDA GPU"):
        plan_device(M, TrainConfig(use_liger_kernel=True), cuda=False)
    fa2 = ModelConfig(name_or_path="x", attn_implementation="flash_attention_2")
    with pytest.raises(ModelError, match="model.attn_implementation: flash_attention_2 needs a CUDA GPU"):
        plan_device(fa2, TrainConfig(), cuda=False)
    assert plan_device(fa2, TrainConfig(), cuda=True, bf16_supported=True, gpu_name="H100").device == "cuda"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelError, match="train.use_liger_kernel: the liger-kernel package is not installed"):
        plan_device(M, TrainConfig(use_liger_kernel=True), cuda=True, bf16_supported=True, gpu_name="H100")


def test_build_lora_config_maps_every_field():
    lc = build_lora_config(
        LoraConfig(r=32, alpha=64, dropout=0.1, target_modules=["q_proj"], use_rslora=True, bias="lora_only")
    )
    assert (lc.r, lc.lora_alpha, lc.lora_dropout, lc.use_rslora, lc.bias) == (32, 64, 0.1, True, "lora_only")
    assert set(lc.target_modules) == {"q_proj"}
    assert build_lora_config(LoraConfig()).target_modules == "all-linear"


def test_quantization_config_is_nf4_double_quant():
    import torch

    q = build_quantization_config(ModelConfig(name_or_path="x", load_in_4bit=True), torch.bfloat16)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert build_quantization_config(ModelConfig(name_or_path="x"), torch.float32) is None


def test_4bit_without_bitsandbytes_is_a_clear_error(monkeypatch):
    import torch

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a)
    )
    with pytest.raises(ModelError, match=r"^model.load_in_4bit: 4-bit loading needs bitsandbytes"):
        build_quantization_config(ModelConfig(name_or_path="x", load_in_4bit=True), torch.float32)


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelError, match=r"^model.name_or_path: no such folder: .*nowhere$"):
        model_source(ModelConfig(name_or_path=str(tmp_path / "nowhere")))


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelError, match=r"^model.gguf_file: missing.gguf not found in "):
        model_source(ModelConfig(name_or_path=str(tmp_path), gguf_file="missing.gguf"))


def test_pkg_source_resolves_to_the_package_folder():
    src, _ = model_source(ModelConfig(name_or_path="pkg:pipeline"))
    assert src.endswith("pipeline")
    with pytest.raises(ModelError, match="package 'no_such_pkg' is not installed"):
        model_source(ModelConfig(name_or_path="pkg:no_such_pkg"))


def test_hub_id_offline_is_a_one_line_error():
    with pytest.raises(
        ModelError, match=r"^model.name_or_path: cannot load a tokenizer from 'someone/no-such-model'"
    ):
        load_tokenizer(ModelConfig(name_or_path="someone/no-such-model"))


def _base():
    plan = plan_device(M, TrainConfig(), cuda=False)
    return load_base_model(M, plan).model


def test_unknown_target_module_names_the_choices():
    model = _base()
    with pytest.raises(
        ModelError, match=r"^lora.target_modules: qkv_proj not in the model; its linear layers are .*q_proj"
    ):
        attach_lora(model, LoraConfig(target_modules=["q_proj", "qkv_proj"]), seed=0)


def test_trainable_count_is_what_r_and_targets_imply_and_detach_restores():
    model = _base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linears = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))}
    r = 4
    expected = sum(r * (m.in_features + m.out_features) for m in linears.values())
    peft_model = attach_lora(model, LoraConfig(r=r, target_modules=["q_proj", "v_proj"]), seed=0)
    trainable, total = count_parameters(peft_model)
    assert trainable == expected
    assert (
        total
        == sum(v.numel() for v in before.values() if v.dtype.is_floating_point) - _tied(model) + expected
    )
    base = detach_lora(peft_model)
    after = base.state_dict()
    assert set(after) == set(before)
    assert all((after[k] == before[k]).all() for k in before)
    assert "lora" not in " ".join(n for n, _ in base.named_modules())


def _tied(model) -> int:
    """state_dict lists tied embedding weights twice; parameters() once."""
    sd = model.state_dict()
    seen, dup = set(), 0
    for v in sd.values():
        if v.data_ptr() in seen:
            dup += v.numel()
        seen.add(v.data_ptr())
    return dup


def test_all_linear_excludes_the_output_head():
    model = _base()
    names = linear_module_names(model)
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names
    peft_model = attach_lora(model, LoraConfig(r=2), seed=0)
    lora_layers = {n.rsplit(".", 2)[0] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert not any("lm_head" in n for n in lora_layers)
    assert len(lora_layers) == 7 * model.config.num_hidden_layers


def test_lora_init_is_seeded():
    a = attach_lora(_base(), LoraConfig(r=2), seed=1)
    b = attach_lora(_base(), LoraConfig(r=2), seed=1)
    c = attach_lora(_base(), LoraConfig(r=2), seed=2)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    key = next(k for k in pa if "lora_A" in k)
    assert (pa[key] == pb[key]).all()
    assert not (pa[key] == pc[key]).all()


def test_bitsandbytes_blocked_import_is_detected(monkeypatch):
    """A blocked import (sys.modules[name] = None, as some sandboxes and test setups do) counts as
    missing: 4-bit loading says how to install it instead of failing inside transformers."""
    import torch

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ModelError, match=r"^model.load_in_4bit: 4-bit loading needs bitsandbytes"):
        build_quantization_config(ModelConfig(name_or_path="x", load_in_4bit=True), torch.float32)
