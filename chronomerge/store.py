"""Content-addressed checkpoint store: `<root>/objects/<id>.safetensors`.

Each object is one safetensors file whose header carries, under the metadata key `chronomerge`,
a JSON record: the object's identity (kind, parent ids, technique, hyperparameters, data digest,
code version, free-form extras), the SHA-256 digest of every tensor, and the wall-clock time.

* The object id is the SHA-256 of the canonical JSON of identity and tensor digests (time is left
  out), so the same content with the same provenance always gets the same id, in any process.
* Tensors bitwise equal to a parent's tensor of the same name are not written again: the record
  points at the object that holds their bytes. Disk grows with what was trained, not with the
  model (an expert that changed only the visual tower stores only the visual tower).
* Writes go to a temporary file, are fsynced and renamed into place, then the directory is
  fsynced: a crash leaves either the whole object or none. Stale temporary files of dead writers
  are removed when a store is opened.
* Reads check the header, the file length, the id and each tensor's digest, and raise
  `CorruptCheckpointError` naming the file. Nothing is ever unpickled.
* Repair: `put` of content whose object exists but fails verification rewrites it (atomically);
  `intact` is what a cached stage checks before it trusts an object (once per object and store
  instance); `quarantine` moves a bad object to `<root>/quarantine/` so that the next run rebuilds it.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from chronomerge import __version__, faults
from chronomerge.statedict import (
    DTYPE_NAMES,
    CorruptCheckpointError,
    LazyStateDict,
    TensorRef,
    read_header,
    tensor_digest,
)

KINDS = ("base", "expert", "merged", "deployed", "merger-state", "fisher", "other")
_META_KEY = "chronomerge"
_FORMAT = 1


class NonFiniteError(ValueError):
    """A checkpoint to store holds NaN or infinite values."""


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def object_id(identity: Mapping[str, Any], tensors: Mapping[str, list]) -> str:
    """SHA-256 over the canonical JSON of identity metadata and `{name: [dtype, shape, digest]}`."""
    return hashlib.sha256(_canonical({"identity": identity, "tensors": tensors}).encode()).hexdigest()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@contextmanager
def _atomic_target(path: Path, suffix: str = ""):
    """Yield a temp path beside `path`; on success fsync it, rename it onto `path`, fsync the dir."""
    tmp = path.parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex}{suffix}"
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        faults.point("store:rename")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def remove_stale_temps(*folders: str | os.PathLike) -> list[Path]:
    """Delete the temp files (`.tmp-<pid>-…`, as `_atomic_target` names them) in `folders` whose
    writing process no longer runs: what a kill between writing and renaming leaves behind."""
    removed = []
    for folder in folders:
        for p in Path(folder).glob(".tmp-*"):
            pid = p.name.split("-")[1]
            if p.is_file() and pid.isdigit() and not pid_alive(int(pid)):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that it holds all of it or nothing (temp file, fsync, rename)."""
    with _atomic_target(Path(path)) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, value: Any) -> None:
    """`value` as indented JSON, written atomically; the parent folder is made if missing."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(value, indent=1).encode())


def tree_digest(path: str | os.PathLike, suffixes: tuple[str, ...] | None = None) -> str:
    """SHA-256 over the files below `path` (or of the file itself): each file's relative name and the
    SHA-256 of its bytes, read in blocks. Hidden files are left out; `suffixes` keeps only those."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.relative_to(path).parts)
        and (suffixes is None or p.suffix in suffixes))
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(path) if p != path else p.name).encode())
        inner = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                inner.update(block)
        h.update(inner.digest())
    return h.hexdigest()


