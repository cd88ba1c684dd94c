"""Merge techniques (one registry), continual mergers and recency weights.

    from chronomerge.merge import merge, TECHNIQUES
    merged = merge("ties", base, [expert_a, expert_b], keep=0.2)
"""
from chronomerge.merge.continual import (
    EMA,
    ContinualAverage,
    ContinualMerger,
    ContinualTaskArithmetic,
    ContinualTIES,
    FisherMerge,
)
from chronomerge.merge.mergers import CONTINUAL, load_merger, save_merger
from chronomerge.merge.opcm import OPCM
from chronomerge.merge.recency import RECENCY, recency_weights
from chronomerge.merge.registry import TECHNIQUES, merge, resolve_hparams

__all__ = [
    "CONTINUAL", "EMA", "OPCM", "RECENCY", "TECHNIQUES", "ContinualAverage", "ContinualMerger",
    "ContinualTIES", "ContinualTaskArithmetic", "FisherMerge", "load_merger", "merge",
    "recency_weights", "resolve_hparams", "save_merger",
]
