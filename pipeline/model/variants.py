"""LoRA variants, built by PEFT from our lora section: named module sets, the initialisations
(Gaussian, PiSSA, OLoRA, EVA, LoftQ) and DoRA; LoRA+ is an optimizer (`loraplus_optimizer`).

What PEFT leaves to its caller is here, so that every variant trains, saves and serves like plain
LoRA:

- PiSSA and OLoRA rewrite the base's targeted weights (the base keeps W - BA). The search shares
  one loaded base between trials, so those weights are copied before the adapter is attached and
  put back when it is detached (`Variant.restore`); the saved adapter is converted by PEFT into a
  plain LoRA adapter (rank 2r) relative to the original base (`Variant.save_kwargs`).
- EVA needs batches of the training data for its SVD of the layers' inputs.
- LoftQ: PEFT's `replace_lora_weights_loftq` computes on CUDA only (peft 0.21) and leaves the
  alpha/r scaling out; `_loftq` composes the same steps from PEFT's helpers on any device and
  divides B by the scaling, so the adapter starts at the quantization residual for every alpha.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.config import LoraConfig
from pipeline.core.errors import ModelError

# The blocks a linear layer sits in, by its parent module's name: Llama/Qwen/Mistral/Phi
# (`self_attn`, `mlp`), GPT-2 (`attn`, `mlp`), Falcon/BLOOM (`self_attention`), Mixtral's experts
# (`block_sparse_moe`), GPT-NeoX/OPT-style `feed_forward` / `ffn`.
BLOCKS = {
    "attention": re.compile(r"attn|attention", re.IGNORECASE),
    "mlp": re.compile(r"mlp|feed_forward|ffn|moe|experts", re.IGNORECASE),
}
EVA_BATCHES = 16  # training batches EVA may read for its SVD (it stops earlier once converged)


def lora_layers(model: Any) -> dict[str, Any]:
    """Every layer LoRA can wrap, by full name: linear layers, GPT-2's Conv1D, bitsandbytes'."""
    kinds = {"Linear4bit", "Linear8bitLt", "Conv1D"}
    return {
        name: m
        for name, m in model.named_modules()
        if name and (isinstance(m, torch.nn.Linear) or type(m).__name__ in kinds)
    }


def resolve_target_modules(model: Any, target: str | list[str]) -> str | list[str]:
    """PEFT's `target_modules` for ours: a named set becomes a pattern of `<block>.<layer>`
    suffixes found in this model (GPT-2's `attn.c_proj` apart from its `mlp.c_proj`)."""
    if not isinstance(target, str) or target == "all-linear":
        return target
    suffixes = sorted(
        {
            ".".join(name.split(".")[-2:])
            for name in lora_layers(model)
            if "." in name and BLOCKS[target].search(name.split(".")[-2])
        }
    )
    if not suffixes:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in lora_layers(model)})
        raise ModelError(
            f"lora.target_modules: {target!r} finds no {target} layers in this model (its layers: "
            f"{', '.join(leaves)}); name the modules instead"
        )
    return r"(.*\.)?(" + "|".join(re.escape(s) for s in suffixes) + ")"


def init_lora_weights(cfg: LoraConfig) -> bool | str:
    """PEFT's `init_lora_weights` for our `lora.init` (EVA and LoftQ finish after attaching)."""
    if cfg.init in ("default", "loftq"):
        return True
    if cfg.init == "pissa" and cfg.pissa_iterations is not None:
        return f"pissa_niter_{cfg.pissa_iterations}"
    return cfg.init


def peft_kwargs(cfg: LoraConfig) -> dict[str, Any]:
    """The variant's arguments of `peft.LoraConfig`."""
    out: dict[str, Any] = {"init_lora_weights": init_lora_weights(cfg), "use_dora": cfg.use_dora}
    if cfg.init == "eva":
        from peft import EvaConfig

        out["eva_config"] = EvaConfig(rho=cfg.eva_rho)
    return out


