"""Content-derived cache keys for stage tasks. Only small values travel between stages (content ids,
digests, metric dicts), never tensors.

key = SHA-256(stage name, code version, inputs). The code version hashes the stage function's
source and the core modules it depends on, so a change in a helper invalidates the stage
(Prefect's TASK_SOURCE would only see the wrapper). The `ws` argument (where the store and
data live, which device) is not part of the key: a result is a set of content ids, valid anywhere
those objects exist; the flow checks they do and recomputes when they do not.

A stage's trainings write their progress checkpoints under its key (`<store>/progress/<key>/`,
`chronomerge.resume`), removed when the stage returns: a killed stage's rerun (same key) resumes them.

Stages run under SERIALIZABLE isolation with flock locks (in PREFECT_HOME/locks, tasks/locks.py; on a
Dask worker also the scheduler's lock of the key, which holds across machines):
when two flow runs (a sweep's, or two processes) reach the same stage key at once, one computes it
and the other waits and reads the cached result, so the same expert is never trained twice; a lock
held by a killed process is released with it.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path

import prefect.runtime
from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.settings import PREFECT_HOME

import chronomerge
from chronomerge.resume import stage_progress
from tasks.locks import StageLockManager

CORE = Path(chronomerge.__file__).parent


def code_version(fn: Callable, modules: tuple[str, ...]) -> str:
    """SHA-256 of `fn`'s source and of the core files (globs relative to chronomerge/) it relies on."""
    h = hashlib.sha256(inspect.getsource(fn).encode())
    for pattern in modules:
        files = sorted(CORE.glob(pattern))
        if not files:
            raise FileNotFoundError(f"code_version: no file matches chronomerge/{pattern}")
        for f in files:
            h.update(f.relative_to(CORE).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def refuse_unsafe_records(folder: str | Path) -> list[str]:
    """Move every result record in `folder` that names a serializer other than JSON (pickle runs code
    when it loads) to `<folder>/../refused-records/` before any task can read it; returns one line per
    refused record, naming the file and its serializer (its stage recomputes: a cache miss).

    Only complete JSON records can name a serializer, so a record being written by a concurrent run is
    never taken for one. Anything else that is not a valid JSON record (a truncated file, another
    shape) Prefect reads through the tasks' JSON serializer, fails to parse, and treats as a miss."""
    folder = Path(folder)
    refused = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        try:
            kind = json.loads(path.read_bytes())["metadata"]["serializer"]["type"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if kind == "json":
            continue
        dest = folder.parent / "refused-records" / path.name
        dest.parent.mkdir(exist_ok=True)
        try:
            os.replace(path, dest)
        except FileNotFoundError:  # another run of this project refused it first
            continue
        refused.append(f"refused Prefect result record {path} (serializer {kind!r}; only JSON is read): "
                       f"moved to {dest}, its stage recomputes")
    return refused


def stage_key(name: str, version: str, parameters: dict) -> str:
    inputs = {k: v for k, v in parameters.items() if k != "ws"}
    body = json.dumps({"stage": name, "code": version, "inputs": inputs}, sort_keys=True, default=str)
    return f"{name}-{hashlib.sha256(body.encode()).hexdigest()}"


def key_of(stage_task, ws, /, **inputs) -> str:
    """The cache key of `stage_task` on these inputs (what Prefect looks its record up by)."""
    params = dict(inspect.signature(stage_task.fn).bind(ws, **inputs).arguments)
    return stage_key(stage_task.name, stage_task.code_version, params)


def run_uncached(stage_task, ws, /, **inputs):
    """Run a stage's function outside a flow (no record kept), its progress checkpoints under its key,
    so that it and a flow's run of the same stage resume each other's progress."""
    with stage_progress(ws.store, key_of(stage_task, ws, **inputs)):
        return stage_task.fn.__wrapped__(ws, **inputs)


def run_name(stage: str, parameters: dict) -> str:
    """A stage run named after what it does: `train t003-numerals-neon` (the task it works on), or, for
    a stage that sees only the store, its task number (`init task 4`)."""
    task = parameters.get("task") or (parameters.get("tasks") or [None])[-1]
    if task:
        return f"{stage} {task['name']}"
    so_far = parameters.get("experts", (parameters.get("storage") or {}).get("experts"))
    return stage if so_far is None else f"{stage} task {len(so_far) + 1}"


def stage(name: str, modules: tuple[str, ...]):
    """Decorator: a core stage function → a cached, persisted Prefect task named `name`."""
    def wrap(fn: Callable):
        version = code_version(fn, modules)
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def under_key(*args, **kwargs):
            params = signature.bind(*args, **kwargs).arguments
            with stage_progress(params["ws"].store, stage_key(name, version, params)):
                return fn(*args, **kwargs)

        policy = CacheKeyFnPolicy(cache_key_fn=lambda ctx, params: stage_key(name, version, params)).configure(
            isolation_level="SERIALIZABLE", lock_manager=StageLockManager(Path(PREFECT_HOME.value()) / "locks"))
        t = task(name=name, cache_policy=policy, persist_result=True, result_serializer="json",
                 cache_result_in_memory=False,
                 task_run_name=lambda: run_name(name, prefect.runtime.task_run.parameters))(under_key)
        t.code_version = version
        return t
    return wrap
