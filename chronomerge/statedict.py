"""State dicts whose tensors stay on disk until asked for.

`LazyStateDict` maps parameter names to tensors stored in safetensors files and reads one tensor
per lookup with positioned reads (no mmap), so a merge over K experts holds only the tensors it is
working on, whatever K is. Tensors can carry a SHA-256 digest; a lookup verifies it and raises
`CorruptCheckpointError` naming the file and key on mismatch. The safetensors format is parsed
here (an 8-byte header length, a JSON header, raw little-endian bytes); nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
StateDictLike = Mapping[str, torch.Tensor]


class CorruptCheckpointError(ValueError):
    """A checkpoint file is truncated, malformed or fails its digest check."""


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes in C order (the bytes safetensors writes)."""
    t = tensor.detach().contiguous().cpu()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: file, byte range (absolute), dtype, shape, optional digest."""

    path: Path
    begin: int
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    digest: str | None = None

    def read(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype)
        buf = out.reshape(-1).view(torch.uint8).numpy()
        if buf.nbytes != self.end - self.begin:
            raise CorruptCheckpointError(f"{self.path}: byte range of a tensor does not match its shape")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.begin)
            got = f.readinto(memoryview(buf))
        if got != buf.nbytes:
            raise CorruptCheckpointError(f"{self.path}: truncated (short read)")
        if self.digest is not None and hashlib.sha256(buf).hexdigest() != self.digest:
            raise CorruptCheckpointError(f"{self.path}: tensor bytes fail their SHA-256 digest")
        return out


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Parse a safetensors header; returns tensor locations and the `__metadata__` strings.

    Raises `CorruptCheckpointError` naming the file when the header is malformed or the file is
    shorter than the header says (a truncated write).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise CorruptCheckpointError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > _MAX_HEADER or 8 + n > size:
                raise CorruptCheckpointError(f"{path}: truncated or malformed safetensors header")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CorruptCheckpointError(f"{path}: unreadable safetensors header ({e})") from e
    meta = header.pop("__metadata__", None) or {}
    refs: dict[str, TensorRef] = {}
    start = 8 + n
    for key, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            b, e = info["data_offsets"]
            shape = tuple(int(s) for s in info["shape"])
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptCheckpointError(f"{path}: bad header entry for tensor {key!r}") from err
        if start + e > size:
            raise CorruptCheckpointError(f"{path}: truncated (tensor {key!r} runs past end of file)")
        refs[key] = TensorRef(path, start + b, start + e, dtype, shape)
    return refs, meta


class LazyStateDict(Mapping):
    """A read-only mapping name → tensor whose values are read from disk on each lookup."""

    def __init__(self, refs: Mapping[str, TensorRef]):
        self._refs = dict(refs)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> LazyStateDict:
        return cls(read_header(path)[0])

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            ref = self._refs[key]
        except KeyError:
            raise KeyError(key) from None
        try:
            return ref.read()
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(f"{e} [tensor {key!r}]") from e

    def __iter__(self) -> Iterator[str]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def ref(self, key: str) -> TensorRef:
        return self._refs[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._refs[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self._refs[key].dtype


def shape_of(sd: Mapping, key: str) -> tuple[int, ...]:
    """Shape of `sd[key]` without reading it when `sd` is lazy (has a `shape(key)` method)."""
    return tuple(sd.shape(key)) if callable(getattr(sd, "shape", None)) else tuple(sd[key].shape)


def dtype_of(sd: Mapping, key: str) -> torch.dtype:
    return sd.dtype(key) if callable(getattr(sd, "dtype", None)) else sd[key].dtype


def check_compatible(base: Mapping, models: list[Mapping], what: str = "model") -> None:
    """Raise `ValueError` naming the first key or shape on which a model disagrees with `base`."""
    keys = set(base)
    for i, m in enumerate(models):
        mk = set(m)
        if mk != keys:
            missing, extra = sorted(keys - mk), sorted(mk - keys)
            raise ValueError(
                f"{what} {i} does not match the base's keys: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        for k in base:
            if shape_of(m, k) != shape_of(base, k):
                raise ValueError(
                    f"{what} {i}: shape of {k!r} is {list(shape_of(m, k))}, base has {list(shape_of(base, k))}"
                )
