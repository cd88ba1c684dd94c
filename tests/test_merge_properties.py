"""Property tests of the merge techniques (docs/methods.md) on random tensors and on a real
tiny open_clip state dict."""
import math

import pytest
import torch
from conftest import perturb
from hypothesis import given, settings
from hypothesis import strategies as st

from chronomerge.merge import TECHNIQUES, merge
from chronomerge.merge.lines import layer_scales

SETTINGS = settings(max_examples=25, deadline=None)


def random_models(seed: int, k: int, shape=(6, 5)):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(shape, generator=g), "b": torch.randn(shape[0], generator=g)}
    models = [{n: v + torch.randn(v.shape, generator=g) for n, v in base.items()} for _ in range(k)]
    return base, models


def close(a, b, atol=1e-5):
    return all(torch.allclose(a[k], b[k], atol=atol, rtol=1e-5) for k in a)


@SETTINGS
@given(seed=st.integers(0, 10_000), k=st.integers(1, 6))
def test_task_arithmetic_with_scale_one_over_k_is_the_average(seed, k):
    base, models = random_models(seed, k)
    assert close(merge("task_arithmetic", base, models, scale=1 / k), merge("average", base, models))


@SETTINGS
@given(seed=st.integers(0, 10_000), k=st.integers(1, 6))
def test_ties_keep_one_with_agreeing_signs_is_the_mean_task_vector(seed, k):
    base, models = random_models(seed, k)
    sign = {n: torch.sign(models[0][n] - base[n]) for n in base}
    agreeing = [{n: base[n] + sign[n] * (m[n] - base[n]).abs() for n in base} for m in models]
    mean_tv = {n: base[n] + sum(m[n] - base[n] for m in agreeing) / k for n in base}
    assert close(merge("ties", base, agreeing, keep=1.0, scale=1.0), mean_tv)


def test_ties_disagreeing_entry_follows_the_elected_sign():
    base = {"w": torch.zeros(3)}
    models = [{"w": torch.tensor([3.0, -1.0, 0.0])}, {"w": torch.tensor([-1.0, -1.0, 0.0])}]
    out = merge("ties", base, models, keep=1.0)["w"]
    assert torch.equal(out, torch.tensor([3.0, -1.0, 0.0]))  # mass +2 elects +, -2 elects -


def test_ties_keep_trims_per_tensor_to_ceil_fraction():
    base = {"w": torch.zeros(10)}
    models = [{"w": torch.arange(1.0, 11.0)}]
    out = merge("ties", base, models, keep=0.25)["w"]  # ceil(2.5) = 3 kept
    assert torch.equal(out, torch.tensor([0.0] * 7 + [8.0, 9.0, 10.0]))
    single = merge("ties", {"s": torch.zeros(1)}, [{"s": torch.ones(1)}], keep=0.01)["s"]
    assert single.item() == 1.0  # a one-element tensor is never wiped out


def test_ties_model_scope_uses_one_threshold_across_tensors():
    base = {"a": torch.zeros(4), "b": torch.zeros(4)}
    models = [{"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([5.0, 6.0, 7.0, 8.0])}]
    out = merge("ties", base, models, keep=0.5, scope="model")
    assert torch.equal(out["a"], torch.zeros(4)) and torch.equal(out["b"], models[0]["b"])
    per_tensor = merge("ties", base, models, keep=0.5)
    assert torch.equal(per_tensor["a"], torch.tensor([0.0, 0.0, 3.0, 4.0]))


@SETTINGS
@given(seed=st.integers(0, 10_000), k=st.integers(1, 6))
def test_magmax_picks_the_largest_magnitude_entry(seed, k):
    base, models = random_models(seed, k)
    out = merge("magmax", base, models, scale=1.0)
    for n in base:
        taus = torch.stack([m[n] - base[n] for m in models])
        idx = taus.abs().argmax(0, keepdim=True)
        assert torch.allclose(out[n] - base[n], taus.gather(0, idx)[0], atol=1e-6)


def test_magmax_ties_go_to_the_later_model():
    base = {"w": torch.zeros(2)}
    out = merge("magmax", base, [{"w": torch.tensor([2.0, 1.0])}, {"w": torch.tensor([-2.0, 0.5])}])["w"]
    assert torch.equal(out, torch.tensor([-2.0, 1.0]))


@SETTINGS
@given(seed=st.integers(0, 10_000), k=st.integers(2, 6))
def test_model_stock_of_identical_experts_returns_that_expert(seed, k):
    base, models = random_models(seed, 1)
    assert close(merge("model_stock", base, models * k), models[0])


def test_model_stock_ratio_matches_the_paper_formula():
    base = {"w": torch.zeros(2)}
    models = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}, {"w": torch.tensor([1.0, 1.0])}]
    taus = [m["w"] for m in models]
    cos = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for i, a in enumerate(taus) for b in taus[i + 1:]]
    c = sum(cos) / len(cos)
    t = 3 * c / (1 + 2 * c)
    mean = sum(taus) / 3
    assert torch.allclose(merge("model_stock", base, models)["w"], t * mean, atol=1e-6)