@dataclass
class Variant:
    """What an attached adapter's variant needs undone or converted later."""

    saved_base: dict[str, torch.Tensor] = field(default_factory=dict)  # PiSSA/OLoRA: original weights
    initial_dir: Path | None = None  # PiSSA/OLoRA: the adapter at init, for PEFT's conversion

    def save_kwargs(self) -> dict[str, Any]:
        """`save_pretrained` arguments: PiSSA/OLoRA adapters are saved as plain LoRA for the
        original base."""
        if self.initial_dir is None:
            return {}
        return {"path_initial_model_for_weight_conversion": str(self.initial_dir)}

    def restore(self, base: Any) -> None:
        """Put the base's original weights back (after the adapter was unloaded)."""
        if self.saved_base:
            modules = dict(base.named_modules())
            with torch.no_grad():
                for name, weight in self.saved_base.items():
                    modules[name].weight.copy_(weight)
        self.saved_base.clear()
        if self.initial_dir is not None:
            shutil.rmtree(self.initial_dir.parent, ignore_errors=True)
            self.initial_dir = None


def before_attach(model: Any, cfg: LoraConfig, targets: str | list[str]) -> Variant:
    """Copy the weights that PiSSA/OLoRA will rewrite (those of the targeted layers)."""
    variant = Variant()
    if cfg.init in ("pissa", "olora"):
        head = model.get_output_embeddings()
        for name, module in lora_layers(model).items():
            if _targeted(name, module is head, targets):
                variant.saved_base[name] = module.weight.detach().to("cpu", copy=True)
    return variant


def _targeted(name: str, is_head: bool, targets: str | list[str]) -> bool:
    """Whether PEFT wraps the layer `name` for `targets`, by PEFT's documented rule: a pattern
    matches the whole name, a list entry the name or its last parts; `all-linear` is every layer
    but the output head."""
    if targets == "all-linear":
        return not is_head
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


def after_attach(
    peft_model: Any, cfg: LoraConfig, variant: Variant, batches: Callable[[], Iterable[dict]] | None
) -> None:
    """Finish the variant's initialisation: EVA's SVD over training batches, LoftQ's fit to the
    quantization error, PiSSA/OLoRA's initial adapter (kept for the conversion at save time)."""
    if cfg.init == "eva":
        from peft import initialize_lora_eva_weights

        if batches is None:
            raise ModelError("lora.init: eva needs training batches to initialise from")
        initialize_lora_eva_weights(peft_model, dataloader=batches(), show_progress_bar=False)
    elif cfg.init == "loftq":
        _loftq(peft_model)
    elif cfg.init in ("pissa", "olora"):
        folder = Path(tempfile.mkdtemp(prefix="pipeline-init-")) / "initial"
        peft_model.save_pretrained(folder)
        variant.initial_dir = folder


@torch.no_grad()
def _loftq(peft_model: Any) -> None:
    """LoftQ (one iteration) on a 4-bit base: each adapter starts at the best rank-r
    approximation of (original weight - dequantized 4-bit weight), scaled by r/alpha."""
    import bitsandbytes as bnb
    from peft.tuners.lora import Linear4bit
    from peft.utils.loftq_utils import _low_rank_decomposition, _SafetensorLoader

    path = getattr(peft_model.get_base_model(), "name_or_path", None) or None
    try:
        weights = _SafetensorLoader(peft_model, path if path and Path(path).exists() else None)
    except (ValueError, FileNotFoundError) as e:
        raise ModelError(f"lora.init: loftq needs the base's safetensors weights on disk: {e}") from None
    found = False
    for name, module in peft_model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        found = True
        original = weights.get_tensor(name.removeprefix("base_model.model.") + ".weight")
        quant = module.get_base_layer().weight
        dequantized = bnb.functional.dequantize_4bit(quant.data, quant.quant_state)
        residual = original.to(dequantized.device, torch.float32) - dequantized.float()
        for adapter in module.active_adapters:
            low = _low_rank_decomposition(residual, reduced_rank=module.r[adapter])
            a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            a.copy_(low["R"].to(a.dtype))
            b.copy_((low["L"] / module.scaling[adapter]).to(b.dtype))
    if not found:
        raise ModelError("lora.init: loftq needs a 4-bit base (model.load_in_4bit: true)")


def loraplus_optimizer(model: Any, args: Any, ratio: float) -> Any:
    """LoRA+ (PEFT's `create_loraplus_optimizer`): the optimizer `train.optimizer` names, with the
    B matrices at `ratio` x the learning rate."""
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
    return create_loraplus_optimizer(
        model,
        optimizer_cls,
        lr=args.learning_rate,
        loraplus_lr_ratio=ratio,
        weight_decay=args.weight_decay,
        **kwargs,
    )
