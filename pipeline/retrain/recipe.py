"""Retrain: the best configuration of a search, trained longer, registered, promoted if better.

Where the configuration comes from, in order of precedence: a YAML file (`best_config`), a given
search run (`from_search`), or the search run behind the current champion of
`registry.model_name` (the default). The retrain trains `retrain.epochs` with a decaying learning
rate, evaluates every `eval_steps`, stops on an eval-loss plateau and restores the best
evaluation's adapter; then it compares itself with the search's baseline and best trial on the
same eval data, registers the adapter and moves `champion` only if it wins.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.config import (
    PipelineConfig,
    apply_overrides,
    load_config,
    parse_overrides,
    select_overrides,
    to_dict,
    to_yaml,
    validate,
    with_overrides,
)
from pipeline.core import console, interrupt, names
from pipeline.core.errors import PipelineError
from pipeline.core.stats import ExampleScores, Interval, NotComparable, improvement
from pipeline.registry import versions as registry
from pipeline.retrain.report import RetrainContext, Row, write_retrain_report
from pipeline.trial.resources import Resources
from pipeline.trial.run import RunSpec, TrialResult, run_trial


@dataclass
class RetrainSource:
    kind: str  # champion | search | file
    description: str  # e.g. "champion pydoc-llama-lora v3 (search run abc)"
    config: PipelineConfig
    search_run_id: str | None = None


@dataclass
class RetrainResult:
    result: TrialResult
    source: RetrainSource
    promotion: registry.Promotion | None
    report_path: Path


def _config_of_search(run_id: str, overrides: list[str]) -> PipelineConfig:
    """The best_config.yaml a search logged, with the command line's overrides."""
    tracking.require_search_run(run_id, "from_search")
    with tempfile.TemporaryDirectory() as tmp:
        path = tracking.download_run_file(run_id, names.BEST_CONFIG_FILE, tmp, "from_search")
        return load_config(path, overrides, search=False)


def resolve_source(
    base: PipelineConfig, overrides: list[str], from_search: str | None, best_config: str | None
) -> RetrainSource:
    """The configuration to retrain and where it came from."""
    tracking.setup(base.tracking)
    # The retrain has no search: a search section and search.* overrides (shared `set` strings)
    # are dropped, not validated (load_config(search=False)).
    if best_config:
        return RetrainSource("file", f"file {best_config}", load_config(best_config, overrides, search=False))
    if from_search:
        return RetrainSource(
            "search", f"search run {from_search}", _config_of_search(from_search, overrides), from_search
        )
    name = base.registry.model_name
    champion = registry.champion(name)
    if champion is None:
        raise PipelineError(
            f"retrain: registered model {name!r} has no {names.CHAMPION_ALIAS} and neither from_search nor "
            "best_config was given; run the search first, or pass -P from_search=<search run id>"
        )
    search_id = champion.search_run_id
    if not search_id:
        raise PipelineError(
            f"retrain: {name} v{champion.version} records no {names.VERSION_SEARCH_RUN}; pass -P from_search=..."
        )
    config = _config_of_search(search_id, overrides)
    return RetrainSource(
        "champion", f"champion {name} v{champion.version} (search run {search_id})", config, search_id
    )


