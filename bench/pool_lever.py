"""Regime lever: the pretraining pool's size (pretraining breadth at the same steps), then the
benchmark's properties, for one seed.

    python bench/pool_lever.py --pool 80000 --seed 0 --parts zs,merge --data data-pool80k --store store \
        --out bench/results-regime-recipes-seed0.jsonl

Everything after `--pool N` is `bench/benchmark_properties.py`'s arguments. The catalog's pool entry
is replaced by one of N training images in this process only (the committed benchmark keeps
20,000); use a data folder of its own, since the datasets differ. The result line records `pool`.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chronomerge.data import catalog  # noqa: E402


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "--pool":
        sys.exit("usage: pool_lever.py --pool N [benchmark_properties.py arguments]")
    n = int(sys.argv[2])
    catalog.PRETRAIN = dataclasses.replace(catalog.PRETRAIN, n_train=n)
    catalog.ALL[catalog.PRETRAIN.name] = catalog.PRETRAIN
    sys.argv = [sys.argv[0], *sys.argv[3:]]
    import benchmark_properties
    benchmark_properties.RECORD["pool"] = n
    benchmark_properties.main()


if __name__ == "__main__":
    main()
