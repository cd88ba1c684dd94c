"""Continual mergers: small state machines that fold one new model at a time into a running merge.

All share one protocol: `update(model, **extras) -> merged state dict`, and `state()` →
`(tensors, config)` / `from_state(base, tensors, config)`, which round-trip exactly through the
checkpoint store (`save_merger` / `load_merger`), so a resumed stream continues bit-for-bit.
The returned merged tensors are shared with the merger's state: treat them as read-only.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from chronomerge.merge import params as P
from chronomerge.merge.registry import merge
from chronomerge.statedict import check_compatible

StateDict = Mapping[str, torch.Tensor]


class ContinualMerger:
    """Base class: holds θ0, the step count t, the running merge and the hyperparameters."""

    name: ClassVar[str]
    reference: ClassVar[str]  # the paper it implements, listed by `chronomerge techniques`
    PARAMS: ClassVar[dict[str, P.Param]] = {}
    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ("current",)
    SCALAR_FIELDS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base: StateDict, *, device: str | torch.device | None = None, **hparams: Any):
        self.hp = P.resolve(self.name, self.PARAMS, hparams)
        self.base = base
        self.device = device
        self.t = 0
        self.current: dict[str, torch.Tensor] | None = None

    def update(self, model: StateDict, **extras: Any) -> dict[str, torch.Tensor]:
        """Fold `model` (θ_t) in and return the merged model θ^(t)."""
        check_compatible(self.base, [model])
        self.t += 1
        self.current = self._step(model, **extras)
        return dict(self.current)

    def _step(self, model: StateDict, **extras: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _merge(self, technique: str, models: list[StateDict], **kw: Any) -> dict[str, torch.Tensor]:
        return merge(technique, self.base, models, device=self.device, **kw)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able config) from which `from_state` rebuilds this merger exactly."""
        tensors = {f"{f}/{k}": v for f in self.TENSOR_FIELDS for k, v in (getattr(self, f) or {}).items()}
        config = {"merger": self.name, "hparams": self.hp, "t": self.t,
                  "scalars": {f: getattr(self, f) for f in self.SCALAR_FIELDS}}
        return tensors, config

    @classmethod
    def from_state(cls, base: StateDict, tensors: StateDict, config: Mapping[str, Any],
                   device: str | torch.device | None = None) -> ContinualMerger:
        if config.get("merger") != cls.name:
            raise ValueError(f"state is for merger {config.get('merger')!r}, not {cls.name!r}")
        m = cls(base, device=device, **config["hparams"])
        m.t = int(config["t"])
        for f in cls.SCALAR_FIELDS:
            setattr(m, f, config["scalars"][f])
        for f in cls.TENSOR_FIELDS:
            prefix = f + "/"
            part = {k[len(prefix):]: tensors[k] for k in tensors if k.startswith(prefix)}
            setattr(m, f, part or None)
        return m


class EMA(ContinualMerger):
    """TIME's EMA merge: θ^EMA_{t+1} = (1 − w)·θ^EMA_t + w·θ_t, θ^EMA_1 = θ0 (weight w on the new model)."""

    name = "ema"
    reference = ("TIME's EMA axis: θ^(t) = (1 − w) θ^(t−1) + w θ_t "
                 '(Roth et al. 2024, "How to Merge Your Multimodal Models Over Time?")')
    PARAMS = {"weight": P.fraction(0.5, False, False)}

    def _step(self, model, **extras):
        w = self.hp["weight"]
        return self._merge("average", [self.current or self.base, model], weights=[1 - w, w])


class ContinualAverage(ContinualMerger):
    """Continual weight averaging (OPCM paper baseline): θ^(t) = ((t − 1)·θ^(t−1) + θ_t) / t."""

    name = "continual_average"
    reference = "Continual weight averaging θ^(t) = ((t−1) θ^(t−1) + θ_t)/t, a baseline of OPCM (Tang et al. 2025)"

    def _step(self, model, **extras):
        return self._merge("average", [self.current or self.base, model], weights=[self.t - 1, 1])


class ContinualTaskArithmetic(ContinualMerger):
    """Continual task arithmetic (OPCM paper baseline): θ^(t) = θ^(t−1) + λ·τ_t, θ^(0) = θ0."""

    name = "continual_task_arithmetic"
    reference = ("Continual task arithmetic θ^(t) = θ^(t−1) + λ τ_t (Ilharco et al. 2023), "
                 "a baseline of OPCM (Tang et al. 2025)")
    PARAMS = {"scale": P.interval(0.3)}

    def _step(self, model, **extras):
        return self._merge("task_arithmetic", [self.current or self.base, model],
                           weights=[1.0, self.hp["scale"]], scale=1.0)


