"""Hyperparameter declarations shared by the merge registry and the continual mergers."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Param:
    """A hyperparameter: its default, a predicate on values, and the allowed values in words."""

    default: Any
    ok: Callable[[Any], bool]
    allowed: str


def _is_real(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def interval(default: float | None, lo: float = -math.inf, hi: float = math.inf,
             lo_open: bool = False, hi_open: bool = False, optional: bool = False) -> Param:
    """A real number in an interval; `optional` admits None (meaning a documented default rule)."""

    def ok(v: Any) -> bool:
        if v is None:
            return optional
        return _is_real(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    if lo == -math.inf and hi == math.inf:
        words = "a finite real number"
    else:
        words = f"a real number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return Param(default, ok, words + (" or None" if optional else ""))


def fraction(default: float, lo_open: bool, hi_open: bool) -> Param:
    return interval(default, 0, 1, lo_open, hi_open)


def choice(default: Any, *values: Any) -> Param:
    return Param(default, lambda v: v in values and type(v) is type(default), f"one of {list(values)}")


def nonneg_int(default: int) -> Param:
    return Param(default, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0")


def resolve(owner: str, params: Mapping[str, Param], given: Mapping[str, Any]) -> dict[str, Any]:
    """Fill defaults and check every value; `ValueError` names the bad one and its allowed values."""
    unknown = sorted(set(given) - set(params))
    if unknown:
        raise ValueError(f"{owner}: unknown hyperparameter(s) {unknown}; allowed: {sorted(params)}")
    hp = {name: given.get(name, p.default) for name, p in params.items()}
    for name, p in params.items():
        if not p.ok(hp[name]):
            raise ValueError(f"{owner}: {name}={hp[name]!r} is not allowed; expected {p.allowed}")
    return hp
