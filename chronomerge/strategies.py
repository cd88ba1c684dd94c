"""The TIME axes: which stored checkpoints feed initialization and deployment (TIME, Sec. 3).

With the store S holding θ0 and the experts θ^S_1..θ^S_t, and f_merge a registered technique:

* init θ^I_t:  zs → θ0; ft → θ^S_{t−1}; ema → θ^EMA_t = f_merge(θ^EMA_{t−1}, θ^S_{t−1}; w), θ^EMA_1 = θ0;
  all → f_merge(θ^S_1..θ^S_{t−1}) with recency weights.
* deploy θ^O_t: ft → θ^S_t; ema → θ^EMA_{t+1} = f_merge(θ^EMA_t, θ^S_t; w); all → f_merge(θ^S_1..θ^S_t).

Both EMA chains continue from the axis' own previous output, so `compose` needs only the experts
so far and that previous output. Weighted techniques take (1 − w, w) for EMA and the recency
weights for `all`; techniques without per-model weights merge the inputs by their own rule
(a non-uniform recency scheme with such a technique is an error).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from chronomerge.merge import TECHNIQUES, merge, recency_weights
from chronomerge.store import CheckpointStore


def merge_inputs(spec: Mapping[str, Any], mode: str, base: str, experts: Sequence[str],
                 previous: str | None) -> tuple[list[str], list[float] | None]:
    """The checkpoint ids f_merge reads for `mode`, and their weights (None: the technique's own rule).

    An empty list means no merge: the axis returns a stored checkpoint as is (`pick`).
    """
    weighted = TECHNIQUES[spec["technique"]].weighted and spec.get("hparams", {}).get("over") != "ties"
    if mode in ("zs", "ft") or not experts:
        return [], None
    if mode == "ema":
        w = float(spec["weight"])
        return [previous or base, experts[-1]], ([1 - w, w] if weighted else None)
    if mode == "all":
        if not weighted:
            if spec.get("recency", "uniform") != "uniform" or spec.get("reverse"):
                raise ValueError(f"recency weights need a weighted technique; {spec['technique']!r} takes none")
            return list(experts), None
        return list(experts), recency_weights(spec.get("recency", "uniform"), len(experts), bool(spec.get("reverse")))
    raise ValueError(f"mode={mode!r} is not allowed; expected one of ['zs', 'ft', 'ema', 'all']")


def pick(mode: str, base: str, experts: Sequence[str]) -> str:
    """The stored checkpoint an axis uses when it merges nothing."""
    return experts[-1] if mode == "ft" and experts else base


def compose(store: CheckpointStore, spec: Mapping[str, Any], mode: str, *, base: str, experts: Sequence[str],
            previous: str | None, kind: str, device: str | torch.device | None = None,
            extra: Mapping[str, Any] | None = None) -> str:
    """Build one axis' model from the store (see module docstring) and return its checkpoint id."""
    inputs, weights = merge_inputs(spec, mode, base, experts, previous)
    if not inputs:
        return pick(mode, base, experts)
    hp = dict(spec.get("hparams", {}))
    merged = merge(spec["technique"], store.get(base), [store.get(i) for i in inputs],
                   weights=weights, device=device, **hp)
    parents = list(dict.fromkeys([*inputs, base]))
    return store.put(merged, kind=kind, parents=parents, technique=spec["technique"],
                     hparams={**hp, "mode": mode, "weights": weights}, extra=extra)
