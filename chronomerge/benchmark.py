"""The embedded benchmark's base model θ0: pretrained once on the pretraining pool, cached in the store.

The cache key is the pretraining recipe (model, seed, data digest, training config), so a
changed recipe pretrains again and an unchanged one reuses the stored base.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from chronomerge.config import PretrainSection, TrainSection
from chronomerge.data import catalog, load_split
from chronomerge.data.generate import prepare
from chronomerge.models import TINY, arch_of, create_model, get_tokenizer
from chronomerge.resume import Checkpointing
from chronomerge.store import CheckpointStore
from chronomerge.train import pretrain


def pretrain_recipe(section: PretrainSection) -> TrainSection:
    """The training config that pretrains the base: params.yaml's `pretrain` section, the rest of training
    at its defaults."""
    return TrainSection(**section.model_dump())


PRETRAIN = pretrain_recipe(PretrainSection())  # the default recipe


def base_recipe(model: str, seed: int, pool_digest: str, cfg: TrainSection) -> dict:
    """What determines a pretrained base: model, seed, the pool's digest and the training config."""
    # "progress": False, and leaving out `text` (pretraining pairs the pool's captions whatever it says),
    # keep the recipe's shape, and so the ids of stored bases, as it has been
    return {"model": model, "seed": seed, "data": pool_digest,
            "train": {**cfg.model_dump(exclude={"text"}), "progress": False}}


def base_ref(recipe: dict) -> str:
    """The store ref under which the base of `recipe` is kept."""
    return "base-" + hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def ensure_base(store: CheckpointStore, data_root: str | os.PathLike, seed: int = 0,
                arch: str | Mapping[str, Any] = TINY, cfg: TrainSection = PRETRAIN, device: str = "cpu",
                size_factor: float = 1.0, progress: bool = False, checkpointing: Checkpointing | None = None) -> str:
    """Id of the pretrained base for (model, seed, data, recipe); pretrains it if not stored yet, with
    progress checkpoints in `checkpointing` (`chronomerge.resume`)."""
    name = arch_of(arch)["name"]
    digests = prepare(data_root, seed, [catalog.PRETRAIN.name], size_factor=size_factor)
    recipe = base_recipe(name, seed, digests[catalog.PRETRAIN.name], cfg)
    ref = base_ref(recipe)
    if (oid := store.ref(ref)) is not None and store.intact(oid):
        return oid  # a corrupt base is pretrained again (same recipe, same id) and replaced
    model = create_model(arch, seed=seed)
    result = pretrain(model, load_split(data_root, catalog.PRETRAIN.name, "train"),
                      cfg.model_copy(update={"seed": seed}), tokenizer=get_tokenizer(arch), device=device,
                      progress=f"pretraining the base θ0 ({name}, seed {seed})" if progress else None,
                      checkpointing=checkpointing)
    oid = store.put(result.state, kind="base", data_digest=recipe["data"], technique="pretrain",
                    hparams=recipe["train"], extra={"model": name, "seed": seed})
    store.set_ref(ref, oid)
    return oid
