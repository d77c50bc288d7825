"""Metrics: perplexity, a generation metric through `evaluate`, and memory peaks (CPU and CUDA)."""

from __future__ import annotations

import math
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from pipeline.core import names

SHIPPED_METRICS = Path(__file__).parents[1] / "assets" / "evaluate_metrics"
GB = 2**30


def perplexity(loss: float) -> float:
    """exp(loss), capped so that a diverged run logs a finite number."""
    return math.exp(min(loss, 50.0)) if math.isfinite(loss) else float("inf")


# ---------------------------------------------------------------------------------------------
# Memory


class MemoryMonitor:
    """Peak resident memory of this process, sampled (cheaply) every step, plus CUDA peaks.

    ``ru_maxrss`` is a lifetime high-water mark, useless when one process runs many trials;
    sampling gives the peak of this trial. On CUDA the allocator's cache is emptied before the
    peaks are reset, so the reserved peak is this trial's, not earlier trials' cached blocks.
    """

    def __init__(self, cuda: Any = None):
        self.cuda = torch.cuda if cuda is None else cuda
        self.process = psutil.Process()
        self.peak_rss = 0

    def start(self) -> None:
        self.peak_rss = self.process.memory_info().rss
        if self.cuda.is_available():
            self.cuda.empty_cache()
            for i in range(self.cuda.device_count()):
                self.cuda.reset_peak_memory_stats(i)

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)

    def peaks(self) -> dict[str, float]:
        """`peak_rss_gb` always; on CUDA the trial's device's peaks, and every device's when several
        are visible."""
        self.sample()
        out = {names.PEAK_RSS_GB: round(self.peak_rss / GB, 4)}
        out.update(gpu_memory_gb(self.cuda))
        return out


def gpu_memory_gb(cuda: Any = None) -> dict[str, float]:
    """Peak allocated and reserved CUDA memory since the last reset: `peak_gpu_mem_gb` and
    `peak_gpu_reserved_gb` of device 0 (where a trial runs), and `peak_gpu<i>_mem_gb` /
    `peak_gpu<i>_reserved_gb` of each device when there are several; empty without CUDA."""
    cuda = torch.cuda if cuda is None else cuda
    if not cuda.is_available():
        return {}
    out = {
        names.PEAK_GPU_MEM_GB: round(cuda.max_memory_allocated(0) / GB, 4),
        names.PEAK_GPU_RESERVED_GB: round(cuda.max_memory_reserved(0) / GB, 4),
    }
    n = cuda.device_count()
    for i in range(n if n > 1 else 0):
        out[names.PEAK_GPU_N_MEM_GB.format(i)] = round(cuda.max_memory_allocated(i) / GB, 4)
        out[names.PEAK_GPU_N_RESERVED_GB.format(i)] = round(cuda.max_memory_reserved(i) / GB, 4)
    return out


def device_tags(cuda: Any = None) -> dict[str, str]:
    """`pipeline.gpu<i>`: name and total memory of every visible GPU (none without CUDA)."""
    cuda = torch.cuda if cuda is None else cuda
    if not cuda.is_available():
        return {}
    return {
        names.GPU_TAG.format(
            i
        ): f"{cuda.get_device_name(i)}, {cuda.get_device_properties(i).total_memory / GB:.1f} GB"
        for i in range(cuda.device_count())
    }


def process_peak_rss_gb() -> float:
    """Lifetime peak RSS of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (GB if sys.platform == "darwin" else 2**20)


# ---------------------------------------------------------------------------------------------
# Eval loss


@dataclass(frozen=True)
class EvalLosses:
    """One evaluation: the eval loss, and each example's summed NLL and response-token count
    (in the order the examples were given), what paired comparisons between runs use."""

    loss: float
    nll: tuple[float, ...]
    tokens: tuple[int, ...]


def eval_loss(
    model: Any, examples: list[dict[str, list[int]]], tokenizer: Any, batch_size: int, precision: str = "fp32"
) -> float:
    """Mean negative log-likelihood per response token over the whole eval set."""
    return eval_losses(model, examples, tokenizer, batch_size, precision).loss


@torch.no_grad()
def eval_losses(
    model: Any, examples: list[dict[str, list[int]]], tokenizer: Any, batch_size: int, precision: str = "fp32"
) -> EvalLosses:
    """Mean negative log-likelihood per response token over the whole eval set, and per example.

    Token-weighted, so it does not depend on how the eval set is batched (the HF Trainer's
    eval_loss is a mean of per-batch means and changes with batch composition). Examples are
    batched longest first (less padding), each batch padded to its longest example. The loss is
    the model's own (so it is what training optimizes); the per-example sums come from the same
    forward's logits at the response positions only (no vocabulary-sized copy of the batch).
    """
    from pipeline.data.collate import build_collator
    from pipeline.data.prepare import IGNORE_INDEX

    collate = build_collator("length_grouped", tokenizer, 0)
    device = next(model.parameters()).device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]), reverse=True)
    nll = [0.0] * len(examples)
    tokens = [0] * len(examples)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in rows]).items()}
            # The model's loss is the mean over the label tokens that follow a position (shifted
            # by one); times their number it is the batch's sum.
            labels = batch["labels"][:, 1:]
            mask = labels != IGNORE_INDEX
            n = int(mask.sum())
            if n == 0:
                continue
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = model(**batch)
            total += float(out.loss) * n
            count += n
            if out.logits is None:  # a fused loss kernel kept no logits: the mean loss only
                continue
            logits = out.logits[:, :-1]
            for j, i in enumerate(rows):
                at = mask[j].nonzero(as_tuple=True)[0]
                tokens[i] = int(at.numel())
                if tokens[i]:
                    nll[i] = float(
                        torch.nn.functional.cross_entropy(
                            logits[j, at].float(), labels[j, at], reduction="sum"
                        )
                    )
    finally:
        model.train(was_training)
    return EvalLosses(total / count if count else float("nan"), tuple(nll), tuple(tokens))


# ---------------------------------------------------------------------------------------------
# Generation metric


def metric_location(name: str) -> str:
    """A shipped metric's folder (loads offline), else the name as given (hub id or path)."""
    shipped = SHIPPED_METRICS / name
    return str(shipped) if shipped.is_dir() else name


def load_generation_metric(name: str) -> Any:
    """An `evaluate` metric by shipped name, local path or hub name."""
    import evaluate

    from pipeline.core.errors import PipelineError

    try:
        return evaluate.load(metric_location(name))
    except Exception as e:  # evaluate raises FileNotFoundError, ConnectionError, ImportError ...
        raise PipelineError(
            f"eval.generation_metric: cannot load {name!r} ({type(e).__name__}); shipped metrics: "
            f"{', '.join(sorted(p.name for p in SHIPPED_METRICS.iterdir() if p.is_dir()))}"
        ) from None


def generation_scores(metric: Any, predictions: list[str], references: list[str]) -> dict[str, float]:
    """The metric's scores, each named `eval_<key>` (e.g. `eval_rougeL`)."""
    result = metric.compute(predictions=predictions, references=references)
    return {
        f"{names.GENERATION_METRIC_PREFIX}{k}": float(v)
        for k, v in result.items()
        if isinstance(v, (int, float))
    }
