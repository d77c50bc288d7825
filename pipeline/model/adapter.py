"""Using an adapter: rebuild base + adapter from an adapter folder, answer prompts.

An adapter folder (a run's `adapter/` artifact, or a registered model's `artifacts/adapter`)
holds `pipeline_base.json`, which says how to load the base model it was trained on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ModelConfig, TrainConfig
from pipeline.core import names
from pipeline.core.errors import ModelError
from pipeline.model.device import DevicePlan, plan_device
from pipeline.model.load import load_base_model


def save_adapter(model: Any, tokenizer: Any, model_cfg: ModelConfig, plan: DevicePlan, folder: Path) -> None:
    """The adapter weights, the tokenizer and the base reference, in one folder (what serving and
    the registry load)."""
    variant = getattr(model, "pipeline_variant", None)  # PiSSA/OLoRA: saved as plain LoRA
    model.save_pretrained(folder, **(variant.save_kwargs() if variant is not None else {}))
    tokenizer.save_pretrained(folder)
    (folder / names.BASE_REFERENCE_FILE).write_text(json.dumps(base_reference(model_cfg, plan), indent=2))


def discard_local_adapter(adapter_dir: str | Path) -> None:
    """Delete the local copy of a run's adapter (the run keeps its `adapter/` artifact)."""
    folder = Path(adapter_dir).parent  # adapters/<run id>/
    if folder.parent.name == names.ADAPTERS_DIR:
        shutil.rmtree(folder, ignore_errors=True)


def base_config(adapter_dir: str | Path) -> ModelConfig:
    """The ModelConfig of the base, from the adapter's reference (local paths checked)."""
    ref_path = Path(adapter_dir) / names.BASE_REFERENCE_FILE
    if not ref_path.is_file():
        raise ModelError(
            f"{adapter_dir}: no {names.BASE_REFERENCE_FILE}; not an adapter made by this pipeline"
        )
    ref = json.loads(ref_path.read_text())
    source = ref["name_or_path"]
    resolved = ref.get("resolved_path")
    # A relative folder was relative to where training ran; fall back to its absolute path then.
    if not source.startswith("pkg:") and not Path(source).exists() and resolved and Path(resolved).exists():
        source = resolved
    dtype = ref.get("dtype") or "auto"
    if dtype == "float16" and not torch.cuda.is_available():
        dtype = "float32"  # fp16 weights cannot run on this CPU stack; float32 holds them exactly
    return ModelConfig(
        name_or_path=source,
        dtype=dtype,
        gguf_file=ref.get("gguf_file"),
        revision=ref.get("revision"),
        load_in_4bit=bool(ref.get("load_in_4bit")),
        quant_type=ref.get("quant_type", "nf4"),
        double_quant=ref.get("double_quant", True),
        trust_remote_code=bool(ref.get("trust_remote_code")),
    )


def base_reference(m: ModelConfig, plan: DevicePlan) -> dict[str, Any]:
    """What a loader needs to rebuild the base model under the adapter (`pipeline_base.json`;
    `base_config` reads it back)."""
    local = Path(m.name_or_path).expanduser()
    return {
        "name_or_path": m.name_or_path,
        "resolved_path": str(local.resolve())
        if not m.name_or_path.startswith("pkg:") and local.exists()
        else None,
        "gguf_file": m.gguf_file,
        "revision": m.revision,
        "dtype": plan.dtype,
        "load_in_4bit": m.load_in_4bit,
        "quant_type": m.quant_type,
        "double_quant": m.double_quant,
        "trust_remote_code": m.trust_remote_code,
    }


def load_adapter(adapter_dir: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer): the base model with the adapter applied, in eval mode."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    cfg = base_config(adapter_dir)  # the dtype the adapter was trained on
    plan = plan_device(cfg, TrainConfig())
    base = load_base_model(cfg, plan, for_training=False).model  # straight onto the GPU if any
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def prompts_from(model_input: Any) -> list[str]:
    """Prompts from a string, a list of strings, a dict or a DataFrame with a `prompt` column."""
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict):
        value = model_input.get("prompt", model_input.get("prompts"))
        return [value] if isinstance(value, str) else list(value)
    if hasattr(model_input, "columns"):  # pandas DataFrame: what MLflow hands over under the signature
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        # {"prompt": [a, b]} arrives as one row holding the list: its prompts, one by one.
        cells = model_input[column].tolist()
        return [str(p) for v in cells for p in (v if isinstance(v, (list, tuple)) else [v])]
    return [str(p) for p in model_input]


def generate_answers(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 64) -> list[str]:
    """Greedy answers to user prompts, each wrapped in the tokenizer's chat template."""
    rendered = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    return generate(model, tokenizer, rendered, max_new_tokens)


@torch.no_grad()
def generate(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int = 8
) -> list[str]:
    """Greedy answers for rendered prompts (left-padded batches; only new tokens are decoded)."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    config = model.config if hasattr(model, "config") else None
    use_cache = getattr(config, "use_cache", None)
    if config is not None:
        config.use_cache = True
    device = next(model.parameters()).device
    outputs: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(
                prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            outputs.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        # Fast tokenizers keep the last padding setting in their backend, and save_pretrained
        # writes it to tokenizer.json: a saved tokenizer would then load as left-padding.
        backend = getattr(tokenizer, "_tokenizer", None)
        if backend is not None and hasattr(backend, "no_padding"):
            backend.no_padding()
        if config is not None:
            config.use_cache = use_cache
        model.train(was_training)
    return outputs
