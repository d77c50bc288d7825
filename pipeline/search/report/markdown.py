"""The search report: markdown and PNG plots. It only renders; the numbers come from `summary`.

It replaces a hand-written report whose numbers were invented: here each figure comes from the
trial records (which mirror the MLflow runs) and each insight states the numbers behind it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.core import names
from pipeline.core.events import EXAMPLES, STEPS
from pipeline.search.records import COMPLETED, KILLED, SearchState, TrialRecord
from pipeline.search.report import noise as noise_report
from pipeline.search.report import plots
from pipeline.search.report.evidence import Evidence
from pipeline.search.report.summary import (
    best_so_far,
    counts,
    fmt,
    important_parameters,
    improvement_pct,
    parameter_effects,
    pct,
    recommendations,
    steps_saved_pct,
    why_no_stopping,
)
from pipeline.search.stopping import progression_unit

PLOTS = names.REPORT_PLOTS
UNITS = {STEPS: "optimizer steps", EXAMPLES: "training examples seen"}
COMPARED_METRICS = (
    names.EVAL_LOSS,
    names.EVAL_PERPLEXITY,
    names.EVAL_ROUGE_L,
    names.PEAK_RSS_GB,
    names.PEAK_GPU_MEM_GB,
    names.TRAIN_TOKENS_PER_SECOND,
)


@dataclass
class ReportContext:
    config: PipelineConfig
    state: SearchState
    best: TrialRecord | None
    analysis: dict[str, Any] = field(default_factory=dict)  # Ax's: sensitivity, pareto, notes
    promotion: str | None = None  # what the registry did, one sentence
    provenance: dict[str, str] = field(default_factory=dict)
    experiment_id: str = ""
    evidence: Evidence | None = None  # the recommendation's interval, replicates (evidence.gather)

    @property
    def model(self) -> str:
        m = self.config.model
        return m.name_or_path + (f" ({m.gguf_file})" if m.gguf_file else "")

    @cached_property
    def important(self) -> list[str]:
        """The parameters the slices plot shows (none when no trial scored)."""
        if not self.state.scored():
            return []
        return important_parameters(self.config.search, self.state, self.analysis.get("sensitivity") or {})

    expected_best_plot: bool = False  # drawn (enough completed trials)

    @property
    def multi_objective(self) -> bool:
        return len(self.config.search.objectives) > 1


def write_report(ctx: ReportContext, out_dir: Path) -> str:
    """Write search_report.md and the plots into out_dir; return the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots.plot_trace(ctx.state, out_dir / PLOTS["trace"])
    plots.plot_curves(ctx.state, out_dir / PLOTS["curves"], progression_unit(ctx.config))
    if ctx.important:
        plots.plot_slices(ctx.config.search, ctx.state, ctx.best, ctx.important, out_dir / PLOTS["slices"])
    if ctx.multi_objective:
        plots.plot_pareto(
            ctx.config.search, ctx.state, ctx.analysis.get("pareto", []), out_dir / PLOTS["pareto"]
        )
    ctx.expected_best_plot = noise_report.plot_expected_best(
        ctx.state, out_dir / noise_report.EXPECTED_BEST_PLOT
    )
    sections = (
        _summary,
        _best,
        _replicates,
        _insights,
        _history,
        _warm_start,
        _convergence,
        _pareto,
        _next_steps,
        _plots,
        _provenance,
    )
    text = "\n".join(line for section in sections for line in section(ctx))
    (out_dir / names.REPORT_FILE).write_text(text)
    return text


def description(ctx: ReportContext) -> str:
    """One paragraph for the parent run's description in the MLflow UI."""
    s, best, base = ctx.state, ctx.best, ctx.state.baseline
    text = f"Ax search of {len(s.finished())} trials over {', '.join(ctx.config.search.parameters)}."
    if best is not None:
        label = best.run_name or f"trial {best.index}"
        text += (
            f" Recommended: {_link(label, ctx.experiment_id, best.run_id)}, eval_loss {best.eval_loss:.4f}"
        )
        interval = ctx.evidence.improvement if ctx.evidence is not None else None
        if interval is not None:
            text += f", improvement on the baseline {interval.text()}"
        elif base is not None:
            gain = improvement_pct(base.eval_loss, best.eval_loss)
            change = f"a {gain:.1f}% improvement on" if gain >= 0 else f"{-gain:.1f}% worse than"
            text += f", {change} the baseline ({base.eval_loss:.4f})"
        text += "."
    warm = [w for w in s.warm or [] if w.attached]
    if s.warm:
        sources = dict.fromkeys((w.source_search, w.source_experiment) for w in s.warm)
        links = ", ".join(_link(rid[:8], exp, rid) for rid, exp in sources)
        text += f" Warm-started with {len(warm)} of {len(s.warm)} trials of search {links}."
    if ctx.promotion is not None:
        text += f" Registry: {ctx.promotion}."
    return text + f" Report: artifacts {names.REPORT_DIR}/{names.REPORT_FILE}."


