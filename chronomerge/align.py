"""CMM post-merge alignment: pull the merged model's image features back to the previous merged model's.

One epoch over the current task's images; only the visual projection (`visual.proj`) is updated, to
minimise the L1 (or L2) distance between the merged model's image features and those of the
previous merged model, which stays frozen (CMM, post-merge stage; docs/methods.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from chronomerge import faults, resume
from chronomerge.data import Split
from chronomerge.models import model_input, preprocess_of
from chronomerge.train import gpu_slot

PROJECTION = "visual.proj"


def align_projection(model: torch.nn.Module, reference: torch.nn.Module, split: Split, *, loss: str = "l1",
                     lr: float = 1e-3, batch_size: int = 64, device="cpu", seed: int = 0,
                    checkpointing: resume.Checkpointing | None = None) -> torch.Tensor:
    """One epoch of Adam on `model.visual.proj` only; returns the aligned projection (on the CPU).

    Features are the unnormalised image embeddings; the batches follow a seeded permutation.
    `checkpointing`: progress checkpoints (the projection, Adam's state, the batch reached), resumed
    bit-identically (`chronomerge.resume`; the loop draws no random numbers).
    """
    if loss not in ("l1", "l2"):
        raise ValueError(f"align={loss!r} is not allowed; expected one of ['l1', 'l2']")
    dev = torch.device(device)
    model.to(dev).eval()
    reference.to(dev).eval()
    proj = model.visual.proj
    for p in model.parameters():
        p.requires_grad_(False)
    proj.requires_grad_(True)
    opt = torch.optim.Adam([proj], lr=lr)
    images = torch.from_numpy(split.images)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    distance = F.l1_loss if loss == "l1" else F.mse_loss
    pp = preprocess_of(model)
    steps = -(-len(order) // batch_size)
    start, fp = 0, resume.fingerprint({"loss": loss, "lr": lr, "batch_size": batch_size, "seed": seed, "n": len(order)},
                               steps, {"proj": proj}) if checkpointing else ""
    if checkpointing is not None and (got := checkpointing.resume(fp)) is not None:
        start, saved, meta = got
        with torch.no_grad():
            proj.copy_(saved["proj"])
        resume.load_optimizer_state(opt, saved, meta)
        resume.say_resumed("align", start, steps, checkpointing.folder)
    with gpu_slot(dev):  # the GPU is this training's until it ends
        for step in range(start, steps):
            faults.point(f"{checkpointing.stage if checkpointing else 'align'}:step:{step}")
            x = model_input(images[order[step * batch_size:(step + 1) * batch_size]].to(dev), pp)
            with torch.no_grad():
                target = reference.encode_image(x)
            d = distance(model.encode_image(x), target)
            opt.zero_grad(set_to_none=True)
            d.backward()
            opt.step()
            if checkpointing is not None and step + 1 < steps and checkpointing.due(step + 1):
                opt_tensors, opt_meta = resume.optimizer_state(opt)
                checkpointing.save(step + 1, steps, {"proj": proj, **opt_tensors}, fp, opt_meta)
    proj.requires_grad_(False)
    return proj.detach().cpu().clone()
