"""The registry of continual mergers (one row each: name → class, whose `reference` names its paper)
and their round trip through the checkpoint store."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from chronomerge.merge import continual as c
from chronomerge.merge.opcm import OPCM
from chronomerge.statedict import StateDictLike
from chronomerge.store import CheckpointStore

CONTINUAL: dict[str, type[c.ContinualMerger]] = {
    cls.name: cls for cls in (c.EMA, OPCM, c.ContinualTaskArithmetic, c.ContinualTIES, c.ContinualAverage,
                              c.FisherMerge)
}


def save_merger(store: CheckpointStore, merger: c.ContinualMerger, parents: Sequence[str] = ()) -> str:
    """Store a merger's state as a `merger-state` object; returns its id."""
    tensors, config = merger.state()
    return store.put(tensors, kind="merger-state", parents=parents, technique=merger.name,
                     hparams=merger.hp, extra={"merger_config": config})


def load_merger(store: CheckpointStore, oid: str, base: StateDictLike,
                device: str | torch.device | None = None) -> c.ContinualMerger:
    """Rebuild the merger stored as `oid` over `base`, exactly as it was saved."""
    config = store.meta(oid)["extra"]["merger_config"]
    if config.get("merger") not in CONTINUAL:
        raise ValueError(f"{oid}: unknown merger {config.get('merger')!r}; allowed: {sorted(CONTINUAL)}")
    return CONTINUAL[config["merger"]].from_state(base, store.load(oid), config, device=device)
