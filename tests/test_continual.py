"""Continual mergers: OPCM's theorems and general term, the baselines, and exact state round trips."""
import math

import pytest
import torch
from conftest import perturb

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
from chronomerge.merge.opcm import PAPER, is_projected, project, project_all, project_batch, split_rank
from chronomerge.store import CheckpointStore


def matrices(seed, t, shape=(12, 8), scale=1.0):
    g = torch.Generator().manual_seed(seed)
    base = {"layer.weight": torch.randn(shape, generator=g), "layer.bias": torch.randn(shape[0], generator=g)}
    experts = [{k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(t)]
    return base, experts


@pytest.mark.parametrize("projection,rank_rule", [("eq5", "eq5"), ("block", "released")])
@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (10, 10)])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.9])
def test_theorem_5_1_projection_is_orthogonal_to_the_merged_task_vector(shape, alpha, projection, rank_rule):
    g = torch.Generator().manual_seed(1)
    merged = torch.randn(shape, generator=g, dtype=torch.float64)
    delta = torch.randn(shape, generator=g, dtype=torch.float64)
    p = project(delta, merged, alpha, True, projection, rank_rule)
    assert abs(float((p * merged).sum())) < 1e-10 * float(delta.norm() * merged.norm())
    assert float(p.norm()) <= float(delta.norm()) + 1e-12  # an orthogonal projection


