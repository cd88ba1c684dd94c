"""The five TIME stages of task t, and the two stages before a stream, as plain functions.

init → train → store → deploy → eval (TIME, Sec. 3). Each takes small values (checkpoint ids,
dataset names, config dicts) and returns a small JSON-able dict; tensors stay in the checkpoint
store. Prefect tasks in `tasks/` wrap them one to one, which is how a stream is cached and resumed.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from chronomerge.align import PROJECTION, align_projection
from chronomerge.arrivals import digest_arrived
from chronomerge.benchmark import ensure_base, pretrain_recipe
from chronomerge.checkpoints import read_checkpoint
from chronomerge.config import PretrainSection, TrainSection
from chronomerge.data import catalog, load_split, prepare
from chronomerge.data.streams import STREAMS, Task, build_stream, task_split, user_stream
from chronomerge.evaluate import score, summarize
from chronomerge.experts import import_expert
from chronomerge.models import base_weights, create_model, get_tokenizer, load_model
from chronomerge.resume import Checkpointing
from chronomerge.store import CheckpointStore
from chronomerge.strategies import compose, continual_step, set_merged_tensor, store_continual
from chronomerge.train import train

HELD_OUT = [d.name for d in catalog.EVALUATION]
ADAPTATION = [d.name for d in catalog.ADAPTATION]


@dataclass(frozen=True)
class Workspace:
    """Where a stream reads and writes: the checkpoint store, the datasets, the device."""

    store: str
    data: str
    device: str = "cpu"
    progress: bool = False  # report the progress of long stages (a bar, or lines when not on a terminal)
    resume: tuple[float | None, int | None, int] = (60.0, None, 2)  # params.yaml's resume: seconds, steps, keep

    @cached_property
    def checkpoints(self) -> CheckpointStore:
        """The workspace's one checkpoint store, opened (and stale temp files swept) on first use."""
        return CheckpointStore(self.store)

    def progress_checkpoints(self, stage: str) -> Checkpointing | None:
        """Progress checkpoints for a training inside the cached stage running now (`chronomerge.resume`)."""
        return Checkpointing.here(self.store, stage, *self.resume)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' is not allowed here: no CUDA device is visible; use 'auto' or 'cpu'")
    return name


def build_tasks(stream: Mapping[str, Any]) -> list[Task]:
    """The tasks of a stream section (`chronomerge.config.StreamSection`)."""
    if stream["kind"] in STREAMS:
        return build_stream(stream["kind"], stream["length"], stream["seed"])
    return user_stream(stream["experts"] if stream["kind"] == "experts" else stream["tasks"])


def evaluation_sets(stream: Mapping[str, Any], held_out: Sequence[str] | None) -> dict[str, list[str]]:
    """The datasets of A_KA (`adaptation`) and of A_ZS (`held_out`) for a stream.

    Embedded streams: the benchmark's 23 adaptation sets; users' streams: the datasets their tasks
    name, in order. Held-out: `eval.held_out`, or by default the benchmark's held-out sets for the
    embedded and arrivals streams and none for custom and experts streams. A held-out set that a
    task trains on is an error."""
    if stream["kind"] in STREAMS:
        adaptation = list(ADAPTATION)
    else:
        adaptation = list(dict.fromkeys(d for t in build_tasks(stream) for d in t.datasets))
    if held_out is None:
        held_out = HELD_OUT if stream["kind"] in (*STREAMS, "arrivals") else []
    both = sorted(set(adaptation) & set(held_out))
    if both:
        raise ValueError(f"eval.held_out: {both} are trained on by the stream; held-out sets must be unseen")
    return {"adaptation": adaptation, "held_out": list(held_out)}


def task_digest(task: Task, digests: Mapping[str, str]) -> str:
    """SHA-256 naming exactly the data a task trains on: its datasets' digests, classes and slice
    (and, for an imported expert, its source's digest, `digests["expert:<path>"]`)."""
    data = {n: digests[n] for n, _ in task.parts}
    if task.expert:
        data["expert"] = digests[f"expert:{task.expert}"]
    return hashlib.sha256(json.dumps({"task": task.to_dict() | {"index": None, "name": None},
                                      "data": data}, sort_keys=True).encode()).hexdigest()


