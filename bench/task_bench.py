"""Time one task of the default stream on this machine: train an expert, evaluate every set.

    python bench/task_bench.py [--task 0] [--steps 100]

Target (issue 3): at most 20 s on the 2-core CPU, so the default 20-task stream runs in minutes.
Uses the cached pretrained base (pretrains it first when the store has none, not timed).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chronomerge.benchmark import ensure_base  # noqa: E402
from chronomerge.config import TrainSection
from chronomerge.data import catalog, load_split, prepare  # noqa: E402
from chronomerge.data.streams import build_stream, task_split  # noqa: E402
from chronomerge.evaluate import evaluate  # noqa: E402
from chronomerge.models import (
    get_tokenizer,  # noqa: E402
    load_model,  # noqa: E402
)
from chronomerge.store import CheckpointStore  # noqa: E402
from chronomerge.train import train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data")
    p.add_argument("--store", default="store")
    p.add_argument("--task", type=int, default=0)
    p.add_argument("--steps", type=int, default=TrainSection.model_fields["steps"].default)
    p.add_argument("--lr", type=float, default=TrainSection.model_fields["lr"].default)
    args = p.parse_args()
    prepare(args.data, 0)
    store = CheckpointStore(args.store)
    base = load_model(store, ensure_base(store, args.data))
    tok = get_tokenizer()
    task = build_stream("dataset-incremental", 20)[args.task]
    tr = task_split(args.data, task, "train")
    t0 = time.perf_counter()
    sets = {d.name: load_split(args.data, d.name, "test") for d in catalog.ADAPTATION + catalog.EVALUATION}
    model = copy.deepcopy(base)
    t1 = time.perf_counter()
    res = train(model, tr, TrainSection(steps=args.steps, lr=args.lr), tokenizer=tok)
    t2 = time.perf_counter()
    evaluate(model, tok, sets, "cpu")
    t3 = time.perf_counter()
    print(json.dumps({"task": task.name, "threads": torch.get_num_threads(), "load_s": round(t1 - t0, 2),
                      "train_s": round(t2 - t1, 2), "train_img_per_s": round(res.images_per_second),
                      "eval_s": round(t3 - t2, 2), "eval_sets": len(sets),
                      "eval_images": sum(len(s.labels) for s in sets.values()), "total_s": round(t3 - t0, 2)}))


if __name__ == "__main__":
    main()
