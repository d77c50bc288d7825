"""One search dimension (`search.parameters.<key>`) and the checks of conditional ones."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.sections import Section


class ParameterSpec(Section):
    """One search dimension, mapped one-to-one onto an Ax parameter config."""

    type: Literal["range", "choice", "fixed"] = Field(description="`range`, `choice` or `fixed`.")
    bounds: list[float] | None = Field(None, description="range: [low, high], low < high.")
    log: bool = Field(False, description="range: search on a log scale (low > 0).")
    values: list[int | float | str | bool] | None = Field(None, description="choice: the values.")
    ordered: bool | None = Field(
        None, description="choice: values have an order (default: true for numbers and booleans)."
    )
    value: int | float | str | bool | None = Field(None, description="fixed: the value.")
    dependents: dict[str, list[str]] | None = Field(
        None,
        description="choice: per value, the searched parameters that exist only under it (Ax's "
        "`dependent_parameters`), e.g. `{pissa: [lora.pissa_iterations]}` on `lora.init`. A trial "
        "without that value keeps the config's value of the others.",
    )

    @field_validator("dependents", mode="before")
    @classmethod
    def _value_keys(cls, v: Any) -> Any:
        # YAML reads `true:` or `16:` as a bool or a number; the values are matched as text.
        if isinstance(v, dict):
            return {(str(k).lower() if isinstance(k, bool) else str(k)): names for k, names in v.items()}
        return v

    @model_validator(mode="after")
    def _shape(self) -> ParameterSpec:
        if self.type == "range":
            if self.bounds is None or len(self.bounds) != 2:
                raise ValueError("a range needs bounds: [low, high]")
            low, high = self.bounds
            if not low < high:
                raise ValueError(f"bounds are inverted or empty: [{low}, {high}] (need low < high)")
            if self.log and low <= 0:
                raise ValueError(f"log scale needs a positive lower bound, got {low}")
        elif self.type == "choice":
            if not self.values:
                raise ValueError("a choice needs a non-empty list of values")
            if len(set(map(str, self.values))) != len(self.values):
                raise ValueError(f"choice values repeat: {self.values}")
        elif self.value is None:
            raise ValueError("a fixed parameter needs a value")
        extra = {
            "range": ("values", "value", "ordered", "dependents"),
            "choice": ("bounds", "value", "log"),
            "fixed": ("bounds", "values", "log", "ordered", "dependents"),
        }[self.type]
        unknown = [k for k in (self.dependents or {}) if k not in {_text(v) for v in self.choices()}]
        if self.type == "choice" and unknown:
            raise ValueError(f"dependents: {', '.join(unknown)} is not one of the values {self.values}")
        set_fields = [k for k in extra if getattr(self, k) not in (None, False)]
        if set_fields:
            raise ValueError(f"{', '.join(set_fields)} does not apply to a {self.type} parameter")
        return self

    def dependents_by_value(self) -> dict[int | float | str | bool, list[str]]:
        """The parameters that exist only under each value, keyed by the value itself."""
        by_text = self.dependents or {}
        return {v: by_text[_text(v)] for v in self.choices() if _text(v) in by_text}

    def choices(self) -> list[int | float | str | bool]:
        """The values of a choice, or the one value of a fixed parameter ([] for a range)."""
        if self.type == "range":
            return []
        return list(self.values) if self.type == "choice" else [self.value]


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def dependency_problems(params: dict[str, ParameterSpec]) -> list[str]:
    """Conditional parameters must be searched, depend on one parent value, and form no cycle."""
    problems, parent_of = [], {}
    for name, spec in params.items():
        for value, children in spec.dependents_by_value().items():
            for child in children:
                if child not in params or child == name:
                    problems.append(
                        f"{name}: dependents.{_text(value)} names {child!r}, "
                        + ("itself" if child == name else "not a parameter of search.parameters")
                    )
                elif child in parent_of:
                    problems.append(
                        f"{name}: {child} already exists under {parent_of[child][0]}={_text(parent_of[child][1])}; "
                        "a parameter depends on one value of one parent"
                    )
                else:
                    parent_of[child] = (name, value)
    for start in parent_of:
        seen, node = {start}, start
        while node in parent_of:
            node = parent_of[node][0]
            if node in seen:
                problems.append(f"{start}: its dependents form a cycle")
                break
            seen.add(node)
    return list(dict.fromkeys(problems))