class ContinualTIES(ContinualMerger):
    """Continual TIES, in one of two recurrences (`recurrence`):

    * "merge" (default): θ^(1) = θ_1; θ^(t) = TIES(θ^(t−1), θ_t) over θ0, the previous merge and the
      new expert as the two models of one TIES merge (keep 20%, disjoint mean, λ = 1).
    * "baseline": the OPCM paper's continual-TIES baseline code, θ^(1) = θ0 + λ·τ_1 and
      θ^(t) = θ^(t−1) + λ·TIES(θ^(t−1) − θ0, τ_t), so the previous merge counts twice. Its
      configuration there: disjoint sum (`aggregate="sum"`), λ = 0.5, keep 20%, one threshold over
      the whole model (`scope="model"`); set those hyperparameters to reproduce it.
    """

    name = "continual_ties"
    reference = "Continual TIES (Yadav et al. 2023), a baseline of OPCM (Tang et al. 2025); `recurrence` picks the form"
    PARAMS = {"keep": P.fraction(0.2, True, False), "scale": P.interval(1.0),
              "scope": P.choice("tensor", "tensor", "model"), "aggregate": P.choice("mean", "mean", "sum"),
              "recurrence": P.choice("merge", "merge", "baseline")}
    BASELINE = {"recurrence": "baseline", "aggregate": "sum", "scale": 0.5, "keep": 0.2, "scope": "model"}
    """The OPCM paper's continual-TIES baseline configuration."""

    def _step(self, model, **extras):
        hp = {k: v for k, v in self.hp.items() if k != "recurrence"}
        if self.hp["recurrence"] == "merge":
            if self.current is None:
                return {k: model[k].clone() for k in model}
            return self._merge("ties", [self.current, model], **hp)
        lam = hp["scale"]
        if self.current is None:
            return self._merge("task_arithmetic", [model], scale=lam)
        ties = self._merge("ties", [self.current, model], **{**hp, "scale": 1.0})
        return {k: (self.current[k] + lam * (ties[k] - self.base[k]) if self.base[k].dtype.is_floating_point
                    else self.current[k]) for k in self.base}


class FisherMerge(ContinualMerger):
    """CMM's Fisher-weighted merge with the previous merged model (CMM, merge stage).

    θ^(t) = ((1−α)F_prev⊙θ^(t−1) + αF_t⊙θ_t) / ((1−α)F_prev + αF_t + ε), then the stored Fisher
    accumulates F ← (1−α)F_prev + αF_t. F_t is passed as `update(model, fisher=...)` (AdamW
    `exp_avg_sq` after training task t); tensors without a Fisher use F = 1. θ^(1) = θ_1.
    """

    name = "fisher_merge"
    reference = ("Fisher-weighted merge with the previous merged model, F from AdamW's second moments "
                 "(CMM, holistic continual merging)")
    PARAMS = {"alpha": P.fraction(0.4, False, False), "eps": P.interval(1e-8, 0, float("inf"), lo_open=True)}
    TENSOR_FIELDS = ("current", "fisher")

    def __init__(self, base, *, device=None, **hparams):
        super().__init__(base, device=device, **hparams)
        self.fisher: dict[str, torch.Tensor] | None = None

    def _full_fisher(self, model: StateDict, fisher: StateDict | None) -> dict[str, torch.Tensor]:
        fisher = fisher or {}
        for k in fisher:
            if k not in model or tuple(fisher[k].shape) != tuple(model[k].shape):
                raise ValueError(f"fisher_merge: Fisher entry {k!r} does not match the model's keys or shapes")
        return {k: (fisher[k] if k in fisher else torch.ones(model[k].shape)).float()
                for k in model if model[k].dtype.is_floating_point}

    def _step(self, model, fisher: StateDict | None = None, **extras):
        f_cur = self._full_fisher(model, fisher)
        if self.current is None:
            self.fisher = f_cur
            return {k: model[k].clone() for k in model}
        a = self.hp["alpha"]
        merged = self._merge("fisher", [self.current, model], weights=[1 - a, a],
                             fishers=[self.fisher, f_cur], eps=self.hp["eps"])
        self.fisher = {k: (1 - a) * self.fisher[k] + a * f_cur[k] for k in f_cur}
        return merged
