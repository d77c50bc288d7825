"""Command line: `python -m pipeline <command>`. Entry points are a few lines each.

Bad input (config, data, model) prints one line, `error: ...`, and exits with code 2. A trial
that fails at run time (NaN loss) exits with code 1.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from pipeline.config import load_config, to_yaml
from pipeline.core import console, names, outer_run
from pipeline.core.errors import USER_ERROR_EXIT_CODE, PipelineError, SearchFinished, TrialFailed
from pipeline.data.inputs import check_inputs

DEFAULT_CONFIG = "configs/demo-cpu.yaml"

_set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key, e.g. --set train.learning_rate=1e-4. Repeatable; one option may "
    "hold several space-separated pairs (as MLproject's `set` parameter does).",
)
_config_option = click.option(
    "--config",
    "config_path",
    default=DEFAULT_CONFIG,
    show_default=True,
    help="YAML config file.",
)
_quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars; warnings only (CI logs).")


class _OptionalNumber(click.ParamType):
    """A number, or an empty string for "not given" (MLproject parameters default to "")."""

    def __init__(self, kind: type):
        self.kind = kind
        self.name = kind.__name__

    def convert(self, value, param, ctx):
        if value is None or value == "" or isinstance(value, self.kind):
            return None if value == "" else value
        try:
            return self.kind(value)
        except ValueError:
            self.fail(f"{value!r} is not a valid {self.name}", param, ctx)


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    console.silence_library_noise(quiet)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lora-pipeline")
@click.option(
    "--verbose",
    "-v",
    is_flag=True,
    help=f"Print the full traceback of a failure (also: {console.DEBUG_ENV}=1). Without it, a failed "
    f"run keeps its traceback as the artifact {names.ERROR_FILE}.",
)
def cli(verbose: bool) -> None:
    """Find and ship the best LoRA adapter: baseline fine-tune, Ax search, retrain, all in MLflow."""
    console.set_debug(verbose)


@cli.command()
@_config_option
@_set_option
@_quiet_option
def baseline(config_path: str, overrides: tuple[str, ...], quiet: bool) -> None:
    """One LoRA (or 4-bit QLoRA) fine-tune with the config, tracked as an MLflow run."""
    _setup_logging(quiet)
    config = load_config(config_path, overrides, search=False)  # the baseline does not search
    check_inputs(config)  # before the heavy imports: a bad path answers in a second
    from pipeline.trial.run import RunSpec, run_trial

    result = run_trial(config, RunSpec(names.ROLE_BASELINE), quiet=quiet)
    parts = [f"{k}={v:.4f}" for k, v in result.metrics.items() if k.startswith("eval_")]
    click.echo(
        f"baseline run {result.run_id}: {' '.join(parts)} ({result.steps} steps, {result.wall_seconds:.0f}s)"
    )
    click.echo(f"adapter: {result.adapter_uri} (local copy: {result.adapter_dir})")


@cli.command()
@_config_option
@_set_option
@click.option(
    "--n-trials", type=_OptionalNumber(int), default=None, help="Trials to run (default: search.n_trials)."
)
@click.option("--resume", default=None, metavar="RUN_ID", help="Continue the search of this parent run.")
@click.option(
    "--budget-minutes",
    type=_OptionalNumber(float),
    default=None,
    help="Wall-clock budget (default: search.budget_minutes).",
)
@_quiet_option
def search(
    config_path: str,
    overrides: tuple[str, ...],
    n_trials: int | None,
    resume: str | None,
    budget_minutes: float | None,
    quiet: bool,
) -> None:
    """Bayesian search (Ax) over the config's search space; every trial a nested MLflow run."""
    _setup_logging(quiet)
    # The file and its overrides answer before the heavy imports (a resumed search's own config
    # comes from its run, below).
    local = load_config(config_path, overrides)
    if not resume:
        check_inputs(local)
    from pipeline.search import SearchAborted, run_search, search_config

    config = search_config(
        config_path, list(overrides), resume or None, n_trials, budget_minutes, loaded=local
    )
    try:
        result = run_search(config, resume=resume or None, quiet=quiet)
    except SearchFinished as e:
        click.echo(str(e))
        outer = outer_run.outer_run_id()
        if outer and outer != resume:  # `mlflow run` made a run for this invocation: it holds nothing
            from pipeline import tracking

            tracking.discard_run(outer)
        return
    except SearchAborted as e:
        click.echo(f"error: {e}", err=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        click.echo("interrupted: state saved; continue with --resume <search run id>", err=True)
        raise SystemExit(130) from None
    best = result.best
    click.echo(
        f"search run {result.parent_run_id}: best "
        + (f"trial {best.index} eval_loss {best.eval_loss:.4f} (run {best.run_id})" if best else "none")
    )
    if result.best_config_path:
        click.echo(f"best config: {result.best_config_path}")


@cli.command()
@_config_option
@_set_option
@click.option(
    "--from-search", default=None, metavar="RUN_ID", help="Retrain the best config of this search run."
)
@click.option(
    "--best-config", default=None, metavar="PATH", help="Retrain this config file (a best_config.yaml)."
)
@click.option(
    "--allow-duplicate",
    type=click.BOOL,
    default=False,
    show_default=True,
    help="Register even if the same adapter is already a version (true/false).",
)
@click.option(
    "--resume",
    default=None,
    metavar="RUN_ID",
    help="Continue this interrupted retrain run from its last checkpoint (with the config it started with).",
)
@_quiet_option
def retrain(
    config_path: str,
    overrides: tuple[str, ...],
    from_search: str | None,
    best_config: str | None,
    allow_duplicate: bool,
    resume: str | None,
    quiet: bool,
) -> None:
    """Train the best config longer; register it; move `champion` only if it is better.

    Without --from-search or --best-config, the search behind the current champion of the
    config's registry.model_name is retrained. --resume continues an interrupted retrain."""
    _setup_logging(quiet)
    # Both configs answer before the heavy imports; the files of the one that trains are checked.
    base = load_config(config_path, overrides, search=False)
    check_inputs(load_config(best_config, overrides, search=False) if best_config else base)
    from pipeline.retrain import run_retrain

    out = run_retrain(
        config_path,
        list(overrides),
        from_search or None,
        best_config or None,
        allow_duplicate,
        quiet,
        resume=resume or None,
    )
    r = out.result
    click.echo(
        f"retrain run {r.run_id}: eval_loss {r.eval_loss:.4f} ({r.steps} steps); source: {out.source.description}"
    )
    click.echo(f"report: {out.report_path}")


@cli.command()
@click.option(
    "--model",
    "model_uri",
    required=True,
    help="models:/<name>@<alias>, models:/<name>/<version>, runs:/<run id>/adapter or an adapter folder.",
)
@click.option("--prompt", "prompts", multiple=True, required=True, help="A user prompt (repeatable).")
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@_config_option
def generate(model_uri: str, prompts: tuple[str, ...], max_new_tokens: int, config_path: str) -> None:
    """Answer prompts with a registered model or an adapter (base model + adapter, greedy)."""
    _setup_logging(True)
    from pipeline import tracking

    tracking.use_store(load_config(config_path).tracking)
    if model_uri.startswith("models:/"):
        from pipeline.registry import versions as registry

        answers = registry.load_registered(model_uri).predict(
            list(prompts), params={"max_new_tokens": max_new_tokens}
        )
    else:
        from pipeline.model.adapter import generate_answers, load_adapter

        folder = model_uri
        if model_uri.startswith("runs:/"):
            import tempfile

            run_id, _, path = model_uri[len("runs:/") :].partition("/")
            folder = tracking.download_artifacts(run_id, path or "adapter", tempfile.mkdtemp())
        elif not Path(model_uri).is_dir():
            raise PipelineError(
                f"--model: {model_uri!r} is not a models:/ or runs:/ URI nor an adapter folder"
            )
        model, tokenizer = load_adapter(folder)
        answers = generate_answers(model, tokenizer, list(prompts), max_new_tokens)
    for prompt, answer in zip(prompts, answers, strict=True):
        click.echo(f"> {prompt}\n{answer}")


@cli.group()
def config() -> None:
    """Inspect and check configs."""


@config.command("show")
@_config_option
@_set_option
def config_show(config_path: str, overrides: tuple[str, ...]) -> None:
    """Print the resolved config (defaults filled in, overrides applied)."""
    click.echo(to_yaml(load_config(config_path, overrides), f"resolved from {config_path}"), nl=False)


@config.command("docs")
def config_docs() -> None:
    """Print the configuration reference (docs/configuration.md) generated from the schema."""
    from pipeline.config import reference_markdown

    click.echo(reference_markdown(), nl=False)


@config.command("check")
@click.argument("paths", nargs=-1, required=True)
def config_check(paths: tuple[str, ...]) -> None:
    """Validate config files; report every problem of every file."""
    failed = 0
    for path in paths:
        try:
            config = load_config(path)
            click.echo(f"ok: {path}")
        except PipelineError as e:
            failed += 1
            click.echo(f"error: {e}", err=True)
            continue
        from pipeline.model.device import cannot_run_here

        for problem in cannot_run_here(config, space=True):
            click.echo(f"warning: {path}: on this machine: {problem}", err=True)
    if failed:
        raise SystemExit(USER_ERROR_EXIT_CODE)


@cli.command()
@_config_option
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Interface to bind (loopback by default)."
)
@click.option("--port", default=5000, show_default=True, type=int)
def ui(config_path: str, host: str, port: int) -> None:
    """Serve the MLflow UI over the config's tracking store (the one the runs were logged to)."""
    import subprocess

    from pipeline import tracking

    config = load_config(config_path)
    uri = tracking.resolve_tracking_uri(config.tracking)
    if uri.startswith("http"):
        raise PipelineError(f"tracking store {uri} is already a server: open it in a browser")
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise PipelineError(
            f"tracking store {uri}: no such file here; run a baseline or search first, or set "
            "MLFLOW_TRACKING_URI"
        )
    click.echo(f"MLflow UI for {uri} at http://{host}:{port}  (Ctrl-C stops it)")
    try:
        raise SystemExit(subprocess.call(tracking.server_command(uri, host, port)))
    except KeyboardInterrupt:
        raise SystemExit(0) from None


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; turn user errors into one line and exit code 2."""
    # `mlflow run` creates the run before this process starts; if we fail before resuming it,
    # record why (mlflow marks it FAILED from our exit code).
    outer = outer_run.outer_run_id()
    try:
        cli.main(args=argv, prog_name="python -m pipeline", standalone_mode=False)
    except click.exceptions.Exit as e:
        raise SystemExit(e.exit_code) from None
    except click.ClickException as e:
        e.show()
        raise SystemExit(USER_ERROR_EXIT_CODE) from None
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        raise SystemExit(130) from None
    except PipelineError as e:
        _fail(outer, str(e))
        raise SystemExit(USER_ERROR_EXIT_CODE) from None
    except TrialFailed as e:
        if isinstance(e.__cause__, PipelineError):  # bad input found only once training began
            _fail(outer, str(e.__cause__))
            raise SystemExit(USER_ERROR_EXIT_CODE) from None
        _fail(outer, f"trial failed: {e}{e.where()}")
        raise SystemExit(1) from None


def _fail(outer_run: str | None, message: str) -> None:
    click.echo(f"error: {message}", err=True)
    if outer_run:
        from pipeline import tracking

        try:
            tracking.mark_failed(outer_run, message)
        except Exception as e:  # the store itself may be the problem; the message above stands
            click.echo(f"(could not mark run {outer_run} failed: {e})", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
    sys.exit(0)
