"""Benchmarks are not timed tests; CI only checks that each one runs and prints its ratios."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT


def test_throughput_benchmark_smoke(tmp_path):
    p = subprocess.run(
        [sys.executable, "bench/throughput.py", "--steps", "3", "--repeats", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.strip().splitlines()
    assert lines[-2].startswith("ratio pipeline, length_grouped (default) / plain pad-to-max: ")
    assert lines[-1].startswith("ratio pipeline, padding_free / plain pad-to-max: ")
    assert float(lines[-2].rsplit(" ", 1)[1].rstrip("x")) > 0
