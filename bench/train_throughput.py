"""Training throughput: chronomerge's training loop against a bare open_clip loop, same run.

    python bench/train_throughput.py                       # ViT-B-16, batch 512, torch.compile on a GPU
    python bench/train_throughput.py --model chronoclip-tiny --batch 64 --steps 30   # CPU smoke run

Both train a randomly initialised model with the CLIP loss on synthetic batches (bf16 autocast,
fused AdamW and torch.compile on a GPU). Target (issue 3): chronomerge ≥ 95% of the bare loop's
images/s (about 2,700 img/s for ViT-B-16 at batch 512 on an H100). Also times image encoding
(target ≥ 6,000 img/s for ViT-B-16 on a GPU). `--image-size 32` stores the images at 32×32, as the
embedded benchmark does, so every batch is resized to the model's input on the device
(`chronomerge.models.model_input`): the cost of feeding small native images to a large model.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chronomerge.config import TrainSection
from chronomerge.data.generate import Split  # noqa: E402
from chronomerge.evaluate import encode_images  # noqa: E402
from chronomerge.models import create_model, get_tokenizer, model_input, preprocess_of  # noqa: E402
from chronomerge.train import train  # noqa: E402


def bare_loop(model, images, tokens, batch, steps, device, compile_):
    """The reference: the shortest correct open_clip training loop."""
    model.to(device).train()
    pp = preprocess_of(model)
    fwd = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(0)
    skip = min(10, steps // 5)
    for step in range(steps):
        if step == skip:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        idx = torch.randint(len(images), (batch,), generator=gen).to(device)
        x = model_input(images[idx], pp)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            img, txt, scale = fwd(x, tokens[idx])[:3]
            logits = scale * img @ txt.T
            target = torch.arange(batch, device=device)
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (steps - skip) * batch / (time.perf_counter() - t0)


def encode_rate(model, images: np.ndarray, dev: torch.device, n: int) -> float:
    """Images per second of `encode_images` (the evaluation path) over n images, after a warm-up."""
    model.eval()
    batch = np.concatenate([images] * max(1, -(-n // len(images))))[:n]  # made before the clock starts
    encode_images(model, images[:256], dev)  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    encode_images(model, batch, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def measure(model_name: str, batch: int, steps: int, dev: torch.device, compile_: bool,
            image_size: int | None = None, encode: int = 4096) -> dict:
    """The bare loop and chronomerge's loop on the same synthetic data, then the encoding rate."""
    tok = get_tokenizer(model_name)
    size = create_model(model_name).visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    rng = np.random.default_rng(0)
    n = 2 * batch
    stored = image_size or size
    images = rng.integers(0, 256, (n, stored, stored, 3), dtype=np.uint8)
    captions = [f"a photo of object {i % 97} number {i}" for i in range(n)]
    split = Split(images, np.zeros(n, np.int64), [], [], captions)
    bare = bare_loop(create_model(model_name), torch.from_numpy(images).to(dev), tok(captions).to(dev),
                     batch, steps, dev, compile_)
    model = create_model(model_name)
    res = train(model, split, TrainSection(steps=steps, batch_size=batch, compile=compile_, lr=1e-4),
                tokenizer=tok, device=dev)
    enc = encode_rate(model, images, dev, max(encode, 1))
    return {"model": model_name, "device": str(dev), "batch": batch, "compile": compile_,
            "stored_size": stored, "input_size": size,
            "bare_img_per_s": round(bare, 1), "chronomerge_img_per_s": round(res.images_per_second, 1),
            "ratio": round(res.images_per_second / bare, 3), "encode_img_per_s": round(enc, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--encode", type=int, default=4096, help="images to encode for the encoding figure")
    p.add_argument("--image-size", type=int, help="stored image size (default: the model's input size)")
    args = p.parse_args()
    dev = torch.device(args.device)
    compile_ = dev.type == "cuda" and not args.no_compile
    print(json.dumps(measure(args.model, args.batch, args.steps, dev, compile_, args.image_size, args.encode)))


if __name__ == "__main__":
    main()
