"""Task streams over the adaptation datasets, as in FoMo-in-Flux.

* `dataset-incremental`: one adaptation dataset per task, in a seeded order. A stream longer than
  the number of datasets goes round again, each round training on a disjoint slice of a
  dataset's training images (new data for a known domain), so T = 50 or 100 works.
* `random`: the (dataset, class) pairs of the classification datasets are shuffled by seed and
  dealt into T tasks; each task trains on the images of its classes and is tested on theirs.
  Retrieval datasets are dealt whole into the first tasks' evaluation only.

Users' own streams (`user_stream`) list, task by task, a named dataset (`chronomerge data add`;
the task trains on all of it) or an expert trained elsewhere with an optional dataset to evaluate it on.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chronomerge.data import catalog
from chronomerge.data.generate import Split, load_split

STREAMS = ("dataset-incremental", "random")       # the embedded benchmark's streams
USER_STREAMS = ("custom", "experts", "arrivals")  # stream.tasks / stream.experts / what `update` received


@dataclass(frozen=True)
class Task:
    """Task t of a stream: which dataset(s) and classes it draws from, and which slice."""

    index: int
    name: str
    parts: tuple[tuple[str, tuple[int, ...] | None], ...]  # (dataset, class ids or None for all)
    round: int = 0
    rounds: int = 1
    expert: str | None = None  # an expert trained elsewhere (path): imported instead of trained

    @property
    def datasets(self) -> list[str]:
        return [name for name, _ in self.parts]

    def to_dict(self) -> dict[str, Any]:
        """The task as JSON-able values (how it travels to a stage and into its cache key)."""
        return {"index": self.index, "name": self.name, "round": self.round, "rounds": self.rounds,
                "parts": [[name, None if ids is None else list(ids)] for name, ids in self.parts],
                "expert": self.expert}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Task:
        return cls(d["index"], d["name"], tuple((n, None if c is None else tuple(c)) for n, c in d["parts"]),
                   d["round"], d["rounds"], d.get("expert"))


def build_stream(kind: str, length: int, seed: int = 0) -> list[Task]:
    if kind not in STREAMS:
        raise ValueError(f"stream.kind={kind!r} is not allowed; expected one of {list(STREAMS)}")
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"stream.length={length!r} is not allowed; expected an integer >= 1")
    rng = np.random.default_rng(seed)
    names = [d.name for d in catalog.ADAPTATION]
    if kind == "dataset-incremental":
        order = [names[i] for i in (rng.permutation(len(names)) if seed else range(len(names)))]
        rounds = -(-length // len(order))
        return [Task(t, f"t{t:03d}-{order[t % len(order)]}", ((order[t % len(order)], None),),
                     t // len(order), rounds) for t in range(length)]
    pairs = [(d.name, c) for d in catalog.ADAPTATION if d.kind == "classification" for c in range(len(d.classes))]
    if length > len(pairs):
        raise ValueError(f"stream.length={length} is larger than the {len(pairs)} classes a random stream can deal")
    order = [pairs[i] for i in rng.permutation(len(pairs))]
    tasks = []
    for t, chunk in enumerate(np.array_split(np.arange(len(order)), length)):
        by_ds: dict[str, list[int]] = {}
        for i in chunk:
            by_ds.setdefault(order[i][0], []).append(order[i][1])
        tasks.append(Task(t, f"t{t:03d}-random", tuple((d, tuple(sorted(c))) for d, c in sorted(by_ds.items()))))
    return tasks


def user_stream(entries: list) -> list[Task]:
    """A user's stream (kinds custom, experts, arrivals): entry t is a dataset name (task t trains on
    the whole dataset) or an expert `{"path": ..., "dataset": name or None}` (task t imports it and
    is evaluated on its dataset)."""
    tasks = []
    for t, e in enumerate(entries):
        if isinstance(e, str):
            tasks.append(Task(t, f"t{t:03d}-{e}", ((e, None),)))
        else:
            tasks.append(Task(t, f"t{t:03d}-{e.get('dataset') or Path(e['path']).stem}",
                              ((e["dataset"], None),) if e.get("dataset") else (), expert=e["path"]))
    return tasks


def task_split(root: str | os.PathLike, task: Task, split: str) -> Split:
    """The images, labels, class names and captions of one task's split."""
    pieces = [load_split(root, name, split) for name, _ in task.parts]
    if len(pieces) == 1 and task.parts[0][1] is None:
        s = pieces[0]
        if split == "train" and task.rounds > 1:
            keep = np.arange(len(s.labels)) % task.rounds == task.round
            s = Split(s.images[keep], s.labels[keep], s.classes, s.templates,
                      [c for c, k in zip(s.captions, keep) if k], s.kind)
        return s
    classes: list[str] = []
    images, labels, captions = [], [], []
    for (name, ids), s in zip(task.parts, pieces):
        for c in ids if ids is not None else range(len(s.classes)):
            cname = s.classes[c]
            if cname not in classes:
                classes.append(cname)
            sel = np.flatnonzero(s.labels == c)
            images.append(s.images[sel])
            labels.append(np.full(len(sel), classes.index(cname), np.int64))
            captions += [s.captions[i] for i in sel]
    return Split(np.concatenate(images), np.concatenate(labels), classes, ["a {c}."], captions)


def multitask(tasks: list[Task]) -> Task:
    """The multitask baseline's single task: every dataset and class the stream touches, joined.

    Train it with the stream's total budget (T × steps per task) for the joint-training upper bound.
    """
    parts: dict[str, set[int] | None] = {}
    for t in tasks:
        for name, ids in t.parts:
            if ids is None or parts.get(name, set()) is None:
                parts[name] = None
            else:
                parts[name] = parts.get(name, set()) | set(ids)
    return Task(-1, "multitask", tuple((n, None if c is None else tuple(sorted(c))) for n, c in sorted(parts.items())))
