"""The project around the code: MLproject, conda.yaml, CI, docs that cannot drift, module rules."""

from __future__ import annotations

import ast
import re

import tomllib
import yaml

from pipeline.config import reference_markdown

from .conftest import ROOT


def _requirements() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def test_conda_env_matches_pyproject():
    env = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(pip) == sorted(_requirements())
    assert any(str(d).startswith("python") for d in env["dependencies"] if isinstance(d, str))


def test_mlproject_entry_points_are_typed_and_use_the_cli():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    assert spec["conda_env"] == "conda.yaml"
    base = spec["entry_points"]["baseline"]
    assert base["parameters"]["config"] == {"type": "string", "default": "configs/demo-cpu.yaml"}
    assert base["parameters"]["set"]["type"] == "string"
    assert base["command"].startswith("python -m pipeline baseline ")
    for ep in spec["entry_points"].values():
        for name in ep["parameters"]:
            assert "{" + name + "}" in ep["command"]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- test-command -->\s*```(?:bash|sh)?\n(.+?)\n```", readme, re.S)
    assert m, "README must show the test command after <!-- test-command -->"
    command = m.group(1).strip().splitlines()[-1].strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in [line.strip() for line in ci]


def test_configuration_reference_is_current():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert doc == reference_markdown(), "regenerate: python -m pipeline config docs > docs/configuration.md"


def _imports(path) -> set[str]:
    tree = ast.parse(path.read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module.split(".")[0])
    return mods


def test_only_tracking_and_registry_import_mlflow_only_search_imports_ax():
    for path in (ROOT / "pipeline").rglob("*.py"):
        mods = _imports(path)
        if "mlflow" in mods:
            assert path.stem in {"tracking", "registry"}, f"{path} imports mlflow"
        if "ax" in mods:
            assert path.stem == "search", f"{path} imports ax"


def test_data_and_model_assets_are_documented():
    assert (ROOT / "data" / "README.md").read_text().count("PSF") >= 1
    report = (ROOT / "models" / "pydoc-llama" / "pretrain_report.json").read_text()
    assert '"held_out_corpus_loss"' in report
    assert "pretrain_report.json" in (ROOT / "models" / "README.md").read_text()
