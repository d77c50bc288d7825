"""Batching: tokenized examples -> tensors. The collators of the three batching modes
(`train.batching`) and the dataset wrapper the Trainer samples from."""

from __future__ import annotations

from typing import Any

from pipeline.data.prepare import IGNORE_INDEX


def build_collator(
    batching: str,
    tokenizer: Any,
    max_seq_len: int,
    pad_to_multiple_of: int | None = None,
    flash_attention: bool = False,
):
    """The collator for a batching mode (see TrainConfig.batching). `flash_attention`: the
    concatenated batch also carries FlashAttention's cumulative sequence lengths, so its
    variable-length kernel runs without deriving them from position_ids at every layer."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if batching == "padding_free":
        return DataCollatorWithFlattening(return_flash_attn_kwargs=flash_attention)
    if batching == "padded":
        return DataCollatorForSeq2Seq(
            tokenizer, padding="max_length", max_length=max_seq_len, label_pad_token_id=IGNORE_INDEX
        )
    return DataCollatorForSeq2Seq(
        tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=pad_to_multiple_of
    )


class TokenDataset:
    """A list of tokenized examples as a map-style dataset (what Trainer and its samplers expect)."""

    def __init__(self, examples: list[dict[str, list[int]]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]


# ---------------------------------------------------------------------------------------------
# Logits only where a label is predicted


def predicted_positions(labels: Any) -> Any:
    """(batch, seq) bool: the positions whose logits the loss reads, those whose next token is a
    label. With a prompt-masked loss (and padding, and padding-free separators) most are not."""
    import torch

    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    if not keep.any():
        keep[0, 0] = True  # nothing to learn from this batch; one position keeps the shapes valid
    return keep


class LabelPositions:
    """Wraps a collator: each batch also carries `logits_to_keep`, the predicted positions as a
    boolean mask, so the model projects only those onto the vocabulary (transformers slices the
    hidden states before the LM head). The loss is then `completion_loss`."""

    def __init__(self, collate: Any):
        self.collate = collate

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(features)
        batch["logits_to_keep"] = predicted_positions(batch["labels"])
        return batch


def completion_loss(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
    """The causal-LM loss from logits computed at the predicted positions only: the same sum of
    token losses as the model's own (shifted) loss, normalized the same way (by the Trainer's
    token count of the whole accumulated batch, else a mean)."""
    import torch.nn.functional as F

    targets = labels[:, 1:][predicted_positions(labels)[:, :-1]]
    logits = outputs.logits.float()  # an all-masked batch kept one position: its target is ignored
    if logits.ndim != 2 or logits.shape[0] != targets.shape[0]:
        # A model whose forward takes logits_to_keep but not as a mask: never train on misread logits.
        raise ValueError(
            f"train.prompt_logits: this model's forward returned logits of shape {tuple(logits.shape)} "
            f"for {targets.shape[0]} response positions (it does not take a position mask in "
            "logits_to_keep); set train.prompt_logits: true"
        )
    total = F.cross_entropy(logits, targets.to(logits.device), ignore_index=IGNORE_INDEX, reduction="sum")
    if num_items_in_batch is None:
        return total / max(int((targets != IGNORE_INDEX).sum()), 1)
    return total / num_items_in_batch


def takes_position_mask(model: Any) -> bool:
    """Whether the (PEFT-wrapped) model's forward takes `logits_to_keep` as a boolean position
    mask: its forward takes `logits_to_keep` (transformers 5 causal LMs do; a hub model with its own
    code may not), and transformers slices hidden states by a mask (`slice_logits_to_keep`, since
    5.2x; 5.17, the borrowed GPU machine's, takes only a count or one row of positions)."""
    import inspect

    from transformers import modeling_utils

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hasattr(modeling_utils, "slice_logits_to_keep") and (
        "logits_to_keep" in inspect.signature(inner.forward).parameters
    )
