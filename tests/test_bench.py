"""Benchmarks are not timed tests; CI only checks that each one runs and prints its ratios."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import ROOT, venv_env

pytestmark = pytest.mark.bench


def _bench(args: list[str], tmp_path, timeout: int = 900) -> list[str]:
    p = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=venv_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout.strip().splitlines()


def test_throughput_benchmark_smoke(tmp_path):
    """Every peer runs (HF Trainer in three batchings, TRL in three modes, the pipeline in three),
    trains, and reaches an eval loss near the others' after the same steps."""
    lines = _bench(["bench/throughput.py", "--steps", "3", "--repeats", "1"], tmp_path, timeout=900)
    rows = [line for line in lines if " tokens/s  eval_loss " in line]
    assert len(rows) == 9, lines
    losses = [float(line.split("eval_loss ")[1].split()[0]) for line in rows]
    assert all(0 < loss < 20 for loss in losses) and max(losses) - min(losses) < 0.5, rows
    assert sum(line.startswith("ratio pipeline default (length_grouped) / ") for line in lines) == 8
    assert lines[-1].startswith("fastest peer: ") and float(lines[-1].rsplit(" ", 1)[1].rstrip("x")) > 0


def test_checkpoint_kill_benchmark_smoke(tmp_path):
    lines = _bench(
        ["bench/checkpoints.py", "--part", "kills", "--kills", "2", "--steps", "12", "--every", "4"], tmp_path
    )
    assert (
        lines[-2].startswith("steps redone per kill: median ") and "without checkpoints: median" in lines[-2]
    )
    assert lines[-1] == "continued runs equal to the uninterrupted one (eval-loss curve and final loss): 2/2"


def test_model_reuse_benchmark_smoke(tmp_path):
    lines = _bench(
        ["bench/model_reuse.py", "--config", "configs/demo-cpu.yaml", "--trials", "2", "--steps", "2"],
        tmp_path,
        timeout=600,
    )
    assert lines[-1].startswith("ratio reload / reuse: ")
    reuse = next(line for line in lines if line.startswith("reuse the base"))
    assert reuse.endswith("0.0 s)")  # the second trial did not load the model again


def test_overhead_benchmark_smoke(tmp_path):
    lines = _bench(
        ["bench/overhead.py", "--trials", "2", "--set", "train.max_steps=6 train.eval_steps=3"], tmp_path
    )
    assert lines[-1].startswith("pipeline overhead: ") and lines[-1].endswith(
        "% of the search's wall time (goal <= 5%)"
    )
    rows = {
        line.rsplit(None, 2)[0]: float(line.rsplit(None, 2)[1])
        for line in lines
        if line.endswith("%") and "  " in line
    }
    ax = next(v for k, v in rows.items() if k.startswith("Ax"))
    logging = next(v for k, v in rows.items() if k.startswith("MLflow logging"))
    assert ax > 0 and logging > 0  # both measured, not assumed


def test_gpu_memory_check_smoke(tmp_path):
    """On CPU the OOM is simulated; the same release logic is checked (a real one in gpu_check.sh)."""
    lines = _bench(["bench/gpu_memory_check.py", "--set", "train.max_steps=6 train.eval_steps=3"], tmp_path)
    checks = [line for line in lines if line.startswith(("PASS", "FAIL"))]
    assert len(checks) == 4 and all(line.startswith("PASS") for line in checks), checks


def test_grid_benchmark_smoke(tmp_path):
    out = tmp_path / "grid.csv"
    args = ["bench/grid.py", "--limit", "1", "--out", str(out), "--store", str(tmp_path / "grid.db")]
    _bench(args, tmp_path)
    header, row = out.read_text().splitlines()
    assert header.startswith("lora.r,lora.alpha,train.learning_rate,train.batch_size,eval_loss@50")
    assert len(row.split(",")) == len(header.split(","))
    lines = _bench(args, tmp_path)  # resumes: the point already measured is not trained again
    assert lines[0] == "grid: 240 points, 1 done, 1 to run" and len(out.read_text().splitlines()) == 3


def test_early_stopping_benchmark_smoke(tmp_path):
    lines = _bench(
        ["bench/early_stopping.py", "--trials", "3", "--set", "train.max_steps=12 train.eval_steps=4"],
        tmp_path,
    )
    assert lines[-1].startswith("early stopping saved ") and "best eval_loss" in lines[-1]


def test_search_efficiency_replay_smoke(tmp_path):
    plot = tmp_path / "eff.png"
    lines = _bench(
        [
            "bench/search_efficiency.py",
            "--seeds",
            "2",
            "--budget",
            "6",
            "--budget-cheap",
            "6",
            "--plot",
            str(plot),
        ],
        tmp_path,
    )
    assert lines[-1].startswith("ax / random median trials to within 1% of the grid's best: ")
    assert plot.stat().st_size > 10_000
    lines = _bench(
        [
            "bench/search_efficiency.py",
            *(
                "--seeds",
                "1",
                "--early-stopping",
                "50",
                "--es-trials",
                "5",
                "--progression",
                "examples,steps",
            ),
        ],
        tmp_path,
    )
    assert lines[-1].startswith("early stopping: ")
    units = [line.split(",")[0] for line in lines if line.startswith("progression in ")]
    assert units == ["progression in examples", "progression in steps"]


