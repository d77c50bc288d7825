"""Training throughput of the pipeline against the setups users would pick instead (bench/peers.py):
HF Trainer + PEFT with dynamic padding (random order, `group_by_length`), the notebook recipe that
pads to `max_seq_len`, and TRL's SFTTrainer (its defaults, `packing`, `padding_free`). Same model,
data, LoRA config, batch size, steps, optimizer, precision and threads; each run in a fresh
copy of the base model. Prints useful (non-padding) training tokens per second inside optimizer steps
and the eval loss after training for every variant (a fast but wrong variant is no win), then the
ratio of the pipeline's default to every peer and to the fastest one.

    python bench/throughput.py                                   # demo model, 60 steps x 8, 3 repeats
    python bench/throughput.py --config configs/smollm2-cpu.yaml --steps 10 --batch-size 4
    python bench/throughput.py --fair                            # TRL with gradient checkpointing off too
    python bench/throughput.py --set model.load_in_4bit=true     # QLoRA: the base in 4-bit NF4
    python bench/throughput.py --fair --gpu-kernels              # on CUDA: + Liger, FlashAttention-2 varlen
    python bench/throughput.py --steps 3 --repeats 1 --only "pipeline,trl"   # the CI smoke size

Each variant trains `--repeats` times (fresh base copy and adapter, same seed); medians are reported.
Variants run interleaved (repeat 1 of each, then repeat 2, ...) so a slow patch of the machine
does not fall on one variant only.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from collections.abc import Callable
from functools import partial

from peers import Measured, hf_trainer, pipeline_run, trl_sft

from pipeline.config import PipelineConfig, load_config, with_overrides
from pipeline.core.errors import one_line
from pipeline.data.prepare import prepare_data
from pipeline.model.device import plan_device
from pipeline.model.load import BaseModel, load_base_model, load_tokenizer

DEFAULT = "pipeline default (length_grouped)"


Variant = tuple[PipelineConfig, Callable[..., Measured]]  # its config, fn(config, plan, tok, data, base)


def variants(config: PipelineConfig, fair: bool, gpu_kernels: bool = False) -> dict[str, Variant]:
    """Every variant, the pipeline's default first. `fair`: TRL with gradient checkpointing off too.
    `gpu_kernels` (CUDA only): Liger kernels and FlashAttention-2 (varlen when padding-free)."""
    pf = with_overrides(config, {"train.batching": "padding_free"})
    out: dict[str, Variant] = {
        DEFAULT: (config, pipeline_run),
        "pipeline padding_free": (pf, pipeline_run),
        "pipeline, logits at every position": (
            with_overrides(config, {"train.prompt_logits": True}),
            pipeline_run,
        ),
        "HF Trainer+PEFT, pad to max_seq_len": (config, partial(hf_trainer, pad_to_max=True)),
        "HF Trainer+PEFT, dynamic padding": (config, hf_trainer),
        "HF Trainer+PEFT, group_by_length": (config, partial(hf_trainer, group_by_length=True)),
        "TRL SFTTrainer defaults": (config, trl_sft),
        "TRL SFTTrainer packing": (config, partial(trl_sft, mode="packing")),
        "TRL SFTTrainer padding_free": (config, partial(trl_sft, mode="padding_free")),
    }
    if fair:
        for mode in ("defaults", "packing", "padding_free"):
            out[f"TRL SFTTrainer {mode}, no checkpointing"] = (
                config,
                partial(trl_sft, mode=mode, checkpointing=False),
            )
    if gpu_kernels:
        liger = {"train.use_liger_kernel": True}
        fa2 = {"model.attn_implementation": "flash_attention_2"}
        out["pipeline default + Liger"] = (with_overrides(config, liger), pipeline_run)
        out["pipeline padding_free + FA2 varlen"] = (with_overrides(pf, fa2), pipeline_run)
        out["pipeline padding_free + FA2 varlen + Liger"] = (
            with_overrides(pf, {**fa2, **liger}),
            pipeline_run,
        )
        out["TRL SFTTrainer padding_free + FA2 + Liger, no checkpointing"] = (
            with_overrides(config, {**fa2, **liger}),
            partial(trl_sft, mode="padding_free", checkpointing=False),
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo-cpu.yaml")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fair", action="store_true", help="also TRL with gradient checkpointing off")
    ap.add_argument("--gpu-kernels", action="store_true", help="also Liger and FlashAttention-2 (CUDA)")
    ap.add_argument("--only", default="", help="comma-separated substrings: run only matching variants")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="Config overrides, e.g. --set model.load_in_4bit=true (the QLoRA path) or model.dtype=bfloat16.",
    )
    args = ap.parse_args()

    config = load_config(args.config, args.overrides)
    overrides = {
        "train.max_steps": args.steps,
        "train.eval_steps": None,
        "train.logging_steps": max(1, args.steps // 5),
        "train.output_dir": tempfile.mkdtemp(),
    }
    if args.batch_size:
        overrides["train.batch_size"] = args.batch_size
    config = with_overrides(config, overrides)
    plan = plan_device(config.model, config.train)
    tok = load_tokenizer(config.model)
    data = prepare_data(config.data, tok)
    print(
        f"model {config.model.name_or_path} ({'4-bit ' if config.model.load_in_4bit else ''}{plan.precision}) "
        f"on {plan.name}; {args.steps} steps x batch {config.train.batch_size}; LoRA r={config.lora.r} "
        f"{config.lora.target_modules}; mean example {data.stats.mean_len:.0f} tokens, "
        f"max_seq_len {config.data.max_seq_len}; {args.repeats} repeats, a fresh copy of the base each",
        flush=True,
    )
    chosen = variants(config, args.fair, args.gpu_kernels)
    if args.only:
        keys = [k.strip().lower() for k in args.only.split(",") if k.strip()]
        chosen = {n: f for n, f in chosen.items() if n == DEFAULT or any(k in n.lower() for k in keys)}

    # Every run trains a deep copy of the base as loaded: no peer's settings (TRL leaves gradient
    # checkpointing switched on in the model it was given) leak into the next, and SmolLM2's
    # 15-second GGUF load is paid once.
    pristine: dict[str, BaseModel] = {}  # one load per model section (FA2 variants load their own)
    runs: dict[str, list[Measured]] = {name: [] for name in chosen}
    for _ in range(args.repeats):
        for name, (cfg, fn) in list(chosen.items()):
            try:
                key = cfg.model.model_dump_json()
                if key not in pristine:
                    pristine[key] = load_base_model(cfg.model, plan_device(cfg.model, cfg.train))
                base = BaseModel(copy.deepcopy(pristine[key].model), 0.0, pristine[key].source)
                runs[name].append(fn(cfg, plan_device(cfg.model, cfg.train), tok, data, base))
                del base
            except Exception as e:  # e.g. a GPU kernel whose package is missing: the others still run
                if name == DEFAULT:
                    raise
                print(f"{name}: not measured: {one_line(e)}", flush=True)
                del chosen[name], runs[name]

    tps = {n: statistics.median(m.tokens_per_second for m in ms) for n, ms in runs.items()}
    for name, ms in runs.items():
        loss = statistics.median(m.eval_loss for m in ms)
        spread = ", ".join(f"{m.tokens_per_second:.0f}" for m in ms)
        print(f"{name:44s} {tps[name]:9.0f} tokens/s  eval_loss {loss:.4f}  (runs: {spread})")
    mine = tps[DEFAULT]
    for name, value in tps.items():
        if name != DEFAULT:
            print(f"ratio {DEFAULT} / {name}: {mine / value:.2f}x")
    peers = {n: v for n, v in tps.items() if not n.startswith("pipeline")}
    if peers:
        fastest = max(peers, key=peers.get)
        print(f"fastest peer: {fastest}; {DEFAULT} / fastest peer: {mine / peers[fastest]:.2f}x")


if __name__ == "__main__":
    main()