def retrain_config(config: PipelineConfig, train_examples: int, overrides: list[str]) -> PipelineConfig:
    """The best config with the retrain settings in force (and the command line's overrides last)."""
    r = config.retrain
    updates: dict[str, Any] = {
        "train.epochs": r.epochs,
        "train.max_steps": r.max_steps,
        "train.early_stopping_patience": r.early_stopping_patience,
        "train.early_stopping_min_delta": r.early_stopping_min_delta,
        "train.restore_best": True,
        "search": None,
    }
    for key in ("scheduler", "warmup_ratio", "gradient_accumulation_steps"):
        if getattr(r, key) is not None:
            updates[f"train.{key}"] = getattr(r, key)
    accumulation = updates.get("train.gradient_accumulation_steps", config.train.gradient_accumulation_steps)
    steps = (
        r.max_steps
        if r.max_steps > 0
        else math.ceil(math.ceil(train_examples / (config.train.batch_size * accumulation)) * r.epochs)
    )
    updates["train.eval_steps"] = r.eval_steps or max(1, steps // 10)
    config = with_overrides(config, updates)
    # The command line wins over the retrain section (e.g. -P set="train.eval_steps=50").
    train_overrides = select_overrides(overrides, "train.")
    if train_overrides:
        pairs = parse_overrides(train_overrides)
        data = apply_overrides(to_dict(config), pairs)
        config = validate(data, "--set", labels={k: f"--set {k}" for k, _ in pairs})
    return config


def intervals(
    scores: ExampleScores | None, runs: dict[str, tracking.RunRecord | None], confidence: float
) -> dict[str, Interval]:
    """The retrained adapter's eval-loss improvement over each run (by label), paired on the
    same eval examples (one seed each: eval-set noise only); runs without per-example scores or
    on other eval data are left out."""
    out: dict[str, Interval] = {}
    for label, run in runs.items():
        other = tracking.example_scores(run.run_id) if scores is not None and run is not None else None
        if other is None:
            continue
        try:
            out[label] = improvement([scores], [other], True, confidence)
        except NotComparable:
            continue
    return out


def _row(label: str, run: tracking.RunRecord | None) -> Row:
    if run is None:
        return Row(label, None, {}, None)
    return Row(label, run.run_id, dict(run.metrics), run.eval_fingerprint)


def resumed_source(run_id: str, base: PipelineConfig) -> tuple[RetrainSource, str]:
    """An interrupted retrain run: what it retrains (the config it logged, as it started) and
    its name; PipelineError when the run is not a retrain or has finished."""
    tracking.setup(base.tracking)
    run = tracking.get_run(run_id)
    if run is None or run.role != names.ROLE_RETRAIN:
        raise PipelineError(f"resume: {run_id!r} is not a retrain run in this tracking store")
    if run.status == "FINISHED":
        raise PipelineError(f"resume: retrain run {run_id} has finished; there is nothing to continue")
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(
            tracking.download_run_file(run_id, names.CONFIG_FILE, tmp, "resume"), search=False
        )
    search_id = run.tags.get(names.SEARCH_SOURCE_RUN)
    return RetrainSource(
        "resume", run.tags.get(names.RETRAIN_SOURCE, f"retrain run {run_id}"), config, search_id
    ), run.name


def run_retrain(
    config_path: str,
    overrides: list[str],
    from_search: str | None = None,
    best_config: str | None = None,
    allow_duplicate: bool = False,
    quiet: bool = False,
    resume: str | None = None,
) -> RetrainResult:
    """The retrain entry point; `resume`: continue that interrupted retrain run from its last
    checkpoint, with the config it started with."""
    base = load_config(config_path, overrides, search=False)
    if resume:
        source, name = resumed_source(resume, base)
    else:
        source, name = resolve_source(base, overrides, from_search, best_config), None
    resources = Resources()
    data = resources.data(source.config)
    config = source.config if resume else retrain_config(source.config, data.stats.train_examples, overrides)
    search = tracking.get_run(source.search_run_id) if source.search_run_id else None
    finish = _Finish(
        config,
        source,
        baseline=tracking.baseline_of(search) if search else None,
        best=tracking.best_trial_of(search) if search else None,
        train_examples=data.stats.train_examples,
        allow_duplicate=allow_duplicate,
    )
    lora, tr = config.lora, config.train
    spec = RunSpec(
        role=names.ROLE_RETRAIN,
        name=name
        or f"retrain r={lora.r} a={lora.alpha:g} lr={tr.learning_rate:.1e} bs={tr.batch_size} {tr.epochs:g} epochs",
        tags={names.RETRAIN_SOURCE: source.description, names.SEARCH_SOURCE_RUN: source.search_run_id},
        resume=resume,
    )
    # SIGTERM (a scheduler's time limit) ends the run KILLED after the current step, its
    # checkpoint kept for --resume.
    with interrupt.graceful_stop():
        result = run_trial(config, spec, resources=resources, on_complete=finish, quiet=quiet)
    return RetrainResult(result, source, finish.promotion, finish.report_path)


@dataclass
class _Finish:
    """What the retrain does inside its run once the adapter is logged: compare, register
    (promoting only a winner), write the report. Keeps what it did for the caller."""

    config: PipelineConfig
    source: RetrainSource
    baseline: tracking.RunRecord | None
    best: tracking.RunRecord | None
    train_examples: int
    allow_duplicate: bool
    promotion: registry.Promotion | None = None
    report_path: Path | None = None

    def __call__(self, run: tracking.TrackedRun, result: TrialResult) -> None:
        rule = registry.Rule.of(self.config)
        scores = tracking.example_scores(result.run_id)
        versus = intervals(scores, {"baseline": self.baseline, "search best": self.best}, rule.confidence)
        self.promotion = self._register(run, result, rule, versus.get("baseline"))
        self.report_path = self._report(run, result, versus)
        run.set_tags({names.NOTE: f"Retrain of {self.source.description}. {self.promotion.message}."})
        console.say(f"registry: {self.promotion.message}")

    def _register(
        self, run: tracking.TrackedRun, result: TrialResult, rule: registry.Rule, interval: Interval | None
    ) -> registry.Promotion:
        """Register the adapter; `champion` moves only when the rule says it is better."""
        config, source, baseline = self.config, self.source, self.baseline
        offer = registry.candidate(
            config,
            result.run_id,
            result.metrics,
            result.eval_loss,
            result.eval_fingerprint,
            result.adapter_dir,
        )
        # Judged against the champion on its objective's per-example scores, when the run has them.
        held = tracking.example_scores(result.run_id, offer.objective)
        offer = replace(offer, scores=(held,) if held is not None else ())
        same_eval = baseline is not None and baseline.eval_fingerprint == result.eval_fingerprint
        return registry.promote(
            config.registry.model_name,
            offer,
            tags={
                names.VERSION_SEARCH_RUN: source.search_run_id,
                names.VERSION_DATA_FINGERPRINT: result.data_fingerprint,
                names.VERSION_RETRAIN_SOURCE: source.description,
            },
            description=registry.version_description(
                offer,
                to_yaml(config),
                experiment_id=run.experiment_id,
                role=f"retrain of {source.description}",
                metrics=result.metrics,
                search_run_id=source.search_run_id,
                baseline_eval_loss=baseline.eval_loss if same_eval else None,
                interval=interval,
                rule=rule,
            ),
            allow_duplicate=self.allow_duplicate,
            rule=rule,
        )

    def _report(self, run: tracking.TrackedRun, result: TrialResult, versus: dict[str, Interval]) -> Path:
        """The retrain report, locally and as the run's `report/` artifact."""
        config = self.config
        ctx = RetrainContext(
            config=config,
            source=self.source.description,
            rows=[
                _row("baseline", self.baseline),
                _row("search best", self.best),
                Row("retrained", result.run_id, result.metrics, result.eval_fingerprint),
            ],
            evals=result.evals,
            steps_per_epoch=math.ceil(
                self.train_examples / (config.train.batch_size * config.train.gradient_accumulation_steps)
            ),
            promotion=self.promotion.message,
            best_step=int(result.metrics.get(names.BEST_EVAL_STEP, 0)) or None,
            intervals=versus,
        )
        path = write_retrain_report(ctx, Path(config.train.output_dir) / "retrain" / run.run_id)
        run.log_artifacts(path.parent, names.REPORT_DIR)
        return path
