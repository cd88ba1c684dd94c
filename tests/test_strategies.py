"""TIME's axes: which stored checkpoints feed f_merge, with which weights (TIME, Sec. 3)."""
import pytest
import torch

from chronomerge.merge import merge, recency_weights
from chronomerge.store import CheckpointStore
from chronomerge.strategies import compose, merge_inputs

SPEC = {"technique": "average", "hparams": {}, "weight": 0.3, "recency": "uniform", "reverse": False}


def test_zs_and_ft_pick_a_stored_checkpoint_without_merging():
    assert merge_inputs(SPEC, "zs", "b", ["e1", "e2"], "p") == ([], None)
    assert merge_inputs(SPEC, "ft", "b", ["e1", "e2"], "p") == ([], None)
    assert merge_inputs(SPEC, "ema", "b", [], None) == ([], None)  # nothing stored yet: θ0


def test_ema_folds_the_newest_expert_into_the_axis_previous_output_with_weight_w():
    assert merge_inputs(SPEC, "ema", "b", ["e1", "e2"], "p") == (["p", "e2"], [0.7, 0.3])
    assert merge_inputs(SPEC, "ema", "b", ["e1"], None) == (["b", "e1"], [0.7, 0.3])  # θ^EMA_1 = θ0
    ties = {**SPEC, "technique": "ties"}
    assert merge_inputs(ties, "ema", "b", ["e1", "e2"], "p") == (["p", "e2"], None)  # its own rule


@pytest.mark.parametrize("scheme", ["uniform", "linear", "exponential"])
@pytest.mark.parametrize("reverse", [False, True])
def test_all_merges_every_stored_expert_with_recency_weights(scheme, reverse):
    spec = {**SPEC, "recency": scheme, "reverse": reverse}
    ids, w = merge_inputs(spec, "all", "b", ["e1", "e2", "e3"], "p")
    assert ids == ["e1", "e2", "e3"] and w == recency_weights(scheme, 3, reverse)


def test_recency_weights_need_a_weighted_technique():
    with pytest.raises(ValueError, match="recency weights need a weighted technique"):
        merge_inputs({**SPEC, "technique": "ties", "recency": "linear"}, "all", "b", ["e1", "e2"], None)
    assert merge_inputs({**SPEC, "technique": "ties"}, "all", "b", ["e1", "e2"], None) == (["e1", "e2"], None)


def test_compose_stores_the_merge_with_its_inputs_as_parents(tmp_path, tiny_base, tiny_experts):
    store = CheckpointStore(tmp_path)
    base = store.put(tiny_base, kind="base")
    experts = [store.put(e, kind="expert", parents=[base]) for e in tiny_experts[:3]]
    spec = {**SPEC, "recency": "linear"}
    oid = compose(store, spec, "all", base=base, experts=experts, previous=None, kind="deployed", device="cpu")
    expected = merge("average", tiny_base, tiny_experts[:3], weights=recency_weights("linear", 3), device="cpu")
    got = store.load(oid)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert store.meta(oid)["parents"] == [*experts, base]
    assert store.meta(oid)["hparams"]["mode"] == "all"
    assert compose(store, spec, "ft", base=base, experts=experts, previous=None, kind="deployed") == experts[-1]
