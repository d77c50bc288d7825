"""Build the offline lm-evaluation-harness task `pydoc_mc` from the demo data's eval split only.

Each question of the eval split (the same seeded split the trainer makes: `data.seed`,
`data.eval_fraction` of configs/demo-cpu.yaml) becomes a 4-way multiple choice: its own answer
and the answers of three other eval questions of the same kind (a signature among signatures, a
description among descriptions, from the same module where there are enough), in a seeded
order. A question that the training split also asks is left out, so no training example's
question appears in the task and a higher score is not memorisation of the training set.

    .venv/bin/python scripts/build_pydoc_mc.py            # writes tasks/pydoc_mc/pydoc_mc.jsonl
    .venv/bin/python scripts/build_pydoc_mc.py --check    # exit 1 if the committed file differs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.data.prepare import read_records, split_records, to_messages  # noqa: E402

TASK_DIR = ROOT / "tasks" / "pydoc_mc"
CHOICES = 4
SEED = 0  # the distractors and the position of the right answer


def build(config_path: Path) -> tuple[list[dict], dict]:
    """(the task's documents, what they were built from)."""
    cfg = load_config(config_path).data
    path = Path(cfg.path) if Path(cfg.path).is_absolute() else ROOT / cfg.path
    records = read_records(str(path), "data.path")
    train_records, eval_records = split_records(records, cfg)
    # A question asked in training too (several exceptions share one docstring) is left out: its
    # answer there could be learnt, or be another right answer here.
    trained = {to_messages(r, cfg)[-2]["content"] for r in train_records}
    rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
    items = []  # (question, answer, kind, module, line) in the words the trainer uses
    right: dict[str, set[str]] = defaultdict(set)  # every right answer of a question
    for r in eval_records:
        user, assistant = to_messages(r, cfg)[-2:]
        right[user["content"]].add(assistant["content"])
        if user["content"] in trained:
            continue
        module = str(r.data.get("source", "")).split(".")[0]
        items.append((user["content"], assistant["content"], r.data.get("kind", ""), module, r.where))
    answers: dict[tuple[str, str], set[str]] = defaultdict(set)
    for _, answer, kind, module, _ in items:
        answers[kind, module].add(answer)
        answers[kind, ""].add(answer)
    rng = random.Random(SEED)
    docs = []
    for i, (question, answer, kind, module, where) in enumerate(items):
        # Distractors: other answers of the same kind from the same module where there are
        # enough (an `sqlite3` method among `sqlite3` methods), else of the same kind.
        pool = sorted(answers[kind, module] - right[question])
        if len(pool) < CHOICES - 1:
            pool = sorted(answers[kind, ""] - right[question])
        choices = [answer, *rng.sample(pool, CHOICES - 1)]
        rng.shuffle(choices)
        docs.append(
            {
                "id": i,
                "question": question,
                "choices": choices,
                "answer": choices.index(answer),
                "kind": kind,
                "source": f"{rel}:{where.rsplit(':', 1)[1]}",  # file:line, as committed
            }
        )
    meta = {
        "built_by": "scripts/build_pydoc_mc.py",
        "from": rel,
        "data_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "split": {"seed": cfg.seed, "eval_fraction": cfg.eval_fraction, "records": len(records)},
        "documents": len(docs),
        "left_out_asked_in_training": len(eval_records) - len(docs),
        "choices": CHOICES,
        "seed": SEED,
    }
    return docs, meta


def render(docs: list[dict]) -> str:
    return "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo-cpu.yaml"), help="whose data section")
    ap.add_argument("--out", default=str(TASK_DIR), help="the task's folder")
    ap.add_argument("--check", action="store_true", help="compare with the files there; write nothing")
    args = ap.parse_args()
    docs, meta = build(Path(args.config))
    out = Path(args.out)
    files = {"pydoc_mc.jsonl": render(docs), "build.json": json.dumps(meta, indent=1) + "\n"}
    if args.check:
        stale = [n for n, text in files.items() if not (out / n).is_file() or (out / n).read_text() != text]
        print(f"pydoc_mc: {'stale: ' + ', '.join(stale) if stale else 'up to date'} ({len(docs)} questions)")
        return 1 if stale else 0
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)
    print(f"pydoc_mc: {len(docs)} questions from the eval split of {meta['from']} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
