"""LoRA variants on the demo model: DoRA, LoRA+, the PEFT inits (Gaussian, PiSSA, OLoRA, EVA,
LoftQ) and named module sets. Each keeps the LoRA invariant, and each saved adapter serves what
was trained -- PiSSA/OLoRA ones converted to plain LoRA on the original base."""

from __future__ import annotations

import shlex

import mlflow
import pytest
import torch

from pipeline.config import load_config, trial_config, with_overrides
from pipeline.core.errors import ConfigError
from pipeline.data.prepare import prepare_data
from pipeline.model import adapter as serving
from pipeline.model.device import plan_device
from pipeline.model.load import attach_lora, detach_lora, load_base_model, load_tokenizer
from pipeline.model.variants import _targeted, lora_layers, resolve_target_modules
from pipeline.registry import versions as registry
from pipeline.training.train import TrainInputs, init_batches, train
from pipeline.trial.run import run_trial

from ..conftest import DEMO_CONFIG, tiny_overrides

VARIANTS = {
    "dora": {"lora.use_dora": True},
    "gaussian": {"lora.init": "gaussian"},
    "pissa": {"lora.init": "pissa"},
    "pissa-fast-svd": {"lora.init": "pissa", "lora.pissa_iterations": 4},
    "olora": {"lora.init": "olora"},
    "eva": {"lora.init": "eva"},
    "loraplus": {"train.loraplus_lr_ratio": 16.0},
    "attention": {"lora.target_modules": "attention"},
    "mlp+pissa": {"lora.target_modules": "mlp", "lora.init": "pissa"},
    "loftq (4-bit)": {"model.load_in_4bit": True, "lora.init": "loftq"},
    "dora (4-bit)": {"model.load_in_4bit": True, "lora.use_dora": True},
}
PROMPT = torch.tensor([[1, 45, 99, 300, 12, 7, 88, 5]])


def _job(config):
    plan = plan_device(config.model, config.train)
    tok = load_tokenizer(config.model)
    return TrainInputs(config, plan, tok, prepare_data(config.data, tok), quiet=True)


def _on(model) -> torch.Tensor:
    """The probe prompt on the model's device."""
    return PROMPT.to(next(model.parameters()).device)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_keeps_the_base_trains_the_adapter_and_serves_what_it_trained(
    variant, tiny_config, tmp_path
):
    config = with_overrides(
        tiny_config, {**VARIANTS[variant], "train.max_steps": 6, "train.eval_steps": None}
    )
    job = _job(config)
    base = load_base_model(config.model, job.plan).model
    original = _weights(base)
    model = attach_lora(base, config.lora, config.train.seed, lambda: init_batches(job))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert adapter and all("lora_" in n for n in adapter)

    train(model, job, sink=lambda m, s: None)

    after = dict(model.named_parameters())
    assert all(torch.equal(after[n].detach(), v) for n, v in frozen.items()), "a frozen weight moved"
    moved = [n for n, v in adapter.items() if not torch.equal(after[n].detach(), v)]
    assert len(moved) == len(adapter), f"adapter weights that never moved: {set(adapter) - set(moved)}"
    model.eval()
    with torch.no_grad():
        trained = model(_on(model)).logits.float().cpu()
    folder = tmp_path / "adapter"
    serving.save_adapter(model, job.tokenizer, config.model, job.plan, folder)

    restored = detach_lora(model)
    now = restored.state_dict()
    # The shared base is the base as loaded again (PiSSA/OLoRA rewrote it; it is put back).
    assert all(torch.equal(now[k], v) for k, v in original.items() if k in now), "the base changed"

    served, _ = serving.load_adapter(folder)
    with torch.no_grad():
        answer = served(_on(served)).logits.float().cpu()
    # PiSSA/OLoRA adapters are converted to plain LoRA of rank 2r: float rounding, not a change
    # (in float32; bf16 on a GPU rounds at 1e-2).
    tolerance = 2e-4 if job.plan.torch_dtype == torch.float32 else 5e-2
    assert torch.allclose(answer, trained, atol=tolerance, rtol=0), (answer - trained).abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["pissa", "eva", "dora", "attention", "loftq (4-bit)"])
