"""open_clip model construction: the embedded tiny config, open_clip tags and local weight files."""
from __future__ import annotations

import logging
from pathlib import Path

import open_clip
import torch

CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY = "chronoclip-tiny"
_registered = False


def _not_random_init_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("No pretrained weights loaded for model")


def register_embedded_configs() -> None:
    """Register chronomerge's architecture JSONs (e.g. `chronoclip-tiny`) with open_clip, once.

    Also drops open_clip's root-logger notice that a model was initialised randomly: chronomerge
    builds models that way on purpose before loading stored weights into them.
    """
    global _registered
    if not _registered:
        for path in sorted(CONFIG_DIR.glob("*.json")):
            open_clip.add_model_config(path)
        logging.getLogger().addFilter(_not_random_init_notice)
        _registered = True


def create_model(name: str = TINY, pretrained: str | None = None, seed: int = 0) -> torch.nn.Module:
    """Any open_clip architecture by name; `pretrained` is an open_clip tag or a local file path.

    With `pretrained=None` the weights are a seeded random initialisation (deterministic).
    """
    register_embedded_configs()
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r}; known: {TINY!r} and open_clip.list_models()")
    torch.manual_seed(seed)
    return open_clip.create_model(name, pretrained=pretrained)


def get_tokenizer(name: str = TINY):
    """open_clip's tokenizer for `name` (context length from the model config)."""
    register_embedded_configs()
    return open_clip.get_tokenizer(name)
