"""The `search` entry point: Bayesian optimization with Ax, every trial a nested MLflow run.

Its folders and modules, from the bottom up (docs/architecture.md draws them):

- `stopping.py`: early stopping as the config plans it; `ax/`: config -> Ax, the `Optimizer`
  (the only folder that imports ax); `journal.py`: the records, saved atomically, reconciled;
- `failure_rate.py`, `budget.py`: when failures or budgets stop a search;
- `report/`: what the records say (`summary`), the evidence, the markdown, the plots;
- `executors/`: where trials run (here, packed, on Ray workers); `steps/`: baseline, warm start,
  replicates, interrupted trials;
- `preflight.py`, `finish.py`, `loop.py`: before the run exists, the end, and the search itself.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Search", "SearchAborted", "SearchResult", "run_search", "search_config"]


def __getattr__(name: str) -> Any:
    """The package's names, imported on first use: a parallel search's workers import
    `search.executor` and `search.distributed` only, never Ax."""
    if name == "SearchResult":
        from pipeline.search.finish import SearchResult

        return SearchResult
    if name == "search_config":
        from pipeline.search.preflight import search_config

        return search_config
    if name in __all__:
        from pipeline.search import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
