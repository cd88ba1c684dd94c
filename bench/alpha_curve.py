"""How does one expert's gain grow along its task vector? The shape behind averaging's mergeability.

    python bench/alpha_curve.py --seed 0 --tasks 0 3 5 [--set train.lr=5e-4 --set train.steps=400] [--device cuda]
        [--width W] [--layers L] [--pool N] [--tail-share S] [--n-train N] [--pretrain-logit-scale S]
        (levers: bench/levers.py)

Trains one expert from θ0 per listed task of the default stream (default recipe, `--set train.*`
overrides; `--set pretrain.*` and the levers change the base) and prints, per task, its gain over
zero-shot (points) at θ0 + α·τ for α = 1/8, 1/4, 1/2, 1. Averaging K experts gives each θ0 + τ/K
plus the others' interference, so it can keep about 1/K of the gain where the curve is linear;
CLIP's experts keep far more because their curves saturate early. Uses the base and data of
`bench/benchmark_properties.py` (same --data, --store, levers).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import levers  # noqa: E402

from chronomerge.benchmark import ensure_base, pretrain_recipe  # noqa: E402
from chronomerge.config import load_config  # noqa: E402
from chronomerge.data import prepare  # noqa: E402
from chronomerge.data.streams import build_stream, task_split  # noqa: E402
from chronomerge.evaluate import score  # noqa: E402
from chronomerge.merge import merge  # noqa: E402
from chronomerge.models import get_tokenizer, load_model  # noqa: E402
from chronomerge.store import CheckpointStore  # noqa: E402
from chronomerge.train import train  # noqa: E402

ALPHAS = (1 / 8, 1 / 4, 1 / 2, 1.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="data")
    p.add_argument("--store", default="store")
    p.add_argument("--tasks", type=int, nargs="+", default=[0, 3, 5], help="task indices of the default stream")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="train.* or pretrain.* override")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    levers.add_arguments(p)
    args = p.parse_args()
    record = levers.apply(p, args)
    config = load_config(None, args.set)  # the default recipe and the --set overrides
    cfg, dev = config.train, args.device
    prepare(args.data, args.seed)
    store = CheckpointStore(args.store)
    arch = levers.arch(args)
    base_id = ensure_base(store, args.data, args.seed, arch=arch, cfg=pretrain_recipe(config.pretrain), device=dev)
    base = load_model(store, base_id, arch).to(dev)
    theta0 = base.state_dict()
    tok = get_tokenizer(arch)
    tasks = build_stream("dataset-incremental", max(args.tasks) + 1, args.seed)
    for t in args.tasks:
        tr, te = task_split(args.data, tasks[t], "train"), task_split(args.data, tasks[t], "test")
        expert = copy.deepcopy(base)
        train(expert, tr, cfg.model_copy(update={"seed": args.seed}), tokenizer=tok, device=dev)
        zs = score(base, tok, te, dev)
        gains = []
        for a in ALPHAS:
            m = copy.deepcopy(base)
            m.load_state_dict(merge("task_arithmetic", theta0, [expert.state_dict()], scale=a))
            gains.append(round(100 * (score(m, tok, te, dev) - zs), 1))
        print(f"base {base_id[:12]} {record} lr {cfg.lr} steps {cfg.steps} mode {cfg.mode} text {cfg.text} "
              f"task {tasks[t].name}: gain at alpha 1/8, 1/4, 1/2, 1 = {gains}", flush=True)


if __name__ == "__main__":
    main()
