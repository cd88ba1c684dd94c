"""The TIME axes: which stored checkpoints feed initialization and deployment (TIME, Sec. 3).

With the store S holding θ0 and the experts θ^S_1..θ^S_t, and f_merge a registered technique:

* init θ^I_t:  zs → θ0; ft → θ^S_{t−1}; ema → θ^EMA_t = f_merge(θ^EMA_{t−1}, θ^S_{t−1}; w), θ^EMA_1 = θ0;
  all → f_merge(θ^S_1..θ^S_{t−1}) with recency weights.
* deploy θ^O_t: ft → θ^S_t; ema → θ^EMA_{t+1} = f_merge(θ^EMA_t, θ^S_t; w); all → f_merge(θ^S_1..θ^S_t).

Both EMA chains continue from the axis' own previous output, so `compose` needs only the experts
so far and that previous output. Deploy also has `zs` (θ0, the zero-shot baseline) and
`continual`: `continual_step` folds θ^S_t into a continual merger (OPCM, continual task arithmetic,
TIES or averaging, CMM's Fisher merge) whose state is a checkpoint in the store. Weighted techniques take (1
− w, w) for EMA and the recency
weights for `all`; techniques without per-model weights merge the inputs by their own rule
(a non-uniform recency scheme with such a technique is an error).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from chronomerge.merge import CONTINUAL, load_merger, merge, recency_weights, save_merger
from chronomerge.merge.continual import ContinualMerger
from chronomerge.merge.registry import takes_weights
from chronomerge.store import CheckpointStore


def merge_inputs(spec: Mapping[str, Any], mode: str, base: str, experts: Sequence[str],
                 previous: str | None) -> tuple[list[str], list[float] | None]:
    """The checkpoint ids f_merge reads for `mode`, and their weights (None: the technique's own rule).

    An empty list means no merge: the axis returns a stored checkpoint as is (`pick`).
    """
    weighted = takes_weights(spec["technique"], spec.get("hparams", {}))
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


def continual_step(store: CheckpointStore, spec: Mapping[str, Any], *, base: str, expert: str, fisher: str | None,
                   previous_state: str | None, device: str | torch.device | None = None,
                   ) -> tuple[ContinualMerger, dict[str, torch.Tensor]]:
    """Fold θ^S_t into the merger stored as `previous_state` (a new one at t = 1); returns the
    merger, now at step t, and the merged θ^(t). The Fisher merge reads the expert's AdamW
    second moments (`fisher`; None for an imported expert: F = 1)."""
    base_sd = store.get(base)
    if previous_state is None:
        merger = CONTINUAL[spec["merger"]](base_sd, device=device, **spec.get("hparams", {}))
    else:
        merger = load_merger(store, previous_state, base_sd, device=device)
    extras = {"fisher": store.get(fisher) if fisher else None} if merger.name == "fisher_merge" else {}
    return merger, merger.update(store.get(expert), **extras)


def set_merged_tensor(merger: ContinualMerger, base: Mapping[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    """Replace one tensor of the merger's running merge (CMM's aligned projection carries forward)."""
    if getattr(merger, "delta", None) is not None:  # OPCM keeps Δθ_merged = θ^(t) − θ0
        merger.delta[key] = value.float() - base[key].float()
    else:
        merger.current[key] = value.to(merger.current[key].dtype)


def store_continual(store: CheckpointStore, merger: ContinualMerger, merged: Mapping[str, torch.Tensor], *,
                    base: str, expert: str, previous_state: str | None, extra: Mapping[str, Any]) -> tuple[str, str]:
    """Save the merger's state and the merged model; returns (deployed id, state id)."""
    state = save_merger(store, merger, parents=[p for p in (previous_state, expert) if p])
    deployed = store.put(merged, kind="deployed", parents=[state, expert, base], technique=merger.name,
                         hparams={**merger.hp, "mode": "continual"}, extra=extra)
    return deployed, state
