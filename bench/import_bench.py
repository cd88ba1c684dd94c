"""Cost of importing experts trained elsewhere: a Hugging Face CLIP base and vision-only experts of a
real size (ViT-B/32 or ViT-B/16 configs, random weights, saved with `save_pretrained`), converted,
checked against the base and written to the checkpoint store, as `stream.kind: experts` does.

    python bench/import_bench.py --size B-16 --experts 3 [--out bench/results-import-cpu.json]

Needs `transformers` (the `hf` extra). Reports seconds per expert for reading + converting + storing
(the store digests every tensor and writes only the image tower: the text tower equals the base's),
the bytes each expert adds to the store, and the peak RSS of the process.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chronomerge.checkpoints import as_expert, read_checkpoint  # noqa: E402
from chronomerge.models import architecture, base_weights  # noqa: E402
from chronomerge.store import CheckpointStore  # noqa: E402

SIZES = {"B-32": dict(patch_size=32), "B-16": dict(patch_size=16)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="B-16")
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args()
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, CLIPVisionModel

    vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, projection_dim=512, **SIZES[args.size])
    text = CLIPTextConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                          max_position_embeddings=77, projection_dim=512)
    with tempfile.TemporaryDirectory(prefix="chronomerge-import-") as tmp:
        out = measure(Path(tmp), args, text, vision, CLIPConfig, CLIPModel, CLIPVisionModel)
    print(json.dumps(out))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


def measure(root: Path, args, text, vision, CLIPConfig, CLIPModel, CLIPVisionModel) -> dict:  # noqa: N803
    torch.manual_seed(0)
    CLIPModel(
        CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=512)
    ).save_pretrained(root / "base")
    for i in range(args.experts):
        CLIPVisionModel(vision).save_pretrained(root / f"expert-{i}")
    store = CheckpointStore(root / "store")
    t0 = time.perf_counter()
    arch = architecture("auto", str(root / "base"))
    base_id = store.put(base_weights(arch, str(root / "base")), kind="base")
    t_base = time.perf_counter() - t0
    before = sum(f.stat().st_size for f in (root / "store" / "objects").iterdir())
    times = []
    for i in range(args.experts):
        t0 = time.perf_counter()
        ck = read_checkpoint(root / f"expert-{i}")
        digest = ck.digest()
        state = as_expert(ck, store.get(base_id))
        store.put({k: state[k] for k in state}, kind="expert", parents=[base_id], technique="import",
                  data_digest=digest)
        times.append(time.perf_counter() - t0)
    added = (sum(f.stat().st_size for f in (root / "store" / "objects").iterdir()) - before) / args.experts
    return {"size": args.size, "arch": arch["name"], "experts": args.experts, "base_import_s": round(t_base, 2),
            "expert_import_s": [round(t, 2) for t in times], "bytes_per_expert": int(added),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "device": "cpu", "threads": torch.get_num_threads()}


if __name__ == "__main__":
    main()
