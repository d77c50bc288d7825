"""Loading a config: YAML with line numbers, `--set key=value` overrides, validation that
reports every problem at once with its key path (and file line), and plain views of a config
(dict, YAML, dotted params, fingerprints)."""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.config import messages
from pipeline.config.keys import config_field
from pipeline.config.schema import RESULT_SECTIONS, PipelineConfig
from pipeline.core.errors import ConfigError


def _line_map(root: yaml.Node | None) -> dict[tuple[str, ...], int]:
    """Map each key path of a YAML mapping to its 1-based line (the first, if it repeats)."""
    lines: dict[tuple[str, ...], int] = {}
    for path, line in _keys(root, ()):
        lines.setdefault(path, line)
    return lines


def _keys(node: yaml.Node | None, path: tuple[str, ...]) -> Iterable[tuple[tuple[str, ...], int]]:
    """(key path, 1-based line) of every key of a YAML mapping, at any depth, in file order."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            p = (*path, str(key.value))
            yield p, key.start_mark.line + 1
            yield from _keys(value, p)


def _duplicate_keys(node: yaml.Node | None, source: str, path: tuple[str, ...] = ()) -> list[str]:
    """`file:line: key.path: defined twice (first at line N)` for every key a mapping repeats:
    PyYAML keeps the last one silently, so a second `train:` would replace the first."""
    if not isinstance(node, yaml.MappingNode):
        return []
    first: dict[str, int] = {}
    problems = []
    for key, value in node.value:
        name, line = str(key.value), key.start_mark.line + 1
        if name in first:
            where = ".".join((*path, name))
            problems.append(f"{source}:{line}: {where}: defined twice (first at line {first[name]})")
        first.setdefault(name, line)
        problems += _duplicate_keys(value, source, (*path, name))
    return problems


def parse_overrides(items: Iterable[str]) -> list[tuple[str, Any]]:
    """Parse `key.path=value` items; each item may hold several, space-separated (shell quoting)."""
    pairs: list[tuple[str, Any]] = []
    for item in items:
        for token in shlex.split(item or ""):
            key, sep, raw = token.partition("=")
            if not sep or not key:
                raise ConfigError("--set", [f"{token!r}: expected key.path=value"])
            try:
                value = yaml.safe_load(raw) if raw != "" else ""
            except yaml.YAMLError:
                value = raw
            pairs.append((key.strip(), value))
    return pairs


def select_overrides(items: Iterable[str], prefix: str, keep: bool = True) -> list[str]:
    """The `key=value` tokens whose key starts (keep) or does not start (not keep) with prefix."""
    tokens = [t for item in items for t in shlex.split(item or "")]
    return [shlex.quote(t) for t in tokens if t.split("=", 1)[0].startswith(prefix) == keep]


def apply_overrides(data: dict, overrides: list[tuple[str, Any]]) -> dict:
    """Set dotted keys in a nested dict (creating sections as needed)."""
    for key, value in overrides:
        parts = key.split(".")
        if parts[:2] == ["search", "parameters"] and len(parts) > 2:
            _override_search_parameter(data, parts[2:], value)
            continue
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError("--set", [f"{key}: {where} is a value, not a section"])
            node = child
        node[parts[-1]] = value
    return data


def _override_search_parameter(data: dict, rest: list[str], value: Any) -> None:
    """`search.parameters.lora.r.values=[4,8]`: parameter names hold dots themselves, so the name
    is the longest prefix that is a parameter already or a config key."""
    search = data.get("search") if isinstance(data.get("search"), dict) else data.setdefault("search", {})
    params = (
        search.get("parameters")
        if isinstance(search.get("parameters"), dict)
        else search.setdefault("parameters", {})
    )
    known = [
        c for c in range(len(rest), 0, -1) if ".".join(rest[:c]) in params or config_field(".".join(rest[:c]))
    ]
    cut = known[0] if known else len(rest)  # an unknown name is reported by validation
    name, field_path = ".".join(rest[:cut]), rest[cut:]
    if not field_path:
        params[name] = value
    elif len(field_path) == 1:
        spec = params.get(name)
        params[name] = {**(spec if isinstance(spec, dict) else {}), field_path[0]: value}
    else:
        raise ConfigError("--set", [f"search.parameters.{'.'.join(rest)}: a parameter has no nested keys"])


def validate(
    data: Any,
    source: str = "<config>",
    lines: Mapping[tuple[str, ...], int] | None = None,
    labels: Mapping[str, str] | None = None,
) -> PipelineConfig:
    """Validate a plain dict into a PipelineConfig; raise ConfigError with every problem.

    `lines` maps key paths to their line in `source` (a problem there says `file:line`);
    `labels` names where overridden keys came from (`--set train.lr`, `--n-trials`): a problem
    with such a key is reported under that name instead of a file line."""
    if not isinstance(data, dict):
        raise ConfigError(source, ["the file must hold a mapping of sections (model:, data:, ...)"])
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(
            source, messages.problems(PipelineConfig, e.errors(), dict(lines or {}), labels or {}, source)
        ) from None


def load_config(path: str | Path, overrides: Iterable[str] = (), search: bool = True) -> PipelineConfig:
    """Read a YAML config, apply `key=value` overrides, validate once.

    `search=False` (a command that does not search: baseline, retrain) drops the file's search
    section and the `search.*` overrides before validation, so that only what the command uses
    is checked: a baseline is not refused over a rule of the search's."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(path), [f"cannot read the file ({e.strerror or e})"]) from None
    try:  # parsed once: the node tree gives the lines and the duplicates, then the data
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = (yaml.SafeLoader("").construct_document(node) if node is not None else None) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(where, [f"not valid YAML: {getattr(e, 'problem', e)}"]) from None
    repeated = _duplicate_keys(node, str(path))
    if repeated:
        raise ConfigError(str(path), repeated)
    if not search:
        overrides = select_overrides(overrides, "search.", keep=False)
        if isinstance(data, dict):
            data.pop("search", None)
    pairs = parse_overrides(overrides)
    if isinstance(data, dict):
        apply_overrides(data, pairs)
    return validate(data, str(path), _line_map(node), {k: f"--set {k}" for k, _ in pairs})