def atomic_save(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file so that `path` holds either the whole file or nothing."""
    with _atomic_target(Path(path), ".safetensors") as tmp:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata or {}))


class CheckpointStore:
    """A directory of content-addressed safetensors checkpoints (see module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        self._records: dict[str, dict] = {}
        self._intact: set[str] = set()  # verified in full by this instance
        self.remove_stale_temp_files()

    # -- paths and listing -------------------------------------------------------------------
    def path(self, oid: str) -> Path:
        if len(oid) != 64 or any(c not in "0123456789abcdef" for c in oid):
            raise ValueError(f"not a checkpoint id (64 lowercase hex digits): {oid!r}")
        return self.objects / f"{oid}.safetensors"

    def __contains__(self, oid: str) -> bool:
        return self.path(oid).exists()

    def ids(self) -> list[str]:
        return sorted(p.stem for p in self.objects.glob("*.safetensors") if not p.name.startswith("."))

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete temporary files left by writers that no longer run (a killed process)."""
        return remove_stale_temps(self.objects, self.root / "refs")

    # -- writing -----------------------------------------------------------------------------
    def put(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        kind: str,
        parents: Sequence[str] = (),
        technique: str | None = None,
        hparams: Mapping[str, Any] | None = None,
        data_digest: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """Store `tensors` and return the object id; an existing identical object is reused.

        Tensors equal (by digest) to a same-named tensor of a parent are stored as references.
        A floating tensor with NaN or infinite values raises `NonFiniteError`: a diverged
        training or merge fails at its stage instead of feeding later ones.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
        for p in parents:
            if p not in self:
                raise ValueError(f"parent checkpoint {p} is not in the store {self.root}")
        identity = {
            "kind": kind,
            "parents": list(parents),
            "technique": technique,
            "hparams": dict(hparams or {}),
            "data_digest": data_digest,
            "code_version": __version__,
            "extra": dict(extra or {}),
        }
        inherited: dict[tuple[str, str], str] = {}  # (name, digest) -> object holding the bytes
        for p in parents:
            for name, entry in self.record(p)["tensors"].items():
                inherited.setdefault((name, entry[2]), entry[3] or p)
        table: dict[str, list] = {}
        to_write: dict[str, torch.Tensor] = {}
        for name in sorted(tensors):
            t = tensors[name]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"value of {name!r} is a {type(t).__name__}, expected a tensor")
            if t.dtype not in DTYPE_NAMES:
                raise ValueError(f"tensor {name!r} has unsupported dtype {t.dtype}")
            t = t.detach().cpu().contiguous()
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise NonFiniteError(f"refusing to store the {kind} checkpoint ({technique or 'no technique'}): "
                                     f"tensor {name!r} has NaN or infinite values (training or merging diverged)")
            digest = tensor_digest(t)
            held_by = inherited.get((name, digest))
            if held_by is None:
                to_write[name] = t.clone() if t.untyped_storage().nbytes() != t.nbytes else t
            table[name] = [DTYPE_NAMES[t.dtype], list(t.shape), digest, held_by]
        oid = object_id(identity, {k: v[:3] for k, v in table.items()})
        final = self.path(oid)
        if final.exists() and self.intact(oid):
            return oid  # a corrupt file of the same id is replaced below, atomically
        self._records.pop(oid, None)
        record = {"format": _FORMAT, "id": oid, "identity": identity, "tensors": table, "time": time.time()}
        atomic_save(to_write, final, {_META_KEY: _canonical(record)})
        return oid

    # -- reading -----------------------------------------------------------------------------
    def record(self, oid: str) -> dict:
        """The verified header record of object `oid` (identity, tensor table, time)."""
        if oid in self._records:
            return self._records[oid]
        path = self.path(oid)
        if not path.exists():
            raise KeyError(f"checkpoint {oid} is not in the store {self.root}")
        _, meta = read_header(path)
        try:
            record = json.loads(meta[_META_KEY])
            table = record["tensors"]
            identity = record["identity"]
        except (KeyError, json.JSONDecodeError, TypeError) as e:
            raise CorruptCheckpointError(f"{path}: missing or malformed chronomerge record") from e
        if object_id(identity, {k: v[:3] for k, v in table.items()}) != oid:
            raise CorruptCheckpointError(f"{path}: header does not match the object id (file altered)")
        self._records[oid] = record
        return record

    def meta(self, oid: str) -> dict:
        """Identity metadata of `oid` plus its write time."""
        rec = self.record(oid)
        return {**rec["identity"], "time": rec["time"], "id": oid}

    def get(self, oid: str) -> LazyStateDict:
        """A lazy, digest-verified view of object `oid`, references to parents resolved."""
        table = self.record(oid)["tensors"]
        files: dict[str, dict[str, TensorRef]] = {}
        refs = {}
        for name, (_, _, digest, held_by) in table.items():
            holder = held_by or oid
            if holder not in files:
                if holder not in self:
                    raise CorruptCheckpointError(
                        f"{self.path(oid)}: tensor {name!r} lives in {holder}, which is missing from the store"
                    )
                files[holder] = read_header(self.path(holder))[0]
                if held_by:
                    self.record(held_by)  # verify the holder's header too
            try:
                r = files[holder][name]
            except KeyError:
                raise CorruptCheckpointError(f"{self.path(holder)}: tensor {name!r} is missing") from None
            refs[name] = TensorRef(r.path, r.begin, r.end, r.dtype, r.shape, digest)
        return LazyStateDict(refs)

    def load(self, oid: str) -> dict[str, torch.Tensor]:
        """All tensors of `oid` in memory, each verified against its digest."""
        lazy = self.get(oid)
        return {k: lazy[k] for k in lazy}

    def verify(self, oid: str) -> None:
        """Read every tensor of `oid` and check its digest; raise `CorruptCheckpointError` if any fails."""
        lazy = self.get(oid)
        for k in lazy:
            lazy[k]
        self._intact.add(oid)

    def intact(self, oid: str) -> bool:
        """Whether `oid` is in the store and passes `verify` (checked once per object by this instance)."""
        if oid in self._intact:
            return True
        if oid not in self:
            return False
        try:
            self.verify(oid)
        except CorruptCheckpointError:
            self._records.pop(oid, None)
            return False
        return True

    def quarantine(self, oid: str) -> Path:
        """Move object `oid` out of the store to `<root>/quarantine/` (kept for inspection); returns its new path.
        Objects that hold tensors for it are left alone; the next run rebuilds what named it."""
        dest = self.root / "quarantine" / self.path(oid).name
        dest.parent.mkdir(exist_ok=True)
        os.replace(self.path(oid), dest)
        _fsync_dir(self.objects)
        self._records.pop(oid, None)
        self._intact.discard(oid)
        return dest

    # -- named references (e.g. a cached base model, a `latest` deployment) -------------------
    def set_ref(self, name: str, oid: str) -> None:
        """Point the name `name` at object `oid` (atomically replaced)."""
        if oid not in self:
            raise ValueError(f"cannot point ref {name!r} at {oid}: not in the store {self.root}")
        refs = self.root / "refs"
        refs.mkdir(exist_ok=True)
        atomic_write_bytes(refs / name, oid.encode())

    def matching(self, prefix: str) -> list[str]:
        """The ids of stored objects that start with `prefix` (4 to 64 hex digits, as git takes them)."""
        p = prefix.strip().lower()
        if len(p) < 4 or len(p) > 64 or any(c not in "0123456789abcdef" for c in p):
            raise ValueError(f"{prefix!r} is not a checkpoint id or prefix (4 to 64 hex digits)")
        return sorted(q.stem for q in self.objects.glob(f"{p}*.safetensors") if not q.name.startswith("."))

    def resolve(self, prefix: str) -> str:
        """The id of the one stored object whose id starts with `prefix`; `ValueError` when none does or
        several do (listing them)."""
        found = self.matching(prefix)
        p = prefix.strip().lower()
        if not found:
            raise ValueError(f"no checkpoint id in {self.root} starts with {p}")
        if len(found) > 1:
            raise ValueError(f"checkpoint prefix {p} is ambiguous in {self.root}: "
                             + ", ".join(f[:16] for f in found[:5]) + (" …" if len(found) > 5 else ""))
        return found[0]

    def ref(self, name: str) -> str | None:
        """The object a name points at, or None when unset or pointing at a missing object."""
        path = self.root / "refs" / name
        oid = path.read_text(errors="replace").strip() if path.exists() else None
        if oid and (len(oid) != 64 or any(c not in "0123456789abcdef" for c in oid)):
            raise ValueError(f"{path}: not a checkpoint id (64 hex digits); delete the file to unset the ref")
        return oid if oid and oid in self else None

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.objects.glob("*.safetensors"))