def _link(label: str, experiment_id: str, run_id: str) -> str:
    """A markdown link to a run's page, relative to the MLflow UI's root (resolved where it is
    served; registry versions use tracking.run_url, absolute on a server)."""
    return f"[{label}](#/experiments/{experiment_id}/runs/{run_id})"


# ---------------------------------------------------------------------------------------------
# Sections, in the order they appear; each returns its markdown lines.


def _summary(ctx: ReportContext) -> list[str]:
    s, best, base = ctx.state, ctx.best, ctx.state.baseline
    base_loss = base.eval_loss if base else None
    n = counts(s)
    compute = sum(t.wall_seconds for t in s.trials)
    first = ctx.config.search.objectives[0].metric
    base_value = (
        (base_loss if first == names.EVAL_LOSS else (base.metrics or {}).get(first)) if base else None
    )
    what = f"the baseline's `{first}` of **{base_value:.4f}**" if base_value is not None else "the baseline"
    goal = (
        f"Find hyperparameters that beat {what} (run `{base.run_id}`, "
        + (f"reused: {base.why}" if base.reused else "trained in this search")
        + "), "
        + " and ".join(
            f"{'minimizing' if o.minimize else 'maximizing'} `{o.metric}`"
            for o in ctx.config.search.objectives
        )
        + "."
        if base
        else "Find the best hyperparameters."
    )
    md = [
        f"# LoRA search report: {ctx.model}",
        "",
        f"Every number here comes from the MLflow runs of search run `{s.parent_run_id}` and its "
        f"{len(s.trials) + len(s.replicates or []) + (1 if base and not base.reused else 0)} child runs; "
        "nothing is simulated.",
        "",
        "## Goal",
        "",
        goal,
        "",
        "## Results summary",
        "",
        "| Metric | Value |",
        "|---|---|",
        f"| **Baseline eval_loss** | {base_loss:.4f} |"
        if base_loss is not None
        else "| Baseline | not run |",
        f"| **Recommended eval_loss** | {best.eval_loss:.4f} (trial {best.index}, its selection run) |"
        if best
        else "| Best | no scored trial |",
        noise_report.improvement_row(ctx.config, ctx.evidence),
        f"| **Trials** | {len(s.finished())}: {n[COMPLETED]} completed, {n['early_stopped']} early-stopped, "
        f"{n['failed']} failed, {n['abandoned']} abandoned"
        + (f" ({n[KILLED]} interrupted and rerun)" if n[KILLED] else "")
        + " |",
        f"| **Wall time** | {s.wall_seconds / 60:.1f} min over {s.sessions} session(s) |",
        f"| **Compute time in trials** | {compute / 60:.1f} min |",
        f"| **Early stopping** | saved {steps_saved_pct(s):.1f}% of planned training steps (trials "
        f"compared at equal {UNITS[progression_unit(ctx.config)]}) |",
    ]
    loads = [t for t in s.scored() if (t.metrics or {}).get(names.MODEL_LOAD_S, 0) > 0]
    if loads:  # what searching a base setting (model.load_in_4bit) costs
        md.append(
            f"| **Base model loads** | {len(loads)} over {len(s.scored())} scored trials "
            f"({sum(t.metrics[names.MODEL_LOAD_S] for t in loads):.1f} s); the others reused a loaded base |"
        )
    if s.stop_reason:
        md.append(f"| **Stopped** | {s.stop_reason} |")
    return [*md, ""]


