"""The pretrained base model is cached in the store under its recipe."""

import torch

from chronomerge.benchmark import PRETRAIN, ensure_base
from chronomerge.models import load_model
from chronomerge.store import CheckpointStore


def test_base_is_pretrained_once_per_recipe(tmp_path):
    store = CheckpointStore(tmp_path / "store")
    cfg = PRETRAIN.model_copy(update={"steps": 2, "batch_size": 16})
    a = ensure_base(store, tmp_path / "data", cfg=cfg, size_factor=0.01)
    n_objects = len(store.ids())
    assert ensure_base(store, tmp_path / "data", cfg=cfg, size_factor=0.01) == a
    assert len(store.ids()) == n_objects  # reused, not trained again
    meta = store.meta(a)
    assert meta["kind"] == "base" and meta["hparams"]["steps"] == 2 and meta["data_digest"]
    b = ensure_base(store, tmp_path / "data", cfg=cfg.model_copy(update={"lr": 1e-4}), size_factor=0.01)
    assert b != a
    model = load_model(store, a)
    assert torch.equal(model.state_dict()["visual.proj"], store.load(a)["visual.proj"])
