"""What a search settles before its MLflow run exists: its final config (the file, or a resumed
search's own config from its run, then --n-trials and --budget-minutes), and the checks that would
otherwise fail after the baseline trained: an optional extra missing, a warm-start run id that
is wrong, a metric this machine cannot log. A search that fails here leaves no run behind.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.config import PipelineConfig, load_config, with_overrides
from pipeline.core.errors import ConfigError, PipelineError
from pipeline.model.device import cannot_run_here
from pipeline.search import journal
from pipeline.search.steps import warm
from pipeline.training import lmeval


def search_config(
    config_path: str | Path,
    overrides: list[str] = (),
    resume: str | None = None,
    n_trials: int | None = None,
    budget_minutes: float | None = None,
    loaded: PipelineConfig | None = None,
) -> PipelineConfig:
    """A search's final config, validated once: the file (or, resuming, the search's own config
    logged on its run), the --set overrides, then --n-trials and --budget-minutes.

    `loaded`: the file with its overrides, where the caller has loaded it already (the CLI checks
    it before the heavy imports); it is not read again."""
    config = loaded if loaded is not None else load_config(config_path, overrides)
    source = str(config_path)
    if resume:
        with tempfile.TemporaryDirectory() as tmp:
            path = journal.fetch_config(resume, config, tmp)
            config, source = load_config(path, overrides), f"{path.name} of search run {resume}"
    if config.search is None:
        raise ConfigError(source, ["search: the config has no search section (see configs/demo-cpu.yaml)"])
    options = {
        "search.n_trials": ("--n-trials", n_trials),
        "search.budget_minutes": ("--budget-minutes", budget_minutes),
    }
    given = {key: value for key, (_, value) in options.items() if value is not None}
    if not given:
        return config
    return with_overrides(
        config, given, source=source, labels={k: label for k, (label, _) in options.items()}
    )


def check_before_run(config: PipelineConfig, resume: str | None = None) -> None:
    """PipelineError now for what would stop the search later: the lm-eval extra missing, a
    warm-start source that is not a search, an objective or constraint on a metric no trial here
    would log (a CUDA memory peak on a machine without CUDA)."""
    if config.eval.lm_eval is not None:
        lmeval.require()
    if not resume:
        warm.check_sources(config)
    if config.search.executor == "local":
        # Ray workers may have the GPU a driver lacks: their trials are checked as they finish.
        # Here, every value the space allows is checked too (fp16 on a CPU would fail its trials).
        problems = cannot_run_here(config, space=True)
        if problems:
            raise PipelineError("; ".join(problems))
