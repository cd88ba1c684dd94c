"""The sparsify slot of the task-vector pipeline: which entries of a task vector τ_i survive.

Every function takes τ (one tensor of one model) and returns a tensor of the same shape with the
dropped entries set to zero; the TIES trim's selections are found for all of a model's tensors at
once (`select_top`). Conventions chronomerge takes (public code disagrees on them):

* `keep_top`: `keep` is the fraction *kept* (TIES "top-k 20%" is keep=0.2), not the fraction
  dropped; per tensor exactly k = ceil(keep·n) entries survive (ties broken by index), so a
  one-element tensor is never wiped out. With a model-wide threshold (TIES `scope="model"`), entries
  with |τ| ≥ the threshold survive.
* `dare_drop`: each entry is dropped with probability p and survivors are rescaled by 1/(1−p), so
  E[τ̃] = τ (DARE, Yu et al. 2024, Eq. 1). The mask is seeded from (seed, tensor name, model index),
  so a merge is reproducible and does not depend on the order in which tensors are visited.
* `breadcrumbs_mask`: zero the floor(β·n) smallest and the floor(γ·n) largest |τ| (Breadcrumbs,
  Davari & Belilovsky 2024); a tensor too small for a fraction to remove a whole entry keeps it.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_SAMPLE = 1 << 14
_SAMPLE_MARGIN = 4.0  # standard deviations of the sample rank kept on each side of the target


def _kth_value(flat: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """The exact k-th largest (or smallest) entry of a 1-D tensor.

    Sampling select (Floyd & Rivest 1975): a fixed-seed sample brackets the target value, one
    counting pass checks the bracket, and only the entries inside it are ranked exactly. The result
    never depends on the sample: when the bracket misses, the bracket is widened to the whole range.
    About 10x faster than `torch.kthvalue` on the CPU, and avoids it on CUDA, where it is slow.
    """
    if not largest:
        return -_kth_value(-flat, k, largest=True)
    n = flat.numel()
    if n <= 4 * _SAMPLE:
        return torch.topk(flat, k, sorted=False).values.min()
    gen = torch.Generator(device=flat.device).manual_seed(n)
    sample = flat[torch.randint(n, (_SAMPLE,), generator=gen, device=flat.device)].sort(descending=True).values
    centre = k / n * _SAMPLE
    spread = _SAMPLE_MARGIN * (centre * (1 - k / n)) ** 0.5 + 1
    hi = sample[max(int(centre - spread), 0)] if centre - spread >= 1 else flat.max()
    lo = sample[min(int(centre + spread), _SAMPLE - 1)] if centre + spread < _SAMPLE - 1 else flat.min()
    above = int((flat > hi).sum())
    if above < k:
        band = flat[(flat >= lo) & (flat <= hi)]
        if above + band.numel() >= k:
            return torch.topk(band, k - above, sorted=False).values.min()
    return torch.topk(flat, k, sorted=False).values.min()


def topk_mask(scores: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Boolean mask of exactly the k largest (or smallest) entries of `scores`.

    Selects a threshold, then admits entries equal to it in index order until k are chosen, so the
    count is exact even with ties (for example the many zeros of a sparse task vector).
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    thr = _kth_value(flat, k, largest)
    mask = flat > thr if largest else flat < thr
    need = k - int(mask.sum())
    if need > 0:
        mask[torch.nonzero(flat == thr).squeeze(1)[:need]] = True
    return mask.view(scores.shape)


@dataclass(frozen=True)
class Selection:
    """Which entries of one tensor's |τ| a TIES trim keeps: those above `threshold`, and of those
    equal to it the first `ties` in index order (all of them when `ties` is None)."""
    threshold: float
    ties: int | None = None


def select_top(abs_values: Sequence[torch.Tensor], keep: float, scope: str = "tensor") -> list[Selection]:
    """The TIES trims of one model's tensors (all |τ| of one dtype and device), found in one
    batched pass: per tensor exactly k = ceil(keep·n) entries (scope "tensor"), or one model-wide
    threshold over every entry, ties kept (scope "model").

    Exact segmented radix select: non-negative floats order as their bit patterns, so each tensor's
    k-th largest value is found 11 bits at a time from the top, one histogram over all tensors per
    digit (`torch.bincount` on segment · 2¹¹ + digit), each round keeping only the entries whose
    prefix matches the selected one. No per-tensor host sync; the cost is a few passes over the
    model, like averaging it.
    """
    sizes = [t.numel() for t in abs_values]
    flat = torch.cat([t.reshape(-1) for t in abs_values])
    if scope == "model":
        sizes = [flat.numel()]
    n = torch.tensor(sizes, dtype=torch.int64, device=flat.device)
    k = torch.ceil(keep * n.double()).long().clamp(1, None).minimum(n)
    value, greater, equal = _segmented_kth_largest(flat, sizes, k)
    if scope == "model":
        return [Selection(float(value[0]))] * len(abs_values)
    ties = (k - greater).tolist()
    return [Selection(v, None if t == e else t) for v, t, e in zip(value.tolist(), ties, equal.tolist())]


_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
           torch.bfloat16: torch.int16}


_DIGIT = 11  # bits per radix round: 2048 bins per tensor keeps the histograms small for any model


def _segmented_kth_largest(flat: torch.Tensor, sizes: Sequence[int], k: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per contiguous segment of `flat` (non-negative floats): its k-th largest value, how many
    entries exceed it and how many equal it. Integer work in int32 (int64 for float64 only)."""
    bits = torch.finfo(flat.dtype).bits
    idt = torch.int64 if bits == 64 else torch.int32
    dev = flat.device
    keys = flat.view(_INT_OF[flat.dtype]).to(idt)  # no copy for float32 / float64
    n_seg, width = len(sizes), 1 << _DIGIT
    first = torch.arange(n_seg, dtype=idt, device=dev) * width
    prefix = torch.zeros(n_seg, dtype=torch.int64, device=dev)
    greater = torch.zeros_like(prefix)
    rest = k.to(dev).clone()
    sizes = list(sizes)  # entries still in play, per segment (contiguous, in segment order)
    shifts = list(range(bits - _DIGIT, 0, -_DIGIT)) + [0]
    for shift, top in zip(shifts, [bits] + shifts):
        bins = (keys >> shift) & ((1 << (top - shift)) - 1)  # this digit, offset per segment below
        start = 0
        for i, n in enumerate(sizes):
            if i and n:
                bins[start:start + n].add_(i * width)
            start += n
        hist = torch.bincount(bins, minlength=n_seg * width).view(n_seg, width)
        above = hist.flip(1).cumsum(1)  # above[:, j]: entries whose digit is ≥ width − 1 − j
        full = (above < rest[:, None]).sum(1)  # the bins wholly above the k-th entry
        chosen = width - 1 - full
        passed = above.gather(1, (full - 1).clamp(min=0)[:, None])[:, 0] * (full > 0)
        greater += passed
        rest -= passed
        prefix = (prefix << (top - shift)) | chosen
        equal = hist.gather(1, chosen[:, None])[:, 0]
        if shift:  # keep the entries in each segment's chosen bin (they stay grouped by segment)
            picked = torch.zeros(n_seg * width, dtype=torch.bool, device=dev)
            picked[first + chosen] = True
            keys = keys[picked[bins]]
            sizes = equal.tolist()
    value = prefix.to(_INT_OF[flat.dtype]).view(flat.dtype)
    return value, greater, equal


