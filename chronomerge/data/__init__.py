"""Datasets: the embedded generated benchmark, task streams, and adapters for real data."""
from chronomerge.data.generate import Split, load_split, prepare

__all__ = ["Split", "load_split", "prepare"]
