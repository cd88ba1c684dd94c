"""OPCM: continual merging by orthogonal projection (Tang et al. 2025, "Merging Models on the Fly
Without Retraining: A Sequential Approach to Scalable Continual Model Merging").

For t ≥ 2 every projected matrix W (see `matrices`) is projected away from the dominant singular
subspace of the merged task vector ΔW_merged = U Σ Vᵀ; other parameters are added unprojected
(P = identity). Then (Eq. 6-7):

    n̄_t = ((t−1)/t)·n̄_{t−1} + n_t/t,   λ_t = ‖λ_{t−1}Δθ_merged^(t−1) + Δθ_proj^(t)‖ / n̄_t
    θ_merged^(t) = θ0 + (λ_{t−1}Δθ_merged^(t−1) + Δθ_proj^(t)) / λ_t

with θ_merged^(1) = θ_1, λ_1 = 1, n̄_1 = ‖τ_1‖; norms are over all merged parameters.
`scaling="sqrt"` uses λ_t = √t instead (the setting of Theorem 5.2).

The paper's equations and the authors' released code (FusionBench `opcm`, which produced the
paper's Table 1) differ in four ways; each is a named hyperparameter, and the **defaults are the
released code's**, the convention behind Table 1 (`PAPER` lists the Eq. 5 settings):

* `projection`: "block" (released) zeroes only the top-left r×r block of Uᵀ·ΔW_t·V and its diagonal,
  keeping the cross terms (i < r ≤ j, j < r ≤ i):
      P(X) = X − U_r (U_rᵀ X V_r) V_rᵀ − Σ_{i ≥ r} (u_iᵀ X v_i) u_i v_iᵀ;
  "eq5" (the paper, Eq. 5) drops every row and column of the top-r singular pairs and the diagonal:
      P(X) = Σ_{i,j ≥ r, i≠j} ⟨X, u_i v_jᵀ⟩ u_i v_jᵀ
           = (I − U_r U_rᵀ) X (I − V_r V_rᵀ) − Σ_{i ≥ r} (u_iᵀ X v_i) u_i v_iᵀ.
  Both need only a reduced SVD (the diagonal has min(m, n) terms), so they equal the full-matrix
  forms, and both are orthogonal to ΔW_merged (Theorem 5.1) when the diagonal is zeroed.
  `zero_diagonal=False` keeps the i = j terms (i ≥ r), as the authors' first release did by accident.
* `rank_rule`: "released" takes r = the first index i (0-based) with Σ_{k≤i} σ_k / Σσ > α, i.e. the
  number of leading σ whose cumulative share is ≤ α (0 when none exceeds α); "eq5" takes the smallest
  r with Σ_{i≤r} σ_i ≥ α Σσ. The released rule keeps one direction fewer whenever the share hits α
  strictly between two ranks.
* `norm`: n_t in the n̄ recurrence is ‖τ_t‖ (the raw task vector, "raw", released) or ‖Δθ_proj^(t)‖
  (the projected one, "projected", the paper's text).
* `matrices`: "linear" (released) projects the weights that are `nn.Linear` layers in Hugging Face's
  CLIP vision model, on which Table 1 was measured: q, k and v (open_clip fuses them in
  `in_proj_weight`, which is split into its three row blocks and projected block by block), the
  attention output and the MLP's `c_fc` / `c_proj`; not the patch embedding or the output projections
  (`proj`, `text_projection`). "all" projects every 2-D weight but the embeddings, the fused
  `in_proj_weight` as one matrix and `proj` / `text_projection` included (the paper: "linear layers").
A zero ΔW_merged (a tensor nothing has changed yet) leaves X unprojected.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch

from chronomerge.merge import params as P
from chronomerge.merge.continual import ContinualMerger
from chronomerge.merge.registry import default_device

PAPER = {"projection": "eq5", "rank_rule": "eq5", "norm": "projected", "matrices": "all"}
"""The paper's equations (Eq. 5-7) as written; the defaults are the released code's."""

_LINEAR_SUFFIXES = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def is_projected(key: str, shape: tuple[int, ...], matrices: str = "linear") -> bool:
    """Whether parameter `key` is projected: under "all" every 2-D weight but the embeddings, under
    "linear" the transformer blocks' linear layers (see the module docstring)."""
    if len(shape) != 2 or "embedding" in key:
        return False
    return matrices == "all" or key.endswith(_LINEAR_SUFFIXES)


