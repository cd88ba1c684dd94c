"""Export a stored checkpoint as a plain open_clip checkpoint.

The file is a safetensors state dict with open_clip's own key names, nothing else, so that
`open_clip.create_model(name, pretrained=path)` loads it (open_clip picks its safetensors loader
by the `.safetensors` suffix). The embedded `chronoclip-tiny` architecture must first be made known
to open_clip: `open_clip.add_model_config(<chronomerge>/model_configs/chronoclip-tiny.json)`.
"""
from __future__ import annotations

import os
from pathlib import Path

from chronomerge.models import create_model
from chronomerge.store import CheckpointStore, atomic_save


def export_open_clip(store: CheckpointStore, oid: str, path: str | os.PathLike, model_name: str) -> Path:
    """Write checkpoint `oid` to `path` (written whole or not at all) after checking that it loads
    into `model_name` with every key matching."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: the export path must end in .safetensors (open_clip chooses its loader by suffix)")
    state = store.load(oid)
    try:
        create_model(model_name).load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {oid} does not fit open_clip model {model_name!r}: {e}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(state, path, {"chronomerge.id": oid, "open_clip.model": model_name})
    return path
