"""open_clip models: architectures, construction, base weights, and the model's own input transform.

An *architecture* is a small JSON-able dict that travels between stages and into cache keys:
`{"name": open_clip model name, "config": its open_clip model config, "preprocess": size, mean,
std, interpolation, resize_mode}`. `architecture(name, pretrained)` resolves it before any work,
from open_clip's registry, an open_clip tag's preprocessing, or a checkpoint that records it
(`model.name: auto`); `create_model(arch)` builds it in any process (a config derived from a
Hugging Face checkpoint is registered with open_clip on the fly). Images are fed to a model only
through `model_input`, which resizes and normalises them as that model's preprocessing says,
so nothing assumes an image size.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F

from chronomerge.checkpoints import OPENAI_MEAN, OPENAI_STD, CheckpointError, read_checkpoint
from chronomerge.statedict import shape_of

CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY = "chronoclip-tiny"
# The embedded base is pretrained on images normalised with mean 0.5 and std 0.25 per channel.
EMBEDDED_PREPROCESS = {TINY: {"mean": [0.5] * 3, "std": [0.25] * 3}}
RESIZE_MODES = ("shortest", "longest", "squash")
_registered = False
_derived_dir: Path | None = None


class ModelError(ValueError):
    """model.name / model.pretrained cannot be used; the message names the field and the fix."""


def _not_random_init_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("No pretrained weights loaded for model")


def register_embedded_configs() -> None:
    """Register chronomerge's architecture JSONs (e.g. `chronoclip-tiny`) with open_clip, once.

    Also drops open_clip's root-logger notice that a model was initialised randomly: chronomerge
    builds models that way on purpose before loading stored weights into them.
    """
    global _registered
    if not _registered:
        for path in sorted(CONFIG_DIR.glob("*.json")):
            open_clip.add_model_config(path)
        logging.getLogger().addFilter(_not_random_init_notice)
        _registered = True


def _register(name: str, config: Mapping[str, Any]) -> None:
    """Make an architecture known to open_clip in this process (a config derived from a checkpoint)."""
    global _derived_dir
    register_embedded_configs()
    if open_clip.get_model_config(name) == dict(config):
        return
    if _derived_dir is None:
        _derived_dir = Path(tempfile.mkdtemp(prefix="chronomerge-configs-"))
    path = _derived_dir / f"{name}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)


def default_preprocess(name: str, config: Mapping[str, Any], tag: str | None = None) -> dict:
    """open_clip's preprocessing for `name` (and a pretrained tag): size from the config's image
    size, CLIP's mean/std unless the tag (or the embedded config) says otherwise."""
    pp = {"size": config["vision_cfg"].get("image_size", 224), "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
          "interpolation": "bicubic", "resize_mode": "shortest"}
    pp.update(EMBEDDED_PREPROCESS.get(name, {}))
    if tag:
        t = open_clip.get_pretrained_cfg(name, tag) or {}
        pp.update({k: (list(t[k]) if isinstance(t[k], tuple) else t[k])
                   for k in ("mean", "std", "interpolation", "resize_mode") if k in t})
    return pp


def _is_path(pretrained: str) -> bool:
    return (
        os.sep in pretrained or pretrained.startswith(".") or Path(pretrained).suffix != "" or Path(pretrained).exists()
    )


