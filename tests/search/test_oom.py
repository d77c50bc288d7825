"""Out of memory as something the search learns from: an OOM trial reaches Ax as a measured
infeasible point (the memory it asked for, at least the device's capacity), so that a memory
outcome constraint steers BoTorch away from the region, not only from the one point."""

from __future__ import annotations

import math
import shlex

import pytest
import torch

from pipeline import names
from pipeline.config import with_overrides
from pipeline.model import oom_memory_gb
from pipeline.search import run_search, search_config
from pipeline.search.executor import split_batch
from pipeline.search.space import Optimizer

from ..conftest import DEMO_CONFIG
from .common import demo, search_overrides

# A simulated GPU: memory grows with rank x batch; past CAPACITY_GB the trial runs out of it.
GB_PER_RANK_EXAMPLE = 0.1
CAPACITY_GB = 10.0  # rank x batch >= 128 does not fit
BOUND_GB = 9  # the user's constraint, a margin below the capacity (as `peak_gpu_mem_gb <= 15` on a T4)
SPACE = (
    "{lora.r: {type: choice, values: [2, 4, 8, 16, 32]}, train.batch_size: {type: choice, values: [2, 4, 8, 16]},"
    " train.learning_rate: {type: range, bounds: [3.0e-4, 1.0e-2], log: true}}"
)


def test_the_memory_an_oom_asked_for_is_read_from_the_error():
    cuda = torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 15.77 GiB of which "
        "1.06 GiB is free. Of the allocated memory 14.10 GiB is allocated by PyTorch, and 120.00 MiB is reserved"
    )
    assert oom_memory_gb(cuda) == pytest.approx(16.1)  # held + asked, above the capacity
    small = torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 15.77 GiB"
    )
    assert oom_memory_gb(small) == pytest.approx(15.77)  # at least the capacity
    cpu = RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1073741824 bytes.")
    assert oom_memory_gb(cpu) >= 1.0
    assert oom_memory_gb(RuntimeError("out of memory")) is None


def test_split_batch_keeps_the_effective_batch():
    config = demo(
        **{"train.oom_retry": "split_batch", "train.batch_size": 8, "train.gradient_accumulation_steps": 2}
    )
    split, how = split_batch(config)
    assert (split.train.batch_size, split.train.gradient_accumulation_steps) == (4, 4)
    assert how == "batch_size 8 -> 4, gradient_accumulation_steps 2 -> 4"
    assert split_batch(with_overrides(config, {"train.batch_size": 1})) is None
    assert split_batch(demo()) is None  # off by default


def test_an_oom_trial_is_an_infeasible_point_for_ax_only_with_a_memory_constraint():
    config = demo(**{"search.outcome_constraints": ["peak_rss_gb <= 12"]})
    optimizer = Optimizer.create(config)
    index = optimizer.ask().index
    optimizer.report_evaluation(index, 50, 3.0)  # a partial curve before it ran out
    assert optimizer.out_of_memory(index, 40.0)
    trial = optimizer.client._experiment.trials[index]
    data = optimizer.client._experiment.lookup_data(trial_indices=[index]).df
    assert trial.status.is_completed and set(data["metric_name"]) == {names.PEAK_RSS_GB}
    assert data["mean"].tolist() == [pytest.approx(math.log(40.0))]  # Ax models log-memory
    unconstrained = Optimizer.create(demo())
    index = unconstrained.ask().index
    assert not unconstrained.out_of_memory(index, 40.0)
    assert unconstrained.client._experiment.trials[index].status.is_abandoned


def _simulate_gpu(monkeypatch) -> None:
    """Trials use rank x batch x 0.1 GiB of a 10 GiB device (reported as peak_rss_gb, the memory
    metric a CPU run has); past it they raise CUDA's out-of-memory error, having allocated 8 GiB."""
    import pipeline.metrics as metrics
    import pipeline.trial as trial_mod

    real_train = trial_mod.train

    def train(model, job, *args, memory=None, **kwargs):
        need = GB_PER_RANK_EXAMPLE * job.config.lora.r * job.config.train.batch_size
        if need > CAPACITY_GB:
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {need - 8:.2f} GiB. GPU 0 has a total capacity of "
                f"{CAPACITY_GB:.2f} GiB of which 0.10 GiB is free. Of the allocated memory 8.00 GiB is allocated by PyTorch"
            )
        memory.simulated = need
        return real_train(model, job, *args, memory=memory, **kwargs)

    monkeypatch.setattr(trial_mod, "train", train)
    monkeypatch.setattr(
        metrics.MemoryMonitor, "peaks", lambda self: {names.PEAK_RSS_GB: getattr(self, "simulated", 0.0)}
    )


def _search(tmp_path, name: str) -> list[tuple[int, int, bool, str]]:
    """(rank, batch, ran out of memory, how Ax proposed it) of every trial of a 12-trial search."""
    sets = search_overrides(
        tmp_path / name,
        **{
            "search.initialization_trials": 4,
            "train.max_steps": 10,
            "eval.generation_samples": 0,
            "search.max_failure_rate": 1.0,
            "search.seed": 3,
            "tracking.experiment_name": f"oom-{name}",
        },
    )
    sets += [
        shlex.quote(f"search.parameters={SPACE}"),
        shlex.quote(f"search.outcome_constraints=[peak_rss_gb <= {BOUND_GB}]"),
    ]
    state = run_search(search_config(DEMO_CONFIG, sets, n_trials=12), quiet=True).state
    return [
        (
            t.parameters["lora.r"],
            t.parameters["train.batch_size"],
            t.status == names.ABANDONED,
            t.generation_method,
        )
        for t in state.trials
    ]


def _model_ooms_after_the_second(trials: list[tuple[int, int, bool, str]]) -> list[tuple[int, int]]:
    """The trials BoTorch proposed after the search's second OOM that ran out of memory too."""
    ooms = [i for i, (_, _, out, _) in enumerate(trials) if out]
    later = trials[ooms[1] + 1 :] if len(ooms) >= 2 else []
    return [(r, b) for r, b, out, method in later if out and method == "BoTorch"]


@pytest.mark.slow
def test_the_search_stops_proposing_what_does_not_fit_after_two_ooms(tmp_path, monkeypatch):
    """With OOMs as infeasible points (and the rule that a larger config runs out as a smaller
    one did), BoTorch proposes nothing past the memory threshold after the second OOM; the same
    search that only abandons an OOM point (the behaviour before) keeps proposing such points.
    Sobol proposals (the first trials, and Ax's fallback when BoTorch repeats a measured point)
    use no model, so they are not counted."""
    _simulate_gpu(monkeypatch)
    learned = _search(tmp_path, "learns")
    monkeypatch.setattr(Optimizer, "out_of_memory", lambda self, i, gb: self.abandon(i) or False)
    monkeypatch.setattr(Optimizer, "out_of_memory_trials", lambda self: {})  # no rule either
    abandoned = _search(tmp_path, "abandons")
    assert sum(out for _, _, out, _ in learned) >= 2, learned  # the test saw OOMs to learn from
    assert _model_ooms_after_the_second(learned) == [], learned
    assert _model_ooms_after_the_second(abandoned), f"the abandoning search stopped running out: {abandoned}"
