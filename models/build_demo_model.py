"""Pretrain the offline demo base model, ``models/pydoc-llama``, from scratch on CPU.

LoRA adapts a *pretrained* model, so the CPU demo needs one that knows something. This script
makes it from the Python documentation corpus built by ``data/build_pydoc_qa.py``:

1. trains a byte-level BPE tokenizer (4,096 tokens, ChatML special tokens and chat template);
2. pretrains a small Llama (about 1.6M parameters) with the Hugging Face ``Trainer`` on the
   corpus, plus a small share of chat-formatted "show me the docs of module X" turns so the chat
   tokens mean something. The QA task itself is not in the pretraining data;
3. measures held-out loss before and after pretraining (corpus and the QA eval split), and writes
   it to ``models/pydoc-llama/pretrain_report.json``.

Seeded and deterministic on one machine; it takes about 15 minutes on 2 CPU cores:

    python models/build_demo_model.py                  # writes models/pydoc-llama/
    python models/build_demo_model.py --max-steps 50   # a quick smoke run into a temp folder
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "pydoc_corpus.txt.gz"
QA = ROOT / "data" / "pydoc_qa.jsonl"

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SEED = 1234
BLOCK = 256


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token=None,
        pad_token="<|pad|>",
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def chat(tokenizer: PreTrainedTokenizerFast, user: str, assistant: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
        tokenize=False,
    )


def doc_requests(corpus: str, rng: random.Random) -> list[str]:
    """Chat turns that ask for a module's documentation: teaches the chat format, not the QA task."""
    turns = []
    for section in corpus.split("Help on module ")[1:]:
        name = section.split(" ", 1)[0].strip(":\n")
        body = section.split("DESCRIPTION\n", 1)[-1][:600]
        body = "\n".join(line.strip() for line in body.splitlines() if line.strip())[:400]
        if body:
            turns.append((f"Show the documentation of the `{name}` module.", body))
    rng.shuffle(turns)
    return [f"{u}\n{a}" for u, a in turns]


def blocks(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.bos_token_id)
    return [ids[i : i + BLOCK] for i in range(0, len(ids) - BLOCK + 1, BLOCK)]


class Blocks(torch.utils.data.Dataset):
    def __init__(self, data: list[list[int]]):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        x = torch.tensor(self.data[i])
        return {"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)}


def qa_eval_loss(model, tokenizer, records: list[dict]) -> float:
    """Mean response-token loss on chat-formatted QA records (the fine-tuning task)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in records:
            prompt = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
            prefix = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            full = chat(tokenizer, prompt, r["output"])
            p = tokenizer(prefix, add_special_tokens=False)["input_ids"]
            f = tokenizer(full, add_special_tokens=False)["input_ids"]
            x = torch.tensor([f])
            labels = x.clone()
            labels[0, : len(p)] = -100
            out = model(input_ids=x, labels=labels)
            n = int((labels[0, 1:] != -100).sum())
            total += float(out.loss) * n
            count += n
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "pydoc-llama")
    ap.add_argument("--max-steps", type=int, default=2400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab-size", type=int, default=4096)
    args = ap.parse_args()

    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    corpus = gzip.decompress(CORPUS.read_bytes()).decode("utf-8")
    paragraphs = [p for p in corpus.split("\n\n") if p.strip()]

    t0 = time.time()
    tokenizer = train_tokenizer(paragraphs, args.vocab_size)
    chats = [chat(tokenizer, *t.split("\n", 1)) for t in doc_requests(corpus, rng)]
    print(f"tokenizer: {len(tokenizer)} tokens in {time.time() - t0:.0f}s; {len(chats)} chat turns")

    # Hold out every 50th block of the corpus: same distribution, never trained on.
    # Chat turns repeat 3 times so the chat tokens are learned; they stay a small share.
    data = blocks(tokenizer, paragraphs + chats * 3)
    rng.shuffle(data)
    held_out = data[::50]
    train = [b for i, b in enumerate(data) if i % 50]
    print(f"blocks: {len(train)} train, {len(held_out)} held out ({BLOCK} tokens each)")

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters")

    qa = [json.loads(line) for line in QA.read_text().splitlines()]
    qa_probe = random.Random(SEED).sample(qa, 200)

    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(),  # nothing is saved there: save_strategy="no"
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=32,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.1,
        max_grad_norm=1.0,
        logging_steps=50,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=SEED,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=Blocks(train),
        eval_dataset=Blocks(held_out),
        data_collator=default_data_collator,
    )
    before = trainer.evaluate()["eval_loss"]
    qa_before = qa_eval_loss(model, tokenizer, qa_probe)
    print(f"before: held-out corpus loss {before:.3f}, QA response loss {qa_before:.3f}")
    t0 = time.time()
    trainer.train()
    train_s = time.time() - t0
    after = trainer.evaluate()["eval_loss"]
    qa_after = qa_eval_loss(model, tokenizer, qa_probe)
    print(f"after:  held-out corpus loss {after:.3f}, QA response loss {qa_after:.3f}")

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    tokens = args.max_steps * args.batch_size * BLOCK
    report = {
        "parameters": n_params,
        "config": {
            k: getattr(config, k)
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "vocab_size",
            )
        },
        "pretraining": {
            "steps": args.max_steps,
            "batch_size": args.batch_size,
            "block_tokens": BLOCK,
            "tokens": tokens,
            "epochs": round(tokens / (len(train) * BLOCK), 2),
            "learning_rate": args.lr,
            "seconds": round(train_s),
            "tokens_per_second": round(tokens / train_s),
            "seed": SEED,
            "torch": torch.__version__,
        },
        "held_out_corpus_loss": {"before": round(before, 4), "after": round(after, 4)},
        "held_out_corpus_perplexity": {
            "before": round(math.exp(before), 1),
            "after": round(math.exp(after), 2),
        },
        "qa_response_loss_200_records": {"before": round(qa_before, 4), "after": round(qa_after, 4)},
    }
    (args.out / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