def _best(ctx: ReportContext) -> list[str]:
    best, base = ctx.best, ctx.state.baseline
    if best is None:
        return []
    md = ["## Best configuration", "", "```yaml", f"model: {ctx.model}"]
    md += [f"{k}: {fmt(v)}" for k, v in best.parameters.items()]
    md += [
        "```",
        "",
        f"Run `{best.run_id}`; the complete config is `{names.BEST_CONFIG_FILE}` on the search run.",
        "",
    ]
    md += ["### Comparison with baseline", "", "| | Baseline | Best | Change |", "|---|---|---|---|"]
    for k, v in best.parameters.items():
        old = base.parameters.get(k) if base else None
        numbers = isinstance(v, (int, float)) and isinstance(old, (int, float)) and not isinstance(v, bool)
        change = pct(float(v), float(old)) if numbers and old else ("same" if old == v else "")
        md.append(f"| {k} | {fmt(old)} | {fmt(v)} | {change} |")
    for metric in COMPARED_METRICS:
        if metric in best.metrics and base and metric in base.metrics:
            b, n = base.metrics[metric], best.metrics[metric]
            md.append(f"| **{metric}** | {b:.4g} | {n:.4g} | {pct(n, b)} |")
    return [*md, ""]


def _replicates(ctx: ReportContext) -> list[str]:
    return noise_report.replicates_section(ctx.config, ctx.state, ctx.evidence)


def _insights(ctx: ReportContext) -> list[str]:
    md = ["## Insights (computed from the trials)", ""]
    sens = ctx.analysis.get("sensitivity") or {}
    if sens:
        md += [
            "**Sensitivity** (Ax, total Sobol index of the GP model of eval_loss; sign: direction of the effect):",
            "",
            "| Parameter | Sensitivity |",
            "|---|---|",
        ]
        md += [f"| {k} | {v:+.3f} |" for k, v in sorted(sens.items(), key=lambda kv: -abs(kv[1]))]
        md.append("")
    notes = [f"- {n}" for n in ctx.analysis.get("notes", [])]
    return [*md, *notes, *parameter_effects(ctx.config.search, ctx.state), ""]


