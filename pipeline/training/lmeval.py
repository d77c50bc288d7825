"""Task metrics from EleutherAI's lm-evaluation-harness, on the trial's in-memory PEFT model.

After training, the model that was just trained (base + LoRA, no save/load round trip) is
wrapped in the harness's `HFLM` and evaluated on `eval.lm_eval.tasks`. Every task metric is
logged on the trial's run as `lmeval_<task>_<metric>` (its stderr as `..._stderr`), so it can be
a search objective or an outcome constraint like any other trial metric; the tasks' resolved
configs and the harness's results table are artifacts under `lm_eval/`.

The only module that imports `lm_eval` (lazily: the extra is optional).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import LmEvalConfig
from pipeline.core import names
from pipeline.core.errors import PipelineError
from pipeline.core.stats import ExampleScores
from pipeline.core.timing import PhaseTimer

if TYPE_CHECKING:
    from pipeline.training.train import TrainInputs

INSTALL = "eval.lm_eval needs lm-evaluation-harness: pip install -e '.[lmeval]'"
log = logging.getLogger(__name__)


def require() -> None:
    """PipelineError with the install line when the harness is missing (checked before any run)."""
    if importlib.util.find_spec("lm_eval") is None:
        raise PipelineError(INSTALL)


def fingerprint(cfg: LmEvalConfig) -> str:
    """What makes two task scores comparable: the settings (not where the task folder is), the
    task files' contents and the harness's version. The registry compares a task score with the
    champion's only under the same fingerprint."""
    h = hashlib.sha256(
        json.dumps(cfg.model_dump(mode="json", exclude={"include_path"}), sort_keys=True).encode()
    )
    if cfg.include_path and Path(cfg.include_path).is_dir():
        root = Path(cfg.include_path)
        for f in sorted(root.rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts:
                h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        h.update(importlib.metadata.version("lm-eval").encode())
    return h.hexdigest()[:16]


def metric_name(task: str, key: str) -> str | None:
    """`lmeval_<task>_<metric>` for a key of the harness's results (`acc,none`,
    `acc_stderr,none`, `exact_match,strict-match`); None for keys that are not numbers' names."""
    metric, _, filt = key.partition(",")
    if not metric or metric == "alias":
        return None
    name = f"{names.LMEVAL_PREFIX}{task}_{metric}" + (f"_{filt}" if filt and filt != "none" else "")
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def task_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Every finite number in the harness's `results` table, under our metric names."""
    out: dict[str, float] = {}
    for task, row in results.items():
        for key, value in row.items():
            name = metric_name(task, key)
            if name is None or key.startswith("sample_len"):  # a count, not a score
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(float(value)):
                out[name] = float(value)
    return out


@contextlib.contextmanager
def _hushed(quiet: bool) -> Iterator[None]:
    """The harness logs each stage at INFO and draws progress bars on stderr: keep its warnings
    (its errors when quiet) and, when quiet, no bars (tqdm reads TQDM_DISABLE only at import, so
    the bars' stream is swapped instead; logging keeps its own handle on the real stderr)."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR if quiet else logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
            yield
    finally:
        logger.setLevel(level)


def evaluate(
    model: Any, tokenizer: Any, cfg: LmEvalConfig, seed: int = 0, quiet: bool = False
) -> dict[str, Any]:
    """Run the harness on `model` (a PEFT model or any HF causal LM instance); its raw output."""
    require()
    with _hushed(quiet):
        return _evaluate(model, tokenizer, cfg, seed)


def _evaluate(model: Any, tokenizer: Any, cfg: LmEvalConfig, seed: int) -> dict[str, Any]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = _task_manager(TaskManager, cfg)
    unknown = [t for t in cfg.tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (include_path {cfg.include_path})" if cfg.include_path else ""
        raise PipelineError(f"eval.lm_eval.tasks: unknown task(s) {', '.join(unknown)}{where}")
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(cfg.tasks),
            num_fewshot=cfg.num_fewshot,
            limit=cfg.limit,
            apply_chat_template=cfg.apply_chat_template,
            task_manager=manager,
            log_samples=True,  # per-document scores: paired comparisons between runs (stats)
            bootstrap_iters=cfg.bootstrap_iters,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        model.train(was_training)
    if not out or "results" not in out:
        raise PipelineError("eval.lm_eval: the harness returned no results")
    return out


def _task_manager(cls: Any, cfg: LmEvalConfig) -> Any:
    """Only the local tasks when they are all that is asked for: indexing the harness's
    thousands of task files costs more than scoring a small task."""
    if cfg.include_path:
        local = cls(include_path=cfg.include_path, include_defaults=False)
        if all(t in local.all_tasks for t in cfg.tasks):
            return local
        return cls(include_path=cfg.include_path)
    return cls()


def sample_scores(out: dict[str, Any], cfg: LmEvalConfig, seed: int, run_id: str) -> dict[str, ExampleScores]:
    """Each task metric's per-document scores (the harness's logged samples), by metric name:
    two runs on the same task settings then compare paired, document by document."""
    fp = fingerprint(cfg)
    out_scores: dict[str, ExampleScores] = {}
    for task, samples in (out.get("samples") or {}).items():
        rows: dict[str, list[tuple[str, float]]] = {}
        for sample in samples:
            for metric in sample.get("metrics", []):
                value = sample.get(metric)
                name = metric_name(task, f"{metric},{sample.get('filter', 'none')}")
                if name is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                rows.setdefault(name, []).append((str(sample.get("doc_id")), float(value)))
        for name, values in rows.items():
            values.sort(key=lambda r: r[0])
            out_scores[name] = ExampleScores(
                ids=tuple(i for i, _ in values),
                sums=tuple(v for _, v in values),
                weights=(1.0,) * len(values),
                fingerprint=fp,
                seed=seed,
                run_id=run_id,
                metric=name,
            )
    return out_scores


def log_scores(run: Any, model: Any, job: TrainInputs, timer: PhaseTimer) -> dict[str, float]:
    """Score the trial's trained model on `eval.lm_eval` (timed as the `lm_eval` phase); log the
    harness's results table and task configs on `run` (timed as `tracking`, like every other
    logging call of a trial); the metrics (`lmeval_<task>_<metric>`)."""
    cfg, seed, quiet, tokenizer = job.config.eval.lm_eval, job.config.train.seed, job.quiet, job.tokenizer
    before = timer.seconds["lm_eval"]
    with timer.phase("lm_eval"):
        out = evaluate(model, tokenizer, cfg, seed, quiet)
    metrics = task_metrics(out["results"])
    shown = ", ".join(
        f"{k.removeprefix(names.LMEVAL_PREFIX)}={v:.4f}" for k, v in metrics.items() if "stderr" not in k
    )
    log.info("lm-eval %s: %s (%.0f s)", "+".join(cfg.tasks), shown, timer.seconds["lm_eval"] - before)
    with timer.phase("tracking"):
        run.log_dict(_jsonable(out["results"]), names.LMEVAL_RESULTS_FILE)
        run.log_dict(_jsonable(out.get("configs", {})), names.LMEVAL_CONFIGS_FILE)
        for name, scores in sample_scores(out, cfg, seed, run.run_id).items():
            run.log_dict(scores.to_json(), names.LMEVAL_EXAMPLES_FILE.format(name))
    return metrics


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
