"""Rendering of the embedded benchmark's images: concepts × attributes × domains, 32×32 RGB.

A concept draws a white-on-black mask (PIL, 4× supersampled); attributes place, size, count
and colour it; a domain turns mask and colour into a styled image (photo-like shading on a noisy
background, pencil sketch, blurred painting with a palette shift, pixel art, inverted, low light,
neon, blueprint, mosaic). Everything is driven by a `numpy.random.Generator`, so a seed fixes it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SIZE = 32
_SS = 4  # supersampling factor
_CANVAS = SIZE * _SS

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "pink": (240, 120, 180), "cyan": (40, 200, 210),
}
SIZES = {"small": 0.22, "medium": 0.32, "large": 0.44}
POSITIONS = {"center": (0.5, 0.5), "left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28),
             "bottom": (0.5, 0.72)}
COUNTS = {"one": 1, "two": 2, "three": 3}


def _poly(draw, cx, cy, r, pts, rot=0.0):
    draw.polygon([(cx + r * x * math.cos(rot) - r * y * math.sin(rot),
                   cy + r * x * math.sin(rot) + r * y * math.cos(rot)) for x, y in pts], fill=255)


def _regular(n, start=-math.pi / 2):
    return [(math.cos(start + 2 * math.pi * i / n), math.sin(start + 2 * math.pi * i / n)) for i in range(n)]


def _star(points=5, inner=0.45):
    out = []
    for i in range(2 * points):
        r = 1.0 if i % 2 == 0 else inner
        a = -math.pi / 2 + math.pi * i / points
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def _ellipse(draw, cx, cy, rx, ry, fill=255):
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)


def _rect(draw, cx, cy, w, h, fill=255):
    draw.rectangle([cx - w, cy - h, cx + w, cy + h], fill=fill)


def _shape(name):
    def draw_fn(d, cx, cy, r, rng):
        if name == "circle":
            _ellipse(d, cx, cy, r, r)
        elif name == "square":
            _rect(d, cx, cy, 0.8 * r, 0.8 * r)
        elif name == "triangle":
            _poly(d, cx, cy, r, _regular(3))
        elif name == "star":
            _poly(d, cx, cy, r, _star())
        elif name == "diamond":
            _poly(d, cx, cy, r, [(0, -1), (0.65, 0), (0, 1), (-0.65, 0)])
        elif name == "cross":
            _rect(d, cx, cy, r, 0.3 * r)
            _rect(d, cx, cy, 0.3 * r, r)
        elif name == "ring":
            _ellipse(d, cx, cy, r, r)
            _ellipse(d, cx, cy, 0.55 * r, 0.55 * r, fill=0)
        elif name == "hexagon":
            _poly(d, cx, cy, r, _regular(6))
        elif name == "crescent":
            _ellipse(d, cx, cy, r, r)
            _ellipse(d, cx + 0.45 * r, cy - 0.15 * r, 0.8 * r, 0.8 * r, fill=0)
        elif name == "heart":
            _ellipse(d, cx - 0.45 * r, cy - 0.3 * r, 0.5 * r, 0.5 * r)
            _ellipse(d, cx + 0.45 * r, cy - 0.3 * r, 0.5 * r, 0.5 * r)
            _poly(d, cx, cy, r, [(-0.93, -0.15), (0.93, -0.15), (0, 0.95)])
        elif name == "arrow":
            _poly(d, cx, cy, r, [(-1, -0.25), (0.2, -0.25), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.25), (-1, 0.25)])
        elif name == "pentagon":
            _poly(d, cx, cy, r, _regular(5))
        elif name == "semicircle":
            d.pieslice([cx - r, cy - r * 0.6, cx + r, cy + r * 1.4], 180, 360, fill=255)
        elif name == "octagon":
            _poly(d, cx, cy, r, _regular(8, start=math.pi / 8))
        elif name == "trapezoid":
            _poly(d, cx, cy, r, [(-0.5, -0.6), (0.5, -0.6), (1, 0.6), (-1, 0.6)])
        elif name == "lightning":
            _poly(d, cx, cy, r, [(0.2, -1), (-0.6, 0.1), (-0.05, 0.1), (-0.3, 1), (0.6, -0.15), (0.05, -0.15)])
        else:
            raise KeyError(name)
    return draw_fn


def _object(name):
    def draw_fn(d, cx, cy, r, rng):
        if name == "house":
            _rect(d, cx, cy + 0.3 * r, 0.7 * r, 0.55 * r)
            _poly(d, cx, cy - 0.45 * r, r, [(-0.9, 0.2), (0.9, 0.2), (0, -0.55)])
        elif name == "tree":
            _rect(d, cx, cy + 0.6 * r, 0.15 * r, 0.4 * r)
            _ellipse(d, cx, cy - 0.25 * r, 0.65 * r, 0.7 * r)
        elif name == "car":
            _rect(d, cx, cy, r, 0.3 * r)
            _rect(d, cx - 0.1 * r, cy - 0.45 * r, 0.5 * r, 0.2 * r)
            _ellipse(d, cx - 0.55 * r, cy + 0.35 * r, 0.25 * r, 0.25 * r)
            _ellipse(d, cx + 0.55 * r, cy + 0.35 * r, 0.25 * r, 0.25 * r)
        elif name == "snowman":
            _ellipse(d, cx, cy + 0.45 * r, 0.55 * r, 0.55 * r)
            _ellipse(d, cx, cy - 0.45 * r, 0.38 * r, 0.38 * r)
        elif name == "lollipop":
            _ellipse(d, cx, cy - 0.4 * r, 0.55 * r, 0.55 * r)
            _rect(d, cx, cy + 0.5 * r, 0.08 * r, 0.5 * r)
        elif name == "flag":
            _rect(d, cx - 0.8 * r, cy, 0.08 * r, r)
            _rect(d, cx, cy - 0.5 * r, 0.75 * r, 0.45 * r)
        elif name == "mushroom":
            d.pieslice([cx - r, cy - r, cx + r, cy + 0.6 * r], 180, 360, fill=255)
            _rect(d, cx, cy + 0.4 * r, 0.25 * r, 0.55 * r)
        elif name == "umbrella":
            d.pieslice([cx - r, cy - 0.9 * r, cx + r, cy + 0.9 * r], 180, 360, fill=255)
            _rect(d, cx, cy + 0.45 * r, 0.07 * r, 0.5 * r)
            d.arc([cx - 0.35 * r, cy + 0.7 * r, cx + 0.05 * r, cy + 1.05 * r], 0, 180, fill=255, width=max(2, int(0.1 * r)))
        elif name == "rocket":
            _rect(d, cx, cy + 0.1 * r, 0.3 * r, 0.6 * r)
            _poly(d, cx, cy - 0.5 * r, r, [(-0.3, 0.0), (0.3, 0.0), (0, -0.5)])
            _poly(d, cx, cy + 0.5 * r, r, [(-0.3, -0.2), (-0.65, 0.3), (-0.3, 0.2)])
            _poly(d, cx, cy + 0.5 * r, r, [(0.3, -0.2), (0.65, 0.3), (0.3, 0.2)])
        elif name == "cup":
            _rect(d, cx - 0.15 * r, cy, 0.55 * r, 0.6 * r)
            d.ellipse([cx + 0.2 * r, cy - 0.35 * r, cx + 0.9 * r, cy + 0.35 * r], outline=255, width=max(2, int(0.15 * r)))
        elif name == "sailboat":
            _poly(d, cx, cy, r, [(-0.9, 0.45), (0.9, 0.45), (0.6, 0.85), (-0.6, 0.85)])
            _poly(d, cx, cy, r, [(0.05, -0.95), (0.05, 0.35), (0.8, 0.35)])
            _poly(d, cx, cy, r, [(-0.05, -0.7), (-0.05, 0.35), (-0.6, 0.35)])
        elif name == "key":
            d.ellipse([cx - r, cy - 0.35 * r, cx - 0.3 * r, cy + 0.35 * r], outline=255, width=max(2, int(0.18 * r)))
            _rect(d, cx + 0.3 * r, cy, 0.6 * r, 0.09 * r)
            _rect(d, cx + 0.75 * r, cy + 0.2 * r, 0.07 * r, 0.2 * r)
        elif name == "bell":
            d.pieslice([cx - 0.6 * r, cy - 0.9 * r, cx + 0.6 * r, cy + 0.5 * r], 180, 360, fill=255)
            _rect(d, cx, cy + 0.05 * r, 0.6 * r, 0.35 * r)
            _rect(d, cx, cy + 0.45 * r, 0.85 * r, 0.08 * r)
            _ellipse(d, cx, cy + 0.68 * r, 0.15 * r, 0.15 * r)
        elif name == "dumbbell":
            _rect(d, cx, cy, 0.6 * r, 0.09 * r)
            _rect(d, cx - 0.75 * r, cy, 0.15 * r, 0.45 * r)
            _rect(d, cx + 0.75 * r, cy, 0.15 * r, 0.45 * r)
        else:
            raise KeyError(name)
    return draw_fn


def _pattern(name):
    def draw_fn(d, cx, cy, r, rng):
        x0, y0, x1, y1 = cx - r, cy - r, cx + r, cy + r
        step = max(4, int(r / 3))
        w = max(2, step // 2)
        if name == "stripes":
            for y in np.arange(y0, y1, step):
                d.rectangle([x0, y, x1, y + w - 1], fill=255)
        elif name == "bars":
            for x in np.arange(x0, x1, step):
                d.rectangle([x, y0, x + w - 1, y1], fill=255)
        elif name == "checkerboard":
            for i, y in enumerate(np.arange(y0, y1, step)):
                for j, x in enumerate(np.arange(x0, x1, step)):
                    if (i + j) % 2 == 0:
                        d.rectangle([x, y, x + step - 1, y + step - 1], fill=255)
        elif name == "dots":
            for y in np.arange(y0 + w, y1, step):
                for x in np.arange(x0 + w, x1, step):
                    _ellipse(d, x, y, w * 0.6, w * 0.6)
        elif name == "grid":
            for t in np.arange(x0, x1 + 1, step):
                d.line([t, y0, t, y1], fill=255, width=max(1, w // 2))
                d.line([x0, t - x0 + y0, x1, t - x0 + y0], fill=255, width=max(1, w // 2))
        elif name == "zigzag":
            for y in np.arange(y0, y1, step * 1.5):
                pts = [(x, y + (step if k % 2 else 0)) for k, x in enumerate(np.arange(x0, x1 + step, step))]
                d.line(pts, fill=255, width=w)
        elif name == "waves":
            for y in np.arange(y0, y1, step * 1.5):
                pts = [(x, y + 0.5 * step * math.sin((x - x0) / step * 1.6)) for x in np.arange(x0, x1, 2)]
                d.line(pts, fill=255, width=w)
        elif name == "target":
            for k, rr in enumerate(np.arange(r, 0, -step * 0.75)):
                _ellipse(d, cx, cy, rr, rr, fill=255 if k % 2 == 0 else 0)
        elif name == "diagonal":
            for t in np.arange(-2 * r, 2 * r, step):
                d.line([x0 + t, y0, x0 + t + 2 * r, y1], fill=255, width=w)
            d.rectangle([0, 0, x0 - 1, _CANVAS], fill=0)
            d.rectangle([x1 + 1, 0, _CANVAS, _CANVAS], fill=0)
        elif name == "spiral":
            pts = [(cx + (r * k / 200) * math.cos(k / 9), cy + (r * k / 200) * math.sin(k / 9)) for k in range(200)]
            d.line(pts, fill=255, width=w)
        else:
            raise KeyError(name)
    return draw_fn


_FONT_CACHE: dict[int, ImageFont.FreeTypeFont] = {}


def _glyph(char):
    def draw_fn(d, cx, cy, r, rng):
        size = max(8, int(2.2 * r))
        if size not in _FONT_CACHE:
            _FONT_CACHE[size] = ImageFont.load_default(size=size)
        d.text((cx, cy), char, fill=255, font=_FONT_CACHE[size], anchor="mm",
               stroke_width=max(1, size // 10), stroke_fill=255)  # bold enough to survive 4x downsampling
    return draw_fn


SHAPES = ["circle", "square", "triangle", "star", "diamond", "cross", "ring", "hexagon", "crescent", "heart",
          "arrow", "pentagon", "semicircle", "octagon", "trapezoid", "lightning"]
OBJECTS = ["house", "tree", "car", "snowman", "lollipop", "flag", "mushroom", "umbrella", "rocket", "cup",
           "sailboat", "key", "bell", "dumbbell"]
PATTERNS = ["stripes", "bars", "checkerboard", "dots", "grid", "zigzag", "waves", "target", "diagonal", "spiral"]
NUMERALS = list("0123456789")


@dataclass(frozen=True)
class Concept:
    name: str       # class name used in prompts, e.g. "star", "letter K"
    family: str     # shape | object | pattern | glyph
    detail: str     # longer caption phrase, e.g. "five-pointed star"


_DETAILS = {"star": "five-pointed star", "cross": "plus-shaped cross", "ring": "hollow ring",
            "crescent": "crescent moon", "arrow": "arrow pointing right", "lightning": "lightning bolt",
            "target": "target of concentric rings", "house": "house with a pointed roof",
            "tree": "round tree on a trunk", "car": "car on two wheels", "snowman": "snowman of two balls",
            "sailboat": "sailboat with two sails", "dumbbell": "dumbbell weight"}


def concept(name: str) -> Concept:
    if name in SHAPES:
        return Concept(name, "shape", _DETAILS.get(name, name))
    if name in OBJECTS:
        return Concept(name, "object", _DETAILS.get(name, name))
    if name in PATTERNS:
        return Concept(f"{name} pattern", "pattern", _DETAILS.get(name, f"{name} pattern"))
    if name.startswith("letter ") or name.startswith("numeral "):
        return Concept(name, "glyph", f"printed {name}")
    raise KeyError(f"unknown concept {name!r}")


def _drawer(c: Concept):
    if c.family == "shape":
        return _shape(c.name)
    if c.family == "object":
        return _object(c.name)
    if c.family == "pattern":
        return _pattern(c.name.removesuffix(" pattern"))
    return _glyph(c.name.split()[-1])


def concept_mask(c: Concept, size: str, position: str, count: int, rng: np.random.Generator) -> np.ndarray:
    """Float mask in [0, 1], SIZE×SIZE, of `count` copies of the concept."""
    img = Image.new("L", (_CANVAS, _CANVAS), 0)
    d = ImageDraw.Draw(img)
    draw = _drawer(c)
    scale = SIZES[size] * (0.75 if count > 1 else 1.0) * rng.uniform(0.9, 1.1)
    px, py = POSITIONS[position]
    r = scale * _CANVAS / 2
    offsets = {1: [(0, 0)], 2: [(-1, 0), (1, 0)], 3: [(-1, 0.6), (1, 0.6), (0, -0.9)]}[count]
    for ox, oy in offsets:
        cx = (px + rng.uniform(-0.04, 0.04)) * _CANVAS + ox * r * 1.1
        cy = (py + rng.uniform(-0.04, 0.04)) * _CANVAS + oy * r * 1.1
        draw(d, cx, cy, r, rng)
    img = img.resize((SIZE, SIZE), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def _noise(rng, scale, shape=(SIZE, SIZE, 3)):
    return rng.normal(0.0, scale, shape).astype(np.float32)


def _edges(mask):
    m = mask
    gx = np.abs(np.diff(m, axis=1, append=m[:, -1:]))
    gy = np.abs(np.diff(m, axis=0, append=m[-1:, :]))
    return np.clip((gx + gy) * 2.0, 0, 1)


def _blur(img, radius):
    pil = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return np.asarray(pil.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255.0


def stylize(mask: np.ndarray, colour: tuple[int, int, int], domain: str, rng: np.random.Generator) -> np.ndarray:
    """A domain's rendering of a mask in a colour: float RGB in [0, 1]."""
    col = np.array(colour, dtype=np.float32) / 255.0
    m = mask[..., None]
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    if domain in ("photo", "inverted", "low light"):
        # a cluttered but contrasting background: smooth blotches around a tone far from the object's
        light_object = float(col @ np.array([0.3, 0.59, 0.11], np.float32)) > 0.5
        tone = rng.uniform(0.12, 0.32) if light_object else rng.uniform(0.68, 0.88)
        tint = rng.uniform(-0.08, 0.08, 3).astype(np.float32)
        blotches = _blur(np.clip(0.5 + _noise(rng, 0.5), 0, 1), 2.0) - 0.5
        bg_img = tone + tint + 0.35 * blotches + _noise(rng, 0.02)
        shade = (1.1 - 0.3 * (xx + yy) / 2)[..., None]
        img = (1 - m) * bg_img + m * np.clip(col * shade + _noise(rng, 0.02), 0, 1)
        if domain == "inverted":
            img = 1.0 - img
        elif domain == "low light":
            img = img * rng.uniform(0.3, 0.45) + _noise(rng, 0.02)
        return np.clip(img, 0, 1)
    if domain == "sketch":
        paper = 0.92 + _noise(rng, 0.02)
        e = _edges(mask)[..., None]
        pencil = 0.25 + 0.35 * np.mean(col)
        return np.clip(paper * (1 - e) + e * pencil, 0, 1)
    if domain == "painting":
        shift = rng.uniform(-0.15, 0.15, 3).astype(np.float32)
        bg = np.clip(np.array([0.85, 0.8, 0.65], np.float32) + shift + 0.2 * (xx[..., None] - 0.5), 0, 1)
        img = (1 - m) * bg + m * np.clip(col + shift, 0, 1)
        return np.clip(_blur(img, 1.2) + _noise(rng, 0.02), 0, 1)
    if domain == "pixel art":
        bg = np.array([0.1, 0.1, 0.2], np.float32) if rng.random() < 0.5 else np.array([0.9, 0.9, 0.8], np.float32)
        img = (1 - m) * bg + m * col
        small = Image.fromarray((img * 255).astype(np.uint8)).resize((16, 16), Image.BILINEAR)
        img = np.asarray(small.resize((SIZE, SIZE), Image.NEAREST), dtype=np.float32) / 255.0
        return np.round(img * 3) / 3
    if domain == "neon":
        e = _blur(np.repeat(_edges(mask)[..., None], 3, axis=2), 0.8)
        return np.clip(0.05 + _noise(rng, 0.02) + 1.6 * e * col, 0, 1)
    if domain == "blueprint":
        paper = np.array([0.1, 0.25, 0.6], np.float32) + _noise(rng, 0.02)
        grid = ((np.arange(SIZE) % 8) == 0).astype(np.float32)
        paper = paper + 0.1 * np.maximum(grid[None, :], grid[:, None])[..., None]
        e = _edges(mask)[..., None]
        return np.clip(paper * (1 - e) + e * 0.95, 0, 1)
    if domain == "mosaic":
        bg = np.array([0.6, 0.55, 0.5], np.float32)
        img = (1 - m) * bg + m * col
        tiles = img.reshape(16, 2, 16, 2, 3).mean(axis=(1, 3))
        tiles = tiles + rng.normal(0, 0.04, tiles.shape).astype(np.float32)
        out = np.repeat(np.repeat(tiles, 2, axis=0), 2, axis=1)
        grout = ((np.arange(SIZE) % 4) == 0).astype(np.float32)
        out = out * (1 - 0.3 * np.maximum(grout[None, :], grout[:, None])[..., None])
        return np.clip(out, 0, 1)
    raise KeyError(f"unknown domain {domain!r}")


DOMAINS = ["photo", "sketch", "painting", "pixel art", "inverted", "low light", "neon", "blueprint", "mosaic"]
DOMAIN_PHRASES = {
    "photo": ("photo", "a photo of {cap} on a cluttered background"),
    "sketch": ("sketch", "a pencil sketch of {cap} on white paper"),
    "painting": ("painting", "a blurry painting of {cap} in soft colours"),
    "pixel art": ("pixel art image", "a pixel art image of {cap} in a retro game"),
    "inverted": ("inverted photo", "an inverted negative photo of {cap}"),
    "low light": ("dark photo", "a dark low light photo of {cap} at night"),
    "neon": ("neon sign", "a glowing neon sign of {cap} in the dark"),
    "blueprint": ("blueprint", "a technical blueprint drawing of {cap}"),
    "mosaic": ("mosaic", "a tiled mosaic of {cap}"),
}
