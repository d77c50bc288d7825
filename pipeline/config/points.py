"""Every value a search space allows, checked as if it were the config's own, before a run exists.

A trial's config is the config with the trial's values set, and it is validated when the trial
starts: a value the space allows but the key refuses (`lora.init: pisa`, a LoRA+ ratio of 0, a
range bound below a key's minimum) or a combination the rules refuse (`lora.pissa_iterations`
without `lora.init: pissa`, PiSSA on a 4-bit base) would fail trial after trial, or never be drawn
and leave a champion from a space that could not run. So the space's points are checked here:

- a *reference point*: each parameter at the config's own value when the space allows it, else
  its first value (a range: its low bound);
- every value of every parameter (a range: both bounds and the point between them), the others
  at the reference;
- every pair of values of two parameters, the others at the reference (the rules in force relate
  two keys at most).

A conditional parameter is set only where its parent holds the value it exists under (the parent
is set to that value to check it); a point that breaks a linear `search.constraints` is not one
Ax would propose and is skipped. A problem is reported once, on the smallest change from the
reference that shows it, led by the parameter at fault (the loader points at its line).
"""

from __future__ import annotations

import ast
import copy
import itertools
import math
import operator
import re
from collections.abc import Callable, Iterable
from typing import Any

from pipeline.config.keys import value_kind
from pipeline.config.parameters import ParameterSpec

