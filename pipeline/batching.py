"""Batching: tokenized examples -> tensors. The collators of the three batching modes
(`train.batching`) and the dataset wrapper the Trainer samples from."""

from __future__ import annotations

from typing import Any

from pipeline.data import IGNORE_INDEX


def build_collator(batching: str, tokenizer: Any, max_seq_len: int, pad_to_multiple_of: int | None = None):
    """The collator for a batching mode (see TrainConfig.batching)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if batching == "padding_free":
        return DataCollatorWithFlattening()
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
