"""Regime lever: pretrain the base with its logit scale fixed (CLIP's learnt scale sits at its cap of
100; the embedded base learns about 29), then diagnose mergeability, for one seed.

    python bench/temperature_lever.py --pretrain-logit-scale 100 --seed 0 --store store-t100 --multitask --probe \
        --out bench/results-mergeability-diagnosis.jsonl

Everything after `--pretrain-logit-scale S` is `bench/mergeability_diagnosis.py`'s arguments. In this process
the base's logit scale is a constant exp(·) = S during pretraining (a buffer, not a parameter); the
experts fine-tune it as usual. The base's store key does not record S: use a store of its own.
The result line records `pretrain_logit_scale`.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import chronomerge.benchmark as benchmark  # noqa: E402


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "--pretrain-logit-scale":
        sys.exit("usage: temperature_lever.py --pretrain-logit-scale S [mergeability_diagnosis.py arguments]")
    scale = float(sys.argv[2])
    create = benchmark.create_model

    def fixed_scale(*args, **kwargs) -> torch.nn.Module:
        model = create(*args, **kwargs)
        del model.logit_scale
        model.register_buffer("logit_scale", torch.tensor(math.log(scale)))
        return model

    benchmark.create_model = fixed_scale
    sys.argv = [sys.argv[0], *sys.argv[3:]]
    import mergeability_diagnosis
    mergeability_diagnosis.RECORD["pretrain_logit_scale"] = scale
    mergeability_diagnosis.main()


if __name__ == "__main__":
    main()