def keep_top(tau: torch.Tensor, selection: Selection) -> torch.Tensor:
    """TIES trim (Yadav et al. 2023, step 1): keep the entries of |τ| that `selection` names."""
    a = tau.abs()
    if selection.ties is None:
        mask = a >= selection.threshold
    else:
        at = a == selection.threshold
        mask = (a > selection.threshold) | (at & (torch.cumsum(at.reshape(-1), 0).view(a.shape) <= selection.ties))
    return torch.where(mask, tau, torch.zeros_like(tau))


def dare_drop(tau: torch.Tensor, p: float, seed: int, key: str, index: int) -> torch.Tensor:
    """DARE: τ̃ = (1 − Z) ⊙ τ / (1 − p), Z ~ Bernoulli(p), seeded per (seed, key, model index)."""
    if p == 0.0:
        return tau
    digest = hashlib.sha256(f"{seed}/{key}/{index}".encode()).digest()
    gen = torch.Generator(device=tau.device)
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    keep = torch.rand(tau.shape, generator=gen, device=tau.device) >= p
    return torch.where(keep, tau / (1.0 - p), torch.zeros_like(tau))


def breadcrumbs_mask(tau: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the β bottom and γ top fractions of |τ| (floor counts)."""
    n = tau.numel()
    n_low, n_high = math.floor(beta * n), math.floor(gamma * n)
    if n_low + n_high == 0:
        return tau
    a = tau.abs()
    drop = topk_mask(a, n_low, largest=False) | topk_mask(a, n_high, largest=True)
    return torch.where(drop, torch.zeros_like(tau), tau)
