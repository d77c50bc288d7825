"""The retrain report: baseline vs search best vs retrained, each with its run, and the eval
loss over epochs (retrain_report.md and retrain_eval_loss.png)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.core import names
from pipeline.core.plotting import BASELINE_COLOR, mark_best, plt, save
from pipeline.core.stats import Interval
from pipeline.search.report.summary import pct


@dataclass(frozen=True)
class Row:
    """One run the report compares: baseline, search best, retrained."""

    label: str
    run_id: str | None  # None: not available (e.g. a retrain of a YAML file)
    metrics: dict[str, float]
    eval_fingerprint: str | None


@dataclass
class RetrainContext:
    config: PipelineConfig
    source: str
    rows: list[Row]  # baseline, search best, retrained (last)
    evals: list[tuple[int, float]]
    steps_per_epoch: int
    promotion: str | None = None  # what the registry did, one sentence
    best_step: int | None = None
    # The retrained adapter's improvement over each row (by label), paired on the eval examples.
    intervals: dict[str, Interval] = field(default_factory=dict)

    def versus(self, label: str) -> str:
        interval = self.intervals.get(label)
        return f" Improvement {interval.text()}." if interval is not None else ""


def write_retrain_report(ctx: RetrainContext, out_dir: Path) -> Path:
    """retrain_report.md and retrain_eval_loss.png: baseline vs search best vs retrained."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = ctx.rows[-1]
    generated = [
        k for k in mine.metrics if k.startswith("eval_") and k not in (names.EVAL_LOSS, names.EVAL_PERPLEXITY)
    ]
    gen = generated[0] if generated else "generation metric"
    md = [
        "# Retrain report",
        "",
        f"The best configuration of {ctx.source}, trained for "
        + (
            f"{ctx.config.train.max_steps} steps "
            if ctx.config.train.max_steps > 0
            else f"{ctx.config.train.epochs:g} epoch(s) "
        )
        + f"({ctx.config.train.scheduler} schedule, evaluated every {ctx.config.train.eval_steps} steps, "
        f"early stopping after {ctx.config.train.early_stopping_patience} evaluations without improvement, "
        "best evaluation restored). Every number is read from the runs named here.",
        "",
        f"| | run | eval_loss | eval_perplexity | {gen} | same eval data |",
        "|---|---|---|---|---|---|",
    ]
    for row in ctx.rows:
        if row.run_id is None:
            md.append(f"| {row.label} | not available | | | | |")
            continue
        m = row.metrics
        same = (
            "yes"
            if row.eval_fingerprint == mine.eval_fingerprint
            else f"no (fingerprint {row.eval_fingerprint})"
        )
        md.append(
            f"| {row.label} | `{row.run_id}` | {m.get(names.EVAL_LOSS):.4f} | "
            f"{m.get(names.EVAL_PERPLEXITY, math.nan):.3f} | {m.get(gen, math.nan):.4f} | {same} |"
        )
    final = mine.metrics
    md.append("")
    for label in ("search best", "baseline"):
        other = next((r.metrics for r in ctx.rows if r.label == label and r.run_id), None)
        if other and names.EVAL_LOSS in other:
            md.append(
                f"Retrained vs {label}: eval_loss {pct(final[names.EVAL_LOSS], other[names.EVAL_LOSS])}."
                + ctx.versus(label)
            )
    if ctx.best_step is not None:
        md.append(
            f"The best evaluation was at step {ctx.best_step} (epoch {ctx.best_step / ctx.steps_per_epoch:.2f}); "
            "its adapter weights are the ones registered."
        )
    if ctx.promotion is not None:
        md += ["", "## Registry", "", ctx.promotion + "."]
    md += ["", "## Eval loss over epochs", "", f"![Eval loss over epochs]({names.RETRAIN_PLOT_FILE})", ""]
    (out_dir / names.RETRAIN_REPORT_FILE).write_text("\n".join(md))
    _plot_evals(ctx, out_dir / names.RETRAIN_PLOT_FILE)
    return out_dir / names.RETRAIN_REPORT_FILE


def _plot_evals(ctx: RetrainContext, path: Path) -> None:
    """The retrain's eval loss over epochs, its restored best, the baseline and search best."""
    fig, ax = plt.subplots(figsize=(7, 4))
    if ctx.evals:
        steps, losses = zip(*ctx.evals, strict=True)
        ax.plot([s / ctx.steps_per_epoch for s in steps], losses, "o-", label="retrain")
    if ctx.best_step is not None:
        best_loss = dict(ctx.evals).get(ctx.best_step)
        if best_loss is not None:
            mark_best(ax, ctx.best_step / ctx.steps_per_epoch, best_loss, "best (restored)")
    for row, style in zip(ctx.rows[:2], ("--", ":"), strict=True):
        if row.run_id and names.EVAL_LOSS in row.metrics:
            ax.axhline(
                row.metrics[names.EVAL_LOSS],
                ls=style,
                color=BASELINE_COLOR if row.label == "baseline" else "tab:green",
                label=f"{row.label} {row.metrics[names.EVAL_LOSS]:.4f}",
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel("eval_loss")
    ax.set_title("Retrain: eval loss over epochs")
    ax.legend(fontsize=8)
    save(fig, path)
