"""Export a stored checkpoint as a plain open_clip checkpoint.

The file is a safetensors state dict with open_clip's own key names, so that
`open_clip.create_model(name, pretrained=path)` loads it (open_clip picks its safetensors loader
by the `.safetensors` suffix). Its header records the architecture (`open_clip.model`,
`open_clip.config`, `open_clip.preprocess`), so chronomerge reads it back with `model.name: auto`.
An architecture open_clip does not ship (the embedded `chronoclip-tiny`, or one derived from a
Hugging Face checkpoint) must first be made known to open_clip: write the `open_clip.config`
record to `<name>.json` and call `open_clip.add_model_config(path)`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chronomerge.checkpoints import header_metadata
from chronomerge.models import create_model
from chronomerge.store import CheckpointStore, atomic_save


def export_open_clip(store: CheckpointStore, oid: str, path: str | os.PathLike, arch: Mapping[str, Any]) -> Path:
    """Write checkpoint `oid` to `path` (written whole or not at all) after checking that it loads
    into the architecture `arch` with every key matching."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: the export path must end in .safetensors (open_clip chooses its loader by suffix)")
    state = store.load(oid)
    try:
        create_model(arch).load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {oid} does not fit open_clip model {arch['name']!r}: {e}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(
        state, path, {"chronomerge.id": oid, **header_metadata(arch["name"], arch["config"], arch["preprocess"])}
    )
    return path
