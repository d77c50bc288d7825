"""The report's uncertainty: the improvement line with its confidence interval, the seed
replicates and the winner's curse, and the expected best of n trials (Dodge et al., 2019).

Rendered from `evidence.Evidence` and the records; the report (`report.py`) places these lines."""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.core import names
from pipeline.core.plotting import plt, save, ticker
from pipeline.core.stats import expected_best
from pipeline.search import race
from pipeline.search.records import BASELINE, COMPLETED, SearchState
from pipeline.search.report.evidence import Evidence

EXPECTED_BEST_PLOT = "expected_best.png"


def improvement_row(config: PipelineConfig, ev: Evidence | None) -> str:
    """The summary table's Improvement row: estimate, CI, how, and the single-run value."""
    metric = config.search.objectives[0].metric
    if ev is None or ev.recommended is None:
        return "| Improvement | n/a |"
    single = f"{ev.single_run_pct:.1f} %" if ev.single_run_pct is not None else "n/a"
    if ev.improvement is None:
        why = "; ".join(ev.notes) or "no interval"
        return f"| **Improvement** | {metric}: single-run {single} ({why}) |"
    return f"| **Improvement** | {metric}: {ev.improvement.text()}; single-run {single} |"


def replicates_section(config: PipelineConfig, state: SearchState, ev: Evidence | None) -> list[str]:
    """The seed replicates: each replicated configuration's runs, mean and spread, the winner's
    curse, and which configurations the data cannot tell apart."""
    if not state.replicates:
        return []
    metric = config.search.objectives[0].metric
    done = sum(r.status == COMPLETED for r in state.replicates)
    md = [
        "## Seed replicates",
        "",
        f"{done} of {len(state.replicates)} replicate runs completed (search.replicates: "
        f"top_k {config.search.replicates.top_k}, seeds {config.search.replicates.seeds}, "
        f"mode {config.search.replicates.mode}); "
        "the selection run (the one the search measured) is left out of the means: it was picked for "
        "being good, and its distance to the fresh mean is the winner's curse.",
        "",
        f"| Configuration | chosen as | selection run | fresh seeds | mean {metric} | sd | selection - mean |",
        "|---|---|---|---|---|---|---|",
    ]
    chosen_by = {r.of: r.chosen_by for r in state.replicates}
    rows = ([ev.baseline] if ev and ev.baseline else []) + (ev.configs if ev else [])
    for c in rows:
        label = "baseline" if c.key == BASELINE else f"trial {c.key}"
        seeds = ", ".join(f"{s}: {v:.4f}" for s, _, v in c.runs)
        sel = f"{c.selection_value:.4f}" if c.selection_value is not None else "-"
        curse = f"{c.selection_value - c.mean:+.4f}" if c.selection_value is not None else "-"
        sd = f"{c.sd:.4f}" if c.sd is not None else "-"
        md.append(
            f"| {label} | {chosen_by.get(c.key, '')} | {sel} | {seeds} | {c.mean:.4f} | {sd} | {curse} |"
        )
    failed = [r for r in state.replicates if r.done and r.status != COMPLETED]
    if failed:
        md += [
            "",
            f"{len(failed)} replicate(s) failed: "
            + "; ".join(f"{r.of} seed {r.seed}: {r.failure_reason}" for r in failed),
        ]
    md += race_lines(config, state)
    if ev is not None and ev.recommended is not None:
        md += ["", f"Recommended: trial {ev.recommended.index}, {ev.rule}."]
        if ev.indistinguishable:
            md.append(
                f"Trials {', '.join([str(ev.configs[0].key), *ev.indistinguishable])} are statistically "
                f"indistinguishable at {config.registry.confidence:.0%} (paired on seeds and eval "
                "examples): more trials or more seeds would be needed to rank them."
            )
        curse = ev.winners_curse
        if curse is not None:
            md.append(
                f"Winner's curse, measured: the recommendation's selection run scored {curse:+.4f} against "
                "its fresh-seed mean."
            )
    return [*md, ""]


def convergence_lines(state: SearchState, plot: bool) -> list[str]:
    """Whether more trials would likely help: the expected best of n trials."""
    values = [t.eval_loss for t in state.scored() if t.status == COMPLETED]
    if len(values) < 3:
        return []
    curve = expected_best(values)
    n = len(values)
    half = max(1, n // 2)
    gain = curve[half - 1][0] - curve[-1][0]
    middle = f"{curve[half - 1][0]:.4f} at n={half}, " if half > 1 else ""
    md = [
        "",
        f"Expected best eval_loss of n trials drawn like these (Dodge et al., EMNLP 2019): "
        f"{curve[0][0]:.4f} at n=1, {middle}{curve[-1][0]:.4f} "
        f"(± {curve[-1][1]:.4f}) at n={n}. Going from {half} to {n} trials gained {gain:.4f}"
        + (
            "; the curve is still falling, so more trials would likely help."
            if curve[-1][1] > 0 and gain > curve[-1][1] / 2
            else "; the curve has flattened, so more trials are unlikely to help much."
        ),
    ]
    if plot:
        md += ["", f"![Expected best of n trials]({EXPECTED_BEST_PLOT})"]
    return md


def plot_expected_best(state: SearchState, path: Path) -> bool:
    """The expected best eval_loss against the number of trials, ± one standard deviation."""
    values = [t.eval_loss for t in state.scored() if t.status == COMPLETED]
    if len(values) < 3:
        return False
    curve = expected_best(values)
    ks = range(1, len(curve) + 1)
    mean = [m for m, _ in curve]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(ks, mean, color="black", label="expected best")
    ax.fill_between(
        ks, [m - s for m, s in curve], [m + s for m, s in curve], color="gray", alpha=0.3, label="± 1 sd"
    )
    if state.baseline and math.isfinite(state.baseline.eval_loss):
        ax.axhline(state.baseline.eval_loss, color="tab:red", ls="--", label="baseline")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel("trials")
    ax.set_ylabel(f"expected best {names.EVAL_LOSS}")
    ax.set_title("Would more trials help?")
    ax.legend(fontsize=8)
    save(fig, path)
    return True


def race_lines(config: PipelineConfig, state: SearchState) -> list[str]:
    """A race's rounds: the finalists, each round's leader, gaps and drops, and why it stopped."""
    if config.search.replicates.mode != "race" or not state.replicates:
        return []
    decided = race.decide(config, state)
    spec = config.search.replicates
    noise = (
        f"remembered seed noise of a paired difference {decided.prior.sd_pct:.2f} % ({decided.prior.df} "
        f"degrees of freedom, from {decided.prior.source or 'earlier searches'})"
        if decided.prior
        else "no remembered seed noise (the first round decides nothing)"
    )
    md = [
        "",
        f"**The race** (search.replicates.mode race): finalists {', '.join(f'trial {k}' for k in decided.finalists)} "
        f"and the baseline, one shared seed a round; a finalist worse than the leader beyond {decided.confidence:.0%} "
        f"(paired by seed) is dropped; equivalence margin +-{spec.margin:g} %; {noise}. Gaps: the "
        "finalist minus the leader, in percent of the leader's mean (positive: worse).",
        "",
    ]
    md += [f"{i}. {r.text()}" for i, r in enumerate(decided.rounds, 1)]
    if decided.failed:
        md.append(f"Out after a failed replicate: {', '.join(decided.failed)}.")
    md += ["", f"Stopped: {decided.stop or 'not finished (the search stopped before the race ended)'}."]
    return md