def split_ranks(s: torch.Tensor, alpha: float, rule: str = "eq5") -> torch.Tensor:
    """r for each row of singular values `s` (… × k, descending): the number of leading singular
    directions protected (see `rank_rule` in the module docstring). Shares are taken in float64."""
    s = s.double()
    cum = torch.cumsum(s, -1)
    total = cum[..., -1:]
    if rule == "released":
        return (cum / total.clamp(min=torch.finfo(s.dtype).tiny) > alpha).double().argmax(-1)
    target = alpha * total
    r = ((cum < target).sum(-1) + 1).clamp(max=s.shape[-1])
    return torch.where(target[..., 0] > 0, r, torch.zeros_like(r))


def split_rank(s: torch.Tensor, alpha: float, rule: str = "eq5") -> int:
    """r for one vector of singular values (see `split_ranks`)."""
    return int(split_ranks(s[None], alpha, rule)[0])


def project_batch(delta: torch.Tensor, merged: torch.Tensor, alpha: float, zero_diagonal: bool = True,
                  projection: str = "eq5", rank_rule: str = "eq5") -> torch.Tensor:
    """P(ΔW_t) for a batch of same-shaped matrices (B × m × n) against the singular subspaces of
    the matching ΔW_merged, via one batched reduced SVD (module docstring). Each matrix has its own
    rank r (a mask, not a slice, so one set of batched products serves the whole batch):
    C = Uᵀ·ΔW_t·V holds every coefficient ⟨ΔW_t, u_i v_jᵀ⟩; "block" subtracts U (C ⊙ [i, j < r]) Vᵀ,
    "eq5" applies (I − U_r U_rᵀ) · (I − V_r V_rᵀ); the diagonal terms i ≥ r are C_ii."""
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    k = s.shape[-1]
    top = (torch.arange(k, device=s.device) < split_ranks(s, alpha, rank_rule)[:, None]).to(delta.dtype)  # B × k
    v = vh.mT
    if projection == "eq5":
        ur, vr = u * top[:, None, :], v * top[:, None, :]
        a = delta - ur @ (ur.mT @ delta)
        out = a - (a @ vr) @ vr.mT
        diag = (u * (delta @ v)).sum(1) if zero_diagonal else None
    else:
        c = u.mT @ delta @ v
        out = delta - u @ (c * (top[:, :, None] * top[:, None, :])) @ vh
        diag = torch.diagonal(c, dim1=-2, dim2=-1) if zero_diagonal else None
    if diag is not None:
        out = out - (u * (diag * (1 - top))[:, None, :]) @ vh
    untouched = s.sum(-1) == 0  # nothing has changed this tensor yet: X stays unprojected
    return torch.where(untouched[:, None, None], delta, out)


def project(delta: torch.Tensor, merged: torch.Tensor, alpha: float, zero_diagonal: bool = True,
            projection: str = "eq5", rank_rule: str = "eq5") -> torch.Tensor:
    """P(ΔW_t) of one matrix (see `project_batch`)."""
    return project_batch(delta[None], merged[None], alpha, zero_diagonal, projection, rank_rule)[0]


def _blocks(key: str, t: torch.Tensor, matrices: str) -> list[torch.Tensor]:
    """The matrices a projected parameter is projected as: q, k and v separately under "linear"."""
    if matrices == "linear" and key.endswith("in_proj_weight") and t.shape[0] % 3 == 0:
        return list(t.chunk(3))
    return [t]