def _meta_shapes(name: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        m = open_clip.create_model(name, device="meta")
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def architecture(name: str, pretrained: str | None = None) -> dict[str, Any]:
    """Resolve `model.name` and `model.pretrained` to an architecture dict, checking before any
    work: an unknown name, an unknown tag, a missing or unreadable weights file, `auto` without a
    checkpoint that records its architecture, and a name that does not match the checkpoint are
    `ModelError`s naming the field."""
    register_embedded_configs()
    ck = None
    if pretrained and _is_path(pretrained):
        try:
            ck = read_checkpoint(pretrained)
        except CheckpointError as e:
            raise ModelError(f"model.pretrained: {e}") from None
        if ck.vision_only:
            raise ModelError(f"model.pretrained: {pretrained} holds only an image tower; a base needs both towers "
                             f"(use it as an expert: stream.kind experts)")
    if name == "auto":
        if ck is None or ck.config is None or ck.name is None:
            raise ModelError("model.name: 'auto' reads the architecture from model.pretrained, which must then be a "
                             "Hugging Face CLIP folder or an open_clip safetensors file that records its config "
                             "(chronomerge export writes one); otherwise name the architecture, e.g. ViT-B-32")
        _register(ck.name, ck.config)
        return {"name": ck.name, "config": ck.config,
                "preprocess": _checked_preprocess(ck.name, ck.preprocess or default_preprocess(ck.name, ck.config))}
    if name not in open_clip.list_models():
        raise ModelError(f"model.name: unknown open_clip architecture {name!r}; expected 'auto', {TINY!r} or one of "
                         f"open_clip.list_models() (e.g. ViT-B-32, ViT-B-16)")
    config = open_clip.get_model_config(name)
    tag = None
    if pretrained and ck is None:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise ModelError(f"model.pretrained: {pretrained!r} is neither a file nor an open_clip tag of {name}; "
                             f"its tags: {tags or 'none'}")
        tag = pretrained
        _tag_file(name, tag)  # its weights must be in the local cache: checked before any work
    if ck is not None:
        _check_matches(name, config, ck)
    preprocess = (ck.preprocess if ck is not None and ck.preprocess else None) or default_preprocess(name, config, tag)
    return {"name": name, "config": config, "preprocess": _checked_preprocess(name, preprocess)}


def _checked_preprocess(name: str, pp: Mapping[str, Any]) -> dict:
    """The preprocessing `model_input` can apply to RGB images of any size, or a `ModelError`."""
    size = pp.get("size")
    sizes = [size] if isinstance(size, int) else list(size) if isinstance(size, (list, tuple)) else []
    problems = []
    if len(sizes) not in (1, 2) or not all(isinstance(s, int) and s > 0 for s in sizes):
        problems.append(f"image size {size!r} (expected a positive integer or [height, width])")
    if pp.get("resize_mode", "shortest") not in RESIZE_MODES:
        problems.append(f"resize_mode {pp.get('resize_mode')!r} (expected one of {list(RESIZE_MODES)})")
    if pp.get("interpolation", "bicubic") not in ("bicubic", "bilinear", "nearest"):
        problems.append(f"interpolation {pp.get('interpolation')!r}")
    if len(pp.get("mean", ())) != 3 or len(pp.get("std", ())) != 3 or min(pp.get("std", (0,))) <= 0:
        problems.append("mean/std (expected three values each, std > 0: chronomerge's data is RGB)")
    if problems:
        raise ModelError(
            f"model.name: {name!r} takes input chronomerge's RGB images cannot be fed as: {'; '.join(problems)}"
        )
    return dict(pp)


def _check_matches(name: str, config: Mapping, ck) -> None:
    shapes = _meta_shapes(name)
    what = f"{ck.path}" + (f" (architecture {ck.name})" if ck.name else "")
    for k in sorted(set(shapes) | set(ck.state)):
        if k not in ck.state or k not in shapes:
            where = "the checkpoint lacks" if k not in ck.state else f"{name} has no"
            raise ModelError(f"model.name: {name!r} does not match model.pretrained {what}: {where} {k!r}")
        if tuple(shape_of(ck.state, k)) != shapes[k]:
            raise ModelError(f"model.name: {name!r} does not match model.pretrained {what}: {k} is "
                             f"{list(shape_of(ck.state, k))} in the checkpoint, {list(shapes[k])} in {name}")
    if ck.config is not None and bool(ck.config.get("quick_gelu")) != bool(config.get("quick_gelu")):
        raise ModelError(
            f"model.name: {name!r} does not match model.pretrained {what}: the checkpoint uses "
            f"quick_gelu={bool(ck.config.get('quick_gelu'))}, {name} quick_gelu={bool(config.get('quick_gelu'))}"
            f" (try {name}-quickgelu)"
        )


def arch_of(arch: str | Mapping[str, Any]) -> dict[str, Any]:
    """An architecture dict from a dict or a bare open_clip name (registry config, default preprocessing)."""
    if isinstance(arch, Mapping):
        return dict(arch)
    register_embedded_configs()
    if arch not in open_clip.list_models():
        raise ModelError(f"model.name: unknown open_clip architecture {arch!r}")
    config = open_clip.get_model_config(arch)
    return {"name": arch, "config": config, "preprocess": default_preprocess(arch, config)}


def create_model(arch: str | Mapping[str, Any] = TINY, seed: int = 0) -> torch.nn.Module:
    """An open_clip model of `arch` (dict or name), seeded random weights, carrying its preprocessing."""
    a = arch_of(arch)
    _register(a["name"], a["config"])
    torch.manual_seed(seed)
    return open_clip.create_model(a["name"], pretrained=None, force_preprocess_cfg=dict(a["preprocess"]))


def get_tokenizer(arch: str | Mapping[str, Any] = TINY):
    """open_clip's tokenizer for `arch` (context length from the model config)."""
    a = arch_of(arch)
    _register(a["name"], a["config"])
    return open_clip.get_tokenizer(a["name"])


def base_weights(arch: Mapping[str, Any], pretrained: str) -> dict[str, torch.Tensor]:
    """θ0 from an open_clip tag (from the local cache only) or a weights file or folder, checked
    to load into `arch` with every key matching."""
    model = create_model(arch)
    if _is_path(pretrained):
        state = read_checkpoint(pretrained).state
    else:
        state = read_checkpoint(_tag_file(arch["name"], pretrained)).state
    state = dict(state.items())
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"model.pretrained: {pretrained} does not load into {arch['name']}: {str(e)[:500]}") from None
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _tag_file(name: str, tag: str) -> str:
    """The safetensors file of an open_clip tag in the local Hugging Face cache (no network), or a
    `ModelError` that says which file to fetch and where to point `model.pretrained`."""
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(name, tag)
    repo = (cfg.get("hf_hub") or "").rstrip("/")
    found = try_to_load_from_cache(repo, "open_clip_model.safetensors") if repo else None
    if isinstance(found, str):
        return found
    source = (f"the file open_clip_model.safetensors of the Hugging Face repo {repo}" if repo
              else f"{cfg.get('url')} (then convert it to safetensors)")
    raise ModelError(
        f"model.pretrained: the weights of open_clip tag {tag!r} for {name} are not in the local Hugging Face "
        f"cache and cannot be downloaded here. Fetch {source} on a machine with internet, copy it here, and set "
        f"model.pretrained to its path (e.g. weights/{name}-{tag}.safetensors)")


