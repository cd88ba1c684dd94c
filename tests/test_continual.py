"""Continual mergers: OPCM's theorems and general term, the baselines, and exact state round trips."""
import math

import pytest
import torch

from chronomerge.merge import (
    CONTINUAL,
    EMA,
    OPCM,
    ContinualAverage,
    ContinualTaskArithmetic,
    ContinualTIES,
    FisherMerge,
    load_merger,
    merge,
    save_merger,
)
from chronomerge.merge.opcm import is_projected, project, split_rank
from chronomerge.store import CheckpointStore
from conftest import perturb


def matrices(seed, t, shape=(12, 8), scale=1.0):
    g = torch.Generator().manual_seed(seed)
    base = {"layer.weight": torch.randn(shape, generator=g), "layer.bias": torch.randn(shape[0], generator=g)}
    experts = [{k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(t)]
    return base, experts


@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (10, 10)])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.9])
def test_theorem_5_1_projection_is_orthogonal_to_the_merged_task_vector(shape, alpha):
    g = torch.Generator().manual_seed(1)
    merged = torch.randn(shape, generator=g, dtype=torch.float64)
    delta = torch.randn(shape, generator=g, dtype=torch.float64)
    p = project(delta, merged, alpha, zero_diagonal=True)
    assert abs(float((p * merged).sum())) < 1e-10 * float(delta.norm() * merged.norm())
    assert float(p.norm()) <= float(delta.norm()) + 1e-12  # an orthogonal projection


