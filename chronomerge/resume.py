"""Progress checkpoints inside a long training stage: a killed pretraining, fine-tuning, multitask
baseline or alignment pass resumes at its last checkpoint, not at step 0.

Where: `<store>/progress/<stage cache key>/step-<k>.safetensors` (tensors) and `step-<k>.json` (the
record), one pair per checkpoint, the newest `keep` kept. The folder is named by the stage's cache
key (`tasks.cache.stage_key`: the stage, its code and every input), so a changed configuration or
code never resumes another's progress; the record also carries a fingerprint of the training
(config, total steps, tensor names and shapes) that must match. The folder is removed when the stage
finishes (`tasks.cache.stage`).

What a checkpoint holds (safetensors + JSON, never pickle): the model's state dict (and a
linearized model's τ), the optimizer's state (AdamW's `exp_avg`, `exp_avg_sq` and `step` per
parameter; its param groups in the record), the step (the learning-rate schedule is a function of
it), the losses so far and the torch RNG states (CPU, and every CUDA device). The data sampler's
position is the step: every step's batch indices are drawn up front from a generator seeded by
`train.seed` (`chronomerge.train`), so a resumed run draws the same batches. On the CPU a resumed
stage's result is bit-identical to an uninterrupted one (same weights, same AdamW second moments,
same expert id) computed with the same number of torch threads (a CPU matmul's reductions split by
thread: 1 and 2 threads give different last bits, so different ids). On a GPU the resumed run
restores the same state, but cuBLAS/cuDNN kernels (and bf16 autocast) are not run-to-run
deterministic, so the result equals an uninterrupted run's only up to that nondeterminism, as two
uninterrupted GPU runs do.

Writing: the tensors to a temp file (fsync, rename), then their SHA-256 into the record (temp, fsync,
rename): a checkpoint exists only once its record does. Reading: the newest checkpoint whose record
parses, matches the fingerprint and names tensors of the recorded SHA-256 is used; each one skipped
says why on stderr. The interval: every `every_steps` steps, or every `every_seconds` seconds but never
sooner than 50 times the last write took, so checkpoints cost at most about 2% of training time.

Kill points (`chronomerge.faults`): `<stage>:step:<k>` before step k runs (k steps done) and
`<stage>:checkpoint:<k>` inside the write of step k's checkpoint (tensors on disk, record not).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from chronomerge import faults
from chronomerge.store import atomic_save, atomic_write_json, remove_stale_temps

FORMAT = 1
MAX_COST = 0.02  # the time interval stretches to keep writes under this share of training time

# The cache key of the stage running in this thread (set by `tasks.cache.stage`), None outside one.
_STAGE_KEY: ContextVar[str | None] = ContextVar("chronomerge_stage_key", default=None)


def progress_root(store: str | os.PathLike) -> Path:
    return Path(store) / "progress"


@contextmanager
def stage_progress(store: str | os.PathLike, key: str) -> Iterator[Path]:
    """Run a stage under its cache key: its trainings checkpoint into `<store>/progress/<key>/`,
    which is removed when the stage returns (its result is in the store by then); a stage that
    raises or is killed leaves it for the rerun."""
    token = _STAGE_KEY.set(key)
    folder = progress_root(store) / key
    try:
        yield folder
    finally:
        _STAGE_KEY.reset(token)
    shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Checkpointing:
    """Progress checkpoints of one training in `folder`; `stage` names its lines and kill points."""

    folder: Path
    stage: str
    every_seconds: float | None = 60.0
    every_steps: int | None = None
    keep: int = 2
    _last: float = field(default=0.0, repr=False)
    _write_seconds: float = field(default=0.0, repr=False)
    resumed_from: int = 0  # the step `resume` found a checkpoint at (0: none, the training starts over)
    written: int = 0  # checkpoints written by this process
    write_seconds: float = 0.0  # their total time

    @classmethod
    def here(cls, store: str | os.PathLike, stage: str, every_seconds: float | None = 60.0,
             every_steps: int | None = None, keep: int = 2) -> Checkpointing | None:
        """Checkpointing for the stage running in this thread (None outside a cached stage)."""
        key = _STAGE_KEY.get()
        if key is None:
            return None
        return cls(progress_root(store) / key, stage, every_seconds, every_steps, keep)

    # -- writing -----------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """Whether to checkpoint after `step` steps are done."""
        if self.every_steps and step % self.every_steps == 0:
            return True
        if self.every_seconds is None:
            return False
        wait = max(self.every_seconds, self._write_seconds / MAX_COST)
        return time.perf_counter() - self._last >= wait

    def save(self, step: int, total: int, tensors: Mapping[str, torch.Tensor], fingerprint: str,
             meta: Mapping[str, Any]) -> None:
        """Write step `step`'s checkpoint (tensors + record), then drop all but the newest `keep`."""
        t0 = time.perf_counter()
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:09d}"
        path = self.folder / f"{name}.safetensors"
        atomic_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)
        faults.point(f"{self.stage}:checkpoint:{step}")
        atomic_write_json(self.folder / f"{name}.json", {
            "format": FORMAT, "stage": self.stage, "step": step, "total": total, "fingerprint": fingerprint,
            "sha256": _sha256(path), "bytes": path.stat().st_size, "time": time.time(), "meta": dict(meta)})
        for old in self._records()[self.keep:]:
            old.with_suffix(".safetensors").unlink(missing_ok=True)
            old.unlink(missing_ok=True)
        self._last = time.perf_counter()
        self._write_seconds = self._last - t0
        self.written += 1
        self.write_seconds += self._write_seconds

    # -- reading -----------------------------------------------------------------------------
    def _records(self) -> list[Path]:
        """Records, newest first."""
        return sorted(self.folder.glob("step-*.json"), reverse=True) if self.folder.is_dir() else []

    def resume(self, fingerprint: str) -> tuple[int, dict[str, torch.Tensor], dict] | None:
        """(step, tensors, meta) of the newest valid checkpoint of this training, or None; the
        interval's clock starts here. Each checkpoint skipped (partial, corrupt, another training's)
        is reported in one line and removed."""
        self._last = time.perf_counter()
        if not self.folder.is_dir():
            return None
        remove_stale_temps(self.folder)
        records = self._records()
        for orphan in sorted(set(self.folder.glob("step-*.safetensors")) - {r.with_suffix(".safetensors")
                                                                               for r in records}):
            _say(f"skipped progress checkpoint {orphan}: its record is missing (a write cut short); "
                 "removed")
            orphan.unlink(missing_ok=True)
        for rec in records:
            why, got = _read(rec, fingerprint)
            if got is not None:
                self.resumed_from = got[0]
                return got
            _say(f"skipped progress checkpoint {rec.with_suffix('')}: {why}; removed")
            rec.with_suffix(".safetensors").unlink(missing_ok=True)
            rec.unlink(missing_ok=True)
        return None


