"""Per-tensor merge rules. Each rule sees one parameter at a time through a `TensorJob`.

A rule asks for model i's tensor with `job.load(i)` as often as it needs, and never holds more
than a few tensors at once, so memory does not grow with the number of merged models K. All
arithmetic runs in float32 (float64 inputs stay float64) on the job's device.
Notation (docs/methods.md): θ0 base, θ_i model i, τ_i = θ_i − θ0, λ = `scale`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from chronomerge.merge import sparsify as sp


@dataclass
class TensorJob:
    """One parameter of a merge: its name, θ0, a loader for θ_i, weights, per-key prepared data."""

    key: str
    base: torch.Tensor
    load: Callable[[int], torch.Tensor]
    k: int
    weights: list[float] | None = None
    load_fisher: Callable[[int], torch.Tensor | None] = lambda i: None
    prep: dict[str, Any] = field(default_factory=dict)

    def weight(self, i: int) -> float:
        return 1.0 if self.weights is None else self.weights[i]

    def tau(self, i: int) -> torch.Tensor:
        return self.load(i) - self.base


def average(job: TensorJob, hp: dict) -> torch.Tensor:
    """Weight averaging: θ = Σ w_i θ_i / Σ w_i (uniform w by default; TIME Table 1)."""
    acc = torch.zeros_like(job.base)
    for i in range(job.k):
        acc.add_(job.load(i), alpha=job.weight(i))
    return acc / sum(job.weight(i) for i in range(job.k))


def slerp(job: TensorJob, hp: dict) -> torch.Tensor:
    """SLERP of two task vectors: θ0 + sin((1−t)Ω)/sinΩ·τ_1 + sin(tΩ)/sinΩ·τ_2 (Shoemake 1985).

    Convention: t weights the *second* model (t=0 returns model 1, t=1 model 2). Ω is the angle
    between τ_1 and τ_2 of this tensor; when either is zero or |cos Ω| > 0.9995 the rule falls back
    to linear interpolation θ0 + (1−t)τ_1 + tτ_2.
    """
    t = hp["t"]
    t1, t2 = job.tau(0), job.tau(1)
    n1, n2 = t1.norm(), t2.norm()
    if n1 == 0 or n2 == 0:
        return job.base + (1 - t) * t1 + t * t2
    cos = float((t1 * t2).sum() / (n1 * n2))
    if abs(cos) > 0.9995:
        return job.base + (1 - t) * t1 + t * t2
    omega = math.acos(max(-1.0, min(1.0, cos)))
    s = math.sin(omega)
    return job.base + (math.sin((1 - t) * omega) / s) * t1 + (math.sin(t * omega) / s) * t2


def model_stock(job: TensorJob, hp: dict) -> torch.Tensor:
    """Model Stock (Jang et al. 2024, Eq. 6), per tensor: θ = t·mean(θ_i) + (1 − t)·θ0.

    cos is the mean pairwise cosine of the τ_i, computed in two streaming passes from
    Σ_{i≠j} cos_ij = ‖Σ_i τ_i/‖τ_i‖‖² − K' (K' the non-zero τ_i; a zero τ has cosine 0 with all),
    and t = K·cos / (1 + (K − 1)·cos). Convention: t is clamped to [0, 1] (negative cos can push it
    outside; the paper's code does not clamp).
    """
    k = job.k
    norms = [float(job.tau(i).norm()) for i in range(k)]
    unit_sum = torch.zeros_like(job.base)
    mean = torch.zeros_like(job.base)
    for i in range(k):
        theta = job.load(i)
        mean.add_(theta, alpha=1.0 / k)
        if norms[i] > 0:
            unit_sum.add_(theta - job.base, alpha=1.0 / norms[i])
    nonzero = sum(n > 0 for n in norms)
    cos = (float(unit_sum.pow(2).sum()) - nonzero) / (k * (k - 1))
    denom = 1 + (k - 1) * cos
    t = 0.0 if denom <= 0 else min(1.0, max(0.0, k * cos / denom))
    return t * mean + (1 - t) * job.base


def magmax(job: TensorJob, hp: dict) -> torch.Tensor:
    """MagMax (Marczak et al. 2024): per entry the τ_i of largest |τ_i|, θ = θ0 + λ·τ.

    Convention: ties go to the later model (the order of `models`).
    """
    best = torch.zeros_like(job.base)
    best_abs = torch.full_like(job.base, -1.0)
    for i in range(job.k):
        tau = job.tau(i)
        take = tau.abs() >= best_abs
        best = torch.where(take, tau, best)
        best_abs = torch.where(take, tau.abs(), best_abs)
    return job.base + hp["scale"] * best


def fisher(job: TensorJob, hp: dict) -> torch.Tensor:
    """Fisher-weighted average (Matena & Raffel 2022; CMM's merge): Σ w_i F_i θ_i / (Σ w_i F_i + ε).

    F_i is a diagonal Fisher (CMM: AdamW `exp_avg_sq`); a model without one for this tensor uses
    F = 1, so equal Fishers reduce to the weighted average (up to ε).
    """
    num = torch.zeros_like(job.base)
    den = torch.zeros_like(job.base)
    for i in range(job.k):
        f = job.load_fisher(i)
        wf = job.weight(i) * (torch.ones_like(job.base) if f is None else f)
        num.add_(wf * job.load(i))
        den.add_(wf)
    return num / (den + hp["eps"])


# -- the task-vector family: sparsify → consensus → combine and scale -------------------------

def _sparsified(job: TensorJob, i: int, hp: dict, rule: str | None) -> torch.Tensor:
    tau = job.tau(i)
    if rule == "top":
        return sp.keep_top(tau, job.prep["selection"][i])
    if rule == "dare":
        return sp.dare_drop(tau, hp["drop"], hp["seed"], job.key, i)
    if rule == "breadcrumbs":
        return sp.breadcrumbs_mask(tau, hp["beta"], hp["gamma"])
    return tau


def combined_task_vector(job: TensorJob, hp: dict, sparsify: str | None, elect: bool) -> torch.Tensor:
    """τ_m before scaling: Σ_i w_i τ̃_i, or with `elect` the TIES consensus.

    TIES consensus (Yadav et al. 2023, steps 2-3): s = sign(Σ_i τ̂_i) with zeros broken to +, then
    per entry the mean of the τ̂_i whose sign equals s (zero entries do not count; entries with no
    agreeing model stay 0). `aggregate="sum"` takes their sum instead of their mean (the TIES code's
    `merge_func="sum"`, used by the OPCM paper's continual TIES baseline). One streaming pass: positive and
    negative parts are summed and counted
    separately, and Σ_i τ̂_i is their sum, so the τ̂_i are neither held nor recomputed.
    """
    if not elect:
        acc = torch.zeros_like(job.base)
        for i in range(job.k):
            acc.add_(_sparsified(job, i, hp, sparsify), alpha=job.weight(i))
        return acc
    count_dtype = torch.uint8 if job.k < 256 else torch.int32
    pos_sum, neg_sum = torch.zeros_like(job.base), torch.zeros_like(job.base)
    pos_n = torch.zeros_like(job.base, dtype=count_dtype)
    neg_n = torch.zeros_like(job.base, dtype=count_dtype)
    for i in range(job.k):
        tau = _sparsified(job, i, hp, sparsify)
        pos_sum.add_(tau.clamp(min=0))
        neg_sum.add_(tau.clamp(max=0))
        pos_n.add_(tau > 0)
        neg_n.add_(tau < 0)
        del tau
    positive = (pos_sum + neg_sum) >= 0
    if hp.get("aggregate", "mean") == "sum":
        return torch.where(positive, pos_sum, neg_sum)
    return torch.where(positive, pos_sum / pos_n.clamp(min=1), neg_sum / neg_n.clamp(min=1))


def task_vector_rule(sparsify: str | None, elect: bool) -> Callable[[TensorJob, dict], torch.Tensor]:
    """A row of the family: θ = θ0 + λ·τ_m (task arithmetic, TIES, DARE, Breadcrumbs, ...)."""

    def rule(job: TensorJob, hp: dict) -> torch.Tensor:
        return job.base + hp["scale"] * combined_task_vector(job, hp, sparsify, elect)

    return rule


def lines(job: TensorJob, hp: dict) -> torch.Tensor:
    """LiNeS (Wang et al. 2025, Eq. 2): θ = θ0 + λ_l·τ_m with λ_l = α + β(l − 1)/(L − 1).

    τ_m is the task-arithmetic sum or the TIES consensus (`over`); λ_l comes from the tensor's
    depth, prepared once per merge by `chronomerge.merge.lines.layer_scales`.
    """
    elect = hp["over"] == "ties"
    tau_m = combined_task_vector(job, hp, "top" if elect else None, elect)
    return job.base + job.prep["lines_scale"] * tau_m
