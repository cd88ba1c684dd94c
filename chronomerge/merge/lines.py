"""Depth of each parameter for LiNeS: λ_l = α + β(l − 1)/(L − 1) (Wang et al. 2025, Eq. 2).

Block l (1-based) of a tower of L blocks is found from names like `...resblocks.3.`,
`...blocks.3.`, `...layers.3.` or `...layer.3.`; each tower (the prefix before the block index,
e.g. `visual.transformer.` and `transformer.` in open_clip) has its own L. Parameters outside the
blocks: the final norm and projections (`ln_post`, `ln_final`, `proj`, `text_projection`, `head`,
`norm`, `fc_norm`, `logit_scale`) are the deepest and get α + β; embeddings and stem get α.
A tower with a single block gives it α + β.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

_BLOCK = re.compile(r"^(.*?\b(?:resblocks|blocks|layers|layer))\.(\d+)\.")
_HEAD = re.compile(r"(^|\.)(ln_post|ln_final|proj|text_projection|head|norm|fc_norm|logit_scale)(\.|$)")


def block_index(key: str) -> tuple[str, int] | None:
    """(tower prefix, 0-based block index) of a parameter inside a block, else None."""
    m = _BLOCK.match(key)
    return (m.group(1), int(m.group(2))) if m else None


def layer_scales(keys: Iterable[str], alpha: float, beta: float) -> dict[str, float]:
    """λ for every key: α + β·(l − 1)/(L − 1) inside blocks, α + β for heads, α elsewhere."""
    keys = list(keys)
    depth: dict[str, int] = {}
    for k in keys:
        b = block_index(k)
        if b:
            depth[b[0]] = max(depth.get(b[0], 0), b[1] + 1)
    scales = {}
    for k in keys:
        b = block_index(k)
        if b:
            n = depth[b[0]]
            scales[k] = alpha + beta * (b[1] / (n - 1) if n > 1 else 1.0)
        elif _HEAD.search(k):
            scales[k] = alpha + beta
        else:
            scales[k] = alpha
    return scales