@pytest.mark.parametrize("shape", [(9, 5), (5, 9)])
@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.8])
def test_block_projection_equals_the_released_codes_full_matrix_form(shape, alpha):
    """The released code: full SVD, Y = Uᵀ·ΔW·V, zero diag(Y) and Y[:r, :r] with r = argmax(cumsum/Σ > α)."""
    g = torch.Generator().manual_seed(11)
    merged = torch.randn(shape, generator=g, dtype=torch.float64)
    delta = torch.randn(shape, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(merged, full_matrices=True)
    r = int((s.cumsum(0) / s.sum() > alpha).float().argmax())
    y = u.T @ delta @ vh.T
    y.diagonal().fill_(0)
    y[:r, :r] = 0
    expected = u @ y @ vh
    assert torch.allclose(project(delta, merged, alpha, True, "block", "released"), expected, atol=1e-10)
    # the cross terms are what the paper's Eq. 5 drops and the released code keeps (none when r = 0)
    assert torch.allclose(project(delta, merged, alpha, True, "eq5", "released"), expected, atol=1e-6) == (r == 0)


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


def reference_projection(delta, merged, alpha, projection, rank_rule):
    """One matrix, written out from a full SVD: coefficients Y = Uᵀ·ΔW·V, then zero the protected
    ones ("block": Y[:r, :r]; "eq5": rows and columns < r) and the diagonal from r on."""
    u, s, vh = torch.linalg.svd(merged.double(), full_matrices=True)
    r = split_rank(s, alpha, rank_rule)
    y = u.T @ delta.double() @ vh.T
    if projection == "block":
        y[:r, :r] = 0
    else:
        y[:r, :] = 0
        y[:, :r] = 0
    d = torch.arange(r, min(y.shape))
    y[d, d] = 0
    return (u @ y @ vh).to(delta.dtype)


@pytest.mark.parametrize("projection,rank_rule", [("eq5", "eq5"), ("block", "released")])
def test_batched_projection_of_a_model_equals_the_per_matrix_reference(tiny_base, projection, rank_rule):
    """`project_all` groups same-shaped matrices into batches, each with its own rank r; it must give,
    to fp32 tolerance, what a loop of full SVDs gives matrix by matrix (q, k and v as blocks)."""
    g = torch.Generator().manual_seed(21)
    keys = [k for k in tiny_base if tiny_base[k].dtype.is_floating_point]

    def spectrum(shape, decay):  # well-separated singular values, so that fp32 resolves every direction
        k = min(shape)
        q1, q2 = (torch.linalg.qr(torch.randn(n, k, generator=g))[0] for n in shape)
        return q1 @ torch.diag(torch.exp(-decay * torch.arange(k) / k)) @ q2.T

    # merged deltas of different spectra, so that the matrices of one batch get different ranks r
    prev = {k: spectrum(tiny_base[k].shape, (0.5, 2.0, 6.0)[i % 3]) if is_projected(k, tiny_base[k].shape, "all")
            else torch.randn(tiny_base[k].shape, generator=g) for i, k in enumerate(keys)}
    tau = {k: torch.randn(tiny_base[k].shape, generator=g) for k in keys}
    hp = {**OPCM(tiny_base, projection=projection, rank_rule=rank_rule).hp}
    out = project_all(tau, prev, hp)
    ranks = set()
    for k in keys:
        if not is_projected(k, tuple(tau[k].shape), hp["matrices"]):
            assert out[k] is tau[k]
            continue
        n = 3 if k.endswith("in_proj_weight") else 1
        for t, p, o in zip(tau[k].chunk(n), prev[k].chunk(n), out[k].chunk(n)):
            ranks.add(split_rank(torch.linalg.svdvals(p.double()), hp["alpha"], rank_rule))
            ref = reference_projection(t, p, hp["alpha"], projection, rank_rule)
            assert float((o - ref).abs().max()) < 1e-4 * float(ref.abs().max()), k
    assert len(ranks) > 1  # the batches really mixed ranks


def test_a_batch_member_with_a_zero_merged_delta_stays_unprojected():
    g = torch.Generator().manual_seed(4)
    merged = torch.randn(3, 6, 5, generator=g)
    merged[1] = 0
    delta = torch.randn(3, 6, 5, generator=g)
    out = project_batch(delta, merged, 0.5)
    assert torch.equal(out[1], delta[1]) and not torch.allclose(out[0], delta[0])


def test_without_zero_diagonal_the_projection_keeps_the_diagonal_terms():
    g = torch.Generator().manual_seed(3)
    merged, delta = (
        torch.randn(6, 6, generator=g, dtype=torch.float64),
        torch.randn(6, 6, generator=g, dtype=torch.float64),
    )
    kept = project(delta, merged, 0.5, zero_diagonal=False)
    assert abs(float((kept * merged).sum())) > 1e-6  # the released code's behaviour is not orthogonal


def test_split_rank_is_the_smallest_rank_reaching_alpha():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # cumulative shares 0.4, 0.7, 0.9, 1.0
    assert [split_rank(s, a, "eq5") for a in (0.0, 0.4, 0.41, 0.7, 1.0)] == [0, 1, 2, 2, 4]


def test_released_split_rank_counts_the_shares_not_above_alpha():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert [split_rank(s, a, "released") for a in (0.0, 0.39, 0.4, 0.41, 0.7, 0.95, 1.0)] == [0, 0, 1, 1, 2, 3, 0]


def test_opcm_projected_matrices_under_both_conventions(tiny_base):
    shape = {k: tuple(v.shape) for k, v in tiny_base.items()}
    every = [k for k in tiny_base if is_projected(k, shape[k], "all")]
    linear = [k for k in tiny_base if is_projected(k, shape[k], "linear")]
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in every and "visual.proj" in every
    assert not any("embedding" in k for k in every) and set(linear) < set(every)
    assert "visual.transformer.resblocks.1.mlp.c_proj.weight" in linear
    assert "visual.transformer.resblocks.0.attn.out_proj.weight" in linear
    assert "visual.proj" not in linear and "text_projection" not in linear and "visual.conv1.weight" not in linear


def test_linear_convention_projects_q_k_v_as_separate_matrices(tiny_base):
    key = "visual.transformer.resblocks.0.attn.in_proj_weight"
    g = torch.Generator().manual_seed(12)
    tau, prev = (torch.randn(tiny_base[key].shape, generator=g) for _ in range(2))
    hp = {**OPCM(tiny_base).hp}
    out = project_all({key: tau}, {key: prev}, hp)[key]
    for i, (t, p) in enumerate(zip(tau.chunk(3), prev.chunk(3))):
        assert torch.allclose(out.chunk(3)[i], project(t, p, 0.5, True, "block", "released"), atol=1e-5)
    fused = project_all({key: tau}, {key: prev}, {**hp, "matrices": "all"})[key]
    assert not torch.allclose(out, fused, atol=1e-3)


def opcm_run(base, experts, **hp):
    """Run OPCM and recompute the projected task vectors it used, for the general-term check."""
    m = OPCM(base, device="cpu", **hp)
    projections, lams, outs = [], [], []
    for e in experts:
        prev = None if m.delta is None else {k: v.clone() for k, v in m.delta.items()}
        tau = {k: e[k].float() - base[k].float() for k in base}
        projections.append(tau if prev is None else project_all(tau, prev, m.hp))
        outs.append(m.update(e))
        lams.append(m.lam)
    return m, projections, lams, outs


@pytest.mark.parametrize("convention", [{}, PAPER])
def test_opcm_general_term_eq_7_after_several_steps(convention):
    base, experts = matrices(4, 6)
    m, projections, lams, outs = opcm_run(base, experts, **{**convention, "matrices": "all"})
    assert any(not torch.equal(p["layer.weight"], e["layer.weight"] - base["layer.weight"])
               for p, e in zip(projections[1:], experts[1:]))  # something was projected
    for t in range(1, 7):
        for k in base:
            expected = base[k] + sum(p[k] for p in projections[:t]) / lams[t - 1]
            assert torch.allclose(outs[t - 1][k], expected, atol=1e-5), (t, k)
    assert lams[0] == 1.0 and all(lam > 0 for lam in lams)


def test_released_normaliser_is_the_mean_of_raw_task_vector_norms():
    base, experts = matrices(13, 4)
    m = OPCM(base, device="cpu", matrices="all")
    raw = []
    for e in experts:
        m.update(e)
        raw.append(math.sqrt(sum(float((e[k] - base[k]).pow(2).sum()) for k in base)))
        assert m.nbar == pytest.approx(sum(raw) / len(raw), rel=1e-6)
    paper = OPCM(base, device="cpu", **PAPER)
    for e in experts:
        paper.update(e)
    assert paper.nbar < m.nbar  # projected norms are smaller than the raw ones


def test_opcm_first_step_returns_the_first_expert_and_adaptive_lambda_follows_eq_6():
    base, experts = matrices(5, 3)
    m = OPCM(base, device="cpu", **PAPER)
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


@pytest.mark.parametrize("convention", [{"matrices": "all"}, PAPER])
def test_theorem_5_2_norm_bound_with_sqrt_t_scaling(convention):
    base, experts = matrices(6, 8, shape=(16, 16))
    base = {"layer.weight": base["layer.weight"]}
    experts = [{"layer.weight": e["layer.weight"]} for e in experts]
    m = OPCM(base, device="cpu", scaling="sqrt", **convention)
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


def test_continual_ties_baseline_recurrence_counts_the_previous_merge_twice():
    base, experts = matrices(14, 3)
    ct = ContinualTIES(base, device="cpu", **ContinualTIES.BASELINE)
    first = ct.update(experts[0])
    assert all(torch.allclose(first[k], base[k] + 0.5 * (experts[0][k] - base[k]), atol=1e-6) for k in base)
    second = ct.update(experts[1])
    # TIES over the flat model: keep the top 20% of |τ| per model, elect signs, disjoint sum
    keys = sorted(base)
    flat = lambda sd: torch.cat([sd[k].flatten() for k in keys])  # noqa: E731
    taus = torch.stack([flat(first) - flat(base), flat(experts[1]) - flat(base)])
    kth = taus.abs().shape[1] - int(0.2 * taus.shape[1])
    thr = taus.abs().kthvalue(kth, dim=1, keepdim=True).values
    trimmed = torch.where(taus.abs() >= thr, taus, torch.zeros_like(taus))
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    ties = (trimmed * (torch.sign(trimmed) == sign)).sum(0)
    expected = flat(first) + 0.5 * ties
    assert torch.allclose(flat(second), expected, atol=1e-5)


def test_ties_disjoint_sum_and_mean_differ_by_the_agreeing_count():
    base, experts = matrices(15, 3)
    mean = merge("ties", base, experts, keep=1.0)
    total = merge("ties", base, experts, keep=1.0, aggregate="sum")
    for k in base:
        tau_m, tau_s = mean[k] - base[k], total[k] - base[k]
        taus = torch.stack([e[k] - base[k] for e in experts])
        sign = torch.where(taus.sum(0) >= 0, 1.0, -1.0)
        agree = (torch.sign(taus) == sign).sum(0).clamp(min=1)
        assert torch.allclose(tau_s, tau_m * agree, atol=1e-5)


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
