"""Registry: adapters as MLflow registered model versions, and the `champion` alias gate.

A version is a pyfunc model logged *from code* (`registry/pyfunc.py`; no pickle) whose artifacts are the
adapter folder: adapter safetensors, adapter config, tokenizer and `pipeline_base.json`, the
reference to the base model. `mlflow.pyfunc.load_model("models:/<name>@champion")` rebuilds
base + adapter and generates text; the adapter folder also loads with plain
`peft.PeftModel.from_pretrained`.

The alias `champion` moves to a new version only if it beats the current champion's eval loss
on the same eval data (same `eval_fingerprint`); the champion it replaces keeps the alias
`previous`. A failure while registering deletes the half-made version.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from pipeline import tracking
from pipeline.core import names
from pipeline.core.errors import PipelineError
from pipeline.core.provenance import model_requirements
from pipeline.core.stats import ExampleScores, Interval, scalar_scores
from pipeline.registry import pyfunc
from pipeline.registry.gate import (
    DEFAULT_RULE,
    Candidate,
    Rule,
    Verdict,
    VersionRecord,
    candidate,
    decide,
    judge,
)

__all__ = [
    "DEFAULT_RULE",
    "Candidate",
    "Promotion",
    "Rule",
    "VersionRecord",
    "candidate",
    "decide",
    "judge",
    "promote",
]

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the pipeline package, shipped with each model
# What a version takes and gives: one string column of prompts (`prompt` over REST; one unnamed
# column, so a plain string or list still works in Python, where a named one would be refused),
# one answer per prompt, and `max_new_tokens` passed through serving as a param.
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string")]),
    outputs=Schema([ColSpec("string")]),
    params=ParamSchema([ParamSpec("max_new_tokens", "long", 64)]),
)
EXAMPLE = (pd.DataFrame({"prompt": ["What does the function `json.dumps` do?"]}), {"max_new_tokens": 64})


def _version(mv: Any) -> VersionRecord:
    return VersionRecord(mv.name, str(mv.version), dict(mv.tags or {}))


@dataclass
class Promotion:
    """What happened in the registry, in one sentence for the report."""

    model_name: str
    version: str
    promoted: bool
    message: str
    previous_champion: str | None = None
    previous_eval_loss: float | None = None
    duplicate: bool = False
    interval: Interval | None = None  # the improvement over the champion it was judged on


def adapter_sha256(adapter_dir: str | Path) -> str:
    """Fingerprint of the adapter weights (the same training gives the same bytes)."""
    return hashlib.sha256((Path(adapter_dir) / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]


def _version_at_alias(
    client: MlflowClient, name: str, alias: str = names.CHAMPION_ALIAS
) -> VersionRecord | None:
    try:
        return _version(client.get_model_version_by_alias(name, alias))
    except MlflowException:
        return None


def champion(name: str) -> VersionRecord | None:
    """The version holding the `champion` alias, or None."""
    return _version_at_alias(MlflowClient(), name)


def champion_scores(champion: VersionRecord, objective: str) -> list[ExampleScores] | None:
    """The scores the champion's version rests on (its runs' per-example eval losses, or their
    values of a task metric), or None when a run lacks them."""
    runs = champion.scored_runs() or [(None, champion.tags.get(names.VERSION_SOURCE_RUN, ""))]
    out = []
    for seed, run_id in runs:
        scores = tracking.example_scores(run_id, objective)
        if scores is None and objective != names.EVAL_LOSS:
            run = tracking.get_run(run_id)
            value = run.metrics.get(objective) if run is not None else None
            scores = scalar_scores(value, seed, objective, run_id) if value is not None else None
        if scores is None:
            return None
        out.append(scores)
    return out


def promote(
    model_name: str,
    candidate: Candidate,
    tags: dict[str, Any] | None = None,
    description: str = "",
    allow_duplicate: bool = False,
    rule: Rule = DEFAULT_RULE,
) -> Promotion:
    """Register the candidate's adapter as a new version; move `champion` if it wins beyond
    doubt (`champion.judge` under `rule`).

    The model is logged into the active run (the search or retrain run that decided this). An
    adapter identical to an existing version's (same weights) is not registered twice unless
    `allow_duplicate`.
    """
    client = MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = candidate.adapter_dir
        if adapter_dir is None or not (Path(adapter_dir) / names.BASE_REFERENCE_FILE).is_file():
            adapter_dir = mlflow.artifacts.download_artifacts(
                run_id=candidate.run_id, artifact_path=names.ADAPTER_DIR, dst_path=tmp
            )
        sha = adapter_sha256(adapter_dir)
        twin = None if allow_duplicate else _holding(client, model_name, sha)
        if twin is not None:
            return Promotion(
                model_name,
                twin.version,
                False,
                f"{model_name} v{twin.version} already holds this adapter (sha {sha}); no new version",
                duplicate=True,
            )
        base = json.loads((Path(adapter_dir) / names.BASE_REFERENCE_FILE).read_text())
        info = _log_model(adapter_dir)
    # Judged after the duplicate check: the champion's scores are downloads a duplicate never needs.
    champion = _version_at_alias(client, model_name)
    held = champion_scores(champion, candidate.objective) if champion is not None else None
    verdict = judge(candidate, champion, held, rule)
    promoted, reason = verdict.promote, verdict.reason
    version_tags = _version_tags(candidate, sha, base, rule, verdict, champion, tags or {})
    decision = f"**Promotion**: {'promoted' if promoted else 'not promoted'}: {reason}."
    description = description.replace("\n\n**Config**", f"\n\n{decision}\n\n**Config**", 1)
    mv = _register(client, model_name, info.model_uri, version_tags, description, promoted, champion)
    message = f"{model_name} v{mv.version} registered; " + (
        f"alias {names.CHAMPION_ALIAS} moved to it ({reason})" if promoted else f"not promoted: {reason}"
    )
    return Promotion(
        model_name,
        str(mv.version),
        promoted,
        message,
        previous_champion=champion.version if champion else None,
        previous_eval_loss=float(champion.tags[names.VERSION_EVAL_LOSS])
        if champion and names.VERSION_EVAL_LOSS in champion.tags
        else None,
        interval=verdict.interval,
    )


def _register(
    client: MlflowClient,
    model_name: str,
    model_uri: str,
    tags: dict[str, str],
    description: str,
    promoted: bool,
    champion: VersionRecord | None,
) -> Any:
    """The new version with its tags and description; when `promoted`, `champion` moves to it and
    the version it replaces keeps `previous`. A failure deletes the half-made version: none
    exists without its tags and alias decision."""
    mv = None
    try:
        mv = mlflow.register_model(model_uri, model_name, tags=tags)
        client.update_model_version(model_name, mv.version, description=description[:5000])
        if promoted:
            if champion is not None:
                client.set_registered_model_alias(model_name, names.PREVIOUS_ALIAS, champion.version)
            client.set_registered_model_alias(model_name, names.CHAMPION_ALIAS, mv.version)
    except BaseException:
        if mv is not None:
            client.delete_model_version(model_name, mv.version)
        raise
    return mv


def _holding(client: MlflowClient, model_name: str, sha: str) -> VersionRecord | None:
    """The version of `model_name` whose adapter has these weights, if any."""
    return next(
        (mv for mv in _versions(client, model_name) if mv.tags.get(names.VERSION_ADAPTER_SHA) == sha), None
    )


def _log_model(adapter_dir: str | Path) -> Any:
    """Log the adapter as a pyfunc model from code into the active run; its ModelInfo.
    mlflow.pyfunc.log_model, without serving the input example to check it (see _Pyfunc)."""
    return Model.log(
        None,
        _Pyfunc,
        name=names.MODEL_ARTIFACT,
        flavor_name="pyfunc.ModelFromCode",
        validate_serving_input=False,
        python_model=str(Path(pyfunc.__file__)),
        artifacts={"adapter": str(adapter_dir)},
        code_paths=[str(PACKAGE_DIR)],
        pip_requirements=model_requirements(),
        signature=SIGNATURE,
        input_example=EXAMPLE,
    )


def _version_tags(
    candidate: Candidate,
    sha: str,
    base: dict[str, Any],
    rule: Rule,
    verdict: Verdict,
    champion: VersionRecord | None,
    extra: dict[str, Any],
) -> dict[str, str]:
    """A new version's tags: where it came from, how it scored and on which runs, the promotion
    rule and the interval it was judged on, then the caller's (None values left out)."""
    out = {
        names.VERSION_SOURCE_RUN: candidate.run_id,
        names.VERSION_EVAL_LOSS: f"{candidate.eval_loss:.6f}",
        names.VERSION_EVAL_FINGERPRINT: candidate.eval_fingerprint,
        names.VERSION_ADAPTER_SHA: sha,
        names.VERSION_BASE_MODEL: base.get("name_or_path", ""),
        names.VERSION_OBJECTIVE: candidate.objective,
        names.VERSION_OBJECTIVE_VALUE: f"{candidate.score:.6f}",
        names.VERSION_OBJECTIVE_FINGERPRINT: candidate.score_fingerprint,
        names.VERSION_SCORED_RUNS: ",".join(f"{s.seed}:{s.run_id}" for s in candidate.scores)
        or f":{candidate.run_id}",
        names.VERSION_PROMOTION_RULE: rule.text(),
    }
    if candidate.stderr is not None:
        out[names.VERSION_OBJECTIVE_STDERR] = f"{candidate.stderr:.6f}"
    if verdict.interval is not None and champion is not None:
        out[names.VERSION_VS_CHAMPION] = f"{verdict.interval.text()} (v{champion.version})"
    out.update(
        {k: (f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in extra.items() if v is not None}
    )
    return out


class _Pyfunc:
    """mlflow.pyfunc as the flavor `Model.log` saves with, minus the check that serves the input
    example: it loads the base model and generates (minutes, and a second copy in GPU memory next
    to the one just trained, for a 7B model). MLflow's transformers flavor skips it the same way
    for a model given as a path; the serving test covers what it would check."""

    @staticmethod
    def save_model(*, validate_serving_input: bool = False, **kwargs: Any) -> None:
        mlflow.pyfunc.save_model(**kwargs)


def version_description(
    candidate: Candidate,
    config_yaml: str,
    *,
    experiment_id: str,
    role: str,
    metrics: dict[str, float] | None = None,
    search_run_id: str | None = None,
    baseline_eval_loss: float | None = None,
    improvement_pct: float | None = None,
    interval: Interval | None = None,
    rule: Rule | None = None,
) -> str:
    """A version's description (markdown): the run that trained the adapter (`role`: a search
    trial or a retrain) and its search, linked into the MLflow UI; eval loss, the objective it
    was judged on, task metrics (`lmeval_*`), the change against the baseline when known (given,
    or from `baseline_eval_loss`) with its confidence interval when known, the promotion rule;
    then the config as YAML. `promote` adds its decision."""
    url, run_id = tracking.run_url, candidate.run_id
    rows = [("source run", f"{role} [`{run_id}`]({url(experiment_id, run_id)}), experiment {experiment_id}")]
    if search_run_id:
        rows.append(("search run", f"[`{search_run_id}`]({url(experiment_id, search_run_id)})"))
    rows.append((names.EVAL_LOSS, f"{candidate.eval_loss:.4f}"))
    goal = "minimized" if candidate.minimize else "maximized"
    rows.append(("objective", f"{candidate.objective} = {candidate.score:.4f} ({goal})"))
    rows += [(k, f"{v:.4f}") for k, v in sorted((metrics or {}).items()) if k.startswith(names.LMEVAL_PREFIX)]
    if improvement_pct is None and baseline_eval_loss:
        improvement_pct = 100.0 * (baseline_eval_loss - candidate.eval_loss) / baseline_eval_loss
    if improvement_pct is not None:
        base = f" ({baseline_eval_loss:.4f})" if baseline_eval_loss else ""
        side = "below" if improvement_pct >= 0 else "above"
        rows.append(("vs baseline", f"eval_loss {abs(improvement_pct):.1f} % {side} the baseline's{base}"))
    if interval is not None:
        rows.append(("improvement on the baseline", f"{candidate.objective}: {interval.text()}"))
    if rule is not None:
        rows.append(("promotion rule", rule.text()))
    header = "\n".join(["| provenance | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)])
    room = 4900 - len(header)  # MLflow keeps the first 5000 characters
    if len(config_yaml) > room:
        config_yaml = config_yaml[:room] + "\n# ... cut here: the run's config.yaml has it all\n"
    return f"{header}\n\n**Config**\n\n```yaml\n{config_yaml.rstrip()}\n```\n"


def check_model_uri(uri: str) -> str:
    """A `models:/name@alias` or `models:/name/version` URI whose model and alias/version exist.

    Raises PipelineError naming what is missing (and what is there)."""
    m = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))?", uri)
    if not m:
        raise PipelineError(f"--model: {uri!r} is not models:/<name>@<alias> or models:/<name>/<version>")
    name, alias, version = m.groups()
    client = MlflowClient()
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        known = ", ".join(sorted(r.name for r in client.search_registered_models())) or "none"
        raise PipelineError(f"--model: no registered model {name!r} (registered: {known})") from None
    if alias:
        if _version_at_alias(client, name, alias) is None:
            aliases = ", ".join(sorted(registered.aliases or {})) or "none"
            raise PipelineError(
                f"--model: registered model {name!r} has no alias {alias!r} (aliases: {aliases})"
            )
    elif version:
        try:
            client.get_model_version(name, version)
        except MlflowException:
            raise PipelineError(f"--model: registered model {name!r} has no version {version}") from None
    else:
        uri = f"models:/{name}@{names.CHAMPION_ALIAS}"
        return check_model_uri(uri)
    return uri


def download_adapter(uri: str, dst: str | Path) -> Path:
    """The adapter folder of a registered version (loads with plain `PeftModel.from_pretrained`)."""
    root = Path(mlflow.artifacts.download_artifacts(check_model_uri(uri), dst_path=str(dst)))
    # artifacts/adapter/ for every version the pipeline registers; found by its contents anyway.
    found = sorted((root / "artifacts").rglob(names.BASE_REFERENCE_FILE))
    if not found:
        raise PipelineError(f"--model: {uri} holds no adapter ({names.BASE_REFERENCE_FILE} missing)")
    return found[0].parent


def load_registered(uri: str) -> Any:
    """The pyfunc model of a checked models:/ URI (base + adapter, ready to predict)."""
    return mlflow.pyfunc.load_model(check_model_uri(uri))


def _versions(client: MlflowClient, name: str) -> list[VersionRecord]:
    try:
        return [_version(mv) for mv in client.search_model_versions(f"name = '{name}'")]
    except MlflowException:
        return []