# Views of a config


def to_dict(config: PipelineConfig) -> dict:
    return config.model_dump(mode="json")


def to_yaml(config: PipelineConfig, header: str | None = None) -> str:
    body = yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)
    return (f"# {header}\n" if header else "") + body


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"lora": {"r": 8}}` -> `{"lora.r": 8}`; lists are kept as values."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def fingerprint(payload: Any) -> str:
    """Short, stable sha256 of JSON-serializable data."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Where a trial trains and what happens when it fails, not what it trains: out of its fingerprint
# (a baseline is reused), free to change when a search resumes, ignored by warm start.
NO_RESULT_KEYS = ("train.output_dir", "train.checkpoints", "train.keep_checkpoints", "train.oom_retry")


def noise_key(config: PipelineConfig) -> str:
    """Whose seed noise a race remembers: the same model, data, eval set and training length
    (the searched LoRA and optimizer values vary within a search, and its noise pools over them)."""
    d = to_dict(config)
    train = {k: d["train"].get(k) for k in ("max_steps", "epochs")}
    return fingerprint({"model": d["model"], "data": d["data"], "eval": d["eval"], "train": train})


def config_fingerprint(config: PipelineConfig) -> str:
    """Fingerprint of what decides a trial's result: model, data, lora, train and eval settings."""
    d = to_dict(config)
    for key in NO_RESULT_KEYS:
        section, name = key.split(".")
        d[section].pop(name, None)
    for key, default in ADDED_AT_DEFAULT.items():
        section, name = key.split(".")
        if d[section].get(name, default) == default:
            d[section].pop(name, None)
    return fingerprint({k: d[k] for k in RESULT_SECTIONS})


# Keys added after fingerprints were first recorded: at these values a config trains exactly as
# before they existed, so they stay out of its fingerprint (an earlier baseline is still reused).
ADDED_AT_DEFAULT: dict[str, Any] = {
    "lora.use_dora": False,
    "lora.init": "default",
    "lora.pissa_iterations": None,
    "lora.eva_rho": 2.0,
    "train.loraplus_lr_ratio": None,
}


def values_at(config: PipelineConfig, keys: Iterable[str]) -> dict[str, Any]:
    """The config's values at dotted keys (`lora.r` -> 8): what a trial of these keys trains."""
    data = to_dict(config)
    out = {}
    for key in keys:
        node: Any = data
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


def with_overrides(
    config: PipelineConfig,
    values: Mapping[str, Any],
    source: str = "<overrides>",
    labels: Mapping[str, str] | None = None,
) -> PipelineConfig:
    """A new validated config with dotted keys set (a search trial's parameters, the CLI's
    --n-trials). Problems are reported under `labels[key]` (default `--set key`)."""
    data = to_dict(config)
    pairs = list(values.items())
    apply_overrides(data, pairs)
    return validate(data, source, labels={k: (labels or {}).get(k, f"--set {k}") for k, _ in pairs})


def trial_config(config: PipelineConfig, parameters: Mapping[str, Any] | None = None) -> PipelineConfig:
    """What a trial trains: the config without its search section (a trial searches nothing),
    with the trial's parameters set. Baseline, trials, replicates, warm start and best_config.yaml
    all start here, so a value fixed by a trial is never checked against the space it came from."""
    base = config.model_copy(update={"search": None})
    return with_overrides(base, parameters) if parameters else base
