"""Per-trial memory in one search process: peaks that are each trial's own, and a trial that
runs out of memory giving all of it back before the next one starts.

Trials run as the search runs them (`run_job`, one shared base model): a large batch, a small
batch, then a trial that runs out of memory, then the small batch again. Checked:

- peaks are per trial: the small batch's peak is below the large batch's (on CUDA the reserved
  peak would carry the large batch's cached blocks if the allocator were not emptied and reset);
- OOM recovery: the failed trial is `abandoned`, and memory in use after it (CUDA: allocated
  bytes; CPU: RSS) is back to what it was before it; the small batch after it peaks as before.

On a GPU the OOM is real (the trial allocates 1 GiB blocks until CUDA refuses); on CPU it is
simulated (the trial holds 1 GiB and raises torch's OutOfMemoryError), which checks the same
release logic. Prints one line per check and exits 1 if any fails.

    python bench/gpu_memory_check.py                     # the demo model
    python bench/gpu_memory_check.py --config configs/smollm2-cpu.yaml --set model.dtype=bfloat16
"""

from __future__ import annotations

import gc
import sys

from search_bench import fresh_store, parse_args

GIB = 2**30


def main() -> int:
    args = parse_args(__doc__)
    tmp, common = fresh_store("bench-mem-", args)
    import psutil
    import torch

    import pipeline.trial.run as trial_mod
    from pipeline.config import load_config
    from pipeline.core import names
    from pipeline.search.executors.local import TrialJob, run_job
    from pipeline.trial.resources import Resources
    from pipeline.trial.run import setup

    cuda = torch.cuda.is_available()
    base = load_config(args.config, ["tracking.experiment_name=bench-memory", *common])
    resources = Resources()
    setup(base, resources)  # the base model stays loaded across trials, as in a search

    def in_use() -> float:
        gc.collect()
        return torch.cuda.memory_allocated() / GIB if cuda else psutil.Process().memory_info().rss / GIB

    peak_key = names.PEAK_GPU_RESERVED_GB if cuda else names.PEAK_RSS_GB

    def trial(index: int, batch_size: int) -> float:
        out = run_job(TrialJob(index, base, {"train.batch_size": batch_size}), resources, quiet=True)
        if out.result is None:
            raise SystemExit(f"trial {index} (batch {batch_size}) did not train: {out.reason}")
        peak = out.result.metrics[peak_key]
        print(f"trial {index}: batch {batch_size:>2}  {peak_key} {peak:.3f}  (run {out.run_id})", flush=True)
        return peak

    real_train = trial_mod.train

    def runs_out_of_memory(*a, **kw):
        held = []
        if cuda:  # until the allocator refuses: a real CUDA OOM, with the blocks held by this frame
            while True:
                held.append(torch.empty(GIB, dtype=torch.uint8, device="cuda"))
        held.append(torch.ones(GIB // 4))  # 1 GiB, touched
        raise torch.OutOfMemoryError("CUDA out of memory (simulated on CPU). Tried to allocate 1.00 GiB")

    where = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(f"device: {where}; config {args.config}; store {tmp / 'mlflow.db'}", flush=True)
    large, small = trial(1, 16), trial(2, 2)
    before = in_use()
    trial_mod.train = runs_out_of_memory
    try:
        out = run_job(TrialJob(3, base, {"train.batch_size": 2}), resources, quiet=True)
    finally:
        trial_mod.train = real_train
    after = in_use()
    print(f"trial 3: out of memory -> {out.status} ({out.reason})", flush=True)
    again = trial(4, 2)

    unit = "GiB allocated" if cuda else "GiB RSS"
    checks = [
        (
            "peaks are per trial",
            # CPU RSS is mostly the base model and the allocator's arenas: only a sanity bound there
            small < large if cuda else small <= large + 0.05,
            f"batch 2 peak {small:.3f} {'<' if cuda else '<= 0.05 +'} batch 16 peak {large:.3f}",
        ),
        ("OOM trial abandoned", out.status == names.ABANDONED, f"status {out.status}"),
        (
            "OOM memory given back",
            after - before < 0.1,
            f"{before:.3f} {unit} before the OOM trial, {after:.3f} after ({after - before:+.3f})",
        ),
        (
            "next trial peaks as before",
            abs(again - small) <= max(0.05, 0.1 * small),
            f"batch 2 peak {again:.3f} after the OOM vs {small:.3f} before",
        ),
    ]
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
