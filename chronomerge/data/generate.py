"""Generation of the embedded benchmark's images, labels and captions, and its files under `data/`.

Every dataset is drawn from `numpy.random.default_rng((seed, dataset index, split))`, class-balanced,
and written once as `<root>/<name>/<split>.safetensors` (uint8 images, int64 labels) plus
`<root>/<name>/meta.json` (class names, templates, captions); `<root>/manifest.json` lists each
dataset's SHA-256 content digest so DVC and the pipeline can version them.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from chronomerge.data import catalog
from chronomerge.data.catalog import DatasetSpec
from chronomerge.data.render import COLOURS, COUNTS, DOMAIN_PHRASES, SIZE, concept, concept_mask, stylize
from chronomerge.store import atomic_save, atomic_write_bytes

GENERATOR_VERSION = "4"  # bump when rendering or captioning changes what a spec produces
POSITION_PHRASES = {"center": "in the middle", "left": "on the left", "right": "on the right",
                    "top": "at the top", "bottom": "at the bottom"}
TEMPLATES = {
    "concept": ("a {d} of a {c}.", "a {c}."),
    "colour": ("a {d} of a {c} object.",),
    "count": ("a {d} of {c} objects.",),
    "position": ("a {d} of an object {c}.",),
    "size": ("a {d} of a {c} object.",),
    "digit": ("a scan of a {c}.", "a {c}."),
}


@dataclass
class Split:
    """Images (N×32×32×3 uint8), labels, class names, zero-shot templates and per-image captions."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    templates: list[str]
    captions: list[str]
    kind: str = "classification"


def _plural(phrase: str) -> str:
    return phrase + ("es" if phrase.endswith(("s", "x", "ch", "sh")) else "s")


def _describe(detail: str, colour: str, size: str, count: str, position: str) -> str:
    n = COUNTS[count]
    things = f"a {size} {colour} {detail}" if n == 1 else f"{count} {size} {colour} {_plural(detail)}"
    return f"{things} {POSITION_PHRASES[position]}"


def class_names(spec: DatasetSpec) -> list[str]:
    if spec.target == "position":
        return [POSITION_PHRASES[p] for p in spec.positions]
    return list(spec.classes)


