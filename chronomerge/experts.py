"""Experts trained elsewhere: imported into the checkpoint store as task t's θ^S_t (the train stage's
other branch, for `stream.kind: experts`, expert entries of custom streams, and arriving experts).
"""
from __future__ import annotations

from pathlib import Path

from chronomerge.checkpoints import as_expert, read_checkpoint
from chronomerge.data.streams import Task
from chronomerge.store import CheckpointStore


def import_expert(store: CheckpointStore, task: Task, base: str, data_digest: str) -> dict:
    """Read task t's expert (any format `chronomerge.checkpoints` reads), check it against θ0's
    architecture, fill a vision-only expert's text tower from θ0, and store it with parent θ0 and
    its source (path, SHA-256 of its files, format) in its metadata; `data_digest` is the task's
    (`stages.task_digest`, which covers the source's digest). An imported expert has no AdamW
    moments: no Fisher (CMM's Fisher merge then uses F = 1)."""
    ck = read_checkpoint(task.expert)
    state = as_expert(ck, store.get(base))
    expert = store.put({k: state[k] for k in state}, kind="expert", parents=[base], technique="import",
                       data_digest=data_digest, extra={"task": task.name, "t": task.index + 1, "format": ck.format,
                                                       "source": str(Path(task.expert).resolve()),
                                                       "source_digest": ck.digest()})
    return {"expert": expert, "fisher": None, "loop_seconds": 0.0, "loss": None, "images_per_second": None}
