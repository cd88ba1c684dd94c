"""What progress checkpoints (`chronomerge.resume`) cost: the same pretraining run without them, at the
default interval, and at a short one; and the write time of a ViT-B-16-sized checkpoint.

    python bench/progress_cost.py [--steps 600] [--every 60 10] [--vit ViT-B-16] [--out FILE]

`--steps 0` skips the pretraining rows and `--vit ''` the ViT row; a part not run keeps its figures in
`--out`.

Each training row runs `--steps` steps of the embedded base's pretraining recipe (batch 128) from
the same seed, in the order: none, each interval, none again; `overhead` is its wall time over the
mean of the two runs without checkpoints (their difference is the noise), and `write share` is the
checkpoints' own write time over the run's (what the interval bounds at 2%). The ViT row builds an
open_clip model with random weights, takes one contrastive AdamW step at batch 2 so that every
parameter has optimizer state, and times `--writes` checkpoint writes of it (weights + AdamW moments
+ RNG, fsync and SHA-256 included).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chronomerge import resume  # noqa: E402
from chronomerge.benchmark import PRETRAIN  # noqa: E402
from chronomerge.data import catalog, load_split, prepare  # noqa: E402
from chronomerge.models import create_model, get_tokenizer  # noqa: E402
from chronomerge.train import train  # noqa: E402


def pretraining_row(data: str, steps: int, every: float | None) -> dict:
    pool = load_split(data, catalog.PRETRAIN.name, "train")
    cfg = PRETRAIN.model_copy(update={"steps": steps})
    with tempfile.TemporaryDirectory() as folder:
        ck = resume.Checkpointing(Path(folder), "base", every_seconds=every) if every else None
        t0 = time.perf_counter()
        train(create_model(seed=0), pool, cfg, tokenizer=get_tokenizer(), checkpointing=ck)
        wall = time.perf_counter() - t0
        size = max((p.stat().st_size for p in Path(folder).glob("*.safetensors")), default=0)
    return {"every_seconds": every, "steps": steps, "wall_s": round(wall, 2), "written": ck.written if ck else 0,
            "write_s": round(ck.write_seconds, 3) if ck else 0.0, "checkpoint_mb": round(size / 2**20, 1)}


def vit_row(name: str, writes: int) -> dict:
    model = create_model(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.randn(2, 3, *model.visual.image_size)
    img, txt, scale = model(x, get_tokenizer(name)(["a photo", "a sketch"]))[:3]
    loss = (scale * img @ txt.T).logsumexp(1).mean()
    loss.backward()
    opt.step()
    tensors, meta = resume.optimizer_state(opt)
    tensors |= {f"model.{k}": v for k, v in model.state_dict().items()} | resume.rng_state()
    with tempfile.TemporaryDirectory() as folder:
        ck = resume.Checkpointing(Path(folder), "train", every_seconds=None, every_steps=1)
        for i in range(writes):
            ck.save(i + 1, writes + 1, tensors, "bench", meta)
        size = max(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
    per = ck.write_seconds / writes
    return {"model": name, "checkpoint_mb": round(size / 2**20, 1), "write_s": round(per, 2),
            "interval_floor_s": round(per / resume.MAX_COST, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=float, nargs="*", default=[60.0, 10.0])
    p.add_argument("--vit", default="ViT-B-16")
    p.add_argument("--writes", type=int, default=3)
    p.add_argument("--out", default="bench/results-progress-cost.json")
    args = p.parse_args()
    out_path = Path(args.out)
    out = json.loads(out_path.read_text()) if out_path.exists() else {}
    out["threads"] = torch.get_num_threads()
    if args.steps:
        prepare(args.data, 0, [catalog.PRETRAIN.name])
        rows = [pretraining_row(args.data, args.steps, every) for every in [None, *args.every, None]]
        base = (rows[0]["wall_s"] + rows[-1]["wall_s"]) / 2
        for r in rows:
            r["overhead_pct"] = round(100 * (r["wall_s"] / base - 1), 2)
            r["write_share_pct"] = round(100 * r["write_s"] / r["wall_s"], 2)
            print(json.dumps(r), flush=True)
        out["pretraining"] = rows
    if args.vit:
        out["vit"] = vit_row(args.vit, args.writes)
        print(json.dumps(out["vit"]), flush=True)
    out_path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
