"""The project around the code: MLproject, conda.yaml, CI, docs that cannot drift, module rules."""

from __future__ import annotations

import ast
import re

import pytest
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


def test_the_lock_pins_every_requirement_within_its_range():
    """constraints.txt (what setup.sh installs) pins each requirement of the package and of the
    extras setup.sh installs, at a version pyproject.toml allows; torch is setup.sh's TORCH_SPEC."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = [
        *project["dependencies"],
        *(r for x in ("dev", "bench", "distributed", "lmeval") for r in extras[x]),
    ]
    lock = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned with =="
            lock[canonicalize_name(name)] = version.strip()
    for text in wanted:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name == "torch":
            assert name not in lock  # TORCH_SPEC decides, per CUDA build
            continue
        assert name in lock, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(lock[name], prereleases=True), (
            f"{req.name}=={lock[name]} is outside {req}"
        )
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "-c constraints.txt" in setup and "PIPELINE_UNLOCKED" in setup


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


README_MAX_CHARS = 10_000  # the front door: what it is, how to run it, where to read on


def _docs() -> list:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _prose(path) -> str:
    return re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks hold no links


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text()) <= README_MAX_CHARS


def test_every_relative_link_in_the_docs_resolves():
    """A moved section or file breaks the links to it; this names each one."""
    broken = []
    for doc in _docs():
        for link in re.findall(r"\]\(([^)\s]+)\)", _prose(doc)):
            if re.match(r"[a-z]+:", link) or link.startswith("#/"):  # a URL, or an MLflow UI route
                continue
            path, _, anchor = link.partition("#")
            target = (doc.parent / path) if path else doc
            if not target.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {link} (no such file)")
            elif anchor and target.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", _prose(target), re.M)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{doc.relative_to(ROOT)}: {link} (no such heading)")
    assert broken == []


def test_no_hand_written_test_counts_in_the_docs():
    # Counts of tests go stale with the next test (several commits once existed only to update
    # them); CI prints the real ones.
    stale = [
        f"{doc.relative_to(ROOT)}: {m.group(0)}"
        for doc in _docs()
        for m in re.finditer(r"\b\d+ tests\b|\b\d+ (?:passed|skip(?:ped)?)\b", doc.read_text())
    ]
    assert stale == []


def test_configuration_reference_is_current():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert doc == reference_markdown(), "regenerate: python -m pipeline config docs > docs/configuration.md"


# The layers of the data flow, as folders: a module may import its own folder or an earlier one,
# never a later one. Inside `search`, its modules and folders are layers of their own, in the order
# its loop uses them. Inside one layer (a folder, or one of search's), imports form no cycle.
LAYERS = ["core", "config", "data", "model", "training", "tracking", "trial", "registry", "search", "retrain"]
SEARCH_LAYERS = [
    "records",  # plain data: what the search knows
    "stopping",  # the early-stopping rule
    "executors",  # where trials run: local, packed, Ray
    "ax",  # the only importer of ax
    "journal",  # the records on disk
    "failure_rate",
    "budget",
    "race",  # a race's rounds, decided from the replicate records
    "report",  # facts -> evidence -> markdown -> plots
    "steps",  # baseline, warm start, interrupted trials, replicates
    "finish",
    "preflight",
    "loop",
]
TOP = ["cli", "__main__"]  # the entry points, above every layer


def _rank(dotted: str) -> tuple[int, int] | None:
    """Where a module sits: (its folder's place, its place inside search); None when it is in no
    layer. `pipeline` itself is the foundation; `pipeline.search` (the package) is search's top."""
    parts = dotted.split(".")[1:]
    if not parts:
        return (0, 0)
    if parts[0] in TOP:
        return (len(LAYERS), 0)
    if parts[0] not in LAYERS:
        return None
    folder = LAYERS.index(parts[0])
    if parts[0] != "search":
        return (folder, 0)
    if len(parts) == 1:
        return (folder, len(SEARCH_LAYERS))
    return (folder, SEARCH_LAYERS.index(parts[1])) if parts[1] in SEARCH_LAYERS else None


def _layer(dotted: str) -> str:
    """A module's layer, for messages: `pipeline.search.report.plots` -> `search.report`."""
    parts = dotted.split(".")[1:]
    return ".".join(parts[:2] if parts[:1] == ["search"] else parts[:1]) or "pipeline"


# Third-party imports allowed in a few layers only.
TENSOR_LAYER = {"data", "model", "training"}
ONLY_IN = {
    "mlflow": {"tracking", "registry"},
    "ax": {"search.ax"},
    "ray": {"search.executors"},
    "lm_eval": {"training"},
    "torch": TENSOR_LAYER,
    "transformers": TENSOR_LAYER,
    "peft": TENSOR_LAYER,
    "bitsandbytes": TENSOR_LAYER,
}
MAX_LINES = 400
# Reading MLflow's run objects or writing its search filters belongs to tracking and registry.
MLFLOW_READS = re.compile(
    r"\.data\.(tags|metrics|params)\b|\.info\.\w+|search_runs\(|tags\.`|attributes\.status"
)


def _module(path: str) -> str:
    """The dotted module of a file path under the repository root."""
    parts = path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(source: str) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the source, function-level ones included."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if (
                node.module.split(".")[0] == "pipeline"
            ):  # the name may be a module: `from pipeline import names`
                out += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
            else:
                out.append((node.module, node.lineno))
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle among the modules (a -> b -> a), or []."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def layering_violations(files: dict[str, str]) -> list[str]:
    """Every broken rule in {path: source} of `pipeline/` files, one line each."""
    problems = []
    modules = {_module(path) for path in files}
    graph: dict[str, set[str]] = {}
    for path, source in sorted(files.items()):
        module = _module(path)
        rank = _rank(module)
        if rank is None:
            problems.append(f"{path}: module is in no layer (add its folder to LAYERS or SEARCH_LAYERS)")
            continue
        stage = _layer(module)
        for target, line in _imports(source):
            top = target.split(".")[0]
            if top in ONLY_IN and not any(stage == s or stage.startswith(s + ".") for s in ONLY_IN[top]):
                problems.append(f"{path}:{line}: imports {top} (only {', '.join(sorted(ONLY_IN[top]))} may)")
            if top == "pipeline":
                parent = target.rsplit(".", 1)[0]
                if _rank(target) is None or (target not in modules and parent in modules):
                    target = parent  # `from pipeline.search.loop import Search`: a name, not a module
                if target in modules and target != module:
                    graph.setdefault(module, set()).add(target)
                if (_rank(target) or (0, 0)) > rank:
                    problems.append(f"{path}:{line}: imports {target}, a later layer than {stage}")
        if stage not in ONLY_IN["mlflow"]:
            for line, text in enumerate(source.splitlines(), 1):
                if MLFLOW_READS.search(text):
                    problems.append(f"{path}:{line}: reads an MLflow run or filters runs (ask tracking)")
        n = source.count("\n")
        if n > MAX_LINES:
            problems.append(f"{path}: {n} lines (keep modules under {MAX_LINES}: one job each)")
    # A package's `__init__` re-exporting its modules is not a cycle: the modules import the package's
    # siblings, not its names.
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    if cycle := _cycle(graph):
        problems.append(f"import cycle: {' -> '.join(cycle)}")
    return problems


