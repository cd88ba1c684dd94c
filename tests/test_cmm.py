"""CMM's stages on the tiny open_clip model: linearized fine-tuning, post-merge alignment."""
import copy

import numpy as np
import pytest
import torch

from chronomerge.align import align_projection
from chronomerge.config import TrainSection
from chronomerge.data import catalog
from chronomerge.data.generate import generate
from chronomerge.evaluate import zero_shot_accuracy
from chronomerge.models import create_model, get_tokenizer, model_input, preprocess_of
from chronomerge.train import Linearized, is_text_param, train


@pytest.fixture(scope="module")
def task():
    return generate(catalog.ALL["new-shapes-photo"], "train", 0, size_factor=0.2)


def test_the_linearized_tower_is_the_first_order_expansion_of_the_model(task):
    model = create_model(seed=0).eval()
    lin = Linearized(model)
    x = model_input(torch.from_numpy(task.images[:8]), preprocess_of(model))
    with torch.no_grad():
        assert torch.allclose(lin.encode_image(x), model.encode_image(x), atol=1e-6)  # τ = 0
        g = torch.Generator().manual_seed(0)
        for p in lin.tau.values():
            p.copy_(1e-3 * torch.randn(p.shape, generator=g))
        f_lin = lin.encode_image(x)
        moved = copy.deepcopy(model)
        for n, p in moved.visual.named_parameters():
            p.add_(lin.tau[f"visual.{n}"])
        f_moved, f0 = moved.encode_image(x), model.encode_image(x)
    # f(θ0 + τ) − f_lin(θ0 + τ) is second order in τ: far smaller than the first-order change.
    assert (f_moved - f_lin).norm() < 0.05 * (f_moved - f0).norm()


def test_linearized_fine_tuning_trains_only_the_image_tower_and_fits_the_task(task):
    tok = get_tokenizer()
    model = create_model(seed=0)
    before = copy.deepcopy(model.state_dict())
    acc0 = zero_shot_accuracy(model, tok, task, "cpu")
    res = train(model, task, TrainSection(steps=40, batch_size=32, lr=2e-3, mode="linear"), tokenizer=tok)
    assert np.mean(res.losses[-5:]) < np.mean(res.losses[:5])
    for k, v in res.state.items():
        assert torch.equal(v, before[k]) == (not k.startswith("visual.")), k
    assert set(res.exp_avg_sq) == {f"visual.{n}" for n, _ in model.visual.named_parameters()}
    assert not any(is_text_param(k) for k in res.exp_avg_sq)
    # The folded expert θ0 + τ is a plain open_clip model, better than θ0 on the task (tiny random-init
    # base: its tangent space fits less than full fine-tuning does, 0.33 vs 0.25 here).
    assert zero_shot_accuracy(model, tok, task, "cpu") > acc0


def test_alignment_moves_only_the_projection_and_brings_features_closer(task):
    reference = create_model(seed=0).eval()
    merged = create_model(seed=0).eval()
    with torch.no_grad():
        merged.visual.proj.mul_(1.5).add_(0.05)
    x = model_input(torch.from_numpy(task.images), preprocess_of(merged))
    with torch.no_grad():
        before = (merged.encode_image(x) - reference.encode_image(x)).abs().mean()
    other = {k: v.clone() for k, v in merged.state_dict().items() if k != "visual.proj"}
    proj = align_projection(merged, reference, task, loss="l1", lr=1e-2, batch_size=32)
    assert torch.equal(merged.visual.proj.detach(), proj)
    assert all(torch.equal(merged.state_dict()[k], v) for k, v in other.items())
    with torch.no_grad():
        after = (merged.encode_image(x) - reference.encode_image(x)).abs().mean()
    assert after < 0.5 * before
    with pytest.raises(ValueError, match="align='cos' is not allowed"):
        align_projection(merged, reference, task, loss="cos")
