"""Real data: an image folder (one sub-folder per class) or a CSV / JSONL manifest
(`path`, `label`, optional `caption`), read into a `Split` with a content digest.

Errors name the file or class: a missing or unreadable image, an empty class folder, a class
name used twice (case-insensitively), a manifest row without a path or label.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from chronomerge.data.generate import SIZE, Split

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DEFAULT_TEMPLATES = ["a photo of a {c}.", "a {c}."]


def _read_image(path: Path, size: int) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"unreadable image {path}: {e}") from e


def _check_classes(classes: list[str], where: str) -> None:
    seen: dict[str, str] = {}
    for c in classes:
        k = c.strip().lower()
        if k in seen:
            raise ValueError(f"duplicate class name {c!r} (also {seen[k]!r}) in {where}")
        seen[k] = c


def _split(paths: list[Path], labels: list[int], classes: list[str], captions: list[str | None],
           size: int, templates: list[str] | None) -> tuple[Split, str]:
    h = hashlib.sha256()
    images = np.zeros((len(paths), size, size, 3), np.uint8)
    for i, p in enumerate(paths):
        images[i] = _read_image(p, size)
        h.update(str(labels[i]).encode())
        h.update(images[i].tobytes())
    h.update(json.dumps([classes, captions]).encode())
    caps = [c or f"a photo of a {classes[y]}." for c, y in zip(captions, labels)]
    return Split(images, np.asarray(labels, np.int64), classes, templates or DEFAULT_TEMPLATES, caps), h.hexdigest()


def image_folder(root: str | os.PathLike, size: int = SIZE, templates: list[str] | None = None) -> tuple[Split, str]:
    """`root/<class>/<image>`: returns the split and its SHA-256 content digest."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root} has no class sub-folders")
    _check_classes(classes, str(root))
    paths, labels = [], []
    for y, c in enumerate(classes):
        files = sorted(p for p in (root / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"class {c!r} has no images in {root / c}")
        paths += files
        labels += [y] * len(files)
    return _split(paths, labels, [c.replace("_", " ") for c in classes], [None] * len(paths), size, templates)


def manifest(path: str | os.PathLike, size: int = SIZE, templates: list[str] | None = None) -> tuple[Split, str]:
    """A CSV (header `path,label[,caption]`) or JSONL manifest; paths relative to the manifest."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    if path.suffix.lower() == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from e
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"manifest {path} has no rows")
    for n, r in enumerate(rows, 1):
        if not r.get("path") or r.get("label") in (None, ""):
            raise ValueError(f"{path}: row {n} needs a 'path' and a 'label'")
    classes = sorted({str(r["label"]) for r in rows})
    _check_classes(classes, str(path))
    index = {c: i for i, c in enumerate(classes)}
    paths = [(path.parent / r["path"]).resolve() for r in rows]
    return _split(paths, [index[str(r["label"])] for r in rows], classes, [r.get("caption") or None for r in rows],
                  size, templates)
