"""The `search` entry point: Bayesian optimization with Ax, every trial a nested MLflow run.

One job per module, in the order data flows:

- `space.py`: config -> Ax; the `Optimizer` (the only module that imports ax);
- `journal.py`: the search's records, saved atomically, loaded and reconciled on resume;
- `summary.py`: what the records say (best trial, summary metrics, insights); pure functions;
- `plots.py`, `report.py`: the report, rendered from the records and the summary;
- `finish.py`: the end of a search: best trial, summary metrics, best_config.yaml, registry;
- `budget.py`: the wall-clock and device budgets, as a function of the records and a clock;
- `replicates.py`, `evidence.py`, `noise_report.py`: seed replicates, the recommendation and its
  interval, and what the report says of them;
- `executor.py`: where trials run (`LocalExecutor`: one at a time, in this process);
- `packed.py`: `PackedExecutor` (`search.pack`): several trials at once over one base (`packing`);
- `mailbox.py`: the Ray driver's mailbox (workers' evaluations in, stop decisions out);
- `distributed.py`: `RayExecutor`: trials in parallel on Ray workers, Ax stays in the driver;
- `baseline.py`: the baseline, reused or trained;
- `stopping.py`: early stopping as the config plans it (progression unit, whether it can act);
- `preflight.py`: the final config and the checks made before the search's run exists;
- `loop.py`: the search itself: ask Ax, hand trials to the executor, feed results back.
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
