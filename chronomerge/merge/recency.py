"""Recency weights for offline merging over t stored experts (TIME, Sec. 4: offline merging).

Expert i = 1..t (oldest first) gets a raw weight g(i); the weights are normalised to sum to 1.
With `reverse=True` the order is flipped so older experts weigh more.
"""
from __future__ import annotations

import math

RECENCY = {
    "uniform": lambda i, t: 1.0,
    "linear": lambda i, t: float(i),
    "sqrt": lambda i, t: math.sqrt(i),
    "log": lambda i, t: math.log1p(i),
    "quadratic": lambda i, t: float(i) ** 2,
    "cubic": lambda i, t: float(i) ** 3,
    "exponential": lambda i, t: math.exp(i - t),  # e^i, shifted by e^-t to stay finite for long streams
}


def recency_weights(scheme: str, t: int, reverse: bool = False) -> list[float]:
    """Normalised weights of experts 1..t under `scheme` (newest last)."""
    if scheme not in RECENCY:
        raise ValueError(f"unknown recency scheme {scheme!r}; allowed: {sorted(RECENCY)}")
    if not isinstance(t, int) or t < 1:
        raise ValueError(f"recency weights need t >= 1 experts, got {t!r}")
    raw = [RECENCY[scheme](i, t) for i in range(1, t + 1)]
    if reverse:
        raw.reverse()
    total = sum(raw)
    return [r / total for r in raw]
