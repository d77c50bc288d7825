"""Dotted key paths into the config (`lora.r`, `search.parameters.lora.r.values`): the field a
path names, the kind of value it holds, and a path as the YAML nests it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from pipeline.config.sections import SECTIONS


def key_path(key: str) -> tuple[str, ...]:
    """A dotted key as the YAML's path: `search.parameters.lora.r.values` -> ("search",
    "parameters", "lora.r", "values"): a search parameter's name is one key with dots in it."""
    parts = tuple(key.split("."))
    if parts[:2] == ("search", "parameters") and len(parts) > 3:
        return (*parts[:2], ".".join(parts[2:4]), *parts[4:])
    return parts


def config_field(path: str) -> Any | None:
    """The pydantic field at a dotted key path of the config (leaf values, not of the search
    section), or None. What a search dimension may vary."""
    parts = path.split(".")
    model: Any = SECTIONS.get(parts[0])
    if model is None or len(parts) < 2:
        return None
    for i, part in enumerate(parts[1:], 1):
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        field = fields[part]
        if i == len(parts) - 1:
            return (
                None
                if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
                else field
            )
        model = field.annotation
    return None


def value_kind(path: str, values: list[Any]) -> Literal["int", "float", "bool", "str"]:
    """The type of the config key at `path` (int, float, bool or str), from its field's
    annotation, else from the values a search gives it."""
    field = config_field(path)
    annotation = field.annotation if field is not None else None
    args = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
    if args and all(isinstance(a, type) for a in args):
        annotation = args[0]
    for kind, name in ((bool, "bool"), (int, "int"), (float, "float")):
        if annotation is kind:
            return name  # type: ignore[return-value]
    if all(isinstance(v, bool) for v in values):
        return "bool"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "int"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return "float"
    return "str"
