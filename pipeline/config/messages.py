"""Pydantic's errors as the lines a user reads: `file:line: key.path: message` (or `--set key:
message`), one line per key, in words.

Pydantic reports a value that fits no member of a union once per member (`lora.target_modules.
literal['all-linear','attention','mlp']`, `lora.target_modules.list[str]`): those are folded into
one line that says what the key accepts, so no type name of pydantic's reaches the user.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from pydantic import BaseModel

from pipeline.config.keys import key_path
from pipeline.config.sections import PROBLEM_SEPARATOR

Lines = Mapping[tuple[str, ...], int]


def describe(annotation: Any) -> str:
    """What a type accepts, in words: `Literal['a', 'b'] | list[str]` -> "one of a, b, or a list of text"."""
    accepts = getattr(annotation, "accepts", None)
    if isinstance(accepts, str):
        return accepts
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        words = [describe(a) for a in args if a is not type(None)]
        nullable = len(words) < len(args)
        text = ", ".join(words[:-1]) + (" or " if len(words) > 1 else "") + words[-1]
        return text + (" (or null)" if nullable else "")
    if origin is list:
        return f"a list of {_plural(describe(args[0]))}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a mapping of the keys " + ", ".join(annotation.model_fields)
    return {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(
        annotation, "a value"
    )


def _plural(words: str) -> str:
    return {"text": "text values", "an integer": "integers", "a number": "numbers"}.get(words, words)


def _field_at(root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[int, str]:
    """How much of `loc` names config keys (the rest is a union member's tag), and what the key
    there accepts, in words (a field's own `accepts`, else its type's)."""
    depth, annotation, words = _walk(root, loc)
    return depth, words or describe(annotation)


def _walk(root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[int, Any, str | None]:
    """(how much of `loc` names config keys, the type there, its field's own `accepts` words)."""
    annotation: Any = root
    words: str | None = None
    for depth, part in enumerate(loc):
        inner = _without_none(annotation)
        origin = typing.get_origin(inner)
        if isinstance(inner, type) and issubclass(inner, BaseModel) and str(part) in inner.model_fields:
            field = inner.model_fields[str(part)]
            annotation = field.annotation
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            words = extra.get("accepts")
        elif origin is dict:
            annotation, words = typing.get_args(inner)[1], None
        elif origin is list and isinstance(part, int):
            annotation, words = typing.get_args(inner)[0], None
        elif origin in (Union, types.UnionType):
            return depth, annotation, words  # a union's member tag (`list[str]`)
        else:
            break  # an unknown key, or a value's own error
    return len(loc), annotation, words


def _unknown(root: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """`unknown key`, with the nearest key of its section when the name looks like a typo."""
    _, section, _ = _walk(root, loc[:-1])
    section = _without_none(section)
    if loc and isinstance(section, type) and issubclass(section, BaseModel):
        near = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1, cutoff=0.75)
        if near:
            return f"unknown key (did you mean {near[0]}?)"
    return "unknown key"


def _without_none(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def problems(
    root: type[BaseModel],
    errors: list[Mapping[str, Any]],
    lines: Lines,
    labels: Mapping[str, str],
    source: str,
) -> list[str]:
    """Every error as lines `file:line: key.path: message`, one line per key path."""
    out: list[str] = []
    seen: set[tuple] = set()
    for err in errors:
        loc = tuple(err["loc"])
        depth, accepts = _field_at(root, loc)
        if depth < len(loc) or err["type"] in ("model_type", "model_attributes_type", "dict_type"):
            key = loc[:depth]
            if key in seen:
                continue  # the other members of the same union
            seen.add(key)
            given = err.get("input")
            msg = f"must be {accepts}" + ("" if isinstance(given, dict) else f" (got {given!r})")
            out.append(place(tuple(map(str, key)), msg, lines, labels, source))
            continue
        if err["type"] == "extra_forbidden":
            out.append(place(tuple(map(str, loc)), _unknown(root, loc), lines, labels, source))
            continue
        out += _format(err, tuple(map(str, loc)), lines, labels, source)
    return out


def _format(
    err: Mapping[str, Any], loc: tuple[str, ...], lines: Lines, labels: Mapping[str, str], source: str
):
    if err["type"] == "missing":
        msg = "required key is missing"
    else:
        msg = err["msg"].removeprefix("Value error, ")
        given = err.get("input")
        # The message names it already (a number may appear as a limit: `greater than 0`).
        quoted = not isinstance(given, (int, float)) and repr(given) in msg
        if "input" in err and not isinstance(given, dict) and not quoted:
            msg += f" (got {given!r})"
    out = []
    for problem in msg.split(PROBLEM_SEPARATOR):
        # A check across keys leads each problem with the key at fault: point at that key's line
        # (for a mapping such as search.parameters, the entry's own line).
        key, sep, text = problem.partition(": ")
        if sep and not loc and " " not in key:
            out.append(place(key_path(key), text, lines, labels, source))
        elif sep and ((*loc, key) in lines or " " not in key):
            out.append(place((*loc, key), text, lines, labels, source))
        else:
            out.append(place(loc, problem, lines, labels, source))
    return out


def place(loc: tuple[str, ...], msg: str, lines: Lines, labels: Mapping[str, str], source: str) -> str:
    """`msg` about the key at `loc`, led by where its value came from: the `--set` (or other
    option) that gave it, else the line of the deepest key present in the file."""
    path = ".".join(loc)
    for depth in range(len(loc), 0, -1):
        label = labels.get(".".join(loc[:depth]))
        if label:
            return f"{label}: {msg}" if depth == len(loc) else f"{label}: {path}: {msg}"
    for depth in range(len(loc), 0, -1):
        if loc[:depth] in lines:
            return f"{source}:{lines[loc[:depth]]}: {path}: {msg}"
    return f"{path}: {msg}" if path else msg
