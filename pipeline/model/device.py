"""Device and precision: where a trial runs, in what dtype and mixed precision, and what runs of
the settings a device cannot honour as written (a paged optimizer on CPU). GPU-only kernels are
refused here on CPU, with the key at fault, before anything loads.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from pipeline.config import ModelConfig, PipelineConfig, TrainConfig
from pipeline.core import names
from pipeline.core.errors import ModelError
from pipeline.core.provenance import package_versions

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Device and precision


@dataclass(frozen=True)
class DevicePlan:
    """Where and in what precision a trial runs, and what runs of the settings a device cannot
    honour as written (the run records these, not the config's wish)."""

    device: str  # "cuda" or "cpu"
    name: str  # e.g. "NVIDIA A100-SXM4-80GB (1 of 8 visible)" or "cpu (2 threads)"
    dtype: str  # weights dtype: float32 | bfloat16 | float16
    precision: str  # trainer mixed precision: fp32 | bf16 | fp16
    gpus: int = 0  # GPUs the trial uses: 1 (the first visible) unless train.multi_gpu
    optimizer: str = "adamw_torch"  # the transformers optimizer that runs (see effective_optimizer)
    quantization: str | None = None  # the base's 4-bit format as it runs, e.g. "nf4, double quant"
    fallbacks: tuple[str, ...] = ()  # one line per setting that runs differently here than written

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def tags(self) -> dict[str, str]:
        """A run's tags of what ran: the optimizer, the base's 4-bit format (with the bitsandbytes
        that ran it), and the fallbacks in words."""
        tags = {names.OPTIMIZER_EFFECTIVE: self.optimizer}
        if self.quantization:
            bnb = package_versions().get("bitsandbytes")
            tags[names.QUANTIZATION_EFFECTIVE] = (
                f"{self.quantization}; compute {self.dtype}; bitsandbytes {bnb}"
            )
        if self.fallbacks:
            tags[names.FALLBACKS] = "; ".join(self.fallbacks)
        return tags

    def describe(self) -> str:
        """One phrase for a trial's start line: `fp32 on cpu (2 threads), base in 4-bit nf4 ...`."""
        base = f", base in 4-bit {self.quantization}" if self.quantization else ""
        return f"{self.precision} on {self.name}{base}, optimizer {self.optimizer}"


# Paged optimizers page their state to host memory through CUDA unified memory; without CUDA
# bitsandbytes runs the same algorithm unpaged (and only warns). The plan says so and records
# the unpaged name, so that a run's tags tell what trained.
UNPAGED = {
    "paged_adamw_8bit": "adamw_8bit",
    "paged_adamw_32bit": "adamw_torch",
    "paged_ademamix_8bit": "ademamix_8bit",
    "paged_ademamix_32bit": "ademamix",
    "paged_lion_8bit": "lion_8bit",
    "paged_lion_32bit": "lion_32bit",
}


def effective_optimizer(name: str, cuda: bool) -> tuple[str, str | None]:
    """(the optimizer that runs on this device, a line saying why it differs, or None)."""
    if cuda or name not in UNPAGED:
        return name, None
    return UNPAGED[name], (
        f"train.optimizer: {name} pages its state through CUDA memory; on CPU {UNPAGED[name]} runs "
        "instead (the same update, not paged)"
    )


def quantization_label(cfg: ModelConfig) -> str | None:
    """The base's 4-bit format, as a run's tag and start line say it (None: not quantized)."""
    if not cfg.load_in_4bit:
        return None
    return f"{cfg.quant_type}{', double quant' if cfg.double_quant else ''}"


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
    optimizer, fallback = effective_optimizer(train.optimizer, cuda)
    what_runs = {
        "optimizer": optimizer,
        "quantization": quantization_label(model),
        "fallbacks": (fallback,) if fallback else (),
    }
    if not cuda:
        _refuse_gpu_kernels(model, train)
        return DevicePlan("cpu", f"cpu ({torch.get_num_threads()} threads)", dtype, precision, **what_runs)
    if train.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        raise ModelError(
            "train.use_liger_kernel: the liger-kernel package is not installed (pip install -e '.[gpu]')"
        )
    visible = max(1, gpu_count or 1)
    gpus = visible if train.multi_gpu else 1
    name = (gpu_name or "cuda") + (f" ({gpus} of {visible} visible)" if visible > 1 else "")
    return DevicePlan("cuda", name, dtype, precision, gpus, **what_runs)


def _refuse_gpu_kernels(model: ModelConfig, train: TrainConfig) -> None:
    """Without CUDA, GPU-only kernels fail here, with the key at fault, not inside the first step."""
    if train.use_liger_kernel:
        raise ModelError("train.use_liger_kernel: Liger's Triton kernels need a CUDA GPU; set it to false")
    if model.attn_implementation and model.attn_implementation.startswith("flash_attention"):
        raise ModelError(
            f"model.attn_implementation: {model.attn_implementation} needs a CUDA GPU; use sdpa or null"
        )


def use_cpu_threads(n: int) -> None:
    """Intra-op threads of this process (a parallel worker gets its share of the cores)."""
    torch.set_num_threads(max(1, int(n)))


def quiet_libraries() -> None:
    """Libraries at error level and without progress bars, for a process whose output
    interleaves with others' (a parallel search's workers)."""
    from pipeline.core.console import silence_library_noise

    silence_library_noise()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("pipeline").setLevel(logging.WARNING)


def cpu_kernels() -> str:
    """Which vector kernels this CPU runs: torch's dispatch level, the BLAS libraries' kernel
    sets, the CPU's widest vector extensions. Float results differ in their last bits between
    kernel sets, and Ax's model-based proposals (a GP fit and an optimizer over it) amplify that
    into other trials: a search reproduces trial for trial only where this matches."""
    parts = [f"torch {torch.backends.cpu.get_cpu_capability()}"]
    try:
        # The BLAS libraries numpy and scipy load (Ax's GP fit runs on them), loaded here so the
        # answer does not depend on what the process happened to import before.
        import numpy  # noqa: F401
        import scipy.linalg  # noqa: F401
        from threadpoolctl import threadpool_info  # installed with BoTorch

        parts += sorted(
            {f"{i['internal_api']} {i['architecture']}" for i in threadpool_info() if i.get("architecture")}
        )
    except Exception:  # a BLAS it cannot introspect: leave it out
        pass
    flags = set(_cpuinfo("flags").split())
    parts += [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return "; ".join(parts)


def cpu_model() -> str:
    """The CPU's model name (Linux), else what the platform says."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def _cpuinfo(field: str) -> str:
    """The first value of a /proc/cpuinfo field ('' where there is none: not Linux)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    return ""


def hardware() -> dict[str, str]:
    """CPU and, when present, GPU description (for a report's provenance)."""
    info = {
        "cpu": cpu_model(),
        "cpu_kernels": cpu_kernels(),
        "cpu_threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = f"{props.total_memory / 2**30:.1f}"
        info["gpu_count"] = str(torch.cuda.device_count())
    return info


def cannot_run_here(config: PipelineConfig, space: bool = False) -> list[str]:
    """What of a valid config this machine cannot do, each led by its key: a GPU-only setting
    without CUDA, an objective or constraint on a metric no trial here would log; with `space`,
    also at every point of its search space (`search.parameters.train.precision: value 'fp16':
    ...`). `config check` prints these as warnings (the file may be meant for another machine);
    a local search refuses them before its run exists, the device plan before a trial loads."""
    try:
        plan = plan_device(config.model, config.train)
    except ModelError as e:
        return [str(e)]
    problems = config.unavailable_metrics(cuda=plan.device == "cuda")
    if space and not problems and config.search is not None:
        problems = config.space_problems(_trial_cannot_run_here)
    return problems


def _trial_cannot_run_here(data: dict) -> list[str]:
    """What this machine cannot do of a trial's config (its values were validated at load)."""
    try:
        trial = PipelineConfig.model_validate(data)
    except ValueError:
        return []  # the config's own problems: reported when it was loaded
    return cannot_run_here(trial)
