"""The embedded benchmark's datasets: a pretraining pool, adaptation datasets, held-out evaluations.

FoMo-in-Flux in miniature. Like web-scale pretraining data, the pool has a head and a long tail:
most of it (`HEAD_SHARE`) shows common concepts (the first shapes, objects and patterns) in common
domains (photo, sketch, painting); the rest is a thin long tail over every concept and domain of
the benchmark, so that, as for CLIP, the adaptation datasets' class names and styles were seen
rarely rather than never and zero-shot accuracy on them is low but well above chance. Captions are
compositional. Adaptation datasets emphasise the tail's concepts (letters, numerals, new shapes,
objects and patterns, scikit-learn's real handwritten digits, the one family absent from pretraining)
and domains (pixel art, inverted, low light, neon, blueprint, mosaic); two of them are
caption-retrieval sets. Held-out evaluation datasets ask about the head's concepts and attributes in
new combinations; no stream trains on them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from chronomerge.data.render import COLOURS, COUNTS, NUMERALS, POSITIONS, SIZES

BASE_SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "ring")
BASE_OBJECTS = ("house", "tree", "car", "snowman")
BASE_PATTERNS = ("stripes", "bars", "checkerboard", "dots")
NEW_SHAPES_A = ("hexagon", "crescent", "heart", "arrow")
NEW_SHAPES_B = ("pentagon", "semicircle", "octagon", "trapezoid", "lightning")
NEW_OBJECTS_A = ("lollipop", "flag", "mushroom", "umbrella")
NEW_OBJECTS_B = ("rocket", "cup", "sailboat", "key", "bell", "dumbbell")
NEW_PATTERNS = ("grid", "zigzag", "waves", "target", "diagonal", "spiral")


def letters(chars) -> tuple[str, ...]:
    return tuple(f"letter {c}" for c in chars)


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of the benchmark. `target` is what a class is: the concept or an attribute."""

    name: str
    role: str                       # pretrain | adaptation | eval
    concepts: tuple[str, ...]
    domains: tuple[str, ...]
    target: str = "concept"         # concept | colour | count | position | size | digit
    kind: str = "classification"    # classification | retrieval
    n_train: int = 480
    n_test: int = 160
    colours: tuple[str, ...] = tuple(COLOURS)
    sizes: tuple[str, ...] = ("medium", "large")
    positions: tuple[str, ...] = ("center",)
    counts: tuple[str, ...] = ("one",)
    mix: tuple[tuple[DatasetSpec, float], ...] = ()  # a pool drawn from these specs in these shares
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def classes(self) -> tuple[str, ...]:
        if self.target == "concept":
            from chronomerge.data.render import concept
            return tuple(concept(c).name for c in self.concepts)
        if self.target == "digit":
            return tuple(f"handwritten digit {d}" for d in range(10))
        return {"colour": self.colours, "count": self.counts, "position": self.positions,
                "size": self.sizes}[self.target]


_ALL_POS, _ALL_COUNT, _ALL_SIZE = tuple(POSITIONS), tuple(COUNTS), tuple(SIZES)

_HEAD_CONCEPTS = BASE_SHAPES + BASE_OBJECTS + BASE_PATTERNS
_HEAD_DOMAINS = ("photo", "sketch", "painting")

