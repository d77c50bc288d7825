"""One forward over a shared frozen base for the batches of several trials, each row through its
own trial's LoRA adapter (what `packing` runs for a pack's step).

The router is a copy of the base's module tree (the same weight tensors) in which every layer the
trials' LoRA targets is a `PackedLinear`: the base layer once over every row, plus, on each
trial's rows, that trial's `B(A(dropout(x))) * scaling` computed as PEFT's LoRA layer computes it
alone, its dropout drawing from the trial's own RNG state.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Batch keys a packed forward understands; anything else (position_ids of padding-free batches,
# say) is refused by `packing.unpackable` before a trial starts.
BATCH_KEYS = ("input_ids", "attention_mask", "logits_to_keep")
# Keys of a forward call that change nothing a packed forward computes.
IGNORED_KEYS = (
    "labels",
    "num_items_in_batch",
    "return_dict",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
)
_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def share_weights(module: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and buffers are the original's own tensors:
    PEFT can wrap the copy's layers without touching the original's, at no memory cost."""
    state = dict(module.__dict__)
    state["_parameters"] = dict(module._parameters)
    state["_buffers"] = dict(module._buffers)
    state["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    state["_modules"] = {k: None if m is None else share_weights(m) for k, m in module._modules.items()}
    for name in _HOOKS:
        if name in state:
            state[name] = OrderedDict(state[name])
    if "_hf_hook" in state:
        # accelerate's device-alignment hook replaces `forward` with a call bound to the original
        # module; a pack runs on one device, so the copy keeps its class's own forward.
        for name in ("_hf_hook", "_old_forward", "forward"):
            state.pop(name, None)
    copy = module.__class__.__new__(module.__class__)
    copy.__dict__ = state
    return copy


def lora_layers_by_path(peft_model: Any) -> dict[str, Any]:
    """The model's LoRA layers by their path in the base model."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {
        name.removeprefix(prefix): m for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)
    }


@dataclass
class Route:
    """A trial's rows in the packed batch: its LoRA layers, its RNG (`set_torch_rng` and
    `get_torch_rng`), its rows [start, end) and its batch's own sequence length."""

    layers: dict[str, Any]
    rng: Any
    start: int
    end: int
    length: int


class PackedLinear(nn.Module):
    """A targeted layer of the router: the shared base layer, plus each row's own trial's LoRA."""

    def __init__(self, base_layer: nn.Module, path: str, router: Router) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.path = path
        object.__setattr__(self, "router", router)  # not a submodule

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.router.add_lora(self.path, x, self.base_layer(x, *args, **kwargs))


class Router:
    """The base's tree with each targeted layer routed per row."""

    def __init__(self, base: nn.Module, paths: list[str]) -> None:
        model = share_weights(base)
        for path in paths:
            parent, _, name = path.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            owner._modules[name] = PackedLinear(owner._modules[name], path, self)
        self.model = model
        self.routes: list[Route] = []

    def forward(self, batches: list[dict[str, Any]], trials: list[tuple[dict[str, Any], Any]]) -> list[Any]:
        """Each trial's outputs (logits of its rows, and the model's loss where its batch has
        labels) from one forward over all the batches; `trials` gives each batch's (LoRA layers,
        RNG)."""
        extra = (
            {k for b in batches for k, v in b.items() if v is not None} - set(BATCH_KEYS) - set(IGNORED_KEYS)
        )
        if extra:
            raise ValueError(f"a packed forward takes no {', '.join(sorted(extra))}")
        inputs, self.routes = _concatenated(batches, trials)
        model = self.model
        model.train()
        try:
            out = model(**inputs, use_cache=False)
        finally:
            self.routes = []
        mask = inputs.get("logits_to_keep")
        counts = [int(b["logits_to_keep"].sum()) for b in batches] if isinstance(mask, torch.Tensor) else None
        pieces = out.logits.split(counts) if counts is not None else None
        results, start = [], 0
        for i, batch in enumerate(batches):
            rows, length = batch["input_ids"].shape
            logits = pieces[i] if pieces is not None else out.logits[start : start + rows, :length]
            start += rows
            loss = None
            if batch.get("labels") is not None:  # the model's own loss, on this trial's rows only
                loss = model.loss_function(
                    logits=logits,
                    labels=batch["labels"],
                    vocab_size=model.config.vocab_size,
                    num_items_in_batch=batch.get("num_items_in_batch"),
                )
            results.append(type(out)(loss=loss, logits=logits))
        return results

    def add_lora(self, path: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """`result` (the base layer's output for every row) plus each trial's LoRA on its rows,
        computed as PEFT's LoRA layer computes it alone."""
        outs = []
        four_bit = False
        for route in self.routes:
            layer = route.layers[path]
            a, b = layer.lora_A["default"], layer.lora_B["default"]
            dropout, scaling = layer.lora_dropout["default"], layer.scaling["default"]
            xk = layer._cast_input_dtype(x[route.start : route.end, : route.length], a.weight.dtype)
            with _own_rng(route.rng, dropout):
                dropped = dropout(xk)
            out = b(a(dropped)) * scaling
            four_bit = four_bit or type(layer).__name__ == "Linear4bit"
            if route.length < x.shape[1]:
                out = nn.functional.pad(out, (0, 0, 0, x.shape[1] - route.length))
            outs.append(out)
        delta = outs[0] if len(outs) == 1 else torch.cat(outs)
        if four_bit:  # PEFT's 4-bit layer casts the LoRA output to the base output's dtype first
            if not torch.is_autocast_enabled():
                delta = delta.to(result.dtype)
            return result + delta
        return (result + delta).to(result.dtype)


def _concatenated(
    batches: list[dict[str, Any]], trials: list[tuple[dict[str, Any], Any]]
) -> tuple[dict[str, Any], list[Route]]:
    """The batches as one, padded on the right to the longest, and each trial's route."""
    length = max(int(b["input_ids"].shape[1]) for b in batches)
    ids, att, keep, routes, row = [], [], [], [], 0
    for (layers, rng), b in zip(trials, batches, strict=True):
        x = b["input_ids"]
        rows, n = x.shape
        pad = length - n
        ids.append(nn.functional.pad(x, (0, pad), value=0))
        mask = b.get("attention_mask")
        mask = torch.ones_like(x) if mask is None else mask
        att.append(nn.functional.pad(mask, (0, pad), value=0))
        k = b.get("logits_to_keep")
        if isinstance(k, torch.Tensor):
            keep.append(nn.functional.pad(k, (0, pad), value=False))
        routes.append(Route(layers, rng, row, row + rows, n))
        row += rows
    inputs: dict[str, Any] = {"input_ids": torch.cat(ids), "attention_mask": torch.cat(att)}
    if keep:
        if len(keep) != len(batches):
            raise ValueError("a packed forward needs every trial's batch to carry logits_to_keep, or none")
        inputs["logits_to_keep"] = torch.cat(keep)
    return inputs, routes


@contextlib.contextmanager
def _own_rng(rng: Any, dropout: nn.Module) -> Iterator[None]:
    """Dropout draws from the trial's own RNG state, as it would alone."""
    if not (isinstance(dropout, nn.Dropout) and dropout.p > 0 and dropout.training):
        yield
        return
    rng.set_torch_rng()
    try:
        yield
    finally:
        rng.get_torch_rng()
