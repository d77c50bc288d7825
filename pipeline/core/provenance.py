"""Where a result came from: git commit and package versions (the hardware: `device.hardware`);
what a registered model needs installed."""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path

PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "bitsandbytes",
    "mlflow",
    "ax-platform",
    "botorch",
    "evaluate",
    "datasets",
    "pydantic",
    "gguf",
    # Ax's model-based trials are computed with these: a different release can move them.
    "gpytorch",
    "linear_operator",
    "numpy",
    "scipy",
)


def package_versions() -> dict[str, str]:
    """Installed versions of the stack (missing packages are left out)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


# What a registered model's code needs (gguf too where installed, for GGUF base models).
MODEL_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "safetensors",
    "mlflow",
    "pydantic",
    "pyyaml",
    "psutil",
)


def model_requirements() -> list[str]:
    """pip requirements of a registered model, pinned to this process's versions where known."""
    v = package_versions()
    return [f"{p}=={v[p]}" if p in v else p for p in MODEL_PACKAGES] + (["gguf"] if "gguf" in v else [])


def git_commit(path: str | Path = ".") -> str:
    """HEAD of the repository at `path`, with `-dirty` when the work tree has changes; '' outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return sha + ("-dirty" if dirty else "")
