"""Checks that the embedded benchmark measures what the papers measure (issue 3, section 2).

    python bench/benchmark_properties.py --seed 0

Pretrains (or reuses) the base model, then prints one JSON line, in accuracy points (0-100):
  chance            mean chance level of the held-out evaluation datasets
  zs_a_zs           the base model's zero-shot A_ZS on them      (required: >= 2 x chance)
  zs_a_ka           its A_KA on the adaptation datasets          (expected: low)
  expert_gain_min   min over tasks of (expert on task t - base) on task t   (required: >= 20)
  seq_bwt           BWT of sequential fine-tuning over the stream           (required: <= -5)
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chronomerge.benchmark import PRETRAIN, ensure_base, load_model  # noqa: E402
from chronomerge.data import catalog, load_split, prepare  # noqa: E402
from chronomerge.data.streams import build_stream, task_split  # noqa: E402
from chronomerge.evaluate import chance, evaluate, score, summarize  # noqa: E402
from chronomerge.models import get_tokenizer  # noqa: E402
from chronomerge.store import CheckpointStore  # noqa: E402
from chronomerge.train import TrainConfig, train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="data")
    p.add_argument("--store", default="store")
    p.add_argument("--tasks", type=int, default=20)
    p.add_argument("--stream", default="dataset-incremental")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--pretrain-steps", type=int, default=PRETRAIN.steps)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    t0 = time.perf_counter()
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.verbose else (lambda *a: None)
    prepare(args.data, args.seed)
    store = CheckpointStore(args.store)
    base_id = ensure_base(store, args.data, args.seed,
                          cfg=dataclasses.replace(PRETRAIN, steps=args.pretrain_steps, progress=args.verbose))
    log(f"base {base_id[:12]} ready after {time.perf_counter() - t0:.0f} s")
    base = load_model(store, base_id)
    tok = get_tokenizer()
    held_out = {d.name: load_split(args.data, d.name, "test") for d in catalog.EVALUATION}
    adaptation = {d.name: load_split(args.data, d.name, "test") for d in catalog.ADAPTATION}
    zs = summarize(evaluate(base, tok, {**held_out, **adaptation}, "cpu"), list(adaptation), list(held_out))
    log(f"zero-shot: {zs}")
    tasks = build_stream(args.stream, args.tasks, args.seed)
    train_sets = [task_split(args.data, t, "train") for t in tasks]
    test_sets = [task_split(args.data, t, "test") for t in tasks]
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    gains = []
    for t, (tr, te) in enumerate(zip(train_sets, test_sets)):
        expert = copy.deepcopy(base)
        train(expert, tr, cfg, tokenizer=tok)
        gains.append(score(expert, tok, te, "cpu") - score(base, tok, te, "cpu"))
        log(f"expert {tasks[t].name}: gain {100 * gains[-1]:.1f}")
    seq = copy.deepcopy(base)
    diag = []
    for t, (tr, te) in enumerate(zip(train_sets, test_sets)):
        train(seq, tr, cfg, tokenizer=tok)
        diag.append(score(seq, tok, te, "cpu"))
    final = [score(seq, tok, te, "cpu") for te in test_sets]
    bwt = sum(final[i] - diag[i] for i in range(len(tasks) - 1)) / max(1, len(tasks) - 1)  # BWT: R[T,i] - R[i,i]
    out = {"seed": args.seed, "chance": 100 * chance(held_out), "zs_a_zs": 100 * zs["A_ZS"],
           "zs_a_ka": 100 * zs["A_KA"], "expert_gain_min": 100 * min(gains), "expert_gain_mean": 100 * sum(gains) / len(gains),
           "seq_bwt": 100 * bwt, "tasks": len(tasks), "seconds": time.perf_counter() - t0}
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
