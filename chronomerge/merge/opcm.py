"""OPCM: continual merging by orthogonal projection (Tang et al. 2025, "Merging Models on the Fly
Without Retraining: A Sequential Approach to Scalable Continual Model Merging").

For t ≥ 2 every 2-D linear weight W (open_clip's fused attention `in_proj_weight`, `out_proj`,
MLP `c_fc`/`c_proj`, `proj`, `text_projection`; not the embeddings) is projected away from the
dominant singular subspace of the merged task vector (Eq. 5), with a reduced SVD:

    ΔW_merged = U Σ Vᵀ,  r_α = min{ r : Σ_{i≤r} σ_i ≥ α Σ_i σ_i },
    P(X) = Σ_{i,j ≥ r_α, i≠j} ⟨X, u_i v_jᵀ⟩ u_i v_jᵀ
         = (I − U_r U_rᵀ) X (I − V_r V_rᵀ) − Σ_{i ≥ r_α} (u_iᵀ X v_i) u_i v_iᵀ.

The second form needs only the first min(m, n) singular pairs, so it equals the full-matrix sum.
Other parameters are not projected (P = identity). Then (Eq. 6-7):

    n̄_t = ((t−1)/t)·n̄_{t−1} + ‖Δθ_proj^(t)‖/t,   λ_t = ‖λ_{t−1}Δθ_merged^(t−1) + Δθ_proj^(t)‖ / n̄_t
    θ_merged^(t) = θ0 + (λ_{t−1}Δθ_merged^(t−1) + Δθ_proj^(t)) / λ_t

with θ_merged^(1) = θ_1, λ_1 = 1, n̄_1 = ‖τ_1‖; norms are over all merged parameters.
`scaling="sqrt"` uses λ_t = √t instead (the setting of Theorem 5.2). `zero_diagonal=False`
keeps the i = j terms, reproducing the authors' first release, whose diagonal removal was a no-op.
A zero ΔW_merged (a tensor nothing has changed yet) leaves X unprojected.
"""
from __future__ import annotations

import math

import torch

from chronomerge.merge import params as P
from chronomerge.merge.continual import ContinualMerger
from chronomerge.merge.registry import default_device


def is_projected(key: str, shape: tuple[int, ...]) -> bool:
    """2-D linear weights are projected; embeddings (token, positional) are not."""
    return len(shape) == 2 and "embedding" not in key


def split_rank(s: torch.Tensor, alpha: float) -> int:
    """r_α: the smallest r with Σ_{i≤r} σ_i ≥ α Σ σ_i (0 when α = 0)."""
    target = alpha * float(s.sum())
    if target <= 0:
        return 0
    return min(int((torch.cumsum(s, 0) < target).sum()) + 1, s.numel())


def project(delta: torch.Tensor, merged: torch.Tensor, alpha: float, zero_diagonal: bool = True) -> torch.Tensor:
    """P(ΔW_t) against the singular subspace of ΔW_merged (OPCM Eq. 5), via a reduced SVD."""
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    if float(s.sum()) == 0.0:
        return delta
    r = split_rank(s, alpha)
    ur, vr = u[:, :r], vh[:r].T
    ut_d = ur.T @ delta
    out = delta - ur @ ut_d - (delta @ vr) @ vr.T + ur @ (ut_d @ vr) @ vr.T
    if zero_diagonal and r < s.numel():
        uk, vk = u[:, r:], vh[r:].T
        diag = (uk * (delta @ vk)).sum(0)
        out = out - (uk * diag) @ vk.T
    return out


class OPCM(ContinualMerger):
    """Orthogonal-projection continual merging (see module docstring for the equations)."""

    name = "opcm"
    PARAMS = {"alpha": P.fraction(0.5, False, False), "scaling": P.choice("adaptive", "adaptive", "sqrt"),
              "zero_diagonal": P.choice(True, True, False)}
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
        sq_proj = sq_comb = 0.0
        for k in keys:
            b = self.base[k].to(dev, torch.float32)
            tau = model[k].to(dev, torch.float32) - b
            if self.delta is None:
                proj, comb = tau, tau
            else:
                prev = self.delta[k].to(dev)
                proj = tau
                if is_projected(k, tuple(tau.shape)):
                    proj = project(tau, prev, self.hp["alpha"], self.hp["zero_diagonal"])
                comb = self.lam * prev + proj
            sq_proj += float(proj.double().pow(2).sum())
            sq_comb += float(comb.double().pow(2).sum())
            combined[k] = comb.cpu()
        proj_norm = math.sqrt(sq_proj)
        if self.delta is None:
            lam, self.nbar = 1.0, proj_norm
        else:
            self.nbar = (self.t - 1) / self.t * self.nbar + proj_norm / self.t
            if self.hp["scaling"] == "sqrt":
                lam = math.sqrt(self.t)
            else:
                lam = math.sqrt(sq_comb) / self.nbar if self.nbar > 0 else 1.0
        self.lam, self.last_projection_norm = lam, proj_norm
        self.delta = {k: v / lam for k, v in combined.items()}
        merged = {k: (self.base[k].float() + self.delta[k]).to(self.base[k].dtype) for k in keys}
        merged.update({k: self.base[k].clone() for k in self.base if k not in merged})
        return merged