def _read(rec: Path, fingerprint: str) -> tuple[str, tuple[int, dict, dict] | None]:
    try:
        r = json.loads(rec.read_bytes())
        step, total, meta = int(r["step"]), int(r["total"]), dict(r["meta"])
        if r["format"] != FORMAT:
            return f"format {r['format']!r}, not {FORMAT}", None
    except (OSError, ValueError, KeyError, TypeError):
        return "its record is not valid JSON of a progress checkpoint", None
    if r.get("fingerprint") != fingerprint:
        return "it is another training's (its configuration differs)", None
    tensors = rec.with_suffix(".safetensors")
    try:
        if _sha256(tensors) != r["sha256"]:
            return "its tensors do not match their recorded SHA-256 (corrupt)", None
        return "", (step, load_file(str(tensors)), meta | {"total": total})
    except (OSError, SafetensorError) as e:
        return f"its tensors cannot be read ({e})", None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def fingerprint(config: Mapping[str, Any], total: int, tensors: Mapping[str, torch.Tensor]) -> str:
    """What a checkpoint must match to be resumed: the training's config, length and tensor shapes."""
    shapes = {k: [str(v.dtype), list(v.shape)] for k, v in tensors.items()}
    body = json.dumps({"config": config, "total": total, "tensors": shapes}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


# -- what a training's state is ----------------------------------------------------------------
def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's per-parameter tensors (`opt.<index>.<name>`) and its param groups (JSON)."""
    sd = opt.state_dict()
    tensors = {f"opt.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()
               if isinstance(v, torch.Tensor)}
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> dict[str, torch.Tensor]:
    got = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        got |= {f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return got


def load_rng_state(tensors: Mapping[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def say_resumed(label: str, step: int, total: int, folder: Path) -> None:
    _say(f"{label}: resumed from its progress checkpoint at step {step}/{total} ({folder})")


def in_progress(store: str | os.PathLike, key: str) -> dict | None:
    """The newest readable checkpoint record of the stage with cache key `key` (`chronomerge status`)."""
    for rec in sorted((progress_root(store) / key).glob("step-*.json"), reverse=True):
        try:
            return json.loads(rec.read_bytes())
        except (OSError, ValueError):
            continue
    return None
