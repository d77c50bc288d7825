"""Model: the base (hub id, local folder or GGUF file; optional 4-bit NF4) and its LoRA adapter.

Library objects (``BitsAndBytesConfig``, ``peft.LoraConfig``) are built from our config by the
small ``build_*`` functions below; our config objects never reach library classes.
"""

from __future__ import annotations

import gc
import importlib.util
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config import LoraConfig, ModelConfig
from pipeline.core.errors import ModelError
from pipeline.data.inputs import model_source
from pipeline.model import variants
from pipeline.model.device import DevicePlan

# ---------------------------------------------------------------------------------------------
# Sources


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer of the base model, with a pad token (EOS when the model defines none)."""
    from transformers import AutoTokenizer

    src, gguf = model_source(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(
            src, gguf_file=gguf, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise ModelError(
            f"model.name_or_path: cannot load a tokenizer from {cfg.name_or_path!r}: {_first_line(e)}"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def build_quantization_config(cfg: ModelConfig, compute_dtype: torch.dtype) -> Any | None:
    """BitsAndBytesConfig for 4-bit loading, or None."""
    if not cfg.load_in_4bit:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("model.load_in_4bit: 4-bit loading needs bitsandbytes (pip install bitsandbytes)")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


@dataclass
class BaseModel:
    """A loaded base model and how long loading took (reused across trials by the search)."""

    model: Any
    load_seconds: float
    source: str


def load_base_model(
    cfg: ModelConfig, plan: DevicePlan, gradient_checkpointing: bool = False, for_training: bool = True
) -> BaseModel:
    """Load the base model for LoRA training (quantized when asked), or for inference."""
    from transformers import AutoModelForCausalLM

    src, _ = model_source(cfg)
    kwargs = from_pretrained_kwargs(cfg, plan, for_training)
    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"model.name_or_path: cannot load {cfg.name_or_path!r}: {_first_line(e)}") from None
    if for_training:
        model.config.use_cache = False  # the KV cache only wastes memory during training
    if cfg.gguf_file and "quantization_config" not in kwargs:
        # transformers dequantizes GGUF weights into ordinary tensors on load, but leaves the model
        # marked as quantized, and the Trainer refuses to train a "GGUF-quantized" model.
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
    if "quantization_config" in kwargs:
        # Serving too: an adapter is served on the 4-bit kernels it was trained through (DoRA
        # dequantizes the base weight, which a CPU-repacked layer gets wrong).
        keep_4bit_trainable(model)
    if "quantization_config" in kwargs and for_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return BaseModel(model, time.perf_counter() - t0, cfg.name_or_path)


def keep_4bit_trainable(model: Any) -> None:
    """Keep every 4-bit layer on the kernels that have a backward pass, through evaluations.

    bitsandbytes (0.50 on CPUs with AVX512-BF16) repacks a `Linear4bit` weight into a CPU
    inference layout on its first eval-mode forward without gradients -- exactly what an
    evaluation is -- and never repacks it back: later training steps then run an inference kernel
    with no autograd (wrong LoRA gradients; a crash in layers with a bias). Turning the layer's
    `support_avx512bf16_for_cpu` off keeps the dequantize + matmul path, which has a backward. A
    probe forward checks that it held: a bitsandbytes that repacks anyway is refused, never
    trained on."""
    layers = [m for m in model.modules() if type(m).__name__ in {"Linear4bit", "LinearNF4", "LinearFP4"}]
    for layer in layers:
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False
    if not layers or layers[0].weight.device.type != "cpu":
        return
    probe, was_training = layers[0], layers[0].training
    probe.eval()
    try:
        with torch.no_grad():
            probe(torch.zeros(1, probe.in_features, dtype=probe.compute_dtype or torch.float32))
    finally:
        probe.train(was_training)
    if getattr(probe.weight.quant_state, "packing_format_for_cpu", False):
        import bitsandbytes

        raise ModelError(
            f"model.load_in_4bit: bitsandbytes {bitsandbytes.__version__} repacks 4-bit weights for CPU "
            "inference at evaluation time on this CPU, after which training gets wrong gradients; the "
            "pipeline cannot turn that off in this version: use bitsandbytes 0.50 (constraints.txt), "
            "or set model.load_in_4bit=false on CPU"
        )


def from_pretrained_kwargs(cfg: ModelConfig, plan: DevicePlan, for_training: bool = True) -> dict[str, Any]:
    """`from_pretrained` arguments for our model config and device plan."""
    _, gguf = model_source(cfg)
    quant = build_quantization_config(cfg, plan.torch_dtype)
    kwargs: dict[str, Any] = {
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
        "dtype": plan.torch_dtype,
    }
    if gguf:
        kwargs["gguf_file"] = gguf
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if quant is not None:
        kwargs["quantization_config"] = quant
    if quant is not None or (plan.device == "cuda" and not for_training):
        # Quantized weights are placed at load time (the Trainer cannot move them later); for
        # inference the weights load straight onto the GPU instead of through host memory.
        kwargs["device_map"] = {"": 0 if plan.device == "cuda" else "cpu"}
    return kwargs


# ---------------------------------------------------------------------------------------------
# LoRA


def linear_module_names(model: Any) -> set[str]:
    """Leaf names of the layers LoRA can target (linear, GPT-2's Conv1D, bitsandbytes')."""
    return {full.rsplit(".", 1)[-1] for full in variants.lora_layers(model)}


def build_lora_config(cfg: LoraConfig, target_modules: str | list[str] | None = None) -> Any:
    """peft.LoraConfig from our lora section (`target_modules` as resolved on the model)."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_modules if target_modules is not None else cfg.target_modules,
        use_rslora=cfg.use_rslora,
        bias=cfg.bias,
        task_type="CAUSAL_LM",
        **variants.peft_kwargs(cfg),
    )


