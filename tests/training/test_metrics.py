"""Metrics: memory peaks (the CUDA path through a fake device), perplexity, generation metrics."""

from __future__ import annotations

import math

import pytest

from pipeline.core import names
from pipeline.core.errors import PipelineError
from pipeline.training.metrics import (
    MemoryMonitor,
    eval_losses,
    generation_scores,
    gpu_memory_gb,
    load_generation_metric,
    perplexity,
    process_peak_rss_gb,
)
from pipeline.trial.resources import Resources


class FakeCuda:
    """Stands in for torch.cuda: the logic of the CUDA memory path runs on CPU."""

    def __init__(self, available=True, devices=1):
        self.available = available
        self.devices = devices
        self.calls: list[str] = []
        self.allocated = 3 * 2**30
        self.reserved = 5 * 2**30

    @property
    def resets(self):
        return sum(c.startswith("reset") for c in self.calls)

    def is_available(self):
        return self.available

    def device_count(self):
        return self.devices

    def empty_cache(self):
        self.calls.append("empty_cache")

    def reset_peak_memory_stats(self, device=0):
        self.calls.append(f"reset {device}")

    def max_memory_allocated(self, device=0):
        return self.allocated * (device + 1)

    def max_memory_reserved(self, device=0):
        return self.reserved * (device + 1)

    def get_device_name(self, device=0):
        return f"Fake GPU {device}"

    def get_device_properties(self, device=0):
        from types import SimpleNamespace

        return SimpleNamespace(total_memory=80 * 2**30)


def test_gpu_memory_metrics_when_cuda_present():
    assert gpu_memory_gb(FakeCuda()) == {names.PEAK_GPU_MEM_GB: 3.0, names.PEAK_GPU_RESERVED_GB: 5.0}
    assert gpu_memory_gb(FakeCuda(available=False)) == {}


def test_memory_monitor_resets_cuda_peaks_per_trial_and_tracks_rss():
    cuda = FakeCuda()
    mon = MemoryMonitor(cuda)
    mon.start()
    assert cuda.resets == 1
    blob = bytearray(64 * 2**20)  # 64 MiB more resident memory
    blob[::4096] = b"x" * len(blob[::4096])
    mon.sample()
    peaks = mon.peaks()
    assert set(peaks) == {names.PEAK_RSS_GB, names.PEAK_GPU_MEM_GB, names.PEAK_GPU_RESERVED_GB}
    assert 0 < peaks[names.PEAK_RSS_GB] <= process_peak_rss_gb() + 1e-3  # peaks are rounded to 4 decimals
    del blob


def test_memory_monitor_on_cpu_has_rss_only():
    mon = MemoryMonitor(FakeCuda(available=False))
    mon.start()
    assert set(mon.peaks()) == {names.PEAK_RSS_GB}


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert math.isfinite(perplexity(1e9))
    assert perplexity(float("nan")) == float("inf")


def test_shipped_metrics_load_offline_and_score():
    rouge = load_generation_metric("rouge_l")
    s = generation_scores(
        rouge, ["serialize obj to json", "nothing alike"], ["Serialize obj to a JSON string.", "zzz"]
    )
    assert set(s) == {"eval_rougeL"}
    assert 0.3 < s["eval_rougeL"] < 0.6
    em = load_generation_metric("exact_match")
    assert generation_scores(em, ["a", " b "], ["a", "b"]) == {"eval_exact_match": 1.0}


def test_unknown_metric_is_a_clear_error():
    with pytest.raises(
        PipelineError, match=r"^eval.generation_metric: cannot load 'no_such_metric_xyz'.*rouge_l"
    ):
        load_generation_metric("no_such_metric_xyz")


def test_generation_leaves_the_tokenizer_as_it_was(tmp_path):
    """A tokenizer saved after generating must still load right-padded (for training)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.model.adapter import generate

    from ..conftest import DEMO_MODEL

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL)
    prompts = ["<|im_start|>user\nWhat does `json.dumps` do?<|im_end|>\n<|im_start|>assistant\n", "hi"]
    out = generate(model, tok, prompts, max_new_tokens=4)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    assert tok.padding_side == "right"
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).padding_side == "right"


def test_per_example_eval_losses_add_up_to_the_eval_loss(tiny_config):
    res = Resources()
    data, model = res.data(tiny_config), None
    from pipeline.model.device import plan_device

    base, _ = res.base_model(tiny_config, plan_device(tiny_config.model, tiny_config.train))
    model = base.model
    one = eval_losses(model, data.eval, res.tokenizer(tiny_config), 4)
    assert one.loss == pytest.approx(sum(one.nll) / sum(one.tokens), rel=1e-6)
    assert one.tokens == tuple(sum(t != -100 for t in e["labels"][1:]) for e in data.eval)
    # Examples are scored the same whatever their order and batch: keyed by example, not position.
    back = eval_losses(model, data.eval[::-1], res.tokenizer(tiny_config), 7)
    assert back.nll[::-1] == pytest.approx(one.nll, rel=1e-5) and back.loss == pytest.approx(one.loss)


def test_memory_peaks_are_the_trials_own_and_every_devices():
    """Peaks are reset per trial after the allocator's cache is emptied (else the reserved peak
    carries earlier trials' cached blocks), for every visible device, each logged and named."""
    from pipeline.core import names
    from pipeline.training.metrics import MemoryMonitor, device_tags

    from .test_metrics import FakeCuda

    cuda = FakeCuda(devices=2)
    monitor = MemoryMonitor(cuda)
    monitor.start()
    assert cuda.calls == ["empty_cache", "reset 0", "reset 1"]
    peaks = monitor.peaks()
    assert peaks[names.PEAK_GPU_MEM_GB] == 3.0 and peaks[names.PEAK_GPU_RESERVED_GB] == 5.0
    assert peaks["peak_gpu0_mem_gb"] == 3.0 and peaks["peak_gpu1_mem_gb"] == 6.0
    assert peaks["peak_gpu1_reserved_gb"] == 10.0
    assert device_tags(cuda) == {
        "pipeline.gpu0": "Fake GPU 0, 80.0 GB",
        "pipeline.gpu1": "Fake GPU 1, 80.0 GB",
    }
    one = MemoryMonitor(FakeCuda(devices=1))
    assert not [k for k in one.peaks() if k.startswith("peak_gpu0")]  # one device: the plain names
