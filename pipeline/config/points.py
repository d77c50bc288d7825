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
    space = _Space(base, params, parents, constraints, check)
    space.at_reference()
    space.singles()
    space.pairs()
    space.orphans()
    return list(dict.fromkeys(space.out))


class _Space:
    """The points of one search space, their problems (memoized per point), and the lines said
    of them so far; each step reports only what the steps before it did not."""

    def __init__(self, base, params, parents, constraints, check: Check) -> None:
        self.base, self.parents, self.check = base, parents, check
        self.cands = {n: candidates(n, s) for n, s in params.items()}
        self.reference = {n: _reference(base, n, c) for n, c in self.cands.items()}
        self.rules = [_constraint(c) for c in constraints]
        self.memo: dict[tuple, list[str]] = {}
        self.known: list[str] = []  # the problems of the reference point
        self.single: dict[tuple[str, str], set[str]] = {}  # (name, repr(value)) -> its own problems
        self.out: list[str] = []

    def point(self, changes: dict[str, Any]) -> dict[str, Any] | None:
        """The reference with `changes` and the parent values they need; None if they clash or
        a linear constraint refuses the point."""
        values = {**self.reference, **changes}
        for name in changes:
            node = name
            while node in self.parents:
                parent, needed = self.parents[node]
                if parent in changes and changes[parent] != needed:
                    return None  # this parameter does not exist under the parent's value
                values[parent] = needed
                node = parent
        values = {n: v for n, v in values.items() if _active(n, values, self.parents)}
        if not all(rule(values) for rule in self.rules):
            return None
        return values

    def found(self, values: dict[str, Any]) -> list[str]:
        """The problems of the trial config at this point."""
        key = tuple(sorted((n, repr(v)) for n, v in values.items()))
        if key not in self.memo:
            data = copy.deepcopy(self.base)
            for name, value in values.items():
                _set(data, name, value)
            self.memo[key] = self.check(data)
        return self.memo[key]

    def blame(self, name: str, label: str, value: Any, found_here: list[str]) -> None:
        """Problems of one parameter's value, with how to make it conditional where that helps."""
        lines = [f"search.parameters.{name}: {label} {value!r}: {_about(p, name, value)}" for p in found_here]
        if lines:
            lines[-1] += _dependent_hint(
                name, value, found_here, self.cands, self.parents, self.point, self.found
            )
        self.out.extend(lines)

    def at_reference(self) -> None:
        """The reference point's problems: the config's own values pass, so the parameters the
        space moves off them are at fault (one alone when one suffices, else all together)."""
        ref_point = self.point({})
        self.known = self.found(ref_point) if ref_point is not None else []
        suspects = [n for n in ref_point or {} if _get(self.base, n) != self.reference[n]]
        for p in self.known:
            alone = next((n for n in suspects if p in self.found({n: self.reference[n]})), None)
            if alone is not None:
                label = next(label for label, v in self.cands[alone] if v == self.reference[alone])
                self.blame(alone, label, self.reference[alone], [p])
            else:
                where = ", ".join(f"{n}={ref_point[n]!r}" for n in suspects)
                self.out.append(f"search.parameters.{suspects[0]}: with {where} {COMBINATION}: {p}")

    def singles(self) -> None:
        """Every value of every parameter, the others at the reference (a conditional one under
        its parent's value, whose own problems are its parent's, not its)."""
        for name, options in self.cands.items():
            for label, value in options:
                values = self.point({name: value})
                if values is None:
                    continue
                ancestors = _ancestors(name, self.parents, self.reference)
                known = set(self.known).union(*(self.single.get((a, repr(v)), set()) for a, v in ancestors))
                new = [p for p in self.found(values) if p not in known]
                self.single[(name, repr(value))] = set(new)
                self.blame(name, label, value, new)

    def pairs(self) -> None:
        """Every pair of values of two parameters: what neither value shows alone."""
        for (a, a_opts), (b, b_opts) in itertools.combinations(self.cands.items(), 2):
            reported: set[str] = set()
            for (_, va), (_, vb) in itertools.product(a_opts, b_opts):
                values = self.point({a: va, b: vb})
                if values is None or values.get(a) != va or values.get(b) != vb:
                    continue
                known = (
                    set(self.known)
                    | self.single.get((a, repr(va)), set())
                    | self.single.get((b, repr(vb)), set())
                )
                for p in self.found(values):
                    if p not in known and p not in reported:
                        reported.add(p)
                        self.out.append(f"search.parameters.{b}: {vb!r} with {a}={va!r} {COMBINATION}: {p}")

    def orphans(self) -> None:
        """A dependent whose parent cannot take the value it exists under: both keys named."""
        for child, (parent, needed) in self.parents.items():
            if self.single.get((parent, repr(needed))):
                self.out.append(
                    f"search.parameters.{child}: exists only under {parent}={needed!r}, a value {parent} "
                    "cannot take (above)"
                )


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