def test_model_stock_clamps_negative_ratio_to_the_base():
    base = {"w": torch.ones(2)}
    models = [{"w": torch.tensor([2.0, 1.0])}, {"w": torch.tensor([0.0, 1.0])}]  # cos = -1
    assert torch.equal(merge("model_stock", base, models)["w"], base["w"])


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_slerp_endpoints(seed):
    base, models = random_models(seed, 2)
    assert close(merge("slerp", base, models, t=0.0), models[0])
    assert close(merge("slerp", base, models, t=1.0), models[1])


def test_slerp_is_spherical_between_orthogonal_vectors_and_linear_when_parallel():
    base = {"w": torch.zeros(2)}
    a, b = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}
    mid = merge("slerp", base, [a, b], t=0.5)["w"]
    assert torch.allclose(mid, torch.tensor([math.sqrt(0.5)] * 2), atol=1e-6)  # on the unit circle
    par = {"w": torch.tensor([2.0, 1e-5])}
    lerp = merge("slerp", base, [{"w": torch.tensor([1.0, 0.0])}, par], t=0.25)["w"]
    assert torch.allclose(lerp, 0.75 * torch.tensor([1.0, 0.0]) + 0.25 * par["w"], atol=1e-7)
    zero = merge("slerp", base, [base, a], t=0.5)["w"]
    assert torch.allclose(zero, 0.5 * a["w"])


def test_lines_scales_block_l_by_alpha_plus_beta_fraction(tiny_base):
    expert = perturb(tiny_base, seed=7)
    alpha, beta = 0.2, 0.6
    out = merge("lines", tiny_base, [expert], alpha=alpha, beta=beta)
    depth_checks = {
        "visual.transformer.resblocks.0.mlp.c_fc.weight": alpha,
        "visual.transformer.resblocks.1.mlp.c_fc.weight": alpha + beta,
        "transformer.resblocks.1.attn.in_proj_weight": alpha + beta,
        "visual.conv1.weight": alpha,
        "token_embedding.weight": alpha,
        "visual.proj": alpha + beta,
        "ln_final.weight": alpha + beta,
    }
    for key, lam in depth_checks.items():
        assert torch.allclose(out[key] - tiny_base[key], lam * (expert[key] - tiny_base[key]), atol=1e-6), key


def test_lines_layer_scales_interpolate_over_four_blocks():
    keys = [f"enc.blocks.{i}.w" for i in range(4)] + ["enc.stem.w", "head.w"]
    s = layer_scales(keys, alpha=0.1, beta=0.9)
    assert [round(s[f"enc.blocks.{i}.w"], 6) for i in range(4)] == [0.1, 0.4, 0.7, 1.0]
    assert s["enc.stem.w"] == 0.1 and s["head.w"] == 1.0


def test_dare_is_unbiased_in_expectation():
    base = {"w": torch.zeros(4000)}
    g = torch.Generator().manual_seed(0)
    model = {"w": torch.randn(4000, generator=g)}
    draws = torch.stack([merge("dare", base, [model], drop=0.5, scale=1.0, seed=s)["w"] for s in range(200)])
    err = (draws.mean(0) - model["w"]).abs().mean()
    assert err < 0.1  # single draws are off by ~0.8 on average
    one = draws[0]
    assert 0.45 < (one == 0).float().mean() < 0.55
    assert torch.allclose(one[one != 0], 2 * model["w"][one != 0])


def test_dare_is_seeded_and_order_independent():
    base, models = random_models(3, 3)
    a = merge("dare", base, models, seed=5)
    b = merge("dare", dict(reversed(list(base.items()))), [dict(reversed(list(m.items()))) for m in models], seed=5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["w"], merge("dare", base, models, seed=6)["w"])


def test_breadcrumbs_drops_bottom_and_top_fractions():
    base = {"w": torch.zeros(10), "tiny": torch.zeros(1)}
    model = {"w": torch.arange(1.0, 11.0), "tiny": torch.ones(1)}
    out = merge("breadcrumbs", base, [model], beta=0.3, gamma=0.1, scale=1.0)
    assert torch.equal(out["w"], torch.tensor([0.0, 0, 0, 4, 5, 6, 7, 8, 9, 0]))
    assert out["tiny"].item() == 1.0  # too small for either fraction to remove an entry


