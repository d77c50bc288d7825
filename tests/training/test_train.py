"""Training for real on the demo model: the LoRA invariant, QLoRA on CPU, batching, streaming."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from pipeline.config import with_overrides
from pipeline.core import names
from pipeline.data.prepare import prepare_data
from pipeline.model.device import plan_device
from pipeline.model.load import attach_lora, count_parameters, load_base_model, load_tokenizer
from pipeline.training.train import TrainInputs, build_training_args, train


def _setup(config):
    plan = plan_device(config.model, config.train)
    tok = load_tokenizer(config.model)
    data = prepare_data(config.data, tok)
    base = load_base_model(config.model, plan, config.train.gradient_checkpointing)
    return plan, tok, data, base


def _train(config, model, tok, data, plan, on_eval=None):
    logged: list[tuple[int, dict]] = []
    job = TrainInputs(config, plan, tok, data, quiet=True)
    trainer, outcome = train(model, job, sink=lambda m, s: logged.append((s, dict(m))), on_eval=on_eval)
    return trainer, outcome, logged


def test_lora_invariant_base_frozen_adapter_learns(tiny_config):
    config = with_overrides(tiny_config, {"lora.r": 4, "train.max_steps": 6, "train.eval_steps": None})
    plan, tok, data, base = _setup(config)
    base_before = {k: v.detach().clone() for k, v in base.model.state_dict().items()}
    # Trainable parameters: exactly r * (in + out) for every linear layer but the output head.
    linears = [
        m for n, m in base.model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    ]
    expected = sum(config.lora.r * (m.in_features + m.out_features) for m in linears)
    model = attach_lora(base.model, config.lora, config.train.seed)
    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainable, _ = count_parameters(model)
    assert trainable == expected == sum(p.numel() for p in adapter_before.values())
    assert all("lora_" in n for n in adapter_before)

    _train(config, model, tok, data, plan)

    after = {n: p.detach() for n, p in model.named_parameters()}
    changed = [n for n, p in adapter_before.items() if not torch.equal(p, after[n])]
    assert len(changed) == len(adapter_before), "every adapter matrix moved"
    assert all(after[n].abs().sum() > 0 for n in adapter_before if "lora_B" in n), (
        "B starts at zero, must not stay"
    )
    base_after = model.get_base_model().state_dict()
    for k, v in base_before.items():
        key = (
            k
            if k in base_after
            else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        )
        assert torch.equal(base_after[key], v), f"base weight {k} changed"


def test_qlora_4bit_nf4_trains_on_cpu(tiny_config):
    """QLoRA through evaluations while it trains (every evaluation once repacked the 4-bit layers
    for inference on this CPU): the loss falls, the 4-bit base stays as loaded and in its training
    layout, only the adapter moves. Gradients before/after an evaluation: tests/training/test_quantized.py."""
    config = with_overrides(
        tiny_config,
        {
            "model.load_in_4bit": True,
            "train.max_steps": 10,
            "train.eval_steps": 5,
            "train.learning_rate": 3e-3,
            "eval.at_start": True,
            "lora.r": 8,
        },
    )
    plan, tok, data, base = _setup(config)
    quantized = [m for m in base.model.modules() if type(m).__name__ == "Linear4bit"]
    assert quantized, "the linear layers must be bitsandbytes 4-bit layers"
    assert quantized[0].weight.quant_state.quant_type == "nf4"
    base_before = {n: t.detach().clone() for n, t in base.model.state_dict().items()}
    model = attach_lora(base.model, config.lora, config.train.seed)
    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _, outcome, logged = _train(config, model, tok, data, plan)
    losses = [m[names.TRAIN_LOSS] for _, m in logged if names.TRAIN_LOSS in m]
    evals = [(s, m[names.EVAL_LOSS]) for s, m in logged if names.EVAL_LOSS in m]
    assert all(math.isfinite(x) for x in losses + [e for _, e in evals])
    assert [s for s, _ in evals] == [0, 5, 10], "evaluations at the start, mid-training and the end"
    assert evals[1][1] < evals[0][1] and evals[2][1] < evals[1][1], f"eval loss should fall: {evals}"
    assert outcome.steps == 10
    packed = [m for m in quantized if getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
    assert packed == [], "a 4-bit layer went into the inference layout while training"
    base_after = model.get_base_model().state_dict()
    for name, before in base_before.items():
        key = name if name in base_after else name.replace(".weight", ".base_layer.weight")
        key = key if key in base_after else name.replace(".bias", ".base_layer.bias")
        assert torch.equal(base_after[key], before), f"4-bit base weight {name} changed"
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n], p) for n, p in adapter_before.items() if "lora_B" in n)


def test_padding_free_batches_give_the_padded_loss(tiny_config):
    """Padding-free batching changes the speed, not the numbers: same loss as padded batches."""
    config = with_overrides(tiny_config, {"data.max_train_examples": 16})
    _plan, tok, data, base = _setup(config)
    model = attach_lora(base.model, config.lora, config.train.seed)
    from pipeline.data.collate import build_collator

    batch = data.train[:6]
    model.eval()
    with torch.no_grad():
        padded = build_collator("length_grouped", tok, 128)(batch)
        flat = build_collator("padding_free", tok, 128)(batch)
        loss_padded = model(**padded).loss
        loss_flat = model(**flat).loss
    # Mean over the same label tokens; the flat batch's first label per example is masked too,
    # and with prompt masking that token was masked already.
    assert loss_flat.item() == pytest.approx(loss_padded.item(), abs=1e-4)


def test_flash_attention_padding_free_batches_carry_sequence_lengths(tiny_config):
    """With FlashAttention-2 (a GPU kernel: only the batch is checked here) a padding-free batch
    carries the cumulative sequence lengths its variable-length kernel takes; without it, only
    position_ids (what SDPA and eager read)."""
    from pipeline.data.collate import build_collator

    config = with_overrides(tiny_config, {"data.max_train_examples": 16})
    _plan, tok, data, _base = _setup(config)
    batch = data.train[:3]
    lengths = [len(e["input_ids"]) for e in batch]
    fa = build_collator("padding_free", tok, 128, flash_attention=True)(batch)
    assert fa["cu_seq_lens_q"].tolist() == [0, *itertools.accumulate(lengths)]
    assert fa["max_length_q"] == max(lengths) and fa["input_ids"].shape == (1, sum(lengths))
    sdpa = build_collator("padding_free", tok, 128)(batch)
    assert "cu_seq_lens_q" not in sdpa and sdpa["position_ids"][0, lengths[0]] == 0


@pytest.mark.parametrize("batching", ["length_grouped", "padding_free"])
def test_logits_only_at_response_positions_give_the_model_loss(tiny_config, batching):
    """The LM head runs only where the next token is a label, and the loss is the model's own:
    same value, normalized by the same token count; a batch with no label gives 0, not NaN."""
    from pipeline.data.collate import LabelPositions, build_collator, completion_loss

    config = with_overrides(tiny_config, {"data.max_train_examples": 16})
    _plan, tok, data, base = _setup(config)
    model = attach_lora(base.model, config.lora, config.train.seed).eval()
    full = build_collator(batching, tok, 128)(data.train[:6])
    n = (full["labels"][:, 1:] != -100).sum()
    batch = LabelPositions(build_collator(batching, tok, 128))(data.train[:6])
    labels = batch.pop("labels")
    with torch.no_grad():
        want = model(**full, num_items_in_batch=n).loss
        out = model(**batch)
    assert out.logits.shape[0] == int(n) < full["input_ids"].numel() / 2  # most positions skipped
    assert completion_loss(out, labels, n).item() == pytest.approx(want.item(), abs=1e-6)
    assert completion_loss(out, labels).item() == pytest.approx(want.item(), abs=1e-6)  # mean
    masked = [{**e, "labels": [-100] * len(e["labels"])} for e in data.train[:2]]
    batch = LabelPositions(build_collator(batching, tok, 128))(masked)
    labels = batch.pop("labels")
    loss = completion_loss(model.train()(**batch), labels)
    loss.backward()
    assert loss.item() == 0.0
    # A model that ignores the mask (logits at every position) is refused, not trained on misread logits.
    full_logits = SimpleNamespace(logits=torch.zeros(2, 5, 7))
    with pytest.raises(
        ValueError, match="train.prompt_logits: this model's forward returned logits of shape"
    ):
        completion_loss(full_logits, torch.tensor([[-100, 1, 2, -100, -100], [-100, -100, 3, 4, 5]]))


def test_response_only_logits_train_the_same_adapter(tiny_config):
    """Skipping the prompt's logits changes the speed, not the training: after the same steps
    the adapter weights and eval loss are those of the full-logits run, bit for bit on CPU."""
    config = with_overrides(tiny_config, {"data.max_train_examples": 64, "train.max_steps": 4})
    plan, tok, data, base = _setup(config)
    runs = {}
    for prompt_logits in (True, False):
        c = with_overrides(config, {"train.prompt_logits": prompt_logits})
        model = attach_lora(base.model, c.lora, c.train.seed)
        trainer, outcome, _ = _train(c, model, tok, data, plan)
        assert (trainer.compute_loss_func is None) == prompt_logits
        weights = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
        runs[prompt_logits] = (outcome, weights)
        base.model = model.unload()
    (full, w_full), (short, w_short) = runs[True], runs[False]
    assert short.eval_loss == full.eval_loss and short.tokens == full.tokens
    assert all(torch.equal(w_full[k], w_short[k]) for k in w_full)


def test_eval_loss_is_token_weighted_whatever_the_batching(tiny_config):
    """Batch composition must not change eval_loss (HF's mean of batch means does change)."""
    from pipeline.training.metrics import eval_loss

    _, tok, data, base = _setup(tiny_config)
    model = attach_lora(base.model, tiny_config.lora, 0)
    examples = data.eval[:24]
    by_1 = eval_loss(model, examples, tok, 1)
    by_5 = eval_loss(model, examples, tok, 5)
    by_24 = eval_loss(model, list(reversed(examples)), tok, 24)
    # Reference: summed token NLL by hand.
    total = count = 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            labels = torch.tensor(ex["labels"][1:])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
            mask = labels != -100
            total += float(-logp[mask].gather(1, labels[mask][:, None]).sum())
            count += int(mask.sum())
    assert by_1 == pytest.approx(total / count, abs=1e-5)
    assert by_5 == pytest.approx(by_1, abs=1e-5) and by_24 == pytest.approx(by_1, abs=1e-5)


def test_training_args_follow_the_config(tiny_config):
    config = with_overrides(
        tiny_config,
        {
            "train.scheduler": "cosine_with_min_lr",
            "train.gradient_accumulation_steps": 3,
            "train.batching": "length_grouped",
        },
    )
    plan = plan_device(config.model, config.train, cuda=False)
    args = build_training_args(config.train, config.eval, plan, "/tmp/x")
    assert args.learning_rate == config.train.learning_rate
    assert args.per_device_train_batch_size == config.train.batch_size
    assert args.gradient_accumulation_steps == 3
    assert args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert args.train_sampling_strategy == "group_by_length"
    assert args.report_to in ([], "none", ["none"]) and args.save_strategy == "no"
    assert not args.bf16 and not args.fp16 and args.use_cpu
    assert not args.use_liger_kernel
    liger = with_overrides(config, {"train.use_liger_kernel": True}).train
    assert build_training_args(liger, config.eval, plan, "/tmp/x").use_liger_kernel
    gpu = plan_device(config.model, config.train, cuda=True, bf16_supported=True, gpu_name="H100")
    # Only checks the mapping; TrainingArguments itself refuses bf16 without the hardware.
    assert gpu.precision == "bf16"


def test_a_trial_runs_on_one_gpu_unless_the_config_asks_for_more(tiny_config):
    """With several GPUs visible the HF Trainer wraps the model in DataParallel while eval,
    generation and the memory peaks use one device: a trial is pinned to the first GPU, says so
    in its device tag, and train.multi_gpu opts out."""
    from types import SimpleNamespace

    from pipeline.model.device import plan_device
    from pipeline.training.train import pin_to_plan

    plan = plan_device(
        tiny_config.model, tiny_config.train, cuda=True, bf16_supported=True, gpu_name="H100", gpu_count=4
    )
    assert (plan.gpus, plan.name) == (1, "H100 (1 of 4 visible)")
    args = pin_to_plan(SimpleNamespace(n_gpu=4, _n_gpu=4), plan)
    assert args._n_gpu == 1
    multi = with_overrides(tiny_config, {"train.multi_gpu": True})
    plan = plan_device(multi.model, multi.train, cuda=True, bf16_supported=True, gpu_name="H100", gpu_count=4)
    assert (plan.gpus, pin_to_plan(SimpleNamespace(n_gpu=4, _n_gpu=4), plan)._n_gpu) == (4, 4)
    single = plan_device(
        tiny_config.model, tiny_config.train, cuda=True, bf16_supported=True, gpu_name="T4", gpu_count=1
    )
    assert single.name == "T4" and single.gpus == 1


def test_checkpointing_takes_the_name_the_installed_transformers_knows(tiny_config):
    from transformers import TrainingArguments

    from pipeline.training.train import CHECKPOINTING, build_training_args, checkpointing_name

    # transformers 5.20 renamed it; 5.17 (the borrowed GPU machine's) knows only the old name.
    assert checkpointing_name({"activation_checkpointing": None, "gradient_checkpointing": None}) == (
        "activation_checkpointing"
    )
    assert checkpointing_name({"gradient_checkpointing": None}) == "gradient_checkpointing"
    assert checkpointing_name(TrainingArguments.__dataclass_fields__) == CHECKPOINTING
    plan = plan_device(tiny_config.model, tiny_config.train)
    on = with_overrides(tiny_config, {"train.gradient_checkpointing": True}).train
    args = build_training_args(on, tiny_config.eval, plan, "/tmp/unused", quiet=True)
    assert getattr(args, CHECKPOINTING) is True
    assert getattr(args, f"{CHECKPOINTING}_kwargs") == {"use_reentrant": False}


@pytest.mark.slow
def test_gradient_checkpointing_is_switched_on_once_on_the_4bit_path(tiny_config, monkeypatch):
    """peft's 4-bit preparation switches checkpointing on; the Trainer must not do it again."""
    from transformers import PreTrainedModel

    from pipeline.training.train import CHECKPOINTING
    from pipeline.trial.run import run_trial

    calls = []
    enable = f"{CHECKPOINTING}_enable"  # gradient_checkpointing_enable before transformers 5.20
    real = getattr(PreTrainedModel, enable)

    def counting(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, enable, counting)
    config = with_overrides(tiny_config, {"model.load_in_4bit": True, "train.gradient_checkpointing": True})
    result = run_trial(config, quiet=True)
    assert len(calls) == 1, calls
    assert result.steps == 12
    calls.clear()
    run_trial(with_overrides(tiny_config, {"train.gradient_checkpointing": True}), quiet=True)
    assert len(calls) == 1, calls  # without 4-bit, the Trainer is the one that switches it on
