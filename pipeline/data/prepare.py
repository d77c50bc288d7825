"""Data: records (read by `records.py`) -> chat template -> tokens with prompt tokens masked.

The loss sees only response tokens (labels of prompt tokens are -100). The train/eval split is a
seeded permutation of the records, so it is the same whatever the tokenizer. Examples longer than
``data.max_seq_len`` are truncated, dropped or rejected (``data.truncation``) and counted.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import DataConfig
from pipeline.core.errors import DataError
from pipeline.data.read import Record, looks_like_hub_id, read_records, source_of

IGNORE_INDEX = -100

# Used when neither the tokenizer nor data.chat_template provides a template. Plain-text role
# markers; each assistant turn ends with the tokenizer's EOS token so generation learns to stop.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

REQUIRED_FIELDS = {"alpaca": ("instruction", "output"), "chat": ("messages",), "text": ("text",)}


@dataclass
class DataStats:
    train_examples: int = 0
    eval_examples: int = 0
    truncated: int = 0
    dropped: int = 0
    train_tokens: int = 0
    train_response_tokens: int = 0
    eval_tokens: int = 0
    max_len: int = 0
    mean_len: float = 0.0


@dataclass(frozen=True)
class DataSplit:
    """The train or eval set as runs log it (an MLflow dataset). `digest` hashes the tokenized
    examples used: the same data, split and tokenizer give the same digest."""

    context: str  # training | eval
    name: str  # <file stem or hub id>-train | -eval
    source: str  # the file's absolute path, or the hub id
    digest: str
    examples: int


def _split(context: str, path: str, digest: str, examples: int) -> DataSplit:
    stem = path if looks_like_hub_id(path) else Path(path).stem
    return DataSplit(
        context, f"{stem}-{'train' if context == 'training' else 'eval'}", source_of(path), digest, examples
    )


@dataclass
class PreparedData:
    """Tokenized train and eval sets, the prompts for generation, stats and fingerprints."""

    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    generation: list[dict[str, str]]  # {"prompt": rendered prompt, "reference": response text}
    stats: DataStats
    fingerprint: str  # train + eval tokens
    eval_fingerprint: str  # eval tokens only: eval losses compare only when this matches
    chat_template_source: str = field(default="tokenizer")
    splits: tuple[DataSplit, ...] = ()  # (training, eval): what each run logs as its datasets

    def stats_dict(self) -> dict[str, Any]:
        return {**asdict(self.stats), "chat_template": self.chat_template_source}


# ---------------------------------------------------------------------------------------------
# Records -> messages


def _field(rec: Record, name: str, fields: dict[str, str]) -> Any:
    return rec.data.get(fields.get(name, name))


def _missing_fields(rec: Record, cfg: DataConfig) -> list[str]:
    return [f for f in REQUIRED_FIELDS[cfg.format] if _field(rec, f, cfg.fields) in (None, "")]


def _fields_error(rec: Record, missing: list[str], cfg: DataConfig, hint: str = "") -> DataError:
    cols = ", ".join(cfg.fields.get(f, f) for f in missing)
    needed = ", ".join(cfg.fields.get(f, f) for f in REQUIRED_FIELDS[cfg.format])
    return DataError(f"{rec.where}: record has no {cols!r} (format {cfg.format} needs {needed}){hint}")


def check_fields(records: list[Record], cfg: DataConfig) -> None:
    """The first record (in file order) without a field its format needs, as a DataError; when no
    record has it, the columns the records do have, and data.fields to map them."""
    for rec in records:
        missing = _missing_fields(rec, cfg)
        if not missing:
            continue
        hint = ""
        if all(_missing_fields(r, cfg) for r in records):
            keys = ", ".join(sorted(rec.data)) or "none"
            hint = (
                f"; no record has it: the records' keys are {keys} (set data.format, or map the "
                f"names with data.fields, e.g. {{{missing[0]}: <key>}})"
            )
        raise _fields_error(rec, missing, cfg, hint)


def to_messages(rec: Record, cfg: DataConfig) -> list[dict[str, str]] | str:
    """Messages for chat/alpaca records, plain text for text records; DataError names the record."""
    missing = _missing_fields(rec, cfg)
    if missing:
        raise _fields_error(rec, missing, cfg)
    if cfg.format == "text":
        return str(_field(rec, "text", cfg.fields))
    if cfg.format == "alpaca":
        prompt = str(_field(rec, "instruction", cfg.fields))
        extra = _field(rec, "input", cfg.fields)
        if extra:
            prompt += f"\n\n{extra}"
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": str(_field(rec, "output", cfg.fields))},
        ]
    else:
        messages = _field(rec, "messages", cfg.fields)
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages
        ):
            raise DataError(f"{rec.where}: 'messages' must be a list of {{role, content}} objects")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{rec.where}: 'messages' has no assistant turn to learn from")
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
    return messages


# ---------------------------------------------------------------------------------------------
# Tokenization with masking


def ensure_chat_template(tokenizer: Any, cfg: DataConfig) -> str:
    """Give the tokenizer a chat template; return where it came from (config, tokenizer, fallback)."""
    if cfg.chat_template:
        tokenizer.chat_template = cfg.chat_template
        return "config"
    if getattr(tokenizer, "chat_template", None):
        return "tokenizer"
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return "fallback"


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def segments(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, is_response) pieces, in order.

    Each assistant turn's text is what the template adds after the generation prompt. Templates
    must render a conversation as a prefix of its continuation; one that does not is an error.
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True)
        full = _render(tokenizer, messages[: i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise DataError(
                "data.chat_template: the chat template does not render a conversation as a prefix "
                "of its continuation, so prompt tokens cannot be masked; set data.chat_template"
            )
        pieces.append((prompt[len(done) :], False))
        pieces.append((full[len(prompt) :], True))
        done = full
    return [(t, r) for t, r in pieces if t]


def tokenize_example(tokenizer: Any, messages: list[dict[str, str]] | str) -> dict[str, list[int]]:
    """input_ids and labels; labels are -100 on prompt tokens (all tokens count for text)."""
    if isinstance(messages, str):
        ids = tokenizer(messages, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = [*ids, tokenizer.eos_token_id]
        return {"input_ids": ids, "labels": list(ids)}
    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_response in segments(tokenizer, messages):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if is_response else [IGNORE_INDEX] * len(ids))
    return {"input_ids": input_ids, "labels": labels}


def _fit(example: dict[str, list[int]], cfg: DataConfig, where: str) -> dict[str, list[int]] | None:
    """Apply data.truncation; None means the example is dropped."""
    n = len(example["input_ids"])
    if n <= cfg.max_seq_len:
        return example
    if cfg.truncation == "error":
        raise DataError(
            f"{where}: example has {n} tokens, more than data.max_seq_len={cfg.max_seq_len} "
            "(set data.truncation to truncate or drop)"
        )
    if cfg.truncation == "drop":
        return None
    cut = {k: v[: cfg.max_seq_len] for k, v in example.items()}
    if all(t == IGNORE_INDEX for t in cut["labels"]):
        return None  # the prompt alone fills max_seq_len: nothing left to learn
    return cut


def example_ids(examples: Sequence[dict[str, list[int]]]) -> tuple[str, ...]:
    """A stable id per example: a hash of its tokens and labels (the same example gets the same
    id in every run on this eval set; a repeated example gets `#2`, `#3` ...)."""
    seen: dict[str, int] = {}
    out = []
    for ex in examples:
        h = _tokens_sha([ex])[:12]
        seen[h] = seen.get(h, 0) + 1
        out.append(h if seen[h] == 1 else f"{h}#{seen[h]}")
    return tuple(out)


def _tokens_sha(examples: Sequence[dict[str, list[int]]]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex["input_ids"], ex["labels"]], separators=(",", ":")).encode())
    return h.hexdigest()[:16]


def split_records(records: list[Record], cfg: DataConfig) -> tuple[list[Record], list[Record]]:
    """Seeded split: a permutation of record indices, the first share is the eval set."""
    order = list(range(len(records)))
    random.Random(cfg.seed).shuffle(order)
    n_eval = max(1, math.ceil(len(records) * cfg.eval_fraction))
    if n_eval >= len(records):
        raise DataError(
            f"data.path: {len(records)} record(s) leave nothing to train on with "
            f"eval_fraction={cfg.eval_fraction}"
        )
    eval_idx, train_idx = sorted(order[:n_eval]), order[n_eval:]
    return [records[i] for i in train_idx], [records[i] for i in eval_idx]


def read_data(cfg: DataConfig) -> tuple[list[Record], list[Record] | None]:
    """The records of data.path and of data.eval_path (None when not set), each checked for the
    fields its format needs, in file order: a broken file is named at its first bad record.
    Light (no tokenizer): the entry points call it before the heavy imports."""
    records = read_records(cfg.path, "data.path", cfg.split)
    if not records:
        raise DataError(f"data.path: {cfg.path}: the data set is empty")
    check_fields(records, cfg)
    if not cfg.eval_path:
        return records, None
    eval_recs = read_records(cfg.eval_path, "data.eval_path", cfg.split)
    if not eval_recs:
        raise DataError(f"data.eval_path: {cfg.eval_path}: the data set is empty")
    check_fields(eval_recs, cfg)
    return records, eval_recs


def _splits(cfg: DataConfig) -> tuple[list[Record], list[Record]]:
    """The train and eval records (eval_path's, or split off the data), capped as configured."""
    records, eval_records = read_data(cfg)
    if eval_records is not None:
        train_recs, eval_recs = records, eval_records
    else:
        train_recs, eval_recs = split_records(records, cfg)
    if cfg.max_eval_examples:
        eval_recs = eval_recs[: cfg.max_eval_examples]
    if cfg.max_train_examples:
        train_recs = train_recs[: cfg.max_train_examples]
    return train_recs, eval_recs


def _build(
    recs: list[Record], cfg: DataConfig, tokenizer: Any, stats: DataStats
) -> tuple[list[dict[str, list[int]]], list[tuple[Record, Any]]]:
    """Template, tokenize and fit each record; counts the dropped and truncated in `stats`.
    Returns the examples and the (record, messages) of those kept."""
    out, kept = [], []
    for rec in recs:
        messages = to_messages(rec, cfg)
        ex = tokenize_example(tokenizer, messages)
        fitted = _fit(ex, cfg, rec.where)
        if fitted is None:
            stats.dropped += 1
            continue
        if len(fitted["input_ids"]) < len(ex["input_ids"]):
            stats.truncated += 1
        out.append(fitted)
        kept.append((rec, messages))
    return out, kept


def _generation_prompts(kept: list[tuple[Record, Any]], tokenizer: Any) -> list[dict[str, str]]:
    """Each eval conversation up to its last answer (the prompt), and that answer (the reference)."""
    out = []
    for _, messages in kept:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        out.append(
            {"prompt": _render(tokenizer, messages[:last], True), "reference": messages[last]["content"]}
        )
    return out


def prepare_data(cfg: DataConfig, tokenizer: Any) -> PreparedData:
    """Read, split, template, tokenize, mask and fit the data; fingerprint what the model sees."""
    train_recs, eval_recs = _splits(cfg)
    template_source = "none" if cfg.format == "text" else ensure_chat_template(tokenizer, cfg)
    stats = DataStats()
    train, _ = _build(train_recs, cfg, tokenizer, stats)
    evals, eval_kept = _build(eval_recs, cfg, tokenizer, stats)
    if not train:
        raise DataError(f"data.path: {cfg.path}: no training example left (all {stats.dropped} dropped)")
    if not evals:
        raise DataError(f"data: no eval example left (all {stats.dropped} dropped); check data.max_seq_len")
    generation = [] if cfg.format == "text" else _generation_prompts(eval_kept, tokenizer)
    lengths = [len(e["input_ids"]) for e in train]
    stats.train_examples = len(train)
    stats.eval_examples = len(evals)
    stats.train_tokens = sum(lengths)
    stats.train_response_tokens = sum(sum(t != IGNORE_INDEX for t in e["labels"]) for e in train)
    stats.eval_tokens = sum(len(e["input_ids"]) for e in evals)
    stats.max_len = max(lengths)
    stats.mean_len = round(stats.train_tokens / len(train), 2)
    train_sha, eval_sha = _tokens_sha(train), _tokens_sha(evals)
    return PreparedData(
        train=train,
        eval=evals,
        generation=generation,
        stats=stats,
        fingerprint=hashlib.sha256((train_sha + eval_sha).encode()).hexdigest()[:16],
        eval_fingerprint=eval_sha,
        chat_template_source=template_source,
        splits=(
            _split("training", cfg.path, train_sha, len(train)),
            _split("eval", cfg.eval_path or cfg.path, eval_sha, len(evals)),
        ),
    )
