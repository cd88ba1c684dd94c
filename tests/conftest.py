import pytest
import torch

from chronomerge.models import create_model


@pytest.fixture(scope="session")
def tiny_base() -> dict[str, torch.Tensor]:
    """A real open_clip state dict of the embedded tiny config (pretrained=None, seeded)."""
    return {k: v.clone() for k, v in create_model(seed=0).state_dict().items()}


def perturb(sd: dict[str, torch.Tensor], seed: int, scale: float = 0.01, only: str = "") -> dict[str, torch.Tensor]:
    """A fake expert: θ0 plus seeded noise on floating tensors whose name starts with `only`."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype)
                if v.dtype.is_floating_point and k.startswith(only) else v.clone())
            for k, v in sd.items()}


@pytest.fixture(scope="session")
def tiny_experts(tiny_base):
    return [perturb(tiny_base, seed=i + 1) for i in range(4)]
