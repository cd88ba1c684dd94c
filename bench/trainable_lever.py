"""Regime lever: fine-tune only some of the model's tensors (e.g. the image projection, in which the
image features are linear), then diagnose mergeability, for one seed.

    python bench/trainable_lever.py --train visual.proj --seed 0 --set train.mode=vision \
        --out bench/results-mergeability-diagnosis.jsonl

Everything after `--train NAMES` (comma-separated parameter names of the open_clip model) is
`bench/mergeability_diagnosis.py`'s arguments. In this process every other tensor, the logit scale
included, stays at θ0 during fine-tuning (pretraining is unchanged). The result line records `trainable`.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import chronomerge.train as train_module  # noqa: E402


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "--train":
        sys.exit("usage: trainable_lever.py --train NAME[,NAME...] [mergeability_diagnosis.py arguments]")
    names = tuple(sys.argv[2].split(","))
    train = train_module.train

    def only(model, task, cfg, **kwargs):
        cfg = cfg.model_copy(update={"train_text": False})  # is_text_param alone decides
        real = train_module.is_text_param
        train_module.is_text_param = lambda n: n not in names
        try:
            return train(model, task, cfg, **kwargs)
        finally:
            train_module.is_text_param = real

    import mergeability_diagnosis
    mergeability_diagnosis.train = only
    mergeability_diagnosis.RECORD["trainable"] = list(names)
    sys.argv = [sys.argv[0], *sys.argv[3:]]
    mergeability_diagnosis.main()


if __name__ == "__main__":
    main()