# -- the model's input ------------------------------------------------------------------------------
def preprocess_of(model: torch.nn.Module) -> dict[str, Any]:
    """The preprocessing a model carries (open_clip's `visual.preprocess_cfg`)."""
    return dict(open_clip.get_model_preprocess_cfg(model))


def load_model(store, oid: str, arch: str | Mapping[str, Any] = TINY) -> torch.nn.Module:
    """Checkpoint `oid` of a `CheckpointStore` in an open_clip model of `arch` (an architecture dict
    or an open_clip name), in eval mode."""
    model = create_model(arch)
    model.load_state_dict(store.load(oid))
    return model.eval()


def autocast(device, bf16: bool = True):
    """bf16 autocast on a GPU (training and evaluation alike); full precision on the CPU."""
    if torch.device(device).type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def model_input(images: torch.Tensor, pp: Mapping[str, Any]) -> torch.Tensor:
    """uint8 N×H×W×3 images (any size) → the model's float N×3×S×S input, on the images' device.

    As open_clip's transform: `shortest` resizes the shorter side to S and centre-crops, `longest`
    fits the longer side and pads with `fill_color`, `squash` resizes both sides; interpolation
    as configured (antialiased when shrinking); then (x − mean) / std per channel."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    size = pp["size"]
    th, tw = (size, size) if isinstance(size, int) else tuple(size)
    h, w = x.shape[-2:]
    if (h, w) != (th, tw):
        mode, interp = pp.get("resize_mode", "shortest"), pp.get("interpolation", "bicubic")
        if mode not in RESIZE_MODES:
            raise ModelError(f"preprocess resize_mode {mode!r} is not supported; expected one of {list(RESIZE_MODES)}")
        kw = {"mode": interp, "antialias": True} if interp in ("bilinear", "bicubic") else {"mode": "nearest"}
        if mode == "squash":
            x = F.interpolate(x, size=(th, tw), **kw)
        else:
            scale = (max if mode == "shortest" else min)(th / h, tw / w)
            nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), **kw)
            if mode == "shortest":
                top, left = (nh - th) // 2, (nw - tw) // 2
                x = x[..., top:top + th, left:left + tw]
            else:
                fill = pp.get("fill_color", 0) / 255.0
                pad = ((tw - nw) // 2, tw - nw - (tw - nw) // 2, (th - nh) // 2, th - nh - (th - nh) // 2)
                x = F.pad(x, pad, value=fill)
        x = x.clamp_(0.0, 1.0)  # bicubic overshoot; open_clip's PIL path clips to uint8 too
    mean = torch.tensor(pp["mean"], device=x.device, dtype=x.dtype)[:, None, None]
    std = torch.tensor(pp["std"], device=x.device, dtype=x.dtype)[:, None, None]
    return (x - mean) / std
