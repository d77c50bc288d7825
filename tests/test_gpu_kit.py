"""The GPU kit (bench/gpu/): it builds within what a call to the borrowed GPU machine carries,
its trimmed wheels install as they will there, every module the check imports is in the image or
the kit, and a tier's results survive a failing step."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import zipfile

import pytest

from .conftest import ROOT


def _module(name: str, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


kit = _module("gpu_kit", ROOT / "bench" / "gpu" / "kit.py")


@pytest.mark.gpu_kit
def test_the_kit_builds_within_its_budget_and_installs_as_it_will_there(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu" / "kit.py"), "build", "--dest", str(tmp_path / "kit")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((tmp_path / "kit" / "manifest.json").read_text())
    assert manifest["total_mib"] <= kit.BUDGET_MIB and manifest["tree_mib"] > 5
    assert kit.problems(manifest, tmp_path / "kit") == []
    wheels = {kit.canonical(w["file"].split("-")[0]): w for w in manifest["wheels"]}
    assert set(wheels) == set(kit.kit_names())
    (bnb,) = (tmp_path / "kit" / "wheels").glob("bitsandbytes-*.whl")
    libs = sorted(n.rsplit("/", 1)[-1] for n in zipfile.ZipFile(bnb).namelist() if "libbitsandbytes_" in n)
    assert [lib.split(".")[0] for lib in libs] == ["libbitsandbytes_cpu", "libbitsandbytes_cuda130"], libs
    # As the check installs them there: no index, no dependencies, into a target, for CPython 3.12.
    site = tmp_path / "site"
    platform = [a for p in kit.PLATFORMS for a in ("--platform", p)]
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--only-binary=:all:"]
    install += ["--python-version", "3.12", *platform, "--target", str(site)]
    done = subprocess.run(
        [*install, *map(str, (tmp_path / "kit" / "wheels").glob("*.whl"))], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (site / "mlflow" / "__init__.py").is_file() and not (site / "mlflow" / "server" / "js").exists()
    assert (tmp_path / "kit" / "smollm2" / "config.json").is_file()


def test_every_module_the_check_imports_is_in_the_image_or_the_kit():
    # bench/gpu/imports-tier<N>.txt: what every process of a tier's CPU rehearsal imported
    # (check.sh --cpu --tier N), and which distribution provided it there.
    provided = {}
    for tier in (1, 2):
        provided |= kit.read_imports(ROOT / "bench" / "gpu" / f"imports-tier{tier}.txt")
    assert {"mlflow", "ax", "bitsandbytes", "torch", "transformers", "peft", "trl"} <= set(provided)
    assert kit.imports_problems(provided) == []
    # The check can fail: a module from a distribution neither list has, or from none.
    assert kit.imports_problems({"flask": ["flask"], "ghost": []}) == [
        "flask (from flask): in neither image.txt nor kit.txt",
        "ghost: no distribution provides it",
    ]


def test_a_tier_keeps_its_results_when_a_step_fails(tmp_path):
    tier = _module("gpu_tier", ROOT / "bench" / "gpu" / "tier.py")
    check = tier.Check(1, tmp_path, cpu=True)
    check.run("a fine", lambda: (True, "measured 1.0", {"value": 1.0}))
    check.run("b broken", lambda: 1 / 0)
    saved = json.loads((tmp_path / "tier1.json").read_text())
    assert [(s["step"], s["ok"]) for s in saved["steps"]] == [("a fine", True), ("b broken", False)]
    assert saved["steps"][0]["value"] == 1.0 and "ZeroDivisionError" in saved["steps"][1]["summary"]
    table = (tmp_path / "tier1.md").read_text()
    assert "| a fine | pass |" in table and "| b broken | FAIL |" in table