def _trial_table(ctx: ReportContext, trials: list[TrialRecord]) -> list[str]:
    base_loss = ctx.state.baseline.eval_loss if ctx.state.baseline else None
    keys = [k for k, s in ctx.config.search.parameters.items() if s.type != "fixed"]
    # The other objectives and constrained metrics (task scores, memory) beside eval_loss.
    others = [m for m in ctx.config.search.required_metrics() if m != names.EVAL_LOSS]
    head = ["Trial", *keys, "eval_loss", "vs baseline", *others, "status", "method", "run"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials:
        loss = f"{t.eval_loss:.4f}" if t.eval_loss is not None else "-"
        change = pct(t.eval_loss, base_loss) if (t.eval_loss is not None and base_loss) else "-"
        status = t.status + (" (budget)" if t.stopped_by == "budget" else "")
        scores = [f"{t.metrics[m]:.4g}" if m in (t.metrics or {}) else "-" for m in others]
        cells = [str(t.index), *(fmt(t.parameters.get(k)) for k in keys), loss, change, *scores, status]
        cells += [t.generation_method, f"`{t.run_id}`" if t.run_id else "-"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _history(ctx: ReportContext) -> list[str]:
    scored = sorted(ctx.state.scored(), key=lambda t: t.eval_loss)
    md = ["## Trial history", "", f"Top {min(5, len(scored))} trials:", "", *_trial_table(ctx, scored[:5])]
    worst = scored[-3:][::-1] if len(scored) > 5 else []
    if worst:
        md += ["", "Worst 3 trials:", "", *_trial_table(ctx, worst)]
    unscored = [t for t in ctx.state.trials if not t.scored]
    if unscored:
        md += ["", "Trials without a score:", "", "| Trial | status | reason | run |", "|---|---|---|---|"]
        md += [
            f"| {t.index} | {t.status} | {t.failure_reason or '-'} | `{t.run_id or '-'}` |" for t in unscored
        ]
    return [*md, ""]


def _warm_start(ctx: ReportContext) -> list[str]:
    """The earlier searches' trials given to Ax first, and those left out with why."""
    warm = ctx.state.warm or []
    if not warm:
        return []
    used = [w for w in warm if w.attached]
    keys = list(ctx.config.search.parameters)
    md = [
        "## Warm start",
        "",
        f"{len(used)} of {len(warm)} trials of the earlier searches "
        + ", ".join(f"`{r}`" for r in dict.fromkeys(w.source_search for w in warm))
        + " were given to Ax before the first trial (not counted in n_trials, not promoted).",
        "",
        f"| Ax trial | source run | status | {' | '.join(keys)} | eval_loss | used |",
        "|---|---|---|" + "---|" * len(keys) + "---|---|",
    ]
    for w in warm:
        values = " | ".join(fmt(w.parameters[k]) if k in w.parameters else "-" for k in keys)
        loss = f"{w.eval_loss:.4f}" if w.eval_loss is not None else "-"
        used_text = "yes" if w.attached else "no: " + str(w.skipped).replace("|", "\\|")
        index = w.index if w.attached else "-"
        md.append(f"| {index} | `{w.run_id}` | {w.status} | {values} | {loss} | {used_text} |")
    return [*md, ""]


def _convergence(ctx: ReportContext) -> list[str]:
    trials = [t for t in ctx.state.trials if t.status != KILLED]
    md = ["## Convergence", ""]
    bsf = best_so_far(trials)
    if any(b is not None for b in bsf):
        md.append(
            "Best eval_loss of the completed trials so far, by trial: "
            + ", ".join(f"{i}: {b:.4f}" if b is not None else f"{i}: -" for i, b in enumerate(bsf, 1))
            + "."
        )
        if ctx.best is not None:
            md.append(
                f"The recommended trial was trial number {trials.index(ctx.best) + 1} of {len(trials)}."
            )
    md += noise_report.convergence_lines(ctx.state, ctx.expected_best_plot)
    methods: dict[str, list[float]] = {}
    for t in trials:
        if t.scored:
            methods.setdefault(t.generation_method, []).append(t.eval_loss)
    if methods:
        md += ["", "| Generated by | Trials | Best | Mean |", "|---|---|---|---|"]
        md += [f"| {m} | {len(v)} | {min(v):.4f} | {statistics.fmean(v):.4f} |" for m, v in methods.items()]
    return [*md, ""]


def _pareto(ctx: ReportContext) -> list[str]:
    if not ctx.multi_objective:
        return []
    md = ["## Pareto frontier", ""]
    pareto = ctx.analysis.get("pareto", [])
    if not pareto:
        return [*md, "No Pareto frontier could be computed (see the notes above).", ""]
    metrics = [o.metric for o in ctx.config.search.objectives]
    md += ["| Trial | " + " | ".join(metrics) + " | parameters |", "|---|" + "---|" * (len(metrics) + 1)]
    for p in pareto:
        values = " | ".join(f"{p['metrics'].get(m, math.nan):.4g}" for m in metrics)
        params = ", ".join(f"{k}={fmt(v)}" for k, v in p["parameters"].items())
        md.append(f"| {p['index']} | {values} | {params} |")
    return [*md, ""]


def _next_steps(ctx: ReportContext) -> list[str]:
    recs = recommendations(ctx.config, ctx.state, ctx.best, why_no_stopping(ctx.config, ctx.state))
    md = ["## Recommendations", "", *(f"{i}. {r}" for i, r in enumerate(recs, 1)), ""]
    if ctx.promotion is not None:
        md += ["## Registry", "", ctx.promotion + ".", ""]
    return md


def _plots(ctx: ReportContext) -> list[str]:
    md = [
        "## Plots",
        "",
        f"![Optimization trace]({PLOTS['trace']})",
        "",
        f"![Eval loss curves]({PLOTS['curves']})",
        "",
    ]
    if ctx.important:
        md += [f"![Slices of {', '.join(ctx.important)}]({PLOTS['slices']})", ""]
    if ctx.multi_objective:
        md += [f"![Pareto front]({PLOTS['pareto']})", ""]
    return md


def _provenance(ctx: ReportContext) -> list[str]:
    s, base = ctx.state, ctx.state.baseline
    md = ["## Provenance", "", "| Trial | Run | Status |", "|---|---|---|"]
    if base:
        how = (
            f"reused ({base.why})"
            if base.reused
            else f"trained in this search ({base.why})"
            if base.why
            else "trained"
        )
        md.append(f"| baseline | `{base.run_id}` | {how} |")
    md += [f"| {t.index} | `{t.run_id or '-'}` | {t.status} |" for t in s.trials]
    md += ["", "| | |", "|---|---|", f"| search run | `{s.parent_run_id}` |"]
    md += [f"| {k} | {v} |" for k, v in ctx.provenance.items()]
    return [*md, ""]
