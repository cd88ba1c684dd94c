"""Checkpoint formats: real `transformers` CLIP models (small random configs, saved with
`save_pretrained`) converted to open_clip must give the same features; pickles are refused."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, CLIPVisionModel  # noqa: E402

from chronomerge.checkpoints import CheckpointError, as_expert, read_checkpoint  # noqa: E402
from chronomerge.models import (  # noqa: E402  # noqa: E402
    ModelError,
    architecture,
    base_weights,
    create_model,
    get_tokenizer,
    model_input,
    preprocess_of,
)


def hf_configs(act="quick_gelu", image_size=64, patch=16, width=48):
    text = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=20, projection_dim=24, hidden_act=act)
    vision = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=3,
        image_size=image_size,
        patch_size=patch,
        projection_dim=24,
        hidden_act=act,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=24), vision


def save_hf(model, folder):
    torch.manual_seed(0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """An HF CLIPModel base and a CLIPVisionModel expert (different vision weights), saved."""
    root = tmp_path_factory.mktemp("hf")
    cfg, vcfg = hf_configs()
    torch.manual_seed(1)
    base = CLIPModel(cfg).eval()
    with torch.no_grad():
        base.logit_scale.fill_(2.0)
    save_hf(base, root / "base")
    torch.manual_seed(2)
    expert = CLIPVisionModel(vcfg).eval()
    save_hf(expert, root / "expert")
    return root, base, expert


def _images(n=4, size=64, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_clip_converts_to_open_clip_with_equal_features(tmp_path, act):
    cfg, _ = hf_configs(act)
    torch.manual_seed(3)
    hf = CLIPModel(cfg).eval()
    save_hf(hf, tmp_path / "m")
    arch = architecture("auto", str(tmp_path / "m"))
    assert arch["config"]["quick_gelu"] == (act == "quick_gelu")
    model = create_model(arch)
    model.load_state_dict(base_weights(arch, str(tmp_path / "m")))
    model.eval()
    tok = get_tokenizer(arch)
    tokens = tok(["a photo of a cat.", "a red square on the left", "x"])
    x = model_input(_images(), preprocess_of(model))
    with torch.no_grad():
        ours_i, ours_t = model.encode_image(x), model.encode_text(tokens)
        ref_i = hf.get_image_features(pixel_values=x)
        ref_t = hf.get_text_features(input_ids=tokens)
        ref_i = ref_i if torch.is_tensor(ref_i) else ref_i.pooler_output
        ref_t = ref_t if torch.is_tensor(ref_t) else ref_t.pooler_output
    assert torch.allclose(ours_i, ref_i, atol=1e-4), (ours_i - ref_i).abs().max()
    assert torch.allclose(ours_t, ref_t, atol=1e-4), (ours_t - ref_t).abs().max()
    assert torch.allclose(model.logit_scale, hf.logit_scale)


def test_vision_only_expert_on_a_base_has_the_experts_image_and_the_bases_text_features(hf_pair):
    root, base, expert = hf_pair
    arch = architecture("auto", str(root / "base"))
    base_sd = base_weights(arch, str(root / "base"))
    ck = read_checkpoint(root / "expert")
    assert ck.vision_only and ck.format == "hf-clip-vision"
    full = as_expert(ck, base_sd)
    assert torch.equal(full["visual.proj"], base_sd["visual.proj"])  # CLIPVisionModel has no projection
    model = create_model(arch)
    model.load_state_dict(dict(full.items()))
    model.eval()
    tokens = get_tokenizer(arch)(["a photo of a dog."])
    x = model_input(_images(), preprocess_of(model))
    with torch.no_grad():
        pooled = expert(pixel_values=x).pooler_output
        ref_i = base.visual_projection(pooled)
        ref_t = base.get_text_features(input_ids=tokens)
        ref_t = ref_t if torch.is_tensor(ref_t) else ref_t.pooler_output
        assert torch.allclose(model.encode_image(x), ref_i, atol=1e-4)
        assert torch.allclose(model.encode_text(tokens), ref_t, atol=1e-4)


def test_transformers_4_and_5_vision_key_layouts_read_the_same(hf_pair, tmp_path):
    """transformers 5 saves a CLIPVisionModel without the `vision_model.` prefix that 4.x writes
    (the public per-task experts); the same tensors under 4.x names give the same state dict."""
    root, _, _ = hf_pair
    saved = load_file(root / "expert" / "model.safetensors")
    v5 = not any(k.startswith("vision_model.") for k in saved)
    other = tmp_path / "other"
    shutil.copytree(root / "expert", other)
    renamed = ({f"vision_model.{k}": v for k, v in saved.items()} if v5
               else {k.removeprefix("vision_model."): v for k, v in saved.items()})
    save_file(renamed, other / "model.safetensors", metadata={"format": "pt"})
    a, b = read_checkpoint(root / "expert").state, read_checkpoint(other).state
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert all(k.startswith("visual.") for k in a)


def test_explicit_name_must_match_the_checkpoint(hf_pair):
    root, _, _ = hf_pair
    with pytest.raises(ModelError, match=r"model.name: 'ViT-B-32' does not match model.pretrained .*base"):
        architecture("ViT-B-32", str(root / "base"))


def test_expert_of_another_architecture_is_refused_naming_both_shapes(hf_pair, tmp_path):
    root, _, _ = hf_pair
    _, vcfg = hf_configs(width=60)
    torch.manual_seed(0)
    save_hf(CLIPVisionModel(vcfg), tmp_path / "wide")
    base_sd = base_weights(architecture("auto", str(root / "base")), str(root / "base"))
    with pytest.raises(
        CheckpointError,
        match=r"architecture differs from the base's: .* is \[\d+(, \d+)*\] in the expert, "
        r"\[\d+(, \d+)*\] in the base",
    ):
        as_expert(read_checkpoint(tmp_path / "wide"), base_sd)


def test_pickled_weights_are_refused_with_how_to_convert(tmp_path):
    for name in ("model.bin", "weights.pt"):
        (tmp_path / name).write_bytes(b"\x80\x04not really")
        with pytest.raises(CheckpointError, match="pickled weights are refused.*safetensors"):
            read_checkpoint(tmp_path / name)
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: pickled weights are refused"):
        read_checkpoint(folder)
    with pytest.raises(ModelError, match="model.pretrained: .*pickled weights are refused"):
        architecture("auto", str(tmp_path / "weights.pt"))


def test_auto_needs_a_checkpoint_that_records_its_architecture(tmp_path):
    sd = create_model().state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "plain.safetensors")
    with pytest.raises(ModelError, match="model.name: 'auto' reads the architecture"):
        architecture("auto", str(tmp_path / "plain.safetensors"))
    assert architecture("chronoclip-tiny", str(tmp_path / "plain.safetensors"))["name"] == "chronoclip-tiny"
    with pytest.raises(ModelError, match="model.pretrained: .*missing.safetensors: no such file"):
        architecture("ViT-B-32", str(tmp_path / "missing.safetensors"))


def test_a_preprocessing_the_data_cannot_feed_is_refused_naming_the_model(tmp_path):
    from chronomerge.checkpoints import header_metadata

    arch = architecture("chronoclip-tiny")
    sd = {k: v.contiguous() for k, v in create_model(arch).state_dict().items()}
    bad = {**arch["preprocess"], "mean": [0.5], "std": [0.25]}  # a one-channel model
    save_file(sd, tmp_path / "grey.safetensors", metadata=header_metadata(arch["name"], arch["config"], bad))
    with pytest.raises(ModelError, match="model.name: 'chronoclip-tiny' takes input .* mean/std"):
        architecture("auto", str(tmp_path / "grey.safetensors"))
    good = tmp_path / "tiny.safetensors"
    save_file(sd, good, metadata=header_metadata(arch["name"], arch["config"], arch["preprocess"]))
    assert architecture("auto", str(good)) == arch  # an export names its architecture: auto reads it back