def test_layering_of_the_package():
    files = {
        str(p.relative_to(ROOT)): p.read_text()
        for p in (ROOT / "pipeline").rglob("*.py")
        if "evaluate_metrics" not in p.parts  # metric scripts that `evaluate.load` runs, not modules
    }
    assert "pipeline/search/ax/space.py" in files and "pipeline/tracking/runs.py" in files
    assert layering_violations(files) == []


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        ("pipeline/data/prepare.py", "import mlflow\n", "pipeline/data/prepare.py:1: imports mlflow"),
        (
            "pipeline/search/loop.py",
            "x = 1\nfrom ax.api import Client\n",
            "pipeline/search/loop.py:2: imports ax",
        ),
        ("pipeline/trial/run.py", "import torch\n", "pipeline/trial/run.py:1: imports torch"),
        ("pipeline/search/report/summary.py", "from pipeline import tracking\n", ""),  # earlier: allowed
        (
            "pipeline/config/load.py",
            "def f():\n    from pipeline.trial import run_trial\n",
            "pipeline/config/load.py:2: imports pipeline.trial.run_trial, a later layer than config",
        ),
        (
            "pipeline/search/journal.py",
            "from pipeline.search.loop import Search\n",
            "pipeline/search/journal.py:1: imports pipeline.search.loop.Search, a later layer than search.journal",
        ),
        ("pipeline/search/newthing.py", "", "pipeline/search/newthing.py: module is in no layer"),
        (
            "pipeline/retrain/recipe.py",
            "best = run.data.tags['search.best_run_id']\n",
            "pipeline/retrain/recipe.py:1: reads an MLflow run or filters runs",
        ),
        ("pipeline/core/names.py", "x = 1\n" * (MAX_LINES + 1), "pipeline/core/names.py: 401 lines"),
    ],
)
def test_layering_check_catches_what_it_forbids(path, source, expected):
    """The rule above, shown failing: each forbidden import is reported with its file and line."""
    problems = layering_violations({path: source})
    if expected:
        assert len(problems) == 1 and problems[0].startswith(expected), problems
    else:
        assert problems == []


