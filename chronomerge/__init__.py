"""chronomerge: temporal model merging for CLIP (TIME, OPCM, CMM), framework-free core."""

__version__ = "0.1.0"