def templates(spec: DatasetSpec) -> list[str]:
    words = [DOMAIN_PHRASES[d][0] for d in spec.domains if d in DOMAIN_PHRASES] or ["scan"]
    return sorted({t.format(d=w, c="{c}") for t in TEMPLATES[spec.target] for w in words})


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def _digit_image(img8: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    t = torch.from_numpy(img8)[None, None]
    up = torch.nn.functional.interpolate(t, size=(SIZE - 4, SIZE - 4), mode="bilinear", align_corners=False)[0, 0]
    canvas = np.zeros((SIZE, SIZE), np.float32)
    oy, ox = rng.integers(0, 5, 2)
    canvas[oy:oy + SIZE - 4, ox:ox + SIZE - 4] = up.numpy()
    ink = rng.uniform(0.05, 0.3)
    paper = rng.uniform(0.8, 0.95)
    gray = paper - (paper - ink) * np.clip(canvas, 0, 1) + rng.normal(0, 0.02, canvas.shape)
    return np.repeat(np.clip(gray, 0, 1)[..., None], 3, axis=2)


def _sample(spec: DatasetSpec, label: int, rng: np.random.Generator, pretrain: bool) -> tuple[np.ndarray, str]:
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    colour, size = pick(spec.colours), pick(spec.sizes)
    position, count = pick(spec.positions), pick(spec.counts)
    name = pick(spec.concepts) if spec.target != "concept" else spec.concepts[label]
    if spec.target == "colour":
        colour = spec.colours[label]
    elif spec.target == "count":
        count = spec.counts[label]
    elif spec.target == "position":
        position = spec.positions[label]
    elif spec.target == "size":
        size = spec.sizes[label]
    c = concept(name)
    domain = pick(spec.domains)
    mask = concept_mask(c, size, position, COUNTS[count], rng)
    img = stylize(mask, COLOURS[colour], domain, rng)
    word, long_template = DOMAIN_PHRASES[domain]
    caption = long_template.format(cap=_describe(c.detail, colour, size, count, position))
    if pretrain:  # mix caption forms so that class-name and attribute prompts are learnt too
        forms = [caption, f"a {word} of a {colour} {c.name}.", f"a {word} of a {c.name}.",
                 f"a {word} of a {c.name}.", f"a {word} of a {colour} object.", f"a {word} of a {size} object."]
        caption = pick(forms)
    return img, caption


def split_size(spec: DatasetSpec, split: str, size_factor: float = 1.0) -> int:
    """Images in a split: the catalog's count times `size_factor`, at least one per class."""
    n = spec.n_train if split == "train" else spec.n_test
    return 0 if n == 0 else max(len(spec.classes), int(round(n * size_factor)))


def generate(spec: DatasetSpec, split: str, seed: int, size_factor: float = 1.0) -> Split:
    """Draw one split of one dataset, deterministically from (seed, dataset, split, size)."""
    index = list(catalog.ALL).index(spec.name)
    rng = np.random.default_rng([seed, index, 0 if split == "train" else 1])
    n = split_size(spec, split, size_factor)
    classes = class_names(spec)
    labels = np.arange(n, dtype=np.int64) % len(classes)
    rng.shuffle(labels)
    images = np.zeros((n, SIZE, SIZE, 3), np.uint8)
    captions = []
    if spec.target == "digit":
        pics, targets = _digits()
        # train and test draw from disjoint halves of the 1,797 scans
        half = np.arange(len(targets)) % 2 == (0 if split == "train" else 1)
        pools = {d: np.flatnonzero(half & (targets == d)) for d in range(10)}
        for i, y in enumerate(labels):
            img = _digit_image(pics[int(rng.choice(pools[int(y)]))], rng)
            images[i] = np.round(img * 255)
            captions.append(f"a scan of a handwritten digit {int(y)} on paper")
    elif spec.mix:  # a pool: each image from one part (class-balanced within it), parts in their shares
        counts = [int(round(share * n)) for _, share in spec.mix[:-1]]
        part_of = np.repeat(np.arange(len(spec.mix)), counts + [n - sum(counts)])
        rng.shuffle(part_of)
        for i, k in enumerate(part_of):
            part = spec.mix[k][0]
            c = int(rng.integers(len(part.concepts)))
            img, cap = _sample(part, c, rng, pretrain=True)
            images[i] = np.round(img * 255)
            labels[i] = spec.concepts.index(part.concepts[c])
            captions.append(cap)
    else:
        for i, y in enumerate(labels):
            img, cap = _sample(spec, int(y), rng, pretrain=spec.role == "pretrain")
            images[i] = np.round(img * 255)
            captions.append(cap)
    return Split(images, labels, classes, templates(spec) if spec.role != "pretrain" else [], captions, spec.kind)


# -- files ------------------------------------------------------------------------------------

def write_split(split: Split, path: Path) -> None:
    atomic_save({"images": torch.from_numpy(split.images), "labels": torch.from_numpy(split.labels)}, path)


def dataset_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if not p.name.startswith("."):
            h.update(p.name.encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def prepare(root: str | os.PathLike, seed: int = 0, names: list[str] | None = None,
            size_factor: float = 1.0) -> dict[str, str]:
    """Write every dataset (or `names`) under `root` unless present and intact with the same seed,
    size and recipe (its catalog entry and `GENERATOR_VERSION`); return `{name: content digest}`."""
    if not 0 < size_factor <= 10:
        raise ValueError(f"size_factor={size_factor!r} is not allowed; expected a number in (0, 10]")
    unknown = sorted(set(names or []) - set(catalog.ALL))
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown}; known: {sorted(catalog.ALL)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if (manifest.get("seed"), manifest.get("size_factor", 1.0)) != (seed, size_factor):
        manifest = {}
    digests = dict(manifest.get("datasets", {}))
    recipes = dict(manifest.get("recipes", {}))
    for name in names or list(catalog.ALL):
        spec = catalog.ALL[name]
        folder = root / name
        recipe = hashlib.sha256(f"{GENERATOR_VERSION}|{spec!r}".encode()).hexdigest()
        if (name in digests and recipes.get(name) == recipe and folder.exists()
                and dataset_digest(folder) == digests[name]):
            continue
        folder.mkdir(exist_ok=True)
        meta = {"name": name, "role": spec.role, "kind": spec.kind, "target": spec.target,
                "domains": list(spec.domains), "seed": seed, "splits": {}}
        for split in ("train", "test"):
            if split_size(spec, split) == 0:
                continue
            s = generate(spec, split, seed, size_factor)
            write_split(s, folder / f"{split}.safetensors")
            meta["classes"], meta["templates"] = s.classes, s.templates
            meta["splits"][split] = {"n": len(s.labels), "captions": s.captions}
        atomic_write_bytes(folder / "meta.json", json.dumps(meta, indent=0).encode())
        digests[name], recipes[name] = dataset_digest(folder), recipe
    # sorted, so that the file (and DVC's hash of data/) does not depend on the order datasets were made in
    atomic_write_bytes(manifest_path, json.dumps({"seed": seed, "size_factor": size_factor, "datasets": digests,
                                                   "recipes": recipes}, indent=1, sort_keys=True).encode())
    return digests


def check_dataset(folder: str | os.PathLike) -> None:
    """Check a dataset in chronomerge's format before anything uses it; a `ValueError` names the file and
    what is wrong. Each split: images uint8 N×H×W×3 (so no NaN or inf, values 0-255), at least one
    image of at least 8×8 pixels, integer labels in 0..len(classes)-1, one caption per image."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        classes, splits = meta["classes"], meta["splits"]
        assert isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)
        assert isinstance(meta["templates"], list) and isinstance(splits, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise ValueError(f"{folder / 'meta.json'}: not a dataset description (classes: a non-empty list of "
                         f"names, templates, splits) ({type(e).__name__})") from None
    for split in ("train", "test"):
        path = folder / f"{split}.safetensors"
        if split not in splits:
            raise ValueError(f"{folder / 'meta.json'}: no {split!r} split")
        try:
            t = load_file(path)
            images, labels = t["images"], t["labels"]
        except (OSError, SafetensorError, KeyError) as e:
            raise ValueError(f"{path}: unreadable or without 'images' and 'labels' ({type(e).__name__})") from None
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{path}: images must be uint8 N×H×W×3 (RGB, 0-255); got {str(images.dtype)[6:]} "
                             f"{'×'.join(map(str, images.shape))}")
        n = images.shape[0]
        if n == 0:
            raise ValueError(f"{path}: the {split} split is empty")
        if min(images.shape[1:3]) < 8:
            raise ValueError(f"{path}: images are {images.shape[1]}×{images.shape[2]}; at least 8×8 pixels")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.shape != (n,):
            raise ValueError(f"{path}: labels must be {n} integers, got {str(labels.dtype)[6:]} "
                             f"{'×'.join(map(str, labels.shape))}")
        if int(labels.min()) < 0 or int(labels.max()) >= len(classes):
            raise ValueError(f"{path}: labels run {int(labels.min())}..{int(labels.max())} but meta.json lists "
                             f"{len(classes)} classes (labels 0..{len(classes) - 1})")
        captions = splits[split].get("captions") if isinstance(splits[split], dict) else None
        if not isinstance(captions, list) or len(captions) != n:
            raise ValueError(f"{folder / 'meta.json'}: the {split} split needs one caption per image ({n})")


def load_split(root: str | os.PathLike, name: str, split: str) -> Split:
    """Read one split written by `prepare` (safetensors and JSON only)."""
    from safetensors.torch import load_file

    folder = Path(root) / name
    if not (folder / "meta.json").exists():
        raise FileNotFoundError(f"dataset {name!r} is not prepared under {root} (run prepare)")
    meta = json.loads((folder / "meta.json").read_text())
    if split not in meta["splits"]:
        raise ValueError(f"dataset {name!r} has no {split!r} split; it has {sorted(meta['splits'])}")
    t = load_file(folder / f"{split}.safetensors")
    return Split(t["images"].numpy(), t["labels"].numpy(), meta["classes"], meta["templates"],
                 meta["splits"][split]["captions"], meta["kind"])
