"""Data: formats, readers, masking, truncation, split, fingerprints and bad input."""

from __future__ import annotations

import copy
import csv
import json

import pytest

from pipeline.config import DataConfig
from pipeline.core.errors import DataError
from pipeline.data.collate import build_collator
from pipeline.data.prepare import (
    FALLBACK_CHAT_TEMPLATE,
    IGNORE_INDEX,
    prepare_data,
    read_records,
    split_records,
    tokenize_example,
)

from ..conftest import DEMO_DATA

ALPACA = [
    {
        "instruction": f"What does `mod.f{i}` do?",
        "input": "" if i % 2 else "context",
        "output": f"It does thing {i}.",
    }
    for i in range(20)
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **kw)


@pytest.fixture
def tok(demo_tokenizer):
    return copy.deepcopy(demo_tokenizer)  # tests may replace its chat template


def response_text(tok, example) -> str:
    return tok.decode([t for t in example["labels"] if t != IGNORE_INDEX])


def test_alpaca_masks_the_prompt(tok, tmp_path):
    data = prepare_data(cfg(write_jsonl(tmp_path / "a.jsonl", ALPACA), eval_fraction=0.2), tok)
    for ex in data.train + data.eval:
        assert len(ex["input_ids"]) == len(ex["labels"])
        labels = [t for t in ex["labels"] if t != IGNORE_INDEX]
        assert 0 < len(labels) < len(ex["input_ids"])
        # Only the answer and the end of the assistant turn are learned; the question is not.
        text = tok.decode(labels)
        assert text.startswith("It does thing ") and text.endswith("<|im_end|>\n")
        full = tok.decode(ex["input_ids"])
        assert "What does" in full and "What does" not in text
        # The masked part is exactly a prefix: prompt first, then the response.
        first = next(i for i, t in enumerate(ex["labels"]) if t != IGNORE_INDEX)
        assert all(t == IGNORE_INDEX for t in ex["labels"][:first])
        assert all(t != IGNORE_INDEX for t in ex["labels"][first:])


def test_alpaca_input_field_goes_into_the_prompt(tok):
    from pipeline.data.prepare import Record, to_messages

    msgs = to_messages(Record(ALPACA[0], "x:1"), DataConfig(path="x"))
    assert msgs[0] == {"role": "user", "content": "What does `mod.f0` do?\n\ncontext"}
    assert msgs[1]["role"] == "assistant"


def test_chat_format_learns_every_assistant_turn_only(tok, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Q{i} one"},
                {"role": "assistant", "content": f"A{i} first"},
                {"role": "user", "content": f"Q{i} two"},
                {"role": "assistant", "content": f"A{i} second"},
            ]
        }
        for i in range(10)
    ]
    data = prepare_data(cfg(write_jsonl(tmp_path / "c.jsonl", rows), format="chat", eval_fraction=0.2), tok)
    ex = data.train[0]
    learned = response_text(tok, ex)
    assert "first" in learned and "second" in learned
    assert "Q" not in learned and "Be brief" not in learned and "user" not in learned
    # Two separate response spans: the second user turn sits between them, masked.
    spans = sum(
        1
        for i, t in enumerate(ex["labels"])
        if t != IGNORE_INDEX and (i == 0 or ex["labels"][i - 1] == IGNORE_INDEX)
    )
    assert spans == 2
    # Generation prompts end with the assistant header of the last turn; references are its text.
    g = data.generation[0]
    assert g["prompt"].endswith("<|im_start|>assistant\n") and g["reference"].endswith("second")


def test_text_format_learns_every_token(tok, tmp_path):
    rows = [{"text": f"def f{i}(x): return x + {i}"} for i in range(10)]
    data = prepare_data(cfg(write_jsonl(tmp_path / "t.jsonl", rows), format="text", eval_fraction=0.2), tok)
    ex = data.train[0]
    assert ex["labels"] == ex["input_ids"]
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert data.generation == []


def test_field_mapping(tok, tmp_path):
    rows = [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(10)]
    c = cfg(write_jsonl(tmp_path / "m.jsonl", rows), fields={"instruction": "question", "output": "answer"})
    data = prepare_data(c, tok)
    assert response_text(tok, data.train[0]).startswith("a")