Check = Callable[[dict], list[str]]
COMBINATION = "(a combination search.parameters allows)"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def candidates(name: str, spec: ParameterSpec) -> list[tuple[str, Any]]:
    """(how to name it, value) for the values of a parameter that are checked."""
    if spec.type != "range":
        return [("value", v) for v in spec.choices()]
    low, high = spec.bounds
    if value_kind(name, [low, high]) == "int":
        low, high = int(low), int(high)
        between = [(low + high) // 2] if high - low > 1 else []
    else:
        between = [math.sqrt(low * high) if spec.log else (low + high) / 2]
    return [("bound", low), ("bound", high), *(("value", v) for v in between)]


def problems(
    base: dict,
    params: dict[str, ParameterSpec],
    parents: dict[str, tuple[str, Any]],
    constraints: Iterable[str],
    check: Check,
) -> list[str]:
    """Every problem `check` finds at the space's points of a config (`base`: its dict, without
    the search section), each led by `search.parameters.<the parameter at fault>`."""
    cands = {n: candidates(n, s) for n, s in params.items()}
    reference = {n: _reference(base, n, c) for n, c in cands.items()}
    rules = [_constraint(c) for c in constraints]
    memo: dict[tuple, list[str]] = {}

    def point(changes: dict[str, Any]) -> dict[str, Any] | None:
        """The reference with `changes` and the parent values they need; None if they clash or
        a linear constraint refuses the point."""
        values = {**reference, **changes}
        for name in changes:
            node = name
            while node in parents:
                parent, needed = parents[node]
                if parent in changes and changes[parent] != needed:
                    return None  # this parameter does not exist under the parent's value
                values[parent] = needed
                node = parent
        values = {n: v for n, v in values.items() if _active(n, values, parents)}
        if not all(rule(values) for rule in rules):
            return None
        return values

    def found(values: dict[str, Any]) -> list[str]:
        key = tuple(sorted((n, repr(v)) for n, v in values.items()))
        if key not in memo:
            data = copy.deepcopy(base)
            for name, value in values.items():
                _set(data, name, value)
            memo[key] = check(data)
        return memo[key]

    out: list[str] = []

    def blame(name: str, label: str, value: Any, found_here: list[str]) -> None:
        """Problems of one parameter's value, with how to make it conditional where that helps."""
        lines = [f"search.parameters.{name}: {label} {value!r}: {_about(p, name, value)}" for p in found_here]
        if lines:
            lines[-1] += _dependent_hint(name, value, found_here, cands, parents, point, found)
        out.extend(lines)

    ref_point = point({})
    at_reference = found(ref_point) if ref_point is not None else []
    suspects = [n for n in ref_point or {} if _get(base, n) != reference[n]]
    for p in at_reference:
        # The config's own values pass: the parameters the space moves off them are at fault.
        alone = next((n for n in suspects if p in found({n: reference[n]})), None)
        if alone is not None:
            label = next(label for label, v in cands[alone] if v == reference[alone])
            blame(alone, label, reference[alone], [p])
        else:
            where = ", ".join(f"{n}={ref_point[n]!r}" for n in suspects)
            out.append(f"search.parameters.{suspects[0]}: with {where} {COMBINATION}: {p}")
    single: dict[tuple[str, str], set[str]] = {}
    for name, options in cands.items():
        for label, value in options:
            values = point({name: value})
            if values is None:
                continue
            ancestors = _ancestors(name, parents, reference)
            known = set(at_reference).union(*(single.get((a, repr(v)), set()) for a, v in ancestors))
            new = [p for p in found(values) if p not in known]
            single[(name, repr(value))] = set(new)
            blame(name, label, value, new)
    for (a, a_opts), (b, b_opts) in itertools.combinations(cands.items(), 2):
        reported: set[str] = set()
        for (_, va), (_, vb) in itertools.product(a_opts, b_opts):
            values = point({a: va, b: vb})
            if values is None or values.get(a) != va or values.get(b) != vb:
                continue
            known = set(at_reference) | single.get((a, repr(va)), set()) | single.get((b, repr(vb)), set())
            for p in found(values):
                if p not in known and p not in reported:
                    reported.add(p)
                    out.append(f"search.parameters.{b}: {vb!r} with {a}={va!r} {COMBINATION}: {p}")
    for child, (parent, needed) in parents.items():
        if single.get((parent, repr(needed))):
            out.append(
                f"search.parameters.{child}: exists only under {parent}={needed!r}, a value {parent} "
                "cannot take (above)"
            )
    return list(dict.fromkeys(out))


def _about(problem: str, name: str, value: Any) -> str:
    """A trial config's problem said of a parameter's value: without the parameter's own key
    and the value it already names."""
    return problem.removeprefix(f"{name}: ").removesuffix(f" (got {value!r})")


def _dependent_hint(name, value, new, cands, parents, point, found) -> str:
    """When another parameter's value makes this value valid: how to search it only under that value."""
    if name in parents:
        return ""
    for _, own in cands[name]:
        values = point({name: own})
        if values is not None and not found(values):
            return ""  # some of its values run anywhere: the parameter is not one that needs a parent
    for other, options in cands.items():
        if other == name or len(options) < 2:
            continue
        for _, v in options:
            values = point({other: v, name: value})
            if values is not None and values.get(other) == v and not set(new) & set(found(values)):
                shown = str(v).lower() if isinstance(v, bool) else v
                return f"; or {other} dependents: {{{shown}: [{name}]}}"
    return ""


def _reference(base: dict, name: str, options: list[tuple[str, Any]]) -> Any:
    own = _get(base, name)
    values = [v for _, v in options]
    if any(own == v and type(own) is type(v) for v in values):
        return own
    return values[0]


def _active(name: str, values: dict[str, Any], parents: dict[str, tuple[str, Any]]) -> bool:
    if name not in parents:
        return True
    parent, needed = parents[name]
    return values.get(parent) == needed and _active(parent, values, parents)


def _ancestors(name: str, parents: dict[str, tuple[str, Any]], reference: dict) -> list[tuple[str, Any]]:
    """The (parent, value) pairs a parameter needs that differ from the reference."""
    out = []
    while name in parents:
        parent, needed = parents[name]
        if reference.get(parent) != needed:
            out.append((parent, needed))
        name = parent
    return out


def _get(data: dict, key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(data: dict, key: str, value: Any) -> None:
    *sections, leaf = key.split(".")
    node = data
    for part in sections:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def _constraint(text: str) -> Callable[[dict[str, Any]], bool]:
    """A linear `search.constraints` entry (`lora.alpha <= 4 * lora.r`) as a test of a point; a
    point missing one of its names (a conditional parameter switched off) passes."""
    names = sorted(set(_NAME.findall(text)), key=len, reverse=True)
    alias = {n: f"_{i}" for i, n in enumerate(names)}
    expr = _NAME.sub(lambda m: alias.get(m.group(0), m.group(0)), text)
    try:
        tree = ast.parse(expr, mode="eval").body
    except SyntaxError:
        return lambda values: True  # Ax reports it when the search is configured
    by_alias = {v: k for k, v in alias.items()}

    def value(node: ast.AST, values: dict[str, Any]) -> float:
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.Name):
            return float(values[by_alias[node.id]])
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left, values), value(node.right, values))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand, values)
        raise ValueError(text)

    def holds(values: dict[str, Any]) -> bool:
        if not isinstance(tree, ast.Compare) or len(tree.ops) != 1:
            return True
        try:
            left, right = value(tree.left, values), value(tree.comparators[0], values)
        except (KeyError, ValueError, TypeError):
            return True
        return left <= right if isinstance(tree.ops[0], ast.LtE) else left >= right

    return holds
