"""A trained adapter reloads and serves the logits it trained (part of the GPU check, tier 1 b).

Trains with the pipeline's own pieces (the config's model, 4-bit or not, its optimizer and its
evaluations), takes the trained model's logits on a prompt from the eval set, saves the adapter as
a trial does, loads it as serving and the registry do (`pipeline.model.adapter.load_adapter`: a
fresh base, the adapter on it) and compares. Prints one JSON line: the eval losses seen during
training, the plan's fallbacks, the largest absolute logit difference and its tolerance.

    python bench/gpu/adapter_roundtrip.py --config configs/smollm2-cpu.yaml \\
        --set "model.load_in_4bit=true train.optimizer=paged_adamw_8bit train.max_steps=40 train.eval_steps=10"
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/smollm2-cpu.yaml")
    ap.add_argument("--set", default="", help="config overrides, space-separated")
    args = ap.parse_args()

    import torch

    from pipeline.config import load_config
    from pipeline.core import console, names
    from pipeline.data.prepare import prepare_data
    from pipeline.model import adapter as serving
    from pipeline.model.device import plan_device
    from pipeline.model.load import attach_lora, load_base_model, load_tokenizer
    from pipeline.training.train import TrainInputs, init_batches, train

    console.silence_library_noise(quiet=True)
    config = load_config(ROOT / args.config, [args.set], search=False)
    plan = plan_device(config.model, config.train)
    tokenizer = load_tokenizer(config.model)
    job = TrainInputs(config, plan, tokenizer, prepare_data(config.data, tokenizer), quiet=True)
    model = attach_lora(
        load_base_model(config.model, plan).model, config.lora, config.train.seed, lambda: init_batches(job)
    )
    evals: list[float] = []

    def sink(metrics: dict, step: int) -> None:
        if names.EVAL_LOSS in metrics:
            evals.append(float(metrics[names.EVAL_LOSS]))

    train(model, job, sink=sink)
    prompt = torch.tensor([job.data.eval[0]["input_ids"][:32]])
    model.eval()
    with torch.no_grad():
        trained = model(prompt.to(next(model.parameters()).device)).logits.float().cpu()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter"
        serving.save_adapter(model, tokenizer, config.model, plan, folder)
        del model
        served, _ = serving.load_adapter(folder)
        with torch.no_grad():
            answer = served(prompt.to(next(served.parameters()).device)).logits.float().cpu()
    # The same arithmetic in float32; bf16 and 4-bit kernels round at 1e-2 of a logit.
    tolerance = 2e-4 if plan.torch_dtype == torch.float32 and not config.model.load_in_4bit else 5e-2
    diff = float((answer - trained).abs().max())
    print(
        json.dumps(
            {
                "device": plan.describe(),
                "evals": evals,
                "fallbacks": list(plan.fallbacks),
                "max_abs_diff": diff,
                "tolerance": tolerance,
                "same": diff <= tolerance,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