def test_system_prompt_is_added_and_masked(tok, tmp_path):
    c = cfg(write_jsonl(tmp_path / "a.jsonl", ALPACA), system_prompt="You are terse.")
    data = prepare_data(c, tok)
    ex = data.train[0]
    assert "You are terse." in tok.decode(ex["input_ids"])
    assert "terse" not in response_text(tok, ex)


def test_fallback_template_when_tokenizer_has_none(tok, tmp_path):
    tok.chat_template = None
    data = prepare_data(cfg(write_jsonl(tmp_path / "a.jsonl", ALPACA)), tok)
    assert data.chat_template_source == "fallback"
    assert tok.chat_template == FALLBACK_CHAT_TEMPLATE
    ex = data.train[0]
    assert "<|user|>" in tok.decode(ex["input_ids"])
    learned = response_text(tok, ex)
    assert learned.startswith("It does thing") and learned.rstrip().endswith(tok.eos_token)


def test_config_template_overrides_the_tokenizer(tok, tmp_path):
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    data = prepare_data(cfg(write_jsonl(tmp_path / "a.jsonl", ALPACA), chat_template=template), tok)
    assert data.chat_template_source == "config"
    assert "[user]" in tok.decode(data.train[0]["input_ids"])


def test_readers_agree_on_json_csv_parquet(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    j = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    (tmp_path / "a.json").write_text(json.dumps(ALPACA))
    with (tmp_path / "a.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(ALPACA)
    pq.write_table(pa.Table.from_pylist(ALPACA), tmp_path / "a.parquet")
    fps = {
        prepare_data(cfg(p), tok).fingerprint
        for p in [j, *(tmp_path / f"a.{s}" for s in ("json", "csv", "parquet"))]
    }
    assert len(fps) == 1


def test_split_is_seeded_and_disjoint(tmp_path):
    recs = read_records(str(write_jsonl(tmp_path / "a.jsonl", ALPACA)), "data.path")
    a_train, a_eval = split_records(recs, cfg("x", eval_fraction=0.25, seed=3))
    _b_train, b_eval = split_records(recs, cfg("x", eval_fraction=0.25, seed=3))
    _c_train, c_eval = split_records(recs, cfg("x", eval_fraction=0.25, seed=4))
    assert [r.where for r in a_eval] == [r.where for r in b_eval]
    assert [r.where for r in a_eval] != [r.where for r in c_eval]
    assert len(a_eval) == 5 and len(a_train) == 15
    assert not {r.where for r in a_eval} & {r.where for r in a_train}


def test_fingerprints_are_stable_and_sensitive(tok, tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    a = prepare_data(cfg(p), tok)
    b = prepare_data(cfg(p), tok)
    c = prepare_data(cfg(p, system_prompt="Be brief."), tok)
    assert a.fingerprint == b.fingerprint and a.eval_fingerprint == b.eval_fingerprint
    assert a.fingerprint != c.fingerprint


def test_demo_data_is_big_and_valid(tok):
    c = cfg(DEMO_DATA, max_seq_len=128, max_eval_examples=100)
    data = prepare_data(c, tok)
    assert data.stats.train_examples + data.stats.dropped >= 1000
    assert data.stats.eval_examples == 100


# --- truncation ------------------------------------------------------------------------------

LONG = [{"instruction": "Explain.", "input": "", "output": " ".join(["word"] * 200)} for _ in range(10)]


def test_truncate_counts_and_cuts(tok, tmp_path):
    data = prepare_data(cfg(write_jsonl(tmp_path / "l.jsonl", LONG + ALPACA), max_seq_len=48), tok)
    assert data.stats.truncated == 10
    assert all(len(e["input_ids"]) <= 48 for e in data.train + data.eval)


def test_drop_policy_skips_and_counts(tok, tmp_path):
    data = prepare_data(
        cfg(
            write_jsonl(tmp_path / "l.jsonl", LONG + ALPACA),
            max_seq_len=48,
            truncation="drop",
            eval_fraction=0.5,
        ),
        tok,
    )
    assert data.stats.dropped == 10 and data.stats.truncated == 0
    assert data.stats.train_examples + data.stats.eval_examples == 20


def test_prompt_longer_than_max_len_is_dropped_not_trained_on(tok, tmp_path):
    rows = [{"instruction": "x " * 100, "output": "y"}] * 3 + ALPACA
    data = prepare_data(cfg(write_jsonl(tmp_path / "p.jsonl", rows), max_seq_len=48), tok)
    assert data.stats.dropped == 3


def test_error_policy_names_the_record(tok, tmp_path):
    p = write_jsonl(tmp_path / "l.jsonl", ALPACA + LONG)
    with pytest.raises(
        DataError, match=r"l\.jsonl:\d+: example has \d+ tokens, more than data.max_seq_len=48"
    ):
        prepare_data(cfg(p, max_seq_len=48, truncation="error"), tok)


# --- bad input -------------------------------------------------------------------------------


def test_missing_file(tok, tmp_path):
    with pytest.raises(DataError, match=r"^data.path: file not found: .*nope\.jsonl$"):
        prepare_data(cfg(tmp_path / "nope.jsonl"), tok)


def test_malformed_jsonl_line_names_file_and_line(tok, tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(ALPACA[0]) + "\n" + json.dumps(ALPACA[1]) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON line"):
        prepare_data(cfg(p), tok)


def test_empty_data_set(tok, tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    with pytest.raises(DataError, match="the data set is empty"):
        prepare_data(cfg(p), tok)


def test_record_without_required_field(tok, tmp_path):
    rows = [*ALPACA[:4], {"instruction": "no answer here"}]
    with pytest.raises(
        DataError, match=r"f\.jsonl:5: record has no 'output' \(format alpaca needs instruction, output\)"
    ):
        prepare_data(cfg(write_jsonl(tmp_path / "f.jsonl", rows), eval_fraction=0.5), tok)


def test_chat_without_assistant_turn(tok, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}]}] * 4
    with pytest.raises(DataError, match="no assistant turn"):
        prepare_data(cfg(write_jsonl(tmp_path / "c.jsonl", rows), format="chat"), tok)


def test_unsupported_suffix_and_folder(tok, tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        prepare_data(cfg(tmp_path / "a.txt"), tok)
    with pytest.raises(DataError, match="is a folder"):
        prepare_data(cfg(tmp_path), tok)


def test_offline_hub_id_fails_with_one_line(tok):
    with pytest.raises(DataError, match=r"^data.path: 'someone/no-such-dataset' is neither a local file nor"):
        prepare_data(cfg("someone/no-such-dataset"), tok)


def test_too_few_records_for_a_split(tok, tmp_path):
    with pytest.raises(DataError, match="leave nothing to train on"):
        prepare_data(cfg(write_jsonl(tmp_path / "one.jsonl", ALPACA[:1])), tok)


# --- batching --------------------------------------------------------------------------------


def test_collators(tok, tmp_path):
    data = prepare_data(cfg(write_jsonl(tmp_path / "a.jsonl", ALPACA), max_seq_len=64), tok)
    batch = data.train[:3]
    grouped = build_collator("length_grouped", tok, 64)(batch)
    longest = max(len(e["input_ids"]) for e in batch)
    assert grouped["input_ids"].shape == (3, longest)
    assert int(grouped["attention_mask"].sum()) == sum(len(e["input_ids"]) for e in batch)
    padded = build_collator("padded", tok, 64)(batch)
    assert padded["input_ids"].shape == (3, 64)
    flat = build_collator("padding_free", tok, 64)(batch)
    assert flat["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in batch))
    assert int((flat["position_ids"] == 0).sum()) == 3
    # Labels never leak across example boundaries: each example's first label is masked.
    assert int((flat["labels"] != IGNORE_INDEX).sum()) == sum(
        sum(t != IGNORE_INDEX for t in e["labels"][1:]) for e in batch
    )


def test_tokenize_example_lengths_match(tok):
    ex = tokenize_example(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert len(ex["input_ids"]) == len(ex["labels"])


def test_a_position_mask_is_used_only_where_transformers_slices_by_one(monkeypatch):
    """Response-only logits need a forward that takes `logits_to_keep` and a transformers that
    reads a boolean mask there (5.2x); on 5.17 (the borrowed GPU image's) a mask was misread as
    positions and the trial crashed: there the full logits are computed instead."""
    from transformers import modeling_utils

    from pipeline.data.collate import takes_position_mask

    class Causal:
        def forward(self, input_ids, logits_to_keep=0): ...

    class Custom:
        def forward(self, input_ids): ...

    assert takes_position_mask(Causal()) is hasattr(modeling_utils, "slice_logits_to_keep")
    assert not takes_position_mask(Custom())
    monkeypatch.delattr(modeling_utils, "slice_logits_to_keep", raising=False)
    assert not takes_position_mask(Causal())