def test_a_registered_variant_adapter_loads_as_the_champion_and_generates(variant, tiny_config):
    config = with_overrides(tiny_config, VARIANTS[variant])
    result = run_trial(config, quiet=True)
    mlflow.set_experiment("tests")
    name = "variant-" + variant.split()[0].replace("+", "-")
    with mlflow.start_run():
        offer = registry.Candidate(
            result.run_id, result.eval_loss, result.eval_fingerprint, result.adapter_dir
        )
        assert registry.promote(name, offer).promoted
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    answers = model.predict(["What does `json.dumps` do?"], params={"max_new_tokens": 6})
    assert len(answers) == 1 and isinstance(answers[0], str) and answers[0].strip()
    # ...and it is the adapter the trial trained: the same answer as that run's adapter folder.
    local, tok = serving.load_adapter(result.adapter_dir)
    assert serving.generate_answers(local, tok, ["What does `json.dumps` do?"], 6) == answers


def test_loftq_fits_each_layer_to_its_quantization_error(tiny_config):
    """LoftQ starts each adapter at the best rank-r fit of its layer's 4-bit quantization error,
    scaled by r/alpha: every layer's base + adapter is closer to the unquantized weight than the
    4-bit weight alone (an unscaled fit at alpha/r = 4 would overshoot and be farther), and so
    is the model's output."""
    import bitsandbytes as bnb

    four = with_overrides(tiny_config, {"model.load_in_4bit": True, "lora.init": "loftq", "lora.alpha": 32})
    plan = plan_device(four.model, four.train)
    full = load_base_model(tiny_config.model, plan, for_training=False).model
    original = {n: m.weight.detach() for n, m in full.named_modules() if isinstance(m, torch.nn.Linear)}
    model = attach_lora(load_base_model(four.model, plan).model, four.lora, 0)
    layers = [
        (n, m)
        for n, m in model.named_modules()
        if hasattr(m, "lora_A") and hasattr(m, "quant_state") is False
    ]
    checked = 0
    for name, layer in layers:
        base = layer.get_base_layer().weight
        if not hasattr(base, "quant_state"):
            continue
        q = bnb.functional.dequantize_4bit(base.data, base.quant_state).float()
        w = original[name.removeprefix("base_model.model.")].to(q.device, torch.float32)
        delta = layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
        assert torch.linalg.norm(w - q - delta) < torch.linalg.norm(w - q), name
        checked += 1
    assert checked == len([n for n in original if not n.endswith("lm_head")])
    model.eval()
    with torch.no_grad():
        reference = full(_on(full)).logits.float().cpu()
        with_loftq = (model(_on(model)).logits.float().cpu() - reference).abs().mean()
        with model.disable_adapter():
            without = (model(_on(model)).logits.float().cpu() - reference).abs().mean()
    assert with_loftq < without


def test_loraplus_gives_the_b_matrices_ratio_times_the_learning_rate(tiny_config):
    from pipeline.training.train import _trainer, _training_args

    config = with_overrides(tiny_config, {"train.loraplus_lr_ratio": 8.0, "train.learning_rate": 1e-3})
    job = _job(config)
    model = attach_lora(load_base_model(config.model, job.plan).model, config.lora, 0)
    trainer = _trainer(model, job, _training_args(model, job, None), [])
    names = {id(p): n for n, p in model.named_parameters()}
    rates = {("lora_B" in names[id(p)]): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert rates == {False: pytest.approx(1e-3), True: pytest.approx(8e-3)}


def test_named_module_sets_resolve_per_architecture(tiny_config):
    """`attention` and `mlp` on Llama names and on GPT-2's Conv1D names, where `c_proj` is in both."""
    from transformers import GPT2Config, GPT2LMHeadModel

    llama = load_base_model(tiny_config.model, plan_device(tiny_config.model, tiny_config.train)).model
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    want = {
        (llama, "attention"): {"q_proj", "k_proj", "v_proj", "o_proj"},
        (llama, "mlp"): {"gate_proj", "up_proj", "down_proj"},
        (gpt2, "attention"): {"attn.c_attn", "attn.c_proj"},
        (gpt2, "mlp"): {"mlp.c_fc", "mlp.c_proj"},
    }
    for (model, named), expected in want.items():
        pattern = resolve_target_modules(model, named)
        hit = {
            ".".join(n.split(".")[-2 if model is gpt2 else -1 :])
            for n in lora_layers(model)
            if _targeted(n, False, pattern)
        }
        assert hit == expected, (named, hit)
    with pytest.raises(Exception, match="finds no attention layers"):
        resolve_target_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)), "attention")


