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


def split_rank(s: torch.Tensor, alpha: float, rule: str = "eq5") -> int:
    """r: the number of leading singular directions protected (see `rank_rule` in the module docstring)."""
    total = float(s.sum())
    if rule == "released":
        share = torch.cumsum(s, 0) / total
        return int((share > alpha).float().argmax())
    target = alpha * total
    if target <= 0:
        return 0
    return min(int((torch.cumsum(s, 0) < target).sum()) + 1, s.numel())


def project(delta: torch.Tensor, merged: torch.Tensor, alpha: float, zero_diagonal: bool = True,
            projection: str = "eq5", rank_rule: str = "eq5") -> torch.Tensor:
    """P(ΔW_t) against the singular subspace of ΔW_merged, via a reduced SVD (module docstring)."""
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    if float(s.sum()) == 0.0:
        return delta
    r = split_rank(s, alpha, rank_rule)
    ur, vr = u[:, :r], vh[:r].T
    ut_d = ur.T @ delta
    block = ur @ (ut_d @ vr) @ vr.T
    if projection == "eq5":
        out = delta - ur @ ut_d - (delta @ vr) @ vr.T + block
    else:
        out = delta - block
    if zero_diagonal and r < s.numel():
        uk, vk = u[:, r:], vh[r:].T
        diag = (uk * (delta @ vk)).sum(0)
        out = out - (uk * diag) @ vk.T
    return out


def _project_tensor(key: str, tau: torch.Tensor, prev: torch.Tensor, hp: dict) -> torch.Tensor:
    if not is_projected(key, tuple(tau.shape), hp["matrices"]):
        return tau
    args = (hp["alpha"], hp["zero_diagonal"], hp["projection"], hp["rank_rule"])
    if hp["matrices"] == "linear" and key.endswith("in_proj_weight") and tau.shape[0] % 3 == 0:
        return torch.cat([project(t, p, *args) for t, p in zip(tau.chunk(3), prev.chunk(3))])
    return project(tau, prev, *args)


class OPCM(ContinualMerger):
    """Orthogonal-projection continual merging (see module docstring for the equations)."""

    name = "opcm"
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
        combined: dict[str, torch.Tensor] = {}
        sq_tau = sq_proj = sq_comb = 0.0
        for k in keys:
            b = self.base[k].to(dev, torch.float32)
            tau = model[k].to(dev, torch.float32) - b
            if self.delta is None:
                proj, comb = tau, tau
            else:
                prev = self.delta[k].to(dev)
                proj = _project_tensor(k, tau, prev, self.hp)
                comb = self.lam * prev + proj
            sq_tau += float(tau.double().pow(2).sum())
            sq_proj += float(proj.double().pow(2).sum())
            sq_comb += float(comb.double().pow(2).sum())
            combined[k] = comb.cpu()
        proj_norm = math.sqrt(sq_proj)
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
        self.delta = {k: v / lam for k, v in combined.items()}
        merged = {k: (self.base[k].float() + self.delta[k]).to(self.base[k].dtype) for k in keys}
        merged.update({k: self.base[k].clone() for k in self.base if k not in merged})
        return merged
