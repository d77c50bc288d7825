"""Out of memory as something the search learns from: an OOM trial reaches Ax as a measured
infeasible point (the memory it asked for, at least the device's capacity), so that a memory
outcome constraint steers BoTorch away from the region, not only from the one point."""

from __future__ import annotations

import math

import pytest
import torch

from bench import oom
from bench.oom import abandoning, model_ooms_after_the_second, simulated_gpu
from pipeline.config import with_overrides
from pipeline.core import names
from pipeline.model.load import oom_memory_gb
from pipeline.search.ax.optimizer import Optimizer
from pipeline.search.executors.local import split_batch

from ..common import demo


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
    assert optimizer.statuses()[index] == "COMPLETED"
    assert index not in optimizer.observations(names.EVAL_LOSS)  # the partial curve is not its result
    assert optimizer.observations(names.PEAK_RSS_GB)[index][0] == pytest.approx(math.log(40.0))  # log-memory
    unconstrained = Optimizer.create(demo())
    index = unconstrained.ask().index
    assert not unconstrained.out_of_memory(index, 40.0)
    assert unconstrained.statuses()[index] == "ABANDONED"


@pytest.mark.slow
def test_the_search_stops_proposing_what_does_not_fit_after_two_ooms(tmp_path):
    """On a simulated 10 GiB device (bench/oom.py: rank x batch x 0.1 GiB), with OOMs as
    infeasible points (and the rule that a larger config runs out as a smaller one did), BoTorch
    proposes nothing past the memory threshold after the search's second OOM; the same search that
    only abandons an OOM point (the behaviour before) keeps proposing such points. Sobol proposals
    (the first trials, and Ax's fallback when BoTorch repeats a measured point) use no model, so
    they are not counted."""
    with simulated_gpu():
        learned = oom.run(tmp_path / "learns", seed=3, trials=12)
        with abandoning():
            abandoned = oom.run(tmp_path / "abandons", seed=3, trials=12)
    assert sum(out for _, _, out, _ in learned) >= 2, learned  # the search met OOMs to learn from
    assert model_ooms_after_the_second(learned) == [], learned
    assert model_ooms_after_the_second(abandoned), f"the abandoning search stopped running out: {abandoned}"


def test_split_batch_retries_an_oom_trial_once_at_the_same_effective_batch(tiny_config, monkeypatch):
    """`train.oom_retry: split_batch`: the trial that ran out at batch 8 trains again at batch 4
    with twice the accumulation, in a new run tagged `trial.oom_retry`; the OOM run stays."""
    import pipeline.trial.run as trial_mod
    from pipeline import tracking
    from pipeline.search.executors.local import TrialJob, run_job
    from pipeline.trial.resources import Resources
    from pipeline.trial.run import RunSpec

    real_train, batches = trial_mod.train, []

    def train(model, job, *args, **kwargs):
        batches.append((job.config.train.batch_size, job.config.train.gradient_accumulation_steps))
        if job.config.train.batch_size > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
        return real_train(model, job, *args, **kwargs)

    monkeypatch.setattr(trial_mod, "train", train)
    config = with_overrides(tiny_config, {"train.oom_retry": "split_batch"})
    job = TrialJob(3, config, {"train.batch_size": 8}, RunSpec(names.ROLE_TRIAL, "t3"))
    outcome = run_job(job, Resources())
    assert batches == [(8, 1), (4, 2)]
    assert outcome.status == names.COMPLETED
    retried = tracking.get_run(outcome.run_id)
    assert retried.tags[names.TRIAL_OOM_RETRY].startswith(
        "batch_size 8 -> 4, gradient_accumulation_steps 1 -> 2"
    )
    assert retried.params["train.batch_size"] == "4"
    first = retried.tags[names.TRIAL_OOM_RETRY].split("after run ")[1].rstrip(")")
    assert tracking.get_run(first).tags[names.TRIAL_STATUS] == names.ABANDONED
    # Off (the default): the OOM ends the trial, with the memory it asked for.
    batches.clear()
    outcome = run_job(
        TrialJob(4, tiny_config, {"train.batch_size": 8}, RunSpec(names.ROLE_TRIAL, "t4")), Resources()
    )
    assert batches == [(8, 1)] and outcome.status == names.ABANDONED and outcome.memory_gb >= 2.0
