"""CMM post-merge alignment: pull the merged model's image features back to the previous merged model's.

One epoch over the current task's images; only the visual projection (`visual.proj`) is updated, to
minimise the L1 (or L2) distance between the merged model's image features and those of the
previous merged model, which stays frozen (CMM, post-merge stage; docs/methods.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from chronomerge.data import Split
from chronomerge.models import model_input, preprocess_of

PROJECTION = "visual.proj"


def align_projection(model: torch.nn.Module, reference: torch.nn.Module, split: Split, *, loss: str = "l1",
                     lr: float = 1e-3, batch_size: int = 64, device="cpu", seed: int = 0) -> torch.Tensor:
    """One epoch of Adam on `model.visual.proj` only; returns the aligned projection (on the CPU).

    Features are the unnormalised image embeddings; the batches follow a seeded permutation.
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
    for i in range(0, len(order), batch_size):
        x = model_input(images[order[i:i + batch_size]].to(dev), pp)
        with torch.no_grad():
            target = reference.encode_image(x)
        d = distance(model.encode_image(x), target)
        opt.zero_grad(set_to_none=True)
        d.backward()
        opt.step()
    proj.requires_grad_(False)
    return proj.detach().cpu().clone()
