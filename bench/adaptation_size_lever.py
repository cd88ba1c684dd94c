"""Regime lever: the adaptation datasets' training-set size (CLIP's experts fine-tune on thousands to
tens of thousands of images per task; the embedded tasks have 480), then diagnose mergeability, for one seed.

    python bench/adaptation_size_lever.py --n-train 4800 --seed 0 --data data-n4800 \
        --out bench/results-mergeability-diagnosis.jsonl

Everything after `--n-train N` is `bench/mergeability_diagnosis.py`'s arguments. In this process every
adaptation dataset's catalog entry has N training images (test sets, the pool and so the base are
unchanged); use a data folder of its own, since the datasets differ. The result line records `n_train`.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chronomerge.data import catalog  # noqa: E402


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "--n-train":
        sys.exit("usage: adaptation_size_lever.py --n-train N [mergeability_diagnosis.py arguments]")
    n = int(sys.argv[2])
    catalog.ADAPTATION = tuple(dataclasses.replace(d, n_train=n) for d in catalog.ADAPTATION)
    catalog.ALL.update({d.name: d for d in catalog.ADAPTATION})
    sys.argv = [sys.argv[0], *sys.argv[3:]]
    import mergeability_diagnosis
    mergeability_diagnosis.RECORD["n_train"] = n
    mergeability_diagnosis.main()


if __name__ == "__main__":
    main()