@SETTINGS
@given(seed=st.integers(0, 10_000), k=st.integers(1, 5))
def test_fisher_merge_with_equal_fisher_is_the_weighted_average(seed, k):
    base, models = random_models(seed, k)
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(k, generator=g) + 0.1).tolist()
    f = {n: torch.rand(v.shape, generator=g) + 0.5 for n, v in base.items()}
    out = merge("fisher", base, models, weights=w, fishers=[f] * k)
    assert close(out, merge("average", base, models, weights=w), atol=1e-5)


def test_fisher_weights_entries_by_their_fisher():
    base = {"w": torch.zeros(2)}
    models = [{"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([3.0, 3.0])}]
    fishers = [{"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([3.0, 1.0])}]
    out = merge("fisher", base, models, fishers=fishers)["w"]
    assert torch.allclose(out, torch.tensor([2.5, 1.5]))
    assert torch.allclose(merge("fisher", base, models, fishers=[None, fishers[1]])["w"], torch.tensor([2.5, 2.0]))


@pytest.mark.parametrize("technique", sorted(TECHNIQUES))
def test_every_technique_on_a_real_tiny_open_clip_state_dict(technique, tiny_base, tiny_experts):
    models = tiny_experts[:2] if technique == "slerp" else tiny_experts
    out = merge(technique, tiny_base, models)
    assert list(out) == list(tiny_base)
    for k, v in out.items():
        assert v.shape == tiny_base[k].shape and v.dtype == tiny_base[k].dtype and torch.isfinite(v).all()
    moved = sum(float((out[k] - tiny_base[k]).abs().sum()) for k in out)
    assert moved > 0


@pytest.mark.parametrize("technique", ["average", "slerp", "model_stock", "fisher"])
def test_interpolating_techniques_return_identical_experts_unchanged(technique, tiny_base, tiny_experts):
    e = tiny_experts[0]
    assert close(merge(technique, tiny_base, [e, e]), e, atol=1e-5)


def test_bf16_and_non_float_tensors_are_preserved():
    base = {"w": torch.zeros(3, dtype=torch.bfloat16), "step": torch.tensor([7])}
    models = [{"w": torch.ones(3, dtype=torch.bfloat16), "step": torch.tensor([7])}]
    out = merge("average", base, models)
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["step"], torch.tensor([7]))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.sampled_from([7, 1000, 70_000, 300_000]),
       frac=st.floats(0.0, 1.0), largest=st.booleans(), levels=st.sampled_from([3, 1000, 0]))
def test_selection_is_exact_including_ties(seed, n, frac, largest, levels):
    from chronomerge.merge.sparsify import topk_mask
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g).abs()
    if levels:
        x = (x * levels).round()  # many ties
    k = int(frac * n)
    mask = topk_mask(x, k, largest=largest)
    assert int(mask.sum()) == k
    if 0 < k < n:
        chosen, rest = x[mask], x[~mask]
        assert (chosen.min() >= rest.max()) if largest else (chosen.max() <= rest.min())


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), keep=st.floats(0.001, 1.0), levels=st.sampled_from([2, 50, 0]),
       dtype=st.sampled_from([torch.float32, torch.float64]), scope=st.sampled_from(["tensor", "model"]))
def test_batched_ties_trim_keeps_exactly_the_reference_entries(seed, keep, levels, dtype, scope):
    """`select_top` over many tensors at once (segmented radix select) keeps, per tensor, exactly the
    entries a per-tensor sort keeps: the ceil(keep·n) largest |τ|, ties in index order; with one
    model-wide threshold, every entry ≥ the k-th largest of the whole model."""
    from chronomerge.merge.sparsify import keep_top, select_top
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 3, 17, 1000, 40_000, 5]
    taus = [torch.randn(n, generator=g, dtype=dtype) for n in sizes]
    if levels:
        taus = [(t * levels).round() / levels for t in taus]  # many ties, zeros included
    taus[-1] = torch.zeros(5, dtype=dtype)  # a tensor nothing changed
    kept = [keep_top(t, s) for t, s in zip(taus, select_top([t.abs() for t in taus], keep, scope))]
    if scope == "model":
        everything = torch.cat([t.abs() for t in taus])
        k = math.ceil(keep * everything.numel())
        thr = everything.sort(descending=True).values[k - 1]
        expected = [torch.where(t.abs() >= thr, t, torch.zeros_like(t)) for t in taus]
    else:
        expected = []
        for t in taus:
            k = math.ceil(keep * t.numel())
            order = torch.sort(t.abs(), descending=True, stable=True).indices[:k]  # ties: index order
            e = torch.zeros_like(t)
            e[order] = t[order]
            expected.append(e)
    for t, got, want in zip(taus, kept, expected):
        assert torch.equal(got, want), (t.numel(), keep)
