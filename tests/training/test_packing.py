"""Packed trials (`search.pack`): a trial trained in a pack is the trial trained alone.

Four trials of different rank, alpha, learning rate and batch size train together, one forward
and one backward per step over the shared base; each ends with the eval curve and the adapter
it gets alone: bit-identical when the pack's batches have one length (a larger batch's rows are
computed exactly as a smaller one's), within a measured tolerance when the shorter batches are
padded (the attention over padded keys rounds differently). A trial that fails in a pack (NaN,
an exception, out of memory) loses only itself.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config, with_overrides
from pipeline.core import names
from pipeline.core.errors import ConfigError
from pipeline.search.executors.local import TrialJob, run_job
from pipeline.search.executors.packed import PackedExecutor
from pipeline.training import packing, router
from pipeline.trial.resources import Resources
from pipeline.trial.run import RunSpec

from ..conftest import DEMO_CONFIG, ROOT, tiny_overrides

# Rank, alpha, learning rate and batch size each differ; the demo's LoRA dropout (0.05) is on, so
# each trial's masks must come from its own RNG state.
TRIALS = [
    {"lora.r": 4, "train.learning_rate": 1e-3, "train.batch_size": 4},
    {"lora.r": 16, "train.learning_rate": 3e-3, "train.batch_size": 8},
    {"lora.r": 8, "lora.alpha": 32, "train.learning_rate": 5e-4, "train.batch_size": 4},
    {"lora.r": 32, "train.learning_rate": 2e-3, "train.batch_size": 16, "train.seed": 7},
]
# Measured (12 steps, demo, 2 CPU cores): eval losses agree to 1.6e-7 relative, adapter weights to
# 5e-5 absolute (Adam's normalisation makes the last bits of near-zero gradients visible).
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 2e-4


def _config(tmp_path, **extra):
    values = {"eval.generation_samples": 0, **extra}
    return load_config(DEMO_CONFIG, tiny_overrides(tmp_path, **values))


def _alone(base, trials):
    resources = Resources()
    return [
        run_job(TrialJob(i, base, p, RunSpec(names.ROLE_TRIAL, f"alone-{i}")), resources)
        for i, p in enumerate(trials)
    ]


def _packed(base, trials, size=4):
    executor = PackedExecutor(size)
    for i, p in enumerate(trials):
        executor.submit(TrialJob(i, base, p, RunSpec(names.ROLE_TRIAL, f"packed-{i}")), None)
    outcomes = {}
    while len(outcomes) < len(trials):
        o = executor.wait_any()
        outcomes[o.job.index] = o
    return [outcomes[i] for i in range(len(trials))], executor


def _weights(outcome):
    return load_file(outcome.result.adapter_dir / "adapter_model.safetensors")


def _base_digest(resources_model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(resources_model.state_dict().items()):
        h.update(name.encode() + p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_a_trial_in_a_pack_trains_bit_identically_to_alone(tmp_path):
    # Sequences cut to 32 tokens: every batch has one length, so the shared forward computes each
    # trial's rows with exactly the arithmetic it would alone.
    base = _config(tmp_path, **{"data.max_seq_len": 32})
    alone = _alone(base, TRIALS)
    packed, executor = _packed(base, TRIALS)
    assert executor.pack.shared_steps >= 12  # the trials did share forwards (4 at a time at first)
    for a, p in zip(alone, packed, strict=True):
        assert a.status == p.status == names.COMPLETED, p.reason
        assert p.result.evals == a.result.evals  # the whole eval curve, bit for bit
        wa, wp = _weights(a), _weights(p)
        assert wa.keys() == wp.keys()
        for k in wa:
            assert torch.equal(wa[k], wp[k]), k


def test_padded_packs_agree_within_tolerance_and_a_failing_trial_loses_only_itself(tmp_path, monkeypatch):
    base = _config(tmp_path)
    healthy = TRIALS[1]
    # r=6: an exception in its LoRA path; r=12: out of memory even alone; lr 1e4: its loss goes
    # NaN. And a forward of four trials runs out of memory: the pack must shrink, no trial fail.
    failing = [
        {"lora.r": 6, "train.batch_size": 4},
        {"lora.r": 12, "train.batch_size": 8},
        {"lora.r": 8, "train.learning_rate": 1e4, "train.max_grad_norm": 0.0},
    ]
    add_lora = router.Router.add_lora

    def faulty(self, path, x, result):
        ranks = {route.layers[path].r["default"] for route in self.routes}
        if len(self.routes) >= 4 or 12 in ranks:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
        if 6 in ranks:
            raise RuntimeError("injected failure")
        return add_lora(self, path, x, result)

    monkeypatch.setattr(router.Router, "add_lora", faulty)
    (alone,) = _alone(base, [healthy])
    packed, executor = _packed(base, [healthy, *failing])
    ok, error, oom, nan = packed
    assert ok.status == names.COMPLETED
    assert error.status == names.FAILED and "injected failure" in error.reason
    assert oom.status == names.ABANDONED and "out of memory" in oom.reason.lower()
    assert nan.status == names.FAILED and "nan" in nan.reason.lower()
    assert executor.pack.size == 3  # the out-of-memory forward made the packs smaller, not the trial fail
    for (s_a, l_a), (s_p, l_p) in zip(alone.result.evals, ok.result.evals, strict=True):
        assert s_a == s_p and l_p == pytest.approx(l_a, rel=LOSS_RTOL)
    wa, wp = _weights(alone), _weights(ok)
    assert max(float((wa[k] - wp[k]).abs().max()) for k in wa) < WEIGHT_ATOL
    # Each trial is its own run, tagged with its pack and slot.
    import mlflow

    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`trial.pack` = '1'")
    assert len(runs) == 4
    assert sorted(runs[f"tags.{names.TRIAL_PACK_SLOT}"]) == ["0", "1", "2", "3"]


def test_the_shared_base_is_untouched_by_a_pack(tmp_path):
    from pipeline.model.device import plan_device

    base = _config(tmp_path, **{"train.max_steps": 4, "train.eval_steps": 4})
    resources = Resources()
    model = resources.base_model(base, plan_device(base.model, base.train))[0].model
    before = _base_digest(model)
    executor = PackedExecutor(2, resources)
    for i, p in enumerate(TRIALS[:2]):
        executor.submit(TrialJob(i, base, p, RunSpec(names.ROLE_TRIAL, f"p{i}")), None)
    outcomes = [executor.wait_any(), executor.wait_any()]
    assert all(o.status == names.COMPLETED for o in outcomes)
    assert executor.pack.shared_steps > 0
    # Same weights, bit for bit, and no LoRA layer left in the shared tree: PEFT wrapped copies.
    assert _base_digest(model) == before
    assert not any("lora" in name for name, _ in model.named_modules())


def test_what_cannot_share_a_pack_runs_alone_with_a_line(tmp_path, capsys):
    base = _config(tmp_path, **{"train.max_steps": 4, "train.eval_steps": 4})
    outcomes, _ = _packed(base, [TRIALS[0], {"lora.use_dora": True}, TRIALS[1]])
    assert [o.status for o in outcomes] == [names.COMPLETED] * 3
    assert (
        "trial 1 runs alone, not packed: lora.use_dora (DoRA has its own forward)" in capsys.readouterr().out
    )


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"lora.init": "pissa"}, "lora.init: pissa"),
        ({"lora.bias": "all"}, "lora.bias: all"),
        ({"train.gradient_checkpointing": True}, "train.gradient_checkpointing"),
        ({"train.batching": "padding_free"}, "train.batching: padding_free"),
        ({"lora.init": "gaussian", "lora.r": 64}, None),
    ],
)
def test_unpackable_names_the_key(values, reason):
    config = with_overrides(load_config(DEMO_CONFIG), values)
    got = packing.unpackable(config)
    assert (got is None) if reason is None else got.startswith(reason)


def test_pack_keys_separate_bases_and_targets_not_hyperparameters():
    config = load_config(DEMO_CONFIG)
    key = packing.pack_key(config)
    assert packing.pack_key(with_overrides(config, {"lora.r": 64, "train.learning_rate": 0.1})) == key
    assert packing.pack_key(with_overrides(config, {"lora.target_modules": "attention"})) != key
    assert packing.pack_key(with_overrides(config, {"model.load_in_4bit": True})) != key


def test_pack_config_errors_name_the_key(tmp_path):
    assert load_config(DEMO_CONFIG, ["search.pack=4", "search.executor=ray"]).search.pack == 4  # per worker
    with pytest.raises(ConfigError, match="peak_gpu_mem_gb is its pack's"):
        load_config(DEMO_CONFIG, ["search.pack=2", "search.outcome_constraints=['peak_gpu_mem_gb <= 10']"])


def test_the_pack_shrinks_before_the_next_trial_would_not_fit():
    pack = packing.Pack(8)
    assert pack.fits(8, None) and pack.fits(8, 1.0)  # nothing measured yet: no limit to apply
    pack.peaks = {1: 4.0, 2: 5.5, 3: 7.0}  # GiB: 1.5 per trial on top of the base
    assert pack.fits(3, 8.0) and pack.fits(4, 8.5)
    assert not pack.fits(4, 8.0)
    assert not pack.fits(5, 9.9)


def test_share_weights_shares_tensors_not_modules():
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    copy = router.share_weights(layer)
    assert copy[0].weight is layer[0].weight and copy[0] is not layer[0]
    copy._modules["1"] = torch.nn.Identity()
    assert isinstance(layer[1], torch.nn.ReLU)


@pytest.mark.slow
def test_a_packed_search_interrupted_mid_pack_resumes_every_trial(tmp_path):
    """Ctrl-C while three trials train in one pack: each run ends KILLED at its checkpoint, and
    --resume continues all three, packed again, to the eval losses of the uninterrupted search."""
    from mlflow.tracking import MlflowClient

    from pipeline.search import loop, run_search, search_config

    from ..search.common import Watched, interrupt_at, search_overrides

    sets = search_overrides(tmp_path, **{"train.eval_steps": 3, "lora.dropout": 0.1, "search.pack": 3})
    whole = run_search(search_config(DEMO_CONFIG, sets, n_trials=3), quiet=True)
    with pytest.raises(KeyboardInterrupt):
        executor = Watched(PackedExecutor(3), on_eval=interrupt_at(trial=2, step=6))
        loop.Search(search_config(DEMO_CONFIG, sets, n_trials=3), executor).run()
    client = MlflowClient()
    exp = client.get_experiment_by_name("tests").experiment_id
    (parent,) = client.search_runs([exp], f"tags.`{names.ROLE}` = 'search' and attributes.status = 'KILLED'")
    killed = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(killed) == 3 and {r.info.status for r in killed} == {"KILLED"}

    pid = parent.info.run_id
    resumed = run_search(search_config(DEMO_CONFIG, sets, n_trials=3, resume=pid), resume=pid, quiet=True)
    assert [t.status for t in resumed.state.trials] == [names.COMPLETED] * 3
    for a, b in zip(resumed.state.trials, whole.state.trials, strict=True):
        assert a.index == b.index and a.parameters == b.parameters
        assert a.eval_loss == pytest.approx(b.eval_loss, rel=LOSS_RTOL)
    again = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{pid}'")
    assert {r.info.run_id for r in again} == {r.info.run_id for r in killed}  # each continued in its run
    assert all(r.data.tags.get(names.TRIAL_RESUMED_FROM_STEP) for r in again)


def test_the_executor_admits_no_more_trials_than_the_measured_memory_holds():
    executor = PackedExecutor(8)
    executor.limit_gb = 8.0
    assert executor.idle() == 8  # nothing measured yet
    executor.pack.peaks = {1: 4.0, 2: 5.5}  # 1.5 GiB per trial on top of the base
    executor.running = {0: None, 1: None}
    assert executor.idle() == 1  # a third fits (7.0), a fourth would not (8.5)
    executor.running = {}
    executor.limit_gb = 1.0
    assert executor.idle() == 1  # one trial always runs


def test_the_docs_say_where_packs_run_as_the_key_does():
    """`search.pack`'s description is the one home of where packs run (this process, each Ray
    worker); docs/search.md links to it and says nothing else. (It once said packing inside a Ray
    worker was not built, while the key's description and the code had it.)"""
    from pipeline.config.search import SearchConfig

    assert "each Ray worker" in SearchConfig.model_fields["pack"].description
    section = (ROOT / "docs" / "search.md").read_text().split("## Packed trials", 1)[1].split("\n## ", 1)[0]
    assert "[`search.pack`](configuration.md)" in section
    for sentence in section.replace("\n", " ").split(". "):
        if "Ray" in sentence:
            assert "not built" not in sentence and "one trial each" not in sentence, sentence