# -- before the stream -------------------------------------------------------------------------
def run_prepare(ws: Workspace, data: Mapping[str, Any], pretrained: bool, names: Sequence[str],
                experts: Sequence[str] = ()) -> dict[str, str]:
    """Make (or check) every dataset the stream and its evaluation read; `{name: digest}`.

    Datasets of the embedded benchmark are generated (the pretraining pool too unless the base is
    `pretrained`); any other name must be a dataset under the data root (`chronomerge data add`,
    or copied there by `chronomerge update`) and is digested as it is. Each expert path gets a
    digest of its files under `expert:<path>`."""
    embedded = [n for n in names if n in catalog.ALL] + ([] if pretrained else [catalog.PRETRAIN.name])
    own = [n for n in names if n not in catalog.ALL]
    digests = digest_arrived(ws.data, own, prepare(ws.data, data["seed"], embedded, size_factor=data["size_factor"]))
    for path in experts:
        digests[f"expert:{path}"] = read_checkpoint(path).digest()
    return digests


def run_base(ws: Workspace, arch: Mapping[str, Any], model: Mapping[str, Any], pretrain: Mapping[str, Any],
             data: Mapping[str, Any]) -> dict:
    """θ0 of architecture `arch`: weights from `model.pretrained` (an open_clip tag from the local
    cache, an open_clip safetensors file, an HF CLIP folder), or the embedded base pretrained on the pool."""
    store = ws.checkpoints
    t0 = time.perf_counter()
    if model["pretrained"]:
        oid = store.put(base_weights(arch, model["pretrained"]), kind="base", technique="import",
                        extra={"model": arch["name"], "pretrained": model["pretrained"]})
    else:
        ck = ws.progress_checkpoints("base")
        oid = ensure_base(store, ws.data, data["seed"], arch, pretrain_recipe(PretrainSection(**pretrain)), ws.device,
                          data["size_factor"], progress=ws.progress, checkpointing=ck)
        return {"base": oid, "seconds": time.perf_counter() - t0, "resumed_steps": ck.resumed_from if ck else 0}
    return {"base": oid, "seconds": time.perf_counter() - t0, "resumed_steps": 0}


# -- the five stages of task t -----------------------------------------------------------------
def run_init(ws: Workspace, spec: Mapping[str, Any], base: str, experts: Sequence[str], previous: str | None) -> dict:
    """Stage 1, init θ^I_t from the store (`strategies.compose`, init axis)."""
    t0 = time.perf_counter()
    oid = compose(ws.checkpoints, spec, spec["mode"], base=base, experts=experts, previous=previous,
                  kind="merged", device=ws.device, extra={"role": "init", "t": len(experts) + 1})
    return {"init": oid, "seconds": time.perf_counter() - t0}


def run_train(ws: Workspace, cfg: Mapping[str, Any], arch: Mapping[str, Any], task: Mapping[str, Any], init: str,
              data_digest: str, previous_tasks: Sequence[Mapping[str, Any]], base: str) -> dict:
    """Stage 2, train θ^S_t from θ^I_t on task t; writes the expert and its AdamW second moments.

    A task whose expert was trained elsewhere imports it instead (`chronomerge.experts`)."""
    t0 = time.perf_counter()
    store = ws.checkpoints
    t = Task.from_dict(task)
    if t.expert:
        return import_expert(store, t, base, data_digest) | {"seconds": time.perf_counter() - t0}
    tc = TrainSection(**{**cfg, "seed": 1000 * cfg["seed"] + t.index})
    model = load_model(store, init, arch)
    tok = get_tokenizer(arch)
    pool = load_split(ws.data, catalog.PRETRAIN.name, "train") if tc.replay_pretrain else None
    prev = [task_split(ws.data, Task.from_dict(p), "train") for p in previous_tasks] if tc.replay_previous else ()
    ck = ws.progress_checkpoints("train")
    result = train(model, task_split(ws.data, t, "train"), tc, tokenizer=tok, device=ws.device,
                   replay_pool=pool, previous=prev, progress=f"train {t.name}" if ws.progress else None,
                   checkpointing=ck)
    hp = {k: v for k, v in cfg.items() if k not in ("bf16", "compile")} | {"seed": tc.seed}
    expert = store.put(result.state, kind="expert", parents=[init], technique="finetune", hparams=hp,
                       data_digest=data_digest, extra={"task": t.name, "t": t.index + 1})
    fisher = store.put(result.exp_avg_sq, kind="fisher", parents=[expert], technique="adamw_exp_avg_sq",
                       data_digest=data_digest, extra={"task": t.name, "t": t.index + 1})
    return {"expert": expert, "fisher": fisher, "seconds": time.perf_counter() - t0,
            "loop_seconds": result.seconds, "loss": result.losses[-1],
            "images_per_second": result.images_per_second, "resumed_steps": ck.resumed_from if ck else 0}


