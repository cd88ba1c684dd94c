"""How does one expert's gain grow along its task vector? The shape behind averaging's mergeability.

    python bench/alpha_curve.py --seed 0 --tasks 0 3 5 [--set train.lr=5e-4 --set train.steps=400]

Trains one expert from θ0 per listed task of the default stream (default recipe, `--set train.*`
overrides) and prints, per task, its gain over zero-shot (points) at θ0 + α·τ for α = 1/8, 1/4,
1/2, 1. Averaging K experts gives each θ0 + τ/K plus the others' interference, so it can keep about
1/K of the gain where the curve is linear; CLIP's experts keep far more because their curves
saturate early. Uses the base and data of `bench/benchmark_properties.py` (same --data, --store).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chronomerge.benchmark import PRETRAIN, ensure_base  # noqa: E402
from chronomerge.config import (
    load_config,  # noqa: E402
)
from chronomerge.data import prepare  # noqa: E402
from chronomerge.data.streams import build_stream, task_split  # noqa: E402
from chronomerge.evaluate import score  # noqa: E402
from chronomerge.merge import merge  # noqa: E402
from chronomerge.models import (
    get_tokenizer,  # noqa: E402
    load_model,  # noqa: E402
)
from chronomerge.store import CheckpointStore  # noqa: E402
from chronomerge.train import train  # noqa: E402

ALPHAS = (1 / 8, 1 / 4, 1 / 2, 1.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="data")
    p.add_argument("--store", default="store")
    p.add_argument("--tasks", type=int, nargs="+", default=[0, 3, 5], help="task indices of the default stream")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="train.* override")
    args = p.parse_args()
    cfg = load_config(None, args.set).train  # the default recipe and the --set overrides
    prepare(args.data, args.seed)
    store = CheckpointStore(args.store)
    base = load_model(store, ensure_base(store, args.data, args.seed, cfg=PRETRAIN))
    theta0 = base.state_dict()
    tok = get_tokenizer()
    tasks = build_stream("dataset-incremental", max(args.tasks) + 1, args.seed)
    for t in args.tasks:
        tr, te = task_split(args.data, tasks[t], "train"), task_split(args.data, tasks[t], "test")
        expert = copy.deepcopy(base)
        train(expert, tr, cfg.model_copy(update={"seed": args.seed}), tokenizer=tok)
        zs = score(base, tok, te, "cpu")
        gains = []
        for a in ALPHAS:
            m = copy.deepcopy(base)
            m.load_state_dict(merge("task_arithmetic", theta0, [expert.state_dict()], scale=a))
            gains.append(round(100 * (score(m, tok, te, "cpu") - zs), 1))
        print(f"lr {cfg.lr} steps {cfg.steps} train_text {cfg.train_text} task {tasks[t].name}: "
              f"gain at alpha 1/8, 1/4, 1/2, 1 = {gains}", flush=True)


if __name__ == "__main__":
    main()
