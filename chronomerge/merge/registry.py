"""The one registry of merge techniques and the streaming `merge` driver.

Each row of `TECHNIQUES` names a technique, its per-tensor rule, its hyperparameters with
defaults and allowed values, whether it takes per-model weights, and the paper it implements.
The task-vector family (task arithmetic, TIES, DARE, DARE-TIES, Breadcrumbs, Breadcrumbs-TIES)
is one rule with different sparsify and consensus slots (see `techniques.task_vector_rule`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from chronomerge.merge import params as P
from chronomerge.merge import sparsify as sp
from chronomerge.merge import techniques as tq
from chronomerge.merge.lines import layer_scales
from chronomerge.statedict import check_compatible, dtype_of, shape_of

SEED = P.nonneg_int(0)
FISHERS = P.Param(None, lambda v: v is None or isinstance(v, (list, tuple)), "a list of K Fisher state dicts or None")
EPS = P.interval(1e-8, 0, math.inf, lo_open=True)


@dataclass(frozen=True)
class Technique:
    name: str
    rule: Callable[[tq.TensorJob, dict], torch.Tensor]
    params: Mapping[str, P.Param]
    reference: str
    weighted: bool = False
    min_models: int = 1
    max_models: int | None = None
    prepare: Callable[..., dict[str, dict]] | None = None


def _prepare_top(keys, base, models, hp, device) -> dict[str, dict]:
    """TIES trim: every tensor's selection (`sparsify.select_top`), one model at a time, in one
    batched pass per model and compute dtype."""
    groups: dict[torch.dtype, list[str]] = {}
    for k in keys:
        if dtype_of(base, k).is_floating_point:
            groups.setdefault(torch.float64 if dtype_of(base, k) == torch.float64 else torch.float32, []).append(k)
    prep: dict[str, dict] = {k: {"selection": []} for ks in groups.values() for k in ks}
    for m in models:
        for cdt, ks in groups.items():
            taus = [(m[k].to(device, cdt) - base[k].to(device, cdt)).abs() for k in ks]
            for k, sel in zip(ks, sp.select_top(taus, hp["keep"], hp["scope"])):
                prep[k]["selection"].append(sel)
            del taus
    return prep


def _prepare_lines(keys, base, models, hp, device) -> dict[str, dict]:
    """LiNeS: λ_l per key (alpha=None means 1/K), plus the TIES trims when over TIES."""
    alpha = 1.0 / len(models) if hp["alpha"] is None else hp["alpha"]
    prep = _prepare_top(keys, base, models, hp, device) if hp["over"] == "ties" else {}
    return {k: {**prep.get(k, {}), "lines_scale": s} for k, s in layer_scales(keys, alpha, hp["beta"]).items()}


KEEP = P.fraction(0.2, lo_open=True, hi_open=False)
SCOPE = P.choice("tensor", "tensor", "model")
AGGREGATE = P.choice("mean", "mean", "sum")  # TIES's disjoint mean, or the disjoint sum
_DARE = {"drop": P.fraction(0.9, lo_open=False, hi_open=True), "seed": SEED}
_CRUMBS = {"beta": P.fraction(0.85, False, True), "gamma": P.fraction(0.01, False, True)}
scale = P.interval  # λ: any finite real number

TECHNIQUES: dict[str, Technique] = {t.name: t for t in [
    Technique("average", tq.average, {}, "Weight averaging (Wortsman et al. 2022, model soups)", weighted=True),
    Technique("slerp", tq.slerp, {"t": P.fraction(0.5, False, False)},
              "Spherical linear interpolation (Shoemake 1985) of task vectors", min_models=2, max_models=2),
    Technique("task_arithmetic", tq.task_vector_rule(None, elect=False), {"scale": scale(0.3)},
              "Task arithmetic (Ilharco et al. 2023): θ0 + λ Σ w_i τ_i", weighted=True),
    Technique("ties", tq.task_vector_rule("top", elect=True), {"keep": KEEP, "scale": scale(1.0), "scope": SCOPE,
                                                                    "aggregate": AGGREGATE},
              "TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint mean",
              prepare=_prepare_top),
    Technique("dare", tq.task_vector_rule("dare", elect=False), {**_DARE, "scale": scale(0.3)},
              "DARE (Yu et al. 2024) + task arithmetic", weighted=True),
    Technique("dare_ties", tq.task_vector_rule("dare", elect=True),
              {**_DARE, "scale": scale(1.0), "aggregate": AGGREGATE},
              "DARE (Yu et al. 2024) + TIES sign election and disjoint mean"),
    Technique("breadcrumbs", tq.task_vector_rule("breadcrumbs", elect=False), {**_CRUMBS, "scale": scale(0.3)},
              "Model Breadcrumbs (Davari & Belilovsky 2024) + task arithmetic", weighted=True),
    Technique("breadcrumbs_ties", tq.task_vector_rule("breadcrumbs", elect=True),
              {**_CRUMBS, "scale": scale(1.0), "aggregate": AGGREGATE},
              "Model Breadcrumbs masks + TIES sign election and disjoint mean"),
    Technique("magmax", tq.magmax, {"scale": scale(1.0)}, "MagMax (Marczak et al. 2024): max-magnitude selection"),
    Technique("model_stock", tq.model_stock, {}, "Model Stock (Jang et al. 2024)", min_models=2),
    Technique("lines", tq.lines,
              {"over": P.choice("task_arithmetic", "task_arithmetic", "ties"), "alpha": P.interval(None, optional=True),
               "beta": scale(0.5), "keep": KEEP, "scope": SCOPE},
              "LiNeS (Wang et al. 2025): layer-increasing scaling of the merged task vector; alpha=None means 1/K",
              weighted=True, prepare=_prepare_lines),
    Technique("fisher", tq.fisher, {"fishers": FISHERS, "eps": EPS},
              "Fisher-weighted averaging (Matena & Raffel 2022), CMM's merge", weighted=True),
]}


def resolve_hparams(technique: str, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults filled in and every value checked; `ValueError` names the bad one and its range."""
    if technique not in TECHNIQUES:
        raise ValueError(f"unknown merge technique {technique!r}; allowed: {sorted(TECHNIQUES)}")
    hp = P.resolve(technique, TECHNIQUES[technique].params, hparams)
    if "beta" in hp and "gamma" in hp and hp["beta"] + hp["gamma"] >= 1:
        raise ValueError(f"{technique}: beta + gamma = {hp['beta'] + hp['gamma']} must be < 1 (something must survive)")
    return hp