def test_layering_check_catches_a_cycle_inside_a_layer():
    files = {
        "pipeline/config/a.py": "from pipeline.config.b import X\n",
        "pipeline/config/b.py": "def f():\n    from pipeline.config import a\n",
        "pipeline/config/__init__.py": "from pipeline.config.a import Y\n",  # a re-export: no cycle
    }
    assert layering_violations(files) == [
        "import cycle: pipeline.config.a -> pipeline.config.b -> pipeline.config.a"
    ]
    del files["pipeline/config/b.py"]
    assert layering_violations(files) == []


def test_data_and_model_assets_are_documented():
    assert (ROOT / "data" / "README.md").read_text().count("PSF") >= 1
    report = (ROOT / "models" / "pydoc-llama" / "pretrain_report.json").read_text()
    assert '"held_out_corpus_loss"' in report
    assert "pretrain_report.json" in (ROOT / "models" / "README.md").read_text()


def test_names_assigns_each_name_once():
    # One home for every name: a second assignment (four were, with the same strings) can drift.
    tree = ast.parse((ROOT / "pipeline" / "core" / "names.py").read_text())
    seen: dict[str, int] = {}
    twice = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        for target in targets:
            for name in ast.walk(target):
                if isinstance(name, ast.Name):
                    if name.id in seen:
                        twice.append(f"{name.id}: lines {seen[name.id]} and {node.lineno}")
                    seen.setdefault(name.id, node.lineno)
    assert twice == []