def attach_lora(
    model: Any, cfg: LoraConfig, seed: int, batches: Callable[[], Iterable[dict]] | None = None
) -> Any:
    """Wrap the base with a fresh, seeded LoRA adapter of `cfg`'s variant; only adapter weights
    are trainable. `batches` gives training batches to the inits that read data (EVA)."""
    from peft import get_peft_model

    if isinstance(cfg.target_modules, list):
        available = linear_module_names(model)
        missing = [m for m in cfg.target_modules if m not in available]
        if missing:
            raise ModelError(
                f"lora.target_modules: {', '.join(missing)} not in the model; its linear layers are "
                f"{', '.join(sorted(available))}"
            )
    targets = variants.resolve_target_modules(model, cfg.target_modules)
    variant = variants.before_attach(model, cfg, targets)
    torch.manual_seed(seed)  # the adapter's A matrices are randomly initialized
    # EVA's adapter is created empty and filled from data (PEFT's documented path).
    peft_model = get_peft_model(model, build_lora_config(cfg, targets), low_cpu_mem_usage=cfg.init == "eva")
    peft_model.pipeline_variant = variant
    try:
        variants.after_attach(peft_model, cfg, variant, batches)
    except BaseException:
        detach_lora(peft_model)
        raise
    return peft_model


def detach_lora(peft_model: Any) -> Any:
    """Remove the adapter layers (without merging) and return the untouched base model (with
    the weights a PiSSA/OLoRA init rewrote put back)."""
    variant = getattr(peft_model, "pipeline_variant", None)
    base = peft_model.unload()
    if variant is not None:
        variant.restore(base)
    return base


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as their logical size."""
    trainable = total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)  # bitsandbytes Params4bit: packed storage
        n = math.prod(state.shape) if state is not None else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


# ---------------------------------------------------------------------------------------------
# Failures


def is_out_of_memory(e: BaseException) -> bool:
    """A CUDA (or CPU allocator) out-of-memory error: the same config would run out again."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


_AMOUNT = r"([\d.]+)\s*(GiB|MiB|KiB|bytes|B)"
_UNITS = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "bytes": 1, "B": 1}


def oom_memory_gb(e: BaseException) -> float | None:
    """The memory (GiB) an out-of-memory trial asked for, at least the device's capacity: what
    it held plus what it tried to allocate, from the error's text (CUDA's and the CPU
    allocator's), else from the device. None when neither can be told."""
    text = str(e)

    def amount(pattern: str) -> float | None:
        m = re.search(pattern + r"\s+" + _AMOUNT, text, re.IGNORECASE)
        return float(m.group(1)) * _UNITS[m.group(2)] / 2**30 if m else None

    tried = amount(r"tried to allocate")
    held = amount(r"Of the allocated memory") or 0.0
    capacity = amount(r"total capacity of")
    if capacity is None and torch.cuda.is_available() and isinstance(e, torch.cuda.OutOfMemoryError):
        capacity = torch.cuda.get_device_properties(0).total_memory / 2**30
        held = held or torch.cuda.max_memory_allocated(0) / 2**30
    elif capacity is None and "DefaultCPUAllocator" in text:
        import psutil

        capacity = psutil.virtual_memory().total / 2**30
    if tried is None and capacity is None:
        return None
    return round(max(held + (tried or 0.0), capacity or 0.0), 4)


def free_memory() -> None:
    """Give memory back after a failed trial, so the next one starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def release(error: BaseException) -> None:
    """After a failed trial: drop the tracebacks of the error and its causes, which keep the
    failed frames (the Trainer, optimizer state, activations) alive, then give the memory back
    (`gc.collect()`, and on CUDA `empty_cache()`). Call it after leaving the `except` block: inside
    it the traceback is still live, and out of memory, the next trial would start short of it."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__cause__ or e.__context__
    free_memory()