@pytest.mark.distributed
def test_parallel_benchmark_smoke(tmp_path):
    """bench/parallel.py: the same search sequential and on 2 Ray workers, paired by seed."""
    small = "train.max_steps=8 train.eval_steps=4 data.max_train_examples=64 data.max_eval_examples=16"
    lines = _bench(
        ["bench/parallel.py", "--trials", "2", "--seeds", "1", "--set", f"{small} eval.generation_samples=2"],
        tmp_path,
    )
    assert lines[1].startswith("seed 0: ray ") and " local " in lines[1] and "speed-up" in lines[1]
    assert lines[-1].startswith("parallel: speed-up median ") and "best eval_loss median local" in lines[-1]


def test_ax_owner_benchmark_smoke(tmp_path):
    lines = _bench(["bench/ax_owner.py", "--pending", "1,2", "--warm", "6", "--repeats", "1"], tmp_path)
    rows = [line for line in lines if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(rows) == 2
    assert all(float(cell) > 0 for row in rows for cell in row.strip("|").split("|")[1:6])


def test_batch_replay_smoke(tmp_path):
    lines = _bench(
        ["bench/search_efficiency.py", "--pending", "1,2", "--seeds", "1", "--budget", "6"], tmp_path
    )
    assert lines[-1].startswith("ax-p2 / ax-p1 median trials to within 1% of the grid's best: ")


def test_warm_start_replay_smoke(tmp_path):
    lines = _bench(
        ["bench/search_efficiency.py", "--warm-start", "3", "--seeds", "1", "--budget", "5"], tmp_path
    )
    assert lines[-1].startswith("warm / cold median trials to within 1% of the grid's best: ")
    assert float(lines[-1].split(": ")[1].split(";")[0]) > 0


def test_noise_benchmark_smoke(tmp_path):
    """Seed noise measured on real runs, and a replay of the demo search with noisy observations."""
    lines = _bench(
        ["bench/noise.py", "--part", "seeds", "--seeds", "1,2", "--set", "train.max_steps=6",
         "--set", "train.eval_steps=3", "--set", "data.max_eval_examples=24"],
        tmp_path,
    )  # fmt: skip
    assert sum(" seed " in line and "eval_loss" in line for line in lines) == 4
    assert lines[-1].startswith("ratio sd(paired difference) / sd(baseline): ")
    lines = _bench(
        [
            "bench/noise.py",
            "--part",
            "replay",
            "--replays",
            "1",
            "--settings",
            "1x2,race2p",
            "--extra-trials",
            "1",
            "--verbose",
        ],
        tmp_path,
    )
    assert lines[0].startswith("grid: 240 points, 31 with seed replicates; pooled seed sd ")
    rows = {
        line.split()[0]: line.split()
        for line in lines
        if line.split() and line.split()[0] in ("none", "none+1", "1x2", "race2p")
    }
    assert set(rows) == {"none", "none+1", "1x2", "race2p"} and float(rows["1x2"][-3].rstrip("x")) > 1.0
    # Two fresh seeds a side: the pipeline's paired interval, and whether it held the truth.
    assert rows["1x2"][-2] in ("100%", "0%") and float(rows["1x2"][-1].rstrip("%")) > 0
    assert rows["none"][-2:] == ["-", "-"]  # no replicates: no interval to check
    assert lines[-1].startswith("ratio exact race2p / none: ")
    # The race, decided by the pipeline's own core.race: its rounds, and a stop by the cap at the latest.
    rounds = [line for line in lines if line.startswith("  race: after ")]
    assert 1 <= len(rounds) <= 2 and "stop: " in rounds[-1]
    assert float(rows["race2p"][-3].rstrip("x")) > 1.0


def test_variants_benchmark_smoke(tmp_path):
    """Both spaces search, each winner is replicated on three seeds, the difference has an interval."""
    lines = _bench(
        [
            "bench/variants.py",
            *("--seeds", "0", "--trials", "2", "--init", "2", "--out", str(tmp_path / "v.json")),
            *("--set", "train.max_steps=6", "train.eval_steps=3", "eval.generation_samples=0"),
        ],
        tmp_path,
    )
    winners = [line for line in lines if line.startswith("seed 0 ") and "| seeds " in line]
    assert len(winners) == 2 and all(
        len(w.split("| seeds ")[1].split("|")[0].split(",")) == 3 for w in winners
    )
    assert any(line.startswith("seed 0: variants - plain = ") and "95 % CI" in line for line in lines)
    assert (tmp_path / "v.json").is_file()


def test_oom_benchmark_smoke(tmp_path):
    lines = _bench(["bench/oom.py", "--seeds", "1", "--trials", "5"], tmp_path)
    assert sum(line.startswith("seed 0 ") and "trials out of memory" in line for line in lines) == 2
    assert lines[-2].lstrip().startswith("learns  : ") and lines[-1].lstrip().startswith("abandons: ")


def test_packed_benchmark_smoke(tmp_path):
    """Both pack sizes search the same trials, to the same best eval loss; the ratio is printed."""
    lines = _bench(
        [
            "bench/packed.py",
            *(
                "--packs",
                "1,2",
                "--seeds",
                "0",
                "--stopping",
                "off",
                "--trials",
                "2",
                "--out",
                str(tmp_path / "p.json"),
            ),
            *(
                "--set",
                "train.max_steps=6",
                "train.eval_steps=3",
                "eval.generation_samples=0",
                "search.method=random",
            ),
        ],
        tmp_path,
    )
    rows = [line for line in lines if line.startswith("| off | ")]
    assert len(rows) == 2 and rows[1].split(" | ")[3].endswith(")")
    assert rows[0].split(" | ")[4] == rows[1].split(" | ")[4]  # the same best eval loss
    assert (tmp_path / "p.json").is_file()