# Tests mirror the package: pipeline/<folder>/<module>.py is tested in tests/<folder>/test_<module>.py.
# A module without its own file is listed here with the file that tests it and why it has none.
TESTED_ELSEWHERE = {
    "__main__.py": ("tests/test_cli.py", "`python -m pipeline` is the CLI's entry, four lines"),
    "config/keys.py": ("tests/config/test_load.py", "key paths, through every override and error"),
    "config/messages.py": ("tests/config/test_edge.py", "the one-line problems, asserted as users read them"),
    "config/parameters.py": ("tests/config/test_load.py", "the search parameter specs, loaded from YAML"),
    "config/points.py": ("tests/config/test_edge.py", "every value a space allows, checked at the edge"),
    "config/reference.py": ("tests/test_project.py", "docs/configuration.md is regenerated and compared"),
    "config/schema.py": ("tests/config/test_load.py", "the schema is what load_config validates against"),
    "config/search.py": ("tests/config/test_load.py", "the search section, loaded and refused"),
    "config/sections.py": ("tests/config/test_load.py", "the sections, loaded and refused"),
    "core/console.py": (
        "tests/search/report/test_summary.py",
        "run names and durations, where trials are named",
    ),
    "core/errors.py": ("tests/config/test_edge.py", "exception types, raised and matched everywhere"),
    "core/events.py": ("tests/search/test_stopping.py", "progression units, where early stopping uses them"),
    "core/files.py": ("tests/search/test_journal.py", "atomic writes, where a kill mid-save is tested"),
    "core/interrupt.py": ("tests/search/steps/test_interrupted.py", "signals, sent to real processes"),
    "core/names.py": ("tests/test_project.py", "constants only; that each is assigned once"),
    "core/outer_run.py": ("tests/test_e2e_baseline.py", "the run `mlflow run` makes, adopted end to end"),
    "core/plotting.py": ("tests/retrain/test_recipe.py", "the plots, written by the reports"),
    "core/provenance.py": (
        "tests/test_reproducibility.py",
        "versions and kernels, compared with the example",
    ),
    "data/collate.py": ("tests/data/test_prepare.py", "batches, built from the prepared data"),
    "data/inputs.py": ("tests/model/test_load.py", "the model's inputs, where the model is built"),
    "data/read.py": ("tests/data/test_prepare.py", "every format and bad line, read through prepare"),
    "model/adapter.py": ("tests/registry/test_pyfunc.py", "adapters saved, loaded and served"),
    "model/device.py": ("tests/model/test_load.py", "device and precision plans, where models load"),
    "retrain/report.py": ("tests/retrain/test_recipe.py", "the retrain's report, from a real retrain"),
    "search/ax/outcomes.py": (
        "tests/search/ax/test_space.py",
        "objectives and constraints, in Ax's experiment",
    ),
    "search/executors/mailbox.py": ("tests/search/executors/test_ray.py", "the Ray actor, on a real cluster"),
    "search/failure_rate.py": ("tests/search/test_loop.py", "the failure budget, in a search that fails"),
    "search/finish.py": ("tests/search/test_loop.py", "the search's end: report, best config, registry"),
    "search/preflight.py": ("tests/config/test_load.py", "the search's config and checks before its run"),
    "search/report/evidence.py": ("tests/search/steps/test_replicates.py", "the intervals, from replicates"),
    "search/report/markdown.py": ("tests/search/test_loop.py", "the report, as a search writes it"),
    "search/report/noise.py": ("tests/search/steps/test_replicates.py", "the noise section, from replicates"),
    "search/report/plots.py": ("tests/search/test_loop.py", "the plots, as a search writes them"),
    "training/router.py": ("tests/training/test_packing.py", "the routed LoRA of packed trials"),
    "trial/failures.py": ("tests/trial/test_run.py", "a failed run's classification and error.txt"),
    "trial/resources.py": ("tests/trial/test_run.py", "the base models a process keeps"),
    "trial/resume.py": ("tests/search/steps/test_interrupted.py", "a run continued from its checkpoint"),
}


def _modules_with_logic() -> list[str]:
    return sorted(
        str(p.relative_to(ROOT / "pipeline"))
        for p in (ROOT / "pipeline").rglob("*.py")
        if p.name != "__init__.py" and "assets" not in p.parts  # assets: evaluate's metric scripts
    )


def test_tests_mirror_the_package():
    """Each module has its tests/<folder>/test_<module>.py, or a line above saying where it is tested."""
    missing, stale = [], []
    for module in _modules_with_logic():
        folder, _, name = module.rpartition("/")
        own = f"tests/{folder}/test_{name}" if folder else f"tests/test_{name}"
        if (ROOT / own).is_file() and module in TESTED_ELSEWHERE:
            stale.append(f"{module}: {own} exists now; drop it from TESTED_ELSEWHERE")
        elif not (ROOT / own).is_file() and module not in TESTED_ELSEWHERE:
            missing.append(f"{module}: no {own}, and no line in TESTED_ELSEWHERE")
    gone = sorted(set(TESTED_ELSEWHERE) - set(_modules_with_logic()))
    elsewhere = [
        f"{m}: {f} does not exist" for m, (f, _) in TESTED_ELSEWHERE.items() if not (ROOT / f).is_file()
    ]
    assert (missing, stale, gone, elsewhere) == ([], [], [], [])


# Tests read Ax's state through the Optimizer and drive the search through its seams (the
# executor: tests/search/common.Watched), not their private members: 17 lines once did.
PRIVATE_REACH = re.compile(
    r"\._experiment\b|\._random_seed\b|\bSearch\._[a-z]|\bsearch\._[a-z]|Search, \"_[a-z]"
)


def test_tests_use_public_seams_not_private_ax_or_search_state():
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in sorted((ROOT / "tests").rglob("*.py"))
        if path.name != "test_project.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE_REACH.search(line)
    ]
    assert found == []
    assert PRIVATE_REACH.search("statuses = optimizer.client._experiment.trials")  # what it catches
    assert PRIVATE_REACH.search("real = loop.Search._record")
