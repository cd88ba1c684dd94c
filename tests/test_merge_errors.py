"""Bad input raises ValueError naming the offending key, shape or hyperparameter and the allowed range."""
import pytest
import torch

from chronomerge.merge import EMA, OPCM, ContinualTIES, FisherMerge, merge, recency_weights

BASE = {"a": torch.zeros(3), "b": torch.zeros(2, 2)}
M = [{"a": torch.ones(3), "b": torch.ones(2, 2)}, {"a": -torch.ones(3), "b": torch.ones(2, 2)}]


@pytest.mark.parametrize("technique,hp,pattern", [
    ("ties", {"keep": 0.0}, r"keep=0\.0 .*\(0, 1\]"),
    ("ties", {"keep": 1.5}, r"keep=1\.5 .*\(0, 1\]"),
    ("ties", {"keep": float("nan")}, r"keep=nan"),
    ("ties", {"scope": "layer"}, r"scope='layer' .*\['tensor', 'model'\]"),
    ("dare", {"drop": 1.0}, r"drop=1\.0 .*\[0, 1\)"),
    ("dare", {"drop": -0.1}, r"drop=-0\.1"),
    ("dare_ties", {"seed": -1}, r"seed=-1 .*integer >= 0"),
    ("breadcrumbs", {"beta": 0.9, "gamma": 0.2}, r"beta \+ gamma"),
    ("breadcrumbs_ties", {"gamma": 1.0}, r"gamma=1\.0"),
    ("slerp", {"t": 1.2}, r"t=1\.2 .*\[0, 1\]"),
    ("lines", {"over": "magmax"}, r"over='magmax'"),
    ("task_arithmetic", {"scale": float("inf")}, r"scale=inf"),
    ("task_arithmetic", {"lambda": 0.3}, r"unknown hyperparameter.*'lambda'.*allowed: \['scale'\]"),
    ("fisher", {"eps": 0.0}, r"eps=0\.0"),
])
def test_bad_hyperparameters_name_the_field_and_range(technique, hp, pattern):
    with pytest.raises(ValueError, match=pattern):
        merge(technique, BASE, M, **hp)


def test_unknown_technique_lists_the_registry():
    with pytest.raises(ValueError, match=r"unknown merge technique 'tie'.*'ties'"):
        merge("tie", BASE, M)


def test_empty_model_list():
    with pytest.raises(ValueError, match="at least one model"):
        merge("average", BASE, [])


def test_mismatched_keys_are_named():
    with pytest.raises(ValueError, match=r"model 1 .*missing \['b'\], unexpected \['c'\]"):
        merge("average", BASE, [M[0], {"a": torch.ones(3), "c": torch.ones(2, 2)}])


def test_mismatched_shapes_are_named():
    with pytest.raises(ValueError, match=r"model 0: shape of 'b' is \[4\], base has \[2, 2\]"):
        merge("average", BASE, [{"a": torch.ones(3), "b": torch.ones(4)}])


def test_slerp_needs_exactly_two_models():
    with pytest.raises(ValueError, match="slerp merges exactly 2 models, got 3"):
        merge("slerp", BASE, M + M[:1])


def test_model_stock_needs_two_models():
    with pytest.raises(ValueError, match="model_stock merges at least 2 models, got 1"):
        merge("model_stock", BASE, M[:1])


@pytest.mark.parametrize("weights,pattern", [
    ([1.0], r"weights has 1 entries for 2 models"),
    ([1.0, -1.0], r"weights must be finite, >= 0"),
    ([0.0, 0.0], r"not all zero"),
    ([1.0, float("nan")], r"finite"),
])
def test_weights_must_match_the_models(weights, pattern):
    with pytest.raises(ValueError, match=pattern):
        merge("average", BASE, M, weights=weights)


def test_weights_on_a_technique_that_takes_none():
    with pytest.raises(ValueError, match=r"ties takes no per-model weights; techniques that do: \['average'"):
        merge("ties", BASE, M, weights=[1, 1])


def test_fisher_shape_mismatch_is_named():
    with pytest.raises(ValueError, match=r"Fisher 1 of 'b' has shape \[4\]"):
        merge("fisher", BASE, M, fishers=[None, {"b": torch.ones(4)}])


def test_differing_non_float_tensors_are_named():
    base = {"n": torch.tensor([1])}
    with pytest.raises(ValueError, match=r"non-floating tensor 'n' differs"):
        merge("average", base, [{"n": torch.tensor([2])}])


@pytest.mark.parametrize("cls,hp,pattern", [
    (OPCM, {"alpha": 1.5}, r"opcm: alpha=1\.5 .*\[0, 1\]"),
    (OPCM, {"scaling": "log"}, r"scaling='log' .*\['adaptive', 'sqrt'\]"),
    (OPCM, {"zero_diagonal": "yes"}, r"zero_diagonal='yes'"),
    (EMA, {"weight": -0.1}, r"ema: weight=-0\.1"),
    (ContinualTIES, {"keep": 0}, r"keep=0"),
    (FisherMerge, {"alpha": 2}, r"fisher_merge: alpha=2"),
])
def test_continual_merger_hyperparameters_are_checked(cls, hp, pattern):
    with pytest.raises(ValueError, match=pattern):
        cls(BASE, **hp)


def test_continual_update_with_a_mismatched_model():
    with pytest.raises(ValueError, match=r"shape of 'b'"):
        OPCM(BASE).update({"a": torch.ones(3), "b": torch.ones(3)})


def test_recency_weights_errors_and_values():
    with pytest.raises(ValueError, match=r"unknown recency scheme 'newest'.*'linear'"):
        recency_weights("newest", 3)
    with pytest.raises(ValueError, match="t >= 1"):
        recency_weights("linear", 0)
    assert recency_weights("linear", 3) == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert recency_weights("linear", 3, reverse=True) == pytest.approx([3 / 6, 2 / 6, 1 / 6])
    for scheme in ("uniform", "sqrt", "log", "quadratic", "cubic", "exponential"):
        w = recency_weights(scheme, 100)
        assert sum(w) == pytest.approx(1.0) and all(x > 0 for x in w)
        assert scheme == "uniform" or all(a < b for a, b in zip(w, w[1:]))  # newer weighs more