def _problems(tmp_path, *parameters: str) -> str:
    """The config error of the demo config with these search parameters added."""
    sets = [shlex.quote(f"search.parameters.{p}") for p in parameters]
    with pytest.raises(ConfigError) as e:
        load_config(DEMO_CONFIG, [*tiny_overrides(tmp_path), *sets])
    return str(e.value)


def test_variant_combinations_peft_refuses_are_config_errors_naming_the_keys(tmp_path):
    text = _problems(
        tmp_path,
        "lora.init={type: choice, values: [default, olora, loftq]}",
        "model.load_in_4bit={type: choice, values: [false, true]}",
    )
    assert "lora.init: olora rewrites the base weights" in text and "model.load_in_4bit is true" in text
    assert "search.parameters.lora.init: value 'loftq': loftq fits the adapter to a 4-bit base" in text
    assert "(a combination search.parameters allows)" in text
    assert "dependents:" not in text  # lora.init has values that run anywhere: no parent to suggest
    with pytest.raises(ConfigError, match="lora.pissa_iterations: needs init: pissa"):
        load_config(DEMO_CONFIG, [*tiny_overrides(tmp_path), "lora.pissa_iterations=4"])
    with pytest.raises(ConfigError, match=r"train\.loraplus_lr_ratio"):
        load_config(DEMO_CONFIG, [*tiny_overrides(tmp_path), "train.loraplus_lr_ratio=0.5"])


def test_conditional_parameters_are_checked(tmp_path):
    text = _problems(
        tmp_path,
        "lora.init={type: choice, values: [default, pissa], dependents: {olora: [lora.eva_rho]}}",
    )
    assert "dependents: olora is not one of the values" in text
    text = _problems(
        tmp_path,
        "lora.init={type: choice, values: [default, pissa], dependents: {pissa: [lora.pissa_iterations]}}",
        "lora.use_dora={type: choice, values: [false, true], dependents: {true: [lora.pissa_iterations, lora.nope]}}",
        "lora.pissa_iterations={type: choice, values: [2, 8]}",
    )
    assert "lora.pissa_iterations already exists under lora.init=pissa" in text
    assert "names 'lora.nope', not a parameter of search.parameters" in text


def test_active_drops_the_parameters_their_parent_switches_off(tmp_path):
    sets = [
        "search.parameters.lora.init='{type: choice, values: [default, pissa], dependents: {pissa: [lora.pissa_iterations]}}'",
        "search.parameters.lora.pissa_iterations.type=choice search.parameters.lora.pissa_iterations.values=[2,8]",
    ]
    search = load_config(DEMO_CONFIG, [*tiny_overrides(tmp_path), *sets]).search
    assert search.parents() == {"lora.pissa_iterations": ("lora.init", "pissa")}
    assert search.active({"lora.init": "default", "lora.pissa_iterations": None, "lora.r": 8}) == {
        "lora.init": "default",
        "lora.r": 8,
    }
    on = {"lora.init": "pissa", "lora.pissa_iterations": 8}
    assert search.active(on) == on


def test_a_trial_config_is_not_checked_against_the_space_it_came_from(tmp_path):
    # A trial at init=pissa fixes pissa_iterations; with the search section kept, the space's
    # other inits would then meet a fixed pissa_iterations (the best_config.yaml of bench/variants).
    sets = [
        "search.parameters.lora.init='{type: choice, values: [default, pissa], dependents: {pissa: [lora.pissa_iterations]}}'",
        "search.parameters.lora.pissa_iterations.type=choice search.parameters.lora.pissa_iterations.values=[2,8]",
    ]
    config = load_config(DEMO_CONFIG, [*tiny_overrides(tmp_path), *sets])
    point = {"lora.init": "pissa", "lora.pissa_iterations": 8}
    with pytest.raises(ConfigError, match="value 'default': lora.pissa_iterations: needs init: pissa"):
        with_overrides(config, point)
    trial = trial_config(config, point)
    assert trial.search is None and (trial.lora.init, trial.lora.pissa_iterations) == ("pissa", 8)
    assert trial_config(config) == config.model_copy(update={"search": None})