def run_store(ws: Workspace, storage: Mapping[str, Sequence[str]], expert: str, fisher: str | None) -> dict:
    """Stage 3, store: verify θ^S_t bit for bit and add it (and its Fisher) to the store S."""
    store = ws.checkpoints
    t0 = time.perf_counter()
    for oid in (expert, fisher):
        if oid is not None:  # an imported expert has no Fisher
            store.verify(oid)
    return {"experts": [*storage["experts"], expert], "fishers": [*storage["fishers"], fisher],
            "seconds": time.perf_counter() - t0}


def run_deploy(ws: Workspace, spec: Mapping[str, Any], arch: Mapping[str, Any], base: str, experts: Sequence[str],
               fishers: Sequence[str], previous: str | None, previous_state: str | None,
               task: Mapping[str, Any]) -> dict:
    """Stage 4, deploy θ^O_t from the store: a TIME deploy axis (`strategies.compose`) or a continual
    merger (`strategies.continual_step`), then optionally CMM's post-merge alignment to the
    previous merged model (θ0 at t = 1) on task t's images."""
    t0 = time.perf_counter()
    store = ws.checkpoints
    t = len(experts)
    extra = {"role": "deploy", "t": t}
    out: dict[str, Any] = {}
    if spec["mode"] == "continual":
        merger, merged = continual_step(store, spec, base=base, expert=experts[-1], fisher=fishers[-1],
                                        previous_state=previous_state, device=ws.device)
        if spec["align"] != "none":
            aligned = _align(ws, spec, arch, merged, previous or base, task)
            merged[PROJECTION] = aligned
            set_merged_tensor(merger, store.get(base), PROJECTION, aligned)
        out["deployed"], out["state"] = store_continual(store, merger, merged, base=base, expert=experts[-1],
                                                        previous_state=previous_state, extra=extra)
        if merger.name == "opcm":
            out["lambda"] = merger.lam
    else:
        oid = compose(store, spec, spec["mode"], base=base, experts=experts, previous=previous,
                      kind="deployed", device=ws.device, extra=extra)
        if spec["align"] != "none":
            merged = store.load(oid)
            merged[PROJECTION] = _align(ws, spec, arch, merged, previous or base, task)
            oid = store.put(merged, kind="deployed", parents=[oid, previous or base], technique="align",
                            hparams={"loss": spec["align"], "lr": spec["align_lr"]}, extra=extra)
        out["deployed"] = oid
    return {**out, "seconds": time.perf_counter() - t0}


def _align(ws: Workspace, spec: Mapping[str, Any], arch: Mapping[str, Any], merged: Mapping[str, torch.Tensor],
           reference: str, task: Mapping[str, Any]) -> torch.Tensor:
    store = ws.checkpoints
    model = create_model(arch)
    model.load_state_dict(dict(merged))
    t = Task.from_dict(task)
    return align_projection(model, load_model(store, reference, arch), task_split(ws.data, t, "train"),
                            loss=spec["align"], lr=spec["align_lr"], batch_size=spec["align_batch_size"],
                            device=ws.device, seed=t.index, checkpointing=ws.progress_checkpoints("align"))


def run_eval(ws: Workspace, arch: Mapping[str, Any], deployed: str, tasks: Sequence[Mapping[str, Any]],
             sets: Mapping[str, Sequence[str]], digests: Mapping[str, str]) -> dict:
    """Stage 5, eval θ^O_t: every adaptation and held-out dataset of `sets` (A_KA, A_ZS, GM) and
    the test split of each task seen so far (row t of the accuracy matrix; None for a task without
    a dataset). `digests` names the data scored, so regenerated test sets are scored again (it is
    part of the cache key)."""
    t0 = time.perf_counter()
    model = load_model(ws.checkpoints, deployed, arch).to(ws.device)
    tok = get_tokenizer(arch)
    names = [*sets["adaptation"], *sets["held_out"]]
    scores = {name: score(model, tok, load_split(ws.data, name, "test"), ws.device) for name in names}
    row: list[float | None] = []
    for d in tasks:
        t = Task.from_dict(d)
        whole = len(t.parts) == 1 and t.parts[0][1] is None and t.parts[0][0] in scores
        row.append(None if not t.parts else scores[t.parts[0][0]] if whole
                   else score(model, tok, task_split(ws.data, t, "test"), ws.device))
    return {"scores": scores, "row": row, **summarize(scores, sets["adaptation"], sets["held_out"]),
            "seconds": time.perf_counter() - t0}

