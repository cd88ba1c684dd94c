"""`params.yaml`: the one configuration of a temporal merging run, validated by a schema.

Every section is a pydantic model that forbids unknown fields; `load_config` turns any violation
into a `ConfigError` that names the field (dotted path), the bad value and the allowed values.
`--set key=value` overrides (`apply_overrides`) are applied before validation.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from chronomerge.data.streams import STREAMS, USER_STREAMS
from chronomerge.merge import CONTINUAL, RECENCY, TECHNIQUES, resolve_hparams
from chronomerge.merge import params as P

INIT_MODES = ("zs", "ft", "ema", "all")
DEPLOY_MODES = ("zs", "ft", "ema", "all", "continual")


class ConfigError(ValueError):
    """A field of params.yaml (or a --set override) is missing, unknown or out of range."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    """`name`: an open_clip architecture, or `auto` (read from the checkpoint in `pretrained`).
    `pretrained`: an open_clip tag (from the local cache), an open_clip safetensors file or a Hugging
    Face CLIP folder; None: the embedded base, pretrained on the generated pool. Both are resolved
    and checked before any work (`chronomerge.models.architecture`)."""

    name: str = "chronoclip-tiny"
    pretrained: str | None = None


class DataSection(_Section):
    root: str = "data"
    seed: int = Field(0, ge=0)
    size_factor: float = Field(1.0, gt=0, le=10)


class PretrainSection(_Section):
    """Pretraining of the embedded base on the generated pool (skipped when model.pretrained is set)."""

    steps: int = Field(3000, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup: float = Field(0.05, ge=0, le=1)


class ExpertEntry(_Section):
    """An expert trained elsewhere: open_clip safetensors or a Hugging Face CLIP folder, and the
    dataset (under data.root) it is evaluated on, if any."""

    path: str
    dataset: str | None = None


class StreamSection(_Section):
    """`kind`: the embedded benchmark's `dataset-incremental` or `random` streams (`length` tasks);
    `custom`: the user's tasks in `tasks`, one per task: a dataset name (trained on) or an expert
    `{path, dataset}` (imported); `experts`: the experts in `experts`, imported in order; `arrivals`: what
    `chronomerge update` received (set by it).
    For custom, experts and arrivals, `length` may be left out: it is the number of tasks."""

    kind: Literal[(*STREAMS, *USER_STREAMS)] = "dataset-incremental"  # type: ignore[valid-type]
    length: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0)
    multitask: bool = False  # the joint-training baseline: one task of all the stream's data, T × the steps
    # custom, arrivals: in order, a dataset name under data.root (trained) or an expert entry (imported)
    tasks: list[str | ExpertEntry] = Field(default_factory=list)
    experts: list[ExpertEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _tasks(self):
        listed = {"custom": self.tasks, "arrivals": self.tasks, "experts": self.experts}.get(self.kind)
        if listed is None:
            if self.tasks or self.experts:
                raise ValueError(f"kind {self.kind!r} builds its own tasks; tasks and experts belong to kinds "
                                 f"custom, arrivals (tasks) and experts (experts)")
            if self.length is None:
                object.__setattr__(self, "length", 20)
            return self
        other = self.experts if self.kind != "experts" else self.tasks
        if not listed or other:
            need = "experts" if self.kind == "experts" else "tasks"
            raise ValueError(f"kind {self.kind!r} takes its tasks from {need} (a non-empty list), and only from it")
        if self.length is None:
            object.__setattr__(self, "length", len(listed))
        if self.length != len(listed):
            raise ValueError(f"length={self.length} must equal the number of tasks ({len(listed)})")
        return self

    @property
    def expert_paths(self) -> list[str]:
        """Every expert file or folder the stream imports."""
        return [e.path for e in [*self.experts, *self.tasks] if isinstance(e, ExpertEntry)]


class EvalSection(_Section):
    """`held_out`: the datasets of zero-shot evaluation (A_ZS) that no task trains on. None: the
    embedded benchmark's held-out sets for the embedded and arrivals streams, none for custom and
    experts streams. With no held-out sets A_ZS and GM are absent (null), not zero."""

    held_out: list[str] | None = None


class MergeSpec(_Section):
    """How one TIME axis builds its model from the store (TIME, Sec. 3: f_merge and its inputs)."""

    technique: str = "average"
    hparams: dict[str, Any] = Field(default_factory=dict)
    weight: float = Field(0.5, gt=0, le=1)  # EMA: weight w of the newest expert (weighted techniques)
    recency: str = "uniform"                # all: recency weights over the stored experts
    reverse: bool = False

    @field_validator("technique")
    @classmethod
    def _known_technique(cls, v: str) -> str:
        allowed = sorted(set(TECHNIQUES) - {"fisher"})  # the Fisher merge needs CMM's Fisher state
        if v not in allowed:
            raise ValueError(f"{v!r} is not allowed; expected one of {allowed}")
        return v

    @field_validator("recency")
    @classmethod
    def _known_recency(cls, v: str) -> str:
        if v not in RECENCY:
            raise ValueError(f"{v!r} is not allowed; expected one of {sorted(RECENCY)}")
        return v

    @model_validator(mode="after")
    def _valid_hparams(self):
        resolve_hparams(self.technique, self.hparams)
        return self


class InitSpec(MergeSpec):
    mode: Literal[INIT_MODES] = "ema"  # type: ignore[valid-type]


class DeploySpec(MergeSpec):
    """The deploy axis. `zs` deploys θ0 (the zero-shot baseline); `continual` folds each new expert
    into a continual merger (OPCM, continual task arithmetic / TIES / averaging, CMM's Fisher merge)
    whose state lives in the store, with `hparams` then being the merger's. `align` adds CMM's
    post-merge alignment of the visual projection (L1 or L2 to the previous merged model's features)."""

    mode: Literal[DEPLOY_MODES] = "ema"  # type: ignore[valid-type]
    merger: str = "opcm"
    align: Literal["none", "l1", "l2"] = "none"
    align_lr: float = Field(1e-3, gt=0)
    align_batch_size: int = Field(64, ge=1)

    @field_validator("merger")
    @classmethod
    def _known_merger(cls, v: str) -> str:
        if v not in CONTINUAL:
            raise ValueError(f"{v!r} is not allowed; expected one of {sorted(CONTINUAL)}")
        return v

    @model_validator(mode="after")
    def _valid_hparams(self):
        if self.mode == "continual":
            P.resolve(self.merger, CONTINUAL[self.merger].PARAMS, self.hparams)
        else:
            resolve_hparams(self.technique, self.hparams)
        if self.align != "none" and self.mode not in ("continual", "ema"):
            raise ValueError(
                f"align needs a merged model to carry forward: mode 'continual' or 'ema', not {self.mode!r}"
            )
        return self


class StrategySection(_Section):
    """Best-in-TIME by default: init ema, deploy ema, weighted averaging with w = 0.5."""

    init: InitSpec = Field(default_factory=InitSpec)
    deploy: DeploySpec = Field(default_factory=DeploySpec)


class TrainSection(_Section):
    steps: int = Field(100, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, gt=0)
    mode: Literal["clip", "vision", "linear"] = "clip"  # linear: CMM's tangent-space fine-tuning
    text: Literal["captions", "classes"] = "captions"  # what mode clip pairs a task's images with
    train_text: bool = True
    replay_pretrain: float = Field(0.0, ge=0, lt=1)
    replay_previous: float = Field(0.0, ge=0, lt=1)
    seed: int = Field(0, ge=0)
    bf16: bool = True
    compile: bool = False

    @model_validator(mode="after")
    def _replay(self):
        if self.replay_pretrain + self.replay_previous >= 1:
            raise ValueError("replay_pretrain + replay_previous must be < 1")
        if self.mode != "clip" and (self.replay_pretrain or self.replay_previous):
            raise ValueError("replay needs captions: use it with mode 'clip'")
        if self.mode != "clip" and self.text != "captions":
            raise ValueError(f"text {self.text!r} chooses what contrastive fine-tuning pairs images with: "
                             "use it with mode 'clip' (modes vision and linear train on class labels)")
        return self


MLFLOW_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")


class TrackingSection(_Section):
    enabled: bool = True
    mlflow_uri: str = "sqlite:///mlflow.db"
    experiment: str = "chronomerge"

    @field_validator("mlflow_uri")
    @classmethod
    def _scheme(cls, v: str) -> str:
        scheme = v.split("://", 1)[0].split("+", 1)[0] if "://" in v else ""
        if scheme and scheme not in MLFLOW_SCHEMES:
            raise ValueError(f"the scheme {scheme!r} is not one MLflow tracks to; expected a folder "
                             f"or one of {', '.join(s + '://' for s in MLFLOW_SCHEMES)}")
        return v


GATED = Literal["A_KA", "A_ZS", "GM", "ACC"]


class GateSection(_Section):
    """Promotion gate: each metric of the candidate ≥ the promoted model's value − tolerance, and
    ≥ its floor (an absolute minimum, checked for the first model too)."""

    metrics: list[GATED] = Field(default_factory=lambda: ["A_ZS"], min_length=1)
    tolerance: float = Field(0.02, ge=0, le=1)
    floor: dict[GATED, float] = Field(default_factory=dict)

    @field_validator("floor")
    @classmethod
    def _fractions(cls, v: dict) -> dict:
        bad = {k: x for k, x in v.items() if not 0 <= x <= 1}
        if bad:
            raise ValueError(f"{bad} is not allowed; floors are accuracies in [0, 1]")
        return v


class UpdateSection(_Section):
    """The continual update service (`chronomerge update`, `chronomerge serve`)."""

    incoming: str = "incoming"             # new task datasets arrive here, one folder each
    interval: int | None = Field(300, ge=1)  # seconds between scheduled runs
    cron: str | None = None                # a cron schedule instead of the interval
    gate: GateSection = Field(default_factory=GateSection)
    registered_model: str = "chronomerge-deployed"  # MLflow registered model of promoted models
    alias: str = "production"              # its alias on the promoted version

    @model_validator(mode="after")
    def _schedule(self):
        if (self.interval is None) == (self.cron is None):
            raise ValueError("set exactly one of interval (seconds) and cron")
        if self.alias.lower() == "latest":
            raise ValueError("alias 'latest' is reserved by MLflow; choose another, e.g. production")
        return self


class ResumeSection(_Section):
    """Progress checkpoints inside training stages (`chronomerge.resume`): every `every_steps` steps
    and/or every `every_seconds` seconds (stretched to keep writes under 2% of training time); null
    turns either off, both null turns checkpoints off. They change when a stage is saved, never its
    result, so they are not part of any cache key or of the stream's identity."""

    every_seconds: float | None = Field(60.0, gt=0)
    every_steps: int | None = Field(None, ge=1)
    keep: int = Field(2, ge=1)  # the newest checkpoints kept (an older one serves when the newest is corrupt)


class PathsSection(_Section):
    store: str = "store"
    outputs: str = "outputs"
    metrics: str = "outputs/metrics.json"


class Config(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    pretrain: PretrainSection = Field(default_factory=PretrainSection)
    stream: StreamSection = Field(default_factory=StreamSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    strategy: StrategySection = Field(default_factory=StrategySection)
    train: TrainSection = Field(default_factory=TrainSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    update: UpdateSection = Field(default_factory=UpdateSection)
    resume: ResumeSection = Field(default_factory=ResumeSection)
    paths: PathsSection = Field(default_factory=PathsSection)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def digest(self, *sections: str) -> str:
        """SHA-256 of the canonical JSON of the given sections (all when none given)."""
        d = self.to_dict()
        part = {s: d[s] for s in sections} if sections else d
        return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()


def _format(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            section = e["loc"][:-1]
            known = _known_fields(section)
            msg = f"unknown field; allowed fields here: {known}"
        elif e["type"] == "literal_error":
            msg = f"{e['input']!r} is not allowed; expected one of {e['ctx']['expected']}"
        elif "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        lines.append(f"{source}: {loc or '<root>'}: {msg}")
    return "\n".join(lines)


def _known_fields(section: tuple) -> list[str]:
    model: type[BaseModel] = Config
    for name in section:
        ann = model.model_fields[str(name)].annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def dotted(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as `{"section.field": value}` (an empty dict is a value); the one flattening."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def with_values(raw: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the raw params dict with each dotted field of `values` set to its value (data, not
    text): a sweep point, a sweep's base, an update's stream."""
    out = copy.deepcopy(dict(raw))
    for key, value in values.items():
        node = out
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"{key!r} is not a field path (section.field)")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p!r} is not a section")
        node[parts[-1]] = copy.deepcopy(value)
    return out


def parse_sets(items: Sequence[str]) -> list[tuple[str, Any]]:
    """Command-line `--set key=value` items as (key, value), each value parsed as YAML: the one
    meaning of `--set`, for params fields and merge hyperparameters alike."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out.append((key, yaml.safe_load(value)))
    return out


def apply_overrides(raw: Mapping[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """Apply command-line `key.sub=value` overrides to a raw params dict."""
    out = dict(raw)
    for key, value in parse_sets(sets):  # in order: a later override wins, also over part of an earlier one
        out = with_values(out, {key: value})
    return copy.deepcopy(out)


def validate(raw: dict[str, Any] | None, source: str = "params") -> Config:
    try:
        return Config.model_validate(raw or {})
    except ValidationError as e:
        raise ConfigError(_format(e, source)) from None


def load_config(path: str | os.PathLike | None = "params.yaml", sets: list[str] = ()) -> Config:
    """Read params.yaml (defaults when `path` is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"{p}: no such params file")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level")
        source = str(p)
    return validate(apply_overrides(raw, list(sets)), source)
