"""Evaluation: zero-shot classification, retrieval recall@5, A_KA / A_ZS / GM, ACC and BWT.

Conventions (docs/methods.md, "Metrics"): A_KA is the mean score over the adaptation datasets, A_ZS over
the held-out evaluation datasets, a score being top-1 zero-shot accuracy or, for retrieval sets,
the mean of image→text and text→image recall@5; GM = √(A_KA·A_ZS). With an accuracy matrix
R[t][i] (score on task i after step t), ACC = mean_i R[T][i] and BWT = mean_{i<T} (R[T][i] − R[i][i]).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import open_clip
import torch

from chronomerge.data import Split
from chronomerge.models import autocast, model_input, preprocess_of


@torch.no_grad()
def _encode_batches(encode, items, device, batch_size: int) -> torch.Tensor:
    out = []
    for i in range(0, len(items), batch_size):
        with autocast(device):
            out.append(encode(items[i:i + batch_size]).float())
    return torch.cat(out)


def encode_images(model, images: np.ndarray, device, batch_size: int = 1024, normalize: bool = True) -> torch.Tensor:
    """Image features, normalised unless `normalize=False`; images (uint8 N×H×W×3, any size) go through
    the model's preprocessing.

    On a GPU each batch is staged in pinned host memory and copied without blocking: a copy from
    pageable memory would first wait for the device to finish the previous batch."""
    pp = preprocess_of(model)
    cuda = torch.device(device).type == "cuda"

    def to_device(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x))
        return t.pin_memory().to(device, non_blocking=True) if cuda else t.to(device)

    return _encode_batches(lambda x: model.encode_image(model_input(to_device(x), pp), normalize=normalize),
                           images, device, batch_size)


def encode_texts(model, tokenizer, texts: Sequence[str], device, batch_size: int = 1024) -> torch.Tensor:
    return _encode_batches(lambda t: model.encode_text(tokenizer(list(t)).to(device), normalize=True),
                           list(texts), device, batch_size)


def text_head(model, tokenizer, classes: Sequence[str], templates: Sequence[str], device) -> torch.Tensor:
    """Zero-shot classifier weights (embed_dim × classes), via open_clip's builder."""
    return open_clip.build_zero_shot_classifier(
        model, tokenizer=tokenizer, classnames=list(classes),
        templates=[(lambda c, t=t: t.format(c=c)) for t in templates],
        num_classes_per_batch=None, device=device, use_tqdm=False).float()


def zero_shot_accuracy(model, tokenizer, split: Split, device, head: torch.Tensor | None = None) -> float:
    head = text_head(model, tokenizer, split.classes, split.templates, device) if head is None else head
    feats = encode_images(model, split.images, device)
    pred = (feats @ head).argmax(1).cpu().numpy()
    return float((pred == split.labels).mean())


def retrieval_recall(model, tokenizer, split: Split, device, k: int = 5) -> float:
    """Mean of image→text and text→image recall@k; identical captions count as the same text."""
    texts, owner = np.unique(np.asarray(split.captions), return_inverse=True)
    img = encode_images(model, split.images, device)
    txt = encode_texts(model, tokenizer, list(texts), device)
    sim = img @ txt.T
    owner_t = torch.from_numpy(owner).to(sim.device)
    top_t = sim.topk(min(k, len(texts)), dim=1).indices
    i2t = (top_t == owner_t[:, None]).any(1).float().mean()
    top_i = sim.T.topk(min(k, len(split.images)), dim=1).indices
    t2i = (owner_t[top_i] == torch.arange(len(texts), device=sim.device)[:, None]).any(1).float().mean()
    return float((i2t + t2i) / 2)


@torch.no_grad()
def score(model, tokenizer, split: Split, device) -> float:
    """A dataset's score: accuracy for classification, recall@5 for retrieval."""
    model.eval()
    if split.kind == "retrieval":
        return retrieval_recall(model, tokenizer, split, device)
    return zero_shot_accuracy(model, tokenizer, split, device)


def evaluate(model, tokenizer, splits: Mapping[str, Split], device) -> dict[str, float]:
    return {name: score(model, tokenizer, s, device) for name, s in splits.items()}


def summarize(
    scores: Mapping[str, float], adaptation: Sequence[str], held_out: Sequence[str]
) -> dict[str, float | None]:
    """A_KA, A_ZS and their geometric mean GM (TIME, Sec. 3). With no adaptation (held-out) sets,
    A_KA (A_ZS) and GM are absent (None), not zero."""
    a_ka = float(np.mean([scores[n] for n in adaptation])) if adaptation else None
    a_zs = float(np.mean([scores[n] for n in held_out])) if held_out else None
    gm = None if a_ka is None or a_zs is None else math.sqrt(max(a_ka, 0) * max(a_zs, 0))
    return {"A_KA": a_ka, "A_ZS": a_zs, "GM": gm}


def acc_bwt(rows: Sequence[Sequence[float | None]], t: int | None = None) -> dict[str, float | None]:
    """ACC and BWT after step `t` (default: the last row) of an accuracy matrix R[t][i], the score on
    task i after step t: ACC = mean_i R[t][i], BWT = mean_{i<t} (R[t][i] − R[i][i]) over the first t
    tasks. Rows may be lower-triangular (row t holds tasks 0..t) or longer. A task without a test set
    (an imported expert with no dataset) has None entries and is left out of both; with no task scored
    both are None."""
    t = len(rows) if t is None else t
    if not 1 <= t <= len(rows) or any(len(rows[i]) < i + 1 for i in range(t)):
        raise ValueError(f"an accuracy matrix needs row i to hold tasks 0..i for the first t={t} rows; "
                         f"got row lengths {[len(r) for r in rows]}")
    last = rows[t - 1][:t]
    scored = [x for x in last if x is not None]
    drops = [last[i] - rows[i][i] for i in range(t - 1) if last[i] is not None and rows[i][i] is not None]
    return {"ACC": float(np.mean(scored)) if scored else None,
            "BWT": float(np.mean(drops)) if drops else (0.0 if scored else None)}


def chance(splits: Mapping[str, Split]) -> float:
    """Mean chance score of classification splits (1 / number of classes)."""
    vals = [1.0 / len(s.classes) for s in splits.values() if s.kind == "classification"]
    return float(np.mean(vals))
