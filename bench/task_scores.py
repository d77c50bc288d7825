"""lm-evaluation-harness scores of the base model and of adapters on the same tasks.

    .venv/bin/python bench/task_scores.py                                  # the demo base model on pydoc_mc
    .venv/bin/python bench/task_scores.py --adapter outputs/adapters/<run id>/adapter ...

Each row: what was scored, then every task metric with its standard error. Adapters are
rebuilt from their folders (base reference included), exactly as `generate` loads them; the
base model is the demo config's. Prints the ratio of each adapter's first metric to the base's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import LmEvalConfig, load_config  # noqa: E402
from pipeline.model.adapter import load_adapter  # noqa: E402
from pipeline.model.device import plan_device  # noqa: E402
from pipeline.training import lmeval  # noqa: E402
from pipeline.trial.resources import Resources  # noqa: E402


def scores(model, tokenizer, cfg: LmEvalConfig) -> dict[str, float]:
    return lmeval.task_metrics(lmeval.evaluate(model, tokenizer, cfg, seed=0, quiet=True)["results"])


def show(label: str, m: dict[str, float]) -> str:
    parts = [
        f"{k}={m[k]:.4f} ± {m.get(k + '_stderr', float('nan')):.4f}" for k in m if not k.endswith("_stderr")
    ]
    return f"{label}: " + ", ".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo-cpu.yaml"), help="whose base model")
    ap.add_argument("--tasks", default="pydoc_mc")
    ap.add_argument("--include-path", default=str(ROOT / "tasks"))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--adapter", action="append", default=[], help="an adapter folder (repeatable)")
    args = ap.parse_args()
    cfg = LmEvalConfig(tasks=args.tasks.split(","), include_path=args.include_path, limit=args.limit)
    config = load_config(args.config)
    res = Resources()
    base, _ = res.base_model(config, plan_device(config.model, config.train))
    rows = [("base " + config.model.name_or_path, scores(base.model, res.tokenizer(config), cfg))]
    print(show(*rows[0]), flush=True)
    for adapter in args.adapter:
        model, tokenizer = load_adapter(adapter)
        rows.append((f"adapter {adapter}", scores(model, tokenizer, cfg)))
        print(show(*rows[-1]), flush=True)
    first = next(k for k in rows[0][1] if not k.endswith("_stderr"))
    for label, m in rows[1:]:
        print(f"ratio {label} / base, {first}: {m[first] / rows[0][1][first]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