def takes_weights(technique: str, hp: Mapping[str, Any]) -> bool:
    """Whether `technique` with hyperparameters `hp` merges with per-model weights (LiNeS over TIES does not)."""
    return TECHNIQUES[technique].weighted and hp.get("over") != "ties"


def check_weights(technique: str, weights: Sequence[float] | None, k: int, hp: Mapping[str, Any]) -> list[float] | None:
    if weights is None:
        return None
    if not takes_weights(technique, hp):
        allowed = sorted(n for n, t in TECHNIQUES.items() if t.weighted)
        raise ValueError(f"{technique} takes no per-model weights; techniques that do: {allowed}")
    w = [float(x) for x in weights]
    if len(w) != k:
        raise ValueError(f"weights has {len(w)} entries for {k} models")
    if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all zero, got {w}")
    return w


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def merge(
    technique: str,
    base: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    *,
    weights: Sequence[float] | None = None,
    device: str | torch.device | None = None,
    output_device: str | torch.device = "cpu",
    **hparams: Any,
) -> dict[str, torch.Tensor]:
    """Merge `models` (state dicts or `LazyStateDict`s) over `base` with one registered technique.

    Streams one parameter at a time: a rule loads θ_i[key] from each model as it needs it, on
    `device` (GPU when present by default), so memory holds the merged result plus a few copies
    of the largest tensor, whatever K is. Results come back on `output_device` (the CPU by
    default) in the base's dtype.
    Non-floating tensors must be equal in all models and are copied from the base.
    """
    hp = resolve_hparams(technique, hparams)
    spec = TECHNIQUES[technique]
    models = list(models)
    k = len(models)
    if k == 0:
        raise ValueError("merge needs at least one model, got an empty list")
    if k < spec.min_models or (spec.max_models is not None and k > spec.max_models):
        want = f"exactly {spec.min_models}" if spec.max_models == spec.min_models else f"at least {spec.min_models}"
        raise ValueError(f"{technique} merges {want} models, got {k}")
    check_compatible(base, models)
    w = check_weights(technique, weights, k, hp)
    fishers = hp.get("fishers")
    if fishers is not None:
        if len(fishers) != k:
            raise ValueError(f"fisher: fishers has {len(fishers)} entries for {k} models")
        for i, f in enumerate(fishers):
            for key in f or ():
                if key not in base:
                    raise ValueError(f"fisher: Fisher {i} has key {key!r} that the models lack")
                if shape_of(f, key) != shape_of(base, key):
                    raise ValueError(f"fisher: Fisher {i} of {key!r} has shape {list(shape_of(f, key))}, "
                                     f"the base has {list(shape_of(base, key))}")
    dev = torch.device(device) if device is not None else default_device()
    keys = list(base)
    prep = spec.prepare(keys, base, models, hp, dev) if spec.prepare else {}
    out: dict[str, torch.Tensor] = {}
    # Largest tensors first: their temporaries peak while the result is still small.
    for key in sorted(keys, key=lambda k: -math.prod(shape_of(base, k))):
        b = base[key]
        if not b.dtype.is_floating_point:
            for i, m in enumerate(models):
                if not torch.equal(m[key], b):
                    raise ValueError(f"non-floating tensor {key!r} differs between model {i} and the base")
            out[key] = b.to(output_device, copy=True)
            continue
        cdt = torch.float64 if b.dtype == torch.float64 else torch.float32

        def load(i: int, key: str = key) -> torch.Tensor:
            return models[i][key].to(dev, cdt)

        def load_fisher(i: int, key: str = key) -> torch.Tensor | None:
            f = None if fishers is None or fishers[i] is None else fishers[i].get(key)
            return None if f is None else f.to(dev, cdt)

        job = tq.TensorJob(key, b.to(dev, cdt), load, k, w, load_fisher, prep.get(key, {}))
        out[key] = spec.rule(job, hp).to(output_device, b.dtype)
        del job
    return {key: out[key] for key in keys}
