"""Real data: an image folder (one sub-folder per class) or a CSV / JSONL manifest
(`path`, `label`, optional `caption`), read into a `Split` with a content digest, and
`add_dataset`, the one way a user's data becomes a task dataset (`chronomerge data add`,
`chronomerge update`): train and test splits in chronomerge's dataset format under the data root.

Images are kept at their native size when all share one; images of mixed sizes are brought to one
square size (shorter side resized to `size`, default 224, bicubic, centre crop). Each model
resizes and normalises them to its own input when it reads them (`chronomerge.models.model_input`).
Errors name the file or class: a missing or unreadable image, an empty class folder, a class
name used twice (case-insensitively), a manifest row without a path or label.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from chronomerge.data.generate import Split, dataset_digest, write_split
from chronomerge.store import atomic_write_bytes

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MANIFEST_SUFFIXES = (".csv", ".jsonl")
DEFAULT_TEMPLATES = ["a photo of a {c}.", "a {c}."]
DEFAULT_SIZE = 224
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _open(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"unreadable image {path}: {e}") from e


def _read_image(path: Path, size: int | None) -> np.ndarray:
    """RGB uint8 H×W×3: native, or shorter side to `size` (bicubic) and centre-cropped to size×size."""
    try:
        with _open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                w, h = im.size
                s = size / min(w, h)
                nw, nh = max(size, round(w * s)), max(size, round(h * s))
                im = im.resize((nw, nh), Image.BICUBIC)
                left, top = (nw - size) // 2, (nh - size) // 2
                im = im.crop((left, top, left + size, top + size))
            return np.asarray(im, dtype=np.uint8)
    except OSError as e:
        raise ValueError(f"unreadable image {path}: {e}") from e


def _storage_size(paths: list[Path], size: int | None) -> int | None:
    """None (keep native) when every image has the same size and none is asked for."""
    if size is not None:
        return size
    sizes = set()
    for p in paths:
        with _open(p) as im:
            sizes.add(im.size)
    return None if len(sizes) == 1 else DEFAULT_SIZE


def _check_classes(classes: list[str], where: str) -> None:
    seen: dict[str, str] = {}
    for c in classes:
        k = c.strip().lower()
        if k in seen:
            raise ValueError(f"duplicate class name {c!r} (also {seen[k]!r}) in {where}")
        seen[k] = c


def _split(paths: list[Path], labels: list[int], classes: list[str], captions: list[str | None],
           size: int | None, templates: list[str] | None) -> tuple[Split, str]:
    h = hashlib.sha256()
    size = _storage_size(paths, size)
    first = _read_image(paths[0], size)
    images = np.zeros((len(paths), *first.shape), np.uint8)
    for i, p in enumerate(paths):
        images[i] = first if i == 0 else _read_image(p, size)
        h.update(str(labels[i]).encode())
        h.update(images[i].tobytes())
    h.update(json.dumps([classes, captions]).encode())
    caps = [c or f"a photo of a {classes[y]}." for c, y in zip(captions, labels)]
    return Split(images, np.asarray(labels, np.int64), classes, templates or DEFAULT_TEMPLATES, caps), h.hexdigest()


def image_folder(root: str | os.PathLike, size: int | None = None, templates: list[str] | None = None) -> tuple[Split, str]:
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


def manifest(path: str | os.PathLike, size: int | None = None, templates: list[str] | None = None) -> tuple[Split, str]:
    """A CSV (header `path,label[,caption]`) or JSONL manifest; paths relative to the manifest."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); save the manifest as UTF-8") from None
    if path.suffix.lower() == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{n}: a line is a JSON object with 'path' and 'label' "
                                     f"(and 'caption'), not a {type(row).__name__}")
                rows.append(row)
    else:
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
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


def source_kind(path: str | os.PathLike) -> str | None:
    """'folder' (class sub-folders of images), 'manifest' (.csv / .jsonl), or None."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES:
        return "manifest"
    if p.is_dir() and any(c.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in c.iterdir())
                          for c in p.iterdir() if not c.name.startswith(".")):
        return "folder"
    return None


def _stratified(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask: per class round(fraction·n) images (at least one when the class has two)."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = int(round(test_fraction * len(idx)))
        if test_fraction >= 1:
            k = len(idx)
        elif 0 < test_fraction and len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        test[rng.permutation(idx)[:k]] = True
    return test


def add_dataset(source: str | os.PathLike, root: str | os.PathLike, name: str, *, templates: list[str] | None = None,
                test_fraction: float = 0.2, size: int | None = None, seed: int = 0) -> dict:
    """Turn an image folder or a manifest into the task dataset `root/name` (train and test splits,
    class names, zero-shot templates, captions, content digest); returns its `meta.json` record.

    The split is stratified by class and seeded; `test_fraction` 1 makes an evaluation-only
    (held-out) dataset. The folder appears whole or not at all. Adding the same source again under
    the same name is a no-op; a different dataset under an existing name is an error."""
    from chronomerge.data import catalog

    if not NAME.match(name) or name in catalog.ALL:
        raise ValueError(f"--name {name!r} is not allowed; use letters, digits, '.', '_' or '-' (and not a name of "
                         f"the embedded benchmark)")
    if not 0 <= test_fraction <= 1:
        raise ValueError(f"--test-fraction {test_fraction!r} is not allowed; expected a number in [0, 1]")
    if templates is not None and (not templates or any("{c}" not in t for t in templates)):
        raise ValueError(f"--templates {templates!r}: each template must contain {{c}} (the class name)")
    if size is not None and size < 8:
        raise ValueError(f"--image-size {size!r} is not allowed; expected an integer >= 8")
    kind = source_kind(source)
    if kind is None:
        raise ValueError(f"{source}: neither an image folder (one sub-folder of images per class) nor a "
                         f"manifest ({', '.join(MANIFEST_SUFFIXES)} with columns path,label[,caption])")
    split, digest = (image_folder if kind == "folder" else manifest)(source, size, templates)
    target = Path(root) / name
    if (target / "meta.json").exists():
        meta = json.loads((target / "meta.json").read_text())
        if meta.get("source_digest") == digest and meta.get("test_fraction") == test_fraction:
            return meta
        raise ValueError(f"a different dataset named {name!r} is already in {root}; choose another --name")
    test = _stratified(split.labels, test_fraction, seed)
    meta = {"name": name, "role": "user", "kind": "classification", "target": "class", "domains": [],
            "seed": seed, "classes": split.classes, "templates": split.templates, "source": str(Path(source).resolve()),
            "source_kind": kind, "source_digest": digest, "test_fraction": test_fraction,
            "image_size": list(split.images.shape[1:3]), "splits": {}}
    tmp = target.with_name(f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for part, mask in (("train", ~test), ("test", test)):
        if mask.any():
            s = Split(split.images[mask], split.labels[mask], split.classes, split.templates,
                      [c for c, m in zip(split.captions, mask) if m])
            write_split(s, tmp / f"{part}.safetensors")
            meta["splits"][part] = {"n": int(mask.sum()), "captions": s.captions}
    atomic_write_bytes(tmp / "meta.json", json.dumps(meta, indent=0).encode())
    tmp.rename(target)
    meta["digest"] = dataset_digest(target)
    return meta