ADAPTATION = (
    DatasetSpec("letters-photo", "adaptation", letters("ABCDEF"), ("photo",), sizes=("large",)),
    DatasetSpec("letters-sketch", "adaptation", letters("JKLMNP"), ("sketch",), sizes=("large",)),
    DatasetSpec("letters-painting", "adaptation", letters("TUVWXY"), ("painting",), sizes=("large",)),
    DatasetSpec("numerals-neon", "adaptation", tuple(f"numeral {d}" for d in NUMERALS[:6]), ("neon",),
                sizes=("large",)),
    DatasetSpec("handwritten-digits", "adaptation", (), ("real",), target="digit"),
    DatasetSpec("new-shapes-photo", "adaptation", NEW_SHAPES_A, ("photo",)),
    DatasetSpec("new-shapes-sketch", "adaptation", NEW_SHAPES_B, ("sketch",)),
    DatasetSpec("new-objects-photo", "adaptation", NEW_OBJECTS_A, ("photo",)),
    DatasetSpec("new-objects-painting", "adaptation", NEW_OBJECTS_B, ("painting",)),
    DatasetSpec("new-patterns-photo", "adaptation", NEW_PATTERNS, ("photo",)),
    DatasetSpec("new-shapes-pixel-art", "adaptation", NEW_SHAPES_A + NEW_SHAPES_B[:1], ("pixel art",),
                sizes=("large",)),
    DatasetSpec("new-shapes-inverted", "adaptation", NEW_SHAPES_B, ("inverted",)),
    DatasetSpec("shapes-low-light", "adaptation", BASE_SHAPES, ("low light",)),
    DatasetSpec("objects-neon", "adaptation", BASE_OBJECTS + NEW_OBJECTS_A[:2], ("neon",)),
    DatasetSpec("shapes-blueprint", "adaptation", BASE_SHAPES + NEW_SHAPES_A[:1], ("blueprint",)),
    DatasetSpec("new-shapes-mosaic", "adaptation", NEW_SHAPES_A + NEW_SHAPES_B[:2], ("mosaic",), sizes=("large",)),
    DatasetSpec("new-shapes-neon", "adaptation", NEW_SHAPES_A + NEW_SHAPES_B[:2], ("neon",)),
    DatasetSpec("new-objects-blueprint", "adaptation", NEW_OBJECTS_B[:4] + NEW_OBJECTS_A[2:], ("blueprint",)),
    DatasetSpec("letters-inverted", "adaptation", letters("GHRSTZ"), ("inverted",), sizes=("large",)),
    DatasetSpec("counts-pixel-art", "adaptation", BASE_SHAPES, ("pixel art",), target="count",
                counts=_ALL_COUNT, sizes=("small", "medium")),
    DatasetSpec("colours-neon", "adaptation", BASE_SHAPES, ("neon",), target="colour"),
    DatasetSpec("objects-mosaic-captions", "adaptation", NEW_OBJECTS_A + NEW_OBJECTS_B, ("mosaic",),
                kind="retrieval", sizes=_ALL_SIZE, positions=_ALL_POS),
    DatasetSpec("glyphs-low-light-captions", "adaptation", letters("BDFHJ") + NEW_SHAPES_B, ("low light",),
                kind="retrieval", sizes=_ALL_SIZE, positions=_ALL_POS),
)

HEAD_SHARE = 0.7
_TAIL_CONCEPTS = tuple(dict.fromkeys(c for d in ADAPTATION for c in d.concepts if c not in _HEAD_CONCEPTS))
_HEAD = DatasetSpec("pretrain-head", "pretrain", _HEAD_CONCEPTS, _HEAD_DOMAINS)
_TAIL = DatasetSpec("pretrain-tail", "pretrain", _HEAD_CONCEPTS + _TAIL_CONCEPTS,
                    tuple(dict.fromkeys(_HEAD_DOMAINS + tuple(x for d in ADAPTATION for x in d.domains if x != "real"))))
PRETRAIN = DatasetSpec("pretrain-pool", "pretrain", _TAIL.concepts, _TAIL.domains, n_train=20000, n_test=0,
                       mix=((_HEAD, HEAD_SHARE), (_TAIL, 1 - HEAD_SHARE)))

EVALUATION = (
    DatasetSpec("eval-shapes-photo", "eval", BASE_SHAPES, ("photo",), n_train=0, n_test=240),
    DatasetSpec("eval-shapes-sketch", "eval", BASE_SHAPES, ("sketch",), n_train=0, n_test=240),
    DatasetSpec("eval-objects-sketch", "eval", BASE_OBJECTS, ("sketch",), n_train=0, n_test=240),
    DatasetSpec("eval-objects-painting", "eval", BASE_OBJECTS, ("painting",), n_train=0, n_test=240),
    DatasetSpec("eval-patterns-photo", "eval", BASE_PATTERNS, ("photo", "painting"), n_train=0, n_test=240),
    DatasetSpec("eval-colours", "eval", BASE_SHAPES + BASE_OBJECTS, ("photo", "painting"), target="colour",
                n_train=0, n_test=240),
    DatasetSpec("eval-sizes", "eval", BASE_SHAPES, ("sketch", "photo"), target="size", n_train=0, n_test=240),
)

ALL = {d.name: d for d in (PRETRAIN, *ADAPTATION, *EVALUATION)}
