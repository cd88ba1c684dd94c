"""Where a checkpoint came from: its tree of parents in the store, down to θ0 and the data.

deployed ← merge inputs (experts, the previous merged model) ← experts ← init checkpoints ← base,
each node with its technique, hyperparameters and data digest. A node reached twice is printed
once and referred to afterwards, so long EMA chains stay linear in size.
"""
from __future__ import annotations

from typing import Any

from chronomerge.store import CheckpointStore

_SHOWN_HPARAMS = ("mode", "weights", "lr", "steps", "seed", "keep", "scale", "drop_rate")


def describe(meta: dict[str, Any]) -> str:
    extra = meta.get("extra", {})
    parts = [meta["kind"], meta["id"][:16]]
    if meta.get("technique"):
        parts.append(meta["technique"])
    hp = {k: v for k, v in meta.get("hparams", {}).items() if k in _SHOWN_HPARAMS and v is not None}
    if hp:
        parts.append(" ".join(f"{k}={v}" for k, v in hp.items()))
    for k in ("role", "task", "t", "model", "pretrained", "format", "source"):
        if extra.get(k) is not None:
            parts.append(f"{k}={extra[k]}")
    if extra.get("source_digest"):  # an imported expert: the SHA-256 of its files
        parts.append(f"source_digest={extra['source_digest'][:16]}")
    if meta.get("data_digest"):
        parts.append(f"data={meta['data_digest'][:16]}")
    parts.append(f"code={meta.get('code_version')}")
    return "  ".join(str(p) for p in parts)


def lineage_lines(store: CheckpointStore, oid: str) -> list[str]:
    """The parent tree of `oid` as text lines (box-drawing indentation)."""
    if oid not in store:
        raise KeyError(f"checkpoint {oid} is not in the store {store.root}")
    lines: list[str] = []
    seen: set[str] = set()

    def visit(node: str, prefix: str, last: bool, top: bool) -> None:
        joint = "" if top else ("└── " if last else "├── ")
        if node not in store:
            lines.append(f"{prefix}{joint}{node[:16]}  (missing from the store)")
            return
        meta = store.meta(node)
        if node in seen:
            lines.append(f"{prefix}{joint}{meta['kind']} {node[:16]}  (shown above)")
            return
        seen.add(node)
        lines.append(f"{prefix}{joint}{describe(meta)}")
        child_prefix = prefix + ("" if top else ("    " if last else "│   "))
        parents = meta["parents"]
        for i, p in enumerate(parents):
            visit(p, child_prefix, i == len(parents) - 1, False)

    visit(oid, "", True, True)
    return lines


def _closure(store: CheckpointStore, oid: str) -> dict[str, dict | None]:
    """`oid` and every checkpoint it was made from (transitively) → its metadata (None when missing
    from the store); each header is read once."""
    metas: dict[str, dict | None] = {}
    todo = [oid]
    while todo:
        node = todo.pop()
        if node not in metas:
            metas[node] = store.meta(node) if node in store else None
            todo += metas[node]["parents"] if metas[node] else []
    return metas


def experts_in(store: CheckpointStore, oid: str) -> list[str]:
    """The experts whose weights reach `oid` through any chain of parents (merge inputs, inits), in
    task order: what a deployed model is made of."""
    experts = {n: m for n, m in _closure(store, oid).items() if m and m["kind"] == "expert"}
    return sorted(experts, key=lambda n: (experts[n]["extra"].get("t", 0), n))