def test_reduced_svd_projection_equals_the_full_matrix_sum():
    g = torch.Generator().manual_seed(2)
    merged = torch.randn(9, 5, generator=g, dtype=torch.float64)
    delta = torch.randn(9, 5, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(merged, full_matrices=True)
    r = split_rank(s, 0.5)
    full = torch.zeros_like(delta)
    for i in range(r, 9):
        for j in range(r, 5):
            if i != j:
                basis = torch.outer(u[:, i], vh[j])
                full += (delta * basis).sum() * basis
    assert torch.allclose(project(delta, merged, 0.5, zero_diagonal=True), full, atol=1e-10)


def test_without_zero_diagonal_the_projection_keeps_the_diagonal_terms():
    g = torch.Generator().manual_seed(3)
    merged, delta = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(6, 6, generator=g, dtype=torch.float64)
    kept = project(delta, merged, 0.5, zero_diagonal=False)
    assert abs(float((kept * merged).sum())) > 1e-6  # the released code's behaviour is not orthogonal


def test_split_rank_is_the_smallest_rank_reaching_alpha():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert [split_rank(s, a) for a in (0.0, 0.4, 0.41, 0.7, 1.0)] == [0, 1, 2, 2, 4]


def test_opcm_projects_fused_attention_and_not_embeddings(tiny_base):
    projected = [k for k, v in tiny_base.items() if is_projected(k, tuple(v.shape))]
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in projected
    assert "visual.transformer.resblocks.1.mlp.c_proj.weight" in projected and "visual.proj" in projected
    assert not any("embedding" in k for k in projected)


def opcm_run(base, experts, **hp):
    """Run OPCM and recompute the projected task vectors it used, for the general-term check."""
    m = OPCM(base, device="cpu", **hp)
    projections, lams, outs = [], [], []
    for e in experts:
        prev = None if m.delta is None else {k: v.clone() for k, v in m.delta.items()}
        proj = {}
        for k in base:
            tau = e[k].float() - base[k].float()
            proj[k] = tau if prev is None or not is_projected(k, tuple(tau.shape)) else project(
                tau, prev[k], hp.get("alpha", 0.5), hp.get("zero_diagonal", True))
        projections.append(proj)
        outs.append(m.update(e))
        lams.append(m.lam)
    return m, projections, lams, outs


def test_opcm_general_term_eq_7_after_several_steps():
    base, experts = matrices(4, 6)
    m, projections, lams, outs = opcm_run(base, experts)
    for t in range(1, 7):
        for k in base:
            expected = base[k] + sum(p[k] for p in projections[:t]) / lams[t - 1]
            assert torch.allclose(outs[t - 1][k], expected, atol=1e-5), (t, k)
    assert lams[0] == 1.0 and all(lam > 0 for lam in lams)


def test_opcm_first_step_returns_the_first_expert_and_adaptive_lambda_follows_eq_6():
    base, experts = matrices(5, 3)
    m = OPCM(base, device="cpu")
    out1 = m.update(experts[0])
    assert all(torch.allclose(out1[k], experts[0][k], atol=1e-6) for k in base)
    tau1 = math.sqrt(sum(float((experts[0][k] - base[k]).pow(2).sum()) for k in base))
    assert m.nbar == pytest.approx(tau1, rel=1e-6)
    prev_delta, prev_lam, prev_nbar = {k: v.clone() for k, v in m.delta.items()}, m.lam, m.nbar
    m.update(experts[1])
    proj = {k: project(experts[1][k] - base[k], prev_delta[k], 0.5) if k == "layer.weight" else experts[1][k] - base[k]
            for k in base}
    pn = math.sqrt(sum(float(v.pow(2).sum()) for v in proj.values()))
    nbar = prev_nbar / 2 + pn / 2
    lam = math.sqrt(sum(float((prev_lam * prev_delta[k] + proj[k]).pow(2).sum()) for k in base)) / nbar
    assert m.nbar == pytest.approx(nbar, rel=1e-5) and m.lam == pytest.approx(lam, rel=1e-5)


def test_theorem_5_2_norm_bound_with_sqrt_t_scaling():
    base, experts = matrices(6, 8, shape=(16, 16))
    base = {"layer.weight": base["layer.weight"]}
    experts = [{"layer.weight": e["layer.weight"]} for e in experts]
    m = OPCM(base, device="cpu", scaling="sqrt")
    bound = 0.0
    for t, e in enumerate(experts, 1):
        out = m.update(e)
        bound = max(bound, float((e["layer.weight"] - base["layer.weight"]).pow(2).sum()))
        assert m.lam == pytest.approx(math.sqrt(t))
        assert float((out["layer.weight"] - base["layer.weight"]).pow(2).sum()) <= bound * (1 + 1e-5)


def test_continual_baselines_follow_their_recurrences():
    base, experts = matrices(7, 4)
    ca, cta, ema = ContinualAverage(base, device="cpu"), ContinualTaskArithmetic(base, device="cpu", scale=0.3), \
        EMA(base, device="cpu", weight=0.25)
    running_ema = dict(base)
    for t, e in enumerate(experts, 1):
        avg = ca.update(e)
        ta = cta.update(e)
        em = ema.update(e)
        running_ema = {k: 0.75 * running_ema[k] + 0.25 * e[k] for k in base}
        for k in base:
            assert torch.allclose(avg[k], sum(x[k] for x in experts[:t]) / t, atol=1e-5)
            assert torch.allclose(ta[k], base[k] + 0.3 * sum(x[k] - base[k] for x in experts[:t]), atol=1e-5)
            assert torch.allclose(em[k], running_ema[k], atol=1e-5)


def test_continual_ties_merges_previous_and_new_with_ties():
    base, experts = matrices(8, 3)
    ct = ContinualTIES(base, device="cpu", keep=0.5)
    first = ct.update(experts[0])
    assert all(torch.equal(first[k], experts[0][k]) for k in base)
    second = ct.update(experts[1])
    expected = merge("ties", base, [first, experts[1]], keep=0.5, scale=1.0)
    assert all(torch.equal(second[k], expected[k]) for k in base)


def test_fisher_merge_accumulates_fisher():
    base, experts = matrices(9, 2)
    f1 = {k: torch.full(v.shape, 2.0) for k, v in base.items()}
    f2 = {"layer.weight": torch.full(base["layer.weight"].shape, 4.0)}  # bias has none: F = 1
    fm = FisherMerge(base, device="cpu", alpha=0.4)
    fm.update(experts[0], fisher=f1)
    out = fm.update(experts[1], fisher=f2)
    w = (0.6 * 2 * experts[0]["layer.weight"] + 0.4 * 4 * experts[1]["layer.weight"]) / (0.6 * 2 + 0.4 * 4)
    b = (0.6 * 2 * experts[0]["layer.bias"] + 0.4 * 1 * experts[1]["layer.bias"]) / (0.6 * 2 + 0.4)
    assert torch.allclose(out["layer.weight"], w, atol=1e-5) and torch.allclose(out["layer.bias"], b, atol=1e-5)
    assert torch.allclose(fm.fisher["layer.weight"], torch.full_like(w, 0.6 * 2 + 0.4 * 4))
    assert torch.allclose(fm.fisher["layer.bias"], torch.full_like(b, 0.6 * 2 + 0.4))


@pytest.mark.parametrize("name", sorted(CONTINUAL))
def test_state_round_trips_through_the_store_bit_for_bit(name, tmp_path, tiny_base):
    experts = [perturb(tiny_base, seed=s, only="visual.") for s in range(1, 5)]
    fishers = [{k: torch.rand(v.shape, generator=torch.Generator().manual_seed(s)) + 0.1
                for k, v in e.items() if k.startswith("visual.transformer")} for s, e in enumerate(experts)]
    extras = (lambda i: {"fisher": fishers[i]}) if name == "fisher_merge" else (lambda i: {})
    store = CheckpointStore(tmp_path / "store")
    uninterrupted = CONTINUAL[name](tiny_base, device="cpu")
    for i, e in enumerate(experts):
        final = uninterrupted.update(e, **extras(i))
    resumed = CONTINUAL[name](tiny_base, device="cpu")
    for i, e in enumerate(experts[:2]):
        resumed.update(e, **extras(i))
    oid = save_merger(store, resumed)
    resumed = load_merger(store, oid, tiny_base, device="cpu")
    assert type(resumed) is CONTINUAL[name] and resumed.t == 2
    for i, e in enumerate(experts[2:], 2):
        out = resumed.update(e, **extras(i))
    assert all(torch.equal(out[k], final[k]) for k in final)
    assert uninterrupted.state()[1] == resumed.state()[1]
