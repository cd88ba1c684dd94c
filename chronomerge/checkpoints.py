"""The one place that reads the world's checkpoint formats into open_clip state dicts.

Everything downstream (the store, merges, lineage) sees only open_clip state dicts; this module
turns each accepted format into one, lazily (tensors are read from disk when asked for, so a merge
over many experts stays flat in memory):

* **open_clip safetensors** (`*.safetensors`): open_clip's own key names. chronomerge's exports and
  merges record the architecture in the header (`open_clip.model`, `open_clip.config`,
  `open_clip.preprocess`), which `model.name: auto` reads.
* **Hugging Face `transformers` CLIP folders** (`config.json` + `model.safetensors`, or a sharded
  `model.safetensors.index.json`): `CLIPModel` (both towers), `CLIPVisionModel` or
  `CLIPVisionModelWithProjection` (a vision-only expert, whose text tower, logit scale and, for
  `CLIPVisionModel`, visual projection come from a base). transformers 4.x saves a
  `CLIPVisionModel` with `vision_model.` key prefixes, 5.x without; both are read.
  The conversion derives the open_clip config from the HF config (any CLIP size): q/k/v
  projections are fused into open_clip's `in_proj_weight`/`in_proj_bias` (rows q, k, v), HF's
  `*_projection.weight` (out × in, an `nn.Linear`) becomes open_clip's `proj` /
  `text_projection` (in × out, a bare matrix, so transposed), `hidden_act: quick_gelu` becomes
  `quick_gelu: true` (`gelu` is open_clip's default exact GELU), the class and positional
  embeddings map one to one, `logit_scale` is copied (both store the log of the scale).
  Preprocessing comes from `preprocessor_config.json` when present (mean, std, size, bicubic),
  else CLIP's (OpenAI mean/std, shortest-side resize and centre crop to `image_size`).
* **Pickled weights** (`.pt`, `.pth`, `.bin`, `.ckpt`, `.pkl`, or an HF folder with only
  `pytorch_model.bin`) are refused with a message saying how to convert them: nothing is ever
  unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from chronomerge.statedict import LazyStateDict, dtype_of, read_header, shape_of
from chronomerge.store import tree_digest

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HF_ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # HF hidden_act → open_clip quick_gelu


class CheckpointError(ValueError):
    """A weights file or folder that chronomerge cannot read, named with the reason and the fix."""


def pickle_refusal(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: pickled weights are refused (loading them would run arbitrary code). Convert them once, "
        f"where you trust the file, to safetensors: python -c \"import torch; from safetensors.torch import "
        f"save_file; sd = torch.load('{path.name}', weights_only=True); sd = sd.get('state_dict', sd); "
        f"save_file({{k: v.contiguous() for k, v in sd.items()}}, '{path.stem}.safetensors')\" "
        f"(for a Hugging Face folder: model.save_pretrained(folder, safe_serialization=True))")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read as an open_clip state dict (`state`, lazy), with what is known of its
    architecture (`config`: an open_clip model config, or None when the file does not record it),
    its preprocessing (None: not recorded), its `format`, and whether it holds only the image tower."""

    path: Path
    format: str                      # open_clip | hf-clip | hf-clip-vision
    state: Mapping[str, torch.Tensor]
    config: dict | None
    preprocess: dict | None
    name: str | None = None          # open_clip architecture name, when recorded or derived
    vision_only: bool = False

    def digest(self) -> str:
        """SHA-256 over the checkpoint's files (names and bytes): the source in lineage records."""
        return tree_digest(self.path, (".json", ".safetensors"))


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` looks like weights (a safetensors file or an HF folder), not like data."""
    p = Path(path)
    return (p.is_file() and p.suffix in (".safetensors", *PICKLE_SUFFIXES)) or (
        p.is_dir() and (p / "config.json").is_file()
    )


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open any accepted format (module docstring); raises `CheckpointError` naming the file."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if p.is_dir():
        return _read_hf(p)
    if p.suffix in PICKLE_SUFFIXES:
        raise pickle_refusal(p)
    if p.suffix != ".safetensors":
        raise CheckpointError(f"{p}: not a weights file chronomerge reads; expected an open_clip .safetensors "
                              f"file or a Hugging Face CLIP folder (config.json + model.safetensors)")
    try:
        refs, meta = read_header(p)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    state = LazyStateDict(refs)
    if any(k.startswith(("vision_model.", "text_model.")) for k in state):
        raise CheckpointError(f"{p}: holds Hugging Face CLIP keys; pass the folder with its config.json instead")
    config = json.loads(meta["open_clip.config"]) if "open_clip.config" in meta else None
    preprocess = json.loads(meta["open_clip.preprocess"]) if "open_clip.preprocess" in meta else None
    vision_only = not any(k == "token_embedding.weight" or k.startswith("text.") for k in state)
    return Checkpoint(p, "open_clip", state, config, preprocess, meta.get("open_clip.model"), vision_only)


def header_metadata(name: str, config: Mapping, preprocess: Mapping) -> dict[str, str]:
    """Metadata that records an open_clip architecture in a safetensors header (read back above)."""
    return {"open_clip.model": name, "open_clip.config": json.dumps(config, sort_keys=True),
            "open_clip.preprocess": json.dumps(preprocess, sort_keys=True)}


# -- Hugging Face CLIP ------------------------------------------------------------------------------
def _hf_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        return [folder / s for s in shards]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    pickled = [folder / n for n in ("pytorch_model.bin", "model.pt") if (folder / n).is_file()]
    if pickled:
        raise pickle_refusal(pickled[0])
    raise CheckpointError(f"{folder}: no model.safetensors (nor a model.safetensors.index.json) beside config.json")


def _hf_config(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except ValueError as e:
        raise CheckpointError(f"{folder / 'config.json'}: not valid JSON ({e})") from None
    kind = cfg.get("model_type")
    if kind not in ("clip", "clip_vision_model"):
        raise CheckpointError(f"{folder / 'config.json'}: model_type {kind!r} is not a CLIP model; "
                              f"expected 'clip' (CLIPModel) or 'clip_vision_model' (CLIPVisionModel)")
    return cfg


def _tower_cfg(c: Mapping, where: str, vision: bool) -> tuple[dict, bool]:
    act = c.get("hidden_act", "quick_gelu")
    if act not in HF_ACTIVATIONS:
        raise CheckpointError(
            f"{where}: hidden_act {act!r} has no open_clip equivalent; expected one of {list(HF_ACTIVATIONS)}"
        )
    if abs(float(c.get("layer_norm_eps", 1e-5)) - 1e-5) > 1e-12:
        raise CheckpointError(f"{where}: layer_norm_eps {c['layer_norm_eps']} differs from open_clip's 1e-5")
    width, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    out = {"layers": int(c["num_hidden_layers"]), "width": width, "mlp_ratio": int(c["intermediate_size"]) / width}
    if vision:
        out.update(image_size=int(c["image_size"]), patch_size=int(c["patch_size"]), head_width=width // heads)
    else:
        out.update(context_length=int(c["max_position_embeddings"]), vocab_size=int(c["vocab_size"]), heads=heads)
    return out, HF_ACTIVATIONS[act]


def hf_open_clip_config(cfg: Mapping, where: str = "config.json") -> dict:
    """The open_clip model config of an HF CLIP config (`model_type` clip or clip_vision_model).

    A vision-only config yields only `vision_cfg`, `quick_gelu` and (when given) `embed_dim`."""
    try:
        if cfg.get("model_type") == "clip_vision_model":
            vision, quick = _tower_cfg(cfg, where, True)
            out = {"vision_cfg": vision, "quick_gelu": quick}
            if cfg.get("projection_dim"):
                out["embed_dim"] = int(cfg["projection_dim"])
            return out
        vision, qv = _tower_cfg(cfg["vision_config"], f"{where} vision_config", True)
        text, qt = _tower_cfg(cfg["text_config"], f"{where} text_config", False)
    except KeyError as e:
        raise CheckpointError(f"{where}: missing field {e.args[0]!r}") from None
    if qv != qt:
        raise CheckpointError(f"{where}: the towers use different activations; open_clip has one quick_gelu switch")
    return {"embed_dim": int(cfg.get("projection_dim", 512)), "quick_gelu": qv, "vision_cfg": vision, "text_cfg": text}


def _hf_preprocess(folder: Path, image_size: int) -> dict:
    pp = {"size": image_size, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
          "interpolation": "bicubic", "resize_mode": "shortest"}
    path = folder / "preprocessor_config.json"
    if path.is_file():
        try:
            p = json.loads(path.read_text())
        except ValueError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        pp["mean"], pp["std"] = list(p.get("image_mean", pp["mean"])), list(p.get("image_std", pp["std"]))
        if {2: "bilinear", 3: "bicubic"}.get(p.get("resample")):
            pp["interpolation"] = {2: "bilinear", 3: "bicubic"}[p["resample"]]
    return pp


_LAYER = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)$")
_IN_LAYER = {"self_attn.out_proj.weight": "attn.out_proj.weight", "self_attn.out_proj.bias": "attn.out_proj.bias",
             "layer_norm1.weight": "ln_1.weight", "layer_norm1.bias": "ln_1.bias",
             "layer_norm2.weight": "ln_2.weight", "layer_norm2.bias": "ln_2.bias",
             "mlp.fc1.weight": "mlp.c_fc.weight", "mlp.fc1.bias": "mlp.c_fc.bias",
             "mlp.fc2.weight": "mlp.c_proj.weight", "mlp.fc2.bias": "mlp.c_proj.bias"}
_TOP = {"vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
        "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
        "vision_model.post_layernorm.weight": "visual.ln_post.weight",
        "vision_model.post_layernorm.bias": "visual.ln_post.bias",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
        "logit_scale": "logit_scale"}
_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
_DROPPED = re.compile(r"(^|\.)position_ids$")
_V5_VISION = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")


def hf_key_plan(keys, where: str) -> dict[str, tuple[tuple[str, ...], str]]:
    """open_clip key → (HF keys it is made of, how: copy | cat | t). Unknown HF keys are an error.

    transformers 5.x `CLIPVisionModel` keys (no `vision_model.` prefix) are read as 4.x's."""
    plan: dict[str, tuple[tuple[str, ...], str]] = {}
    qkv: dict[str, dict[str, str]] = {}
    for key in keys:
        k = f"vision_model.{key}" if key.startswith(_V5_VISION) else key
        if _DROPPED.search(k):
            continue
        if k in _TOP:
            plan[_TOP[k]] = ((key,), "copy")
        elif k in _TRANSPOSED:
            plan[_TRANSPOSED[k]] = ((key,), "t")
        elif m := _LAYER.match(k):
            tower, i, rest = m.groups()
            prefix = f"{'visual.' if tower == 'vision_model' else ''}transformer.resblocks.{i}."
            if q := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
                qkv.setdefault(f"{prefix}attn.in_proj_{q.group(2)}", {})[q.group(1)] = key
            elif rest in _IN_LAYER:
                plan[prefix + _IN_LAYER[rest]] = ((key,), "copy")
            else:
                raise CheckpointError(f"{where}: unexpected Hugging Face CLIP key {key!r}")
        else:
            raise CheckpointError(f"{where}: unexpected Hugging Face CLIP key {key!r}")
    for okey, parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise CheckpointError(f"{where}: {okey} needs q, k and v projections; found {sorted(parts)}")
        plan[okey] = ((parts["q"], parts["k"], parts["v"]), "cat")
    return plan


class ConvertedStateDict(Mapping):
    """An open_clip state dict read lazily from an HF checkpoint through a key plan."""

    _OPS: dict[str, Callable[..., torch.Tensor]] = {
        "copy": lambda t: t, "cat": lambda *ts: torch.cat(ts, 0), "t": lambda t: t.t().contiguous()}

    def __init__(self, source: LazyStateDict, plan: Mapping[str, tuple[tuple[str, ...], str]]):
        self._source, self._plan = source, dict(plan)

    def __getitem__(self, key: str) -> torch.Tensor:
        keys, op = self._plan[key]
        return self._OPS[op](*(self._source[k] for k in keys))

    def __iter__(self) -> Iterator[str]:
        return iter(self._plan)

    def __len__(self) -> int:
        return len(self._plan)

    def shape(self, key: str) -> tuple[int, ...]:
        keys, op = self._plan[key]
        shapes = [self._source.shape(k) for k in keys]
        if op == "cat":
            return (sum(s[0] for s in shapes), *shapes[0][1:])
        return tuple(reversed(shapes[0])) if op == "t" else shapes[0]

    def dtype(self, key: str) -> torch.dtype:
        return self._source.dtype(self._plan[key][0][0])


def _read_hf(folder: Path) -> Checkpoint:
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: a folder of weights must be a Hugging Face CLIP folder with a config.json")
    files = _hf_files(folder)
    cfg = _hf_config(folder)
    config = hf_open_clip_config(cfg, str(folder / "config.json"))
    refs: dict = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: shard named by the index is missing")
        try:
            refs.update(read_header(f)[0])
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    source = LazyStateDict(refs)
    state = ConvertedStateDict(source, hf_key_plan(list(source), str(folder)))
    vision_only = cfg["model_type"] == "clip_vision_model"
    name = (
        None
        if vision_only
        else f"hf-clip-{hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]}"
    )
    return Checkpoint(folder, "hf-clip-vision" if vision_only else "hf-clip", state, config,
                      _hf_preprocess(folder, config["vision_cfg"]["image_size"]), name, vision_only)


# -- a vision-only expert on a base ----------------------------------------------------------------
class OnBase(Mapping):
    """An expert's image tower over a base's other tensors (text tower, logit scale, and the visual
    projection when the expert has none): the full open_clip state dict of a vision-only expert."""

    def __init__(self, expert: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]):
        self._expert, self._base = expert, base

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._expert[key] if key in self._expert else self._base[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)

    def shape(self, key: str) -> tuple[int, ...]:
        return shape_of(self._expert if key in self._expert else self._base, key)

    def dtype(self, key: str) -> torch.dtype:
        return dtype_of(self._expert if key in self._expert else self._base, key)


def as_expert(ck: Checkpoint, base: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """The full open_clip state dict of `ck` as an expert of `base`: checks that every tensor it has
    exists in the base with the same shape (else an error naming both shapes), and fills what a
    vision-only expert lacks from the base."""
    extra = sorted(set(ck.state) - set(base))
    if extra:
        raise CheckpointError(f"{ck.path}: its architecture differs from the base's: it has {extra[:3]} "
                              f"({len(extra)} tensors) that the base lacks")
    for k in ck.state:
        if tuple(shape_of(ck.state, k)) != tuple(shape_of(base, k)):
            raise CheckpointError(f"{ck.path}: its architecture differs from the base's: {k} is "
                                  f"{list(shape_of(ck.state, k))} in the expert, {list(shape_of(base, k))} in the base")
    missing = sorted(set(base) - set(ck.state))
    if missing and not ck.vision_only:
        raise CheckpointError(f"{ck.path}: lacks {missing[:3]} ({len(missing)} tensors) of the base")
    if ck.vision_only and any(not k.startswith("visual.") for k in ck.state if k != "logit_scale"):
        raise CheckpointError(f"{ck.path}: a vision-only expert holds text-tower tensors")
    return OnBase(ck.state, base) if missing else ck.state

