"""Benchmarks are not timed tests; CI only checks that each one runs and prints its ratios."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT, venv_env


def test_throughput_benchmark_smoke(tmp_path):
    p = subprocess.run(
        [sys.executable, "bench/throughput.py", "--steps", "3", "--repeats", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.strip().splitlines()
    assert lines[-2].startswith("ratio pipeline, length_grouped (default) / plain pad-to-max: ")
    assert lines[-1].startswith("ratio pipeline, padding_free / plain pad-to-max: ")
    assert float(lines[-2].rsplit(" ", 1)[1].rstrip("x")) > 0


def test_model_reuse_benchmark_smoke(tmp_path):
    env = {**venv_env(tmp_path)}
    p = subprocess.run(
        [
            sys.executable,
            "bench/model_reuse.py",
            "--config",
            "configs/demo-cpu.yaml",
            "--trials",
            "2",
            "--steps",
            "2",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.strip().splitlines()
    assert lines[-1].startswith("ratio reload / reuse: ")
    reuse = next(line for line in lines if line.startswith("reuse the base"))
    assert reuse.endswith("0.0 s)")  # the second trial did not load the model again