def project_all(tau: Mapping[str, torch.Tensor], prev: Mapping[str, torch.Tensor], hp: Mapping[str, Any]
                ) -> dict[str, torch.Tensor]:
    """P applied to every projected parameter of a model (others unchanged): the matrices are
    grouped by shape, and each group is decomposed and projected as one batch."""
    args = (hp["alpha"], hp["zero_diagonal"], hp["projection"], hp["rank_rule"])
    keys = [k for k in tau if is_projected(k, tuple(tau[k].shape), hp["matrices"])]
    groups: dict[tuple[int, ...], list[tuple[str, int]]] = defaultdict(list)
    blocks = {k: (_blocks(k, tau[k], hp["matrices"]), _blocks(k, prev[k], hp["matrices"])) for k in keys}
    for k in keys:
        for j, b in enumerate(blocks[k][0]):
            groups[tuple(b.shape)].append((k, j))
    done: dict[str, list[torch.Tensor | None]] = {k: [None] * len(blocks[k][0]) for k in keys}
    for members in groups.values():
        out = project_batch(torch.stack([blocks[k][0][j] for k, j in members]),
                            torch.stack([blocks[k][1][j] for k, j in members]), *args)
        for (k, j), o in zip(members, out):
            done[k][j] = o
    return {k: (torch.cat(done[k]) if k in done else v) for k, v in tau.items()}


class OPCM(ContinualMerger):
    """Orthogonal-projection continual merging (see module docstring for the equations)."""

    name = "opcm"
    reference = "Orthogonal projection-based continual merging with adaptive λ(t) (Tang et al. 2025, OPCM)"
    PARAMS = {"alpha": P.fraction(0.5, False, False), "scaling": P.choice("adaptive", "adaptive", "sqrt"),
              "zero_diagonal": P.choice(True, True, False), "projection": P.choice("block", "block", "eq5"),
              "rank_rule": P.choice("released", "released", "eq5"), "norm": P.choice("raw", "raw", "projected"),
              "matrices": P.choice("linear", "linear", "all")}
    TENSOR_FIELDS = ("delta",)
    SCALAR_FIELDS = ("lam", "nbar", "last_projection_norm")

    def __init__(self, base, *, device=None, **hparams):
        super().__init__(base, device=device, **hparams)
        self.delta: dict[str, torch.Tensor] | None = None  # Δθ_merged^(t), float32 on the CPU
        self.lam = 1.0
        self.nbar = 0.0
        self.last_projection_norm = 0.0

    def _step(self, model, **extras):
        dev = torch.device(self.device) if self.device is not None else default_device()
        keys = [k for k in self.base if self.base[k].dtype.is_floating_point]
        tau = {k: model[k].to(dev, torch.float32) - self.base[k].to(dev, torch.float32) for k in keys}
        if self.delta is None:
            proj, combined = tau, tau
        else:
            prev = {k: self.delta[k].to(dev) for k in keys}
            proj = project_all(tau, prev, self.hp)
            combined = {k: self.lam * prev[k] + proj[k] for k in keys}
        sq = lambda d: float(torch.stack([v.double().pow(2).sum() for v in d.values()]).sum())  # noqa: E731  one sync
        sq_tau, proj_norm, sq_comb = sq(tau), math.sqrt(sq(proj)), sq(combined)
        n_t = math.sqrt(sq_tau) if self.hp["norm"] == "raw" else proj_norm
        if self.delta is None:
            lam, self.nbar = 1.0, n_t
        else:
            self.nbar = (self.t - 1) / self.t * self.nbar + n_t / self.t
            if self.hp["scaling"] == "sqrt":
                lam = math.sqrt(self.t)
            else:
                lam = math.sqrt(sq_comb) / self.nbar if self.nbar > 0 else 1.0
        self.lam, self.last_projection_norm = lam, proj_norm
        delta = {k: v / lam for k, v in combined.items()}
        self.delta = {k: v.cpu() for k, v in delta.items()}
        # θ0 + Δθ_merged, computed where the work ran and returned where θ0 lives
        merged = {k: (self.base[k].to(dev, torch.float32) + delta[k]).to(self.base[k].device, self.base[k].dtype)
                  for k in keys}
        merged.update({k: self.base[k].clone() for k in self.base if k not in merged})
        return merged
