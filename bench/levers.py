"""Regime levers: recipe changes that `bench/benchmark_properties.py`, `bench/mergeability_diagnosis.py` and
`bench/alpha_curve.py` apply in their own process only (the committed benchmark is unchanged), recorded in
their result line.

    --pool N                  the pretraining pool's size (committed: 20,000), the base pretrained on it
    --tail-share S            the pool's share of long-tail images, which show the adaptation tasks' concepts
                              and domains (committed: 0.3); a thinner tail leaves a longer-pretrained base
                              more to learn on them
    --n-train N               every adaptation dataset's training-set size (committed: 480; test sets unchanged)
    --pretrain-logit-scale S  pretrain the base with its logit scale fixed at S (a buffer, not a parameter;
                              CLIP's learnt scale sits at its cap of 100, the embedded base learns about 29);
                              the experts fine-tune it as usual
    --width W, --layers L     both towers' width (and embed_dim) and depth (embedded config: 64, 2); the base
                              is pretrained at that size under its own store key (`levers.arch`)
    --train NAME[,NAME...]    (mergeability_diagnosis.py) fine-tune only these tensors of the open_clip model
                              (e.g. visual.proj, in which the image features are linear); the logit scale and
                              everything else stay at θ0; pretraining is unchanged

The pretraining recipe itself (steps, batch size, learning rate) is not a lever here: both scripts take it
as `--set pretrain.KEY=VALUE`, validated like params.yaml, and the base's store key records it.

The datasets differ under --pool, --tail-share and --n-train: give them a data folder of their own (--data). The base's
store key records the pool (its digest) but not the fixed scale: give --pretrain-logit-scale a store of its
own (--store).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
from collections.abc import Callable

import torch

import chronomerge.benchmark as benchmark
import chronomerge.train as train_module
from chronomerge.data import catalog
from chronomerge.models import TINY, arch_of


def add_arguments(p: argparse.ArgumentParser, trainable: bool = False) -> None:
    g = p.add_argument_group("regime levers (bench/levers.py)")
    g.add_argument("--pool", type=int, metavar="N", help="pretraining pool of N images (own --data)")
    g.add_argument("--tail-share", type=float, metavar="S", help="the pool's long-tail share, in (0, 1) (own --data)")
    g.add_argument("--n-train", type=int, metavar="N", help="N training images per adaptation dataset (own --data)")
    g.add_argument("--pretrain-logit-scale", type=float, metavar="S",
                   help="pretrain with the logit scale fixed at S (needs its own --store)")
    g.add_argument("--width", type=int, help="both towers' width and embed_dim (embedded config: 64)")
    g.add_argument("--layers", type=int, help="both towers' depth (embedded config: 2)")
    if trainable:
        g.add_argument("--train", metavar="NAME[,NAME...]", help="fine-tune only these parameters")


def apply(p: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """Patch this process for the levers given; returns what to record in the result line."""
    record: dict = {}
    if (args.pool, args.tail_share, args.n_train) != (None, None, None) and args.data == "data":
        p.error("--pool, --tail-share and --n-train change the datasets: give them a data folder of their own (--data)")
    if args.tail_share is not None and not 0 < args.tail_share < 1:
        p.error(f"--tail-share {args.tail_share}: expected a number in (0, 1)")
    if args.pretrain_logit_scale is not None and args.store == "store":
        p.error("--pretrain-logit-scale changes the base under the same store key: give it its own --store")
    if args.pool is not None:
        catalog.PRETRAIN = dataclasses.replace(catalog.PRETRAIN, n_train=args.pool)
        catalog.ALL[catalog.PRETRAIN.name] = catalog.PRETRAIN
        record["pool"] = args.pool
    if args.tail_share is not None:
        (head, _), (tail, _) = catalog.PRETRAIN.mix
        mix = ((head, 1 - args.tail_share), (tail, args.tail_share))
        catalog.PRETRAIN = dataclasses.replace(catalog.PRETRAIN, mix=mix)
        catalog.ALL[catalog.PRETRAIN.name] = catalog.PRETRAIN
        record["tail_share"] = args.tail_share
    if args.n_train is not None:
        catalog.ADAPTATION = tuple(dataclasses.replace(d, n_train=args.n_train) for d in catalog.ADAPTATION)
        catalog.ALL.update({d.name: d for d in catalog.ADAPTATION})
        record["n_train"] = args.n_train
    if args.pretrain_logit_scale is not None:
        create, scale = benchmark.create_model, args.pretrain_logit_scale

        def fixed_scale(*a, **kw) -> torch.nn.Module:
            model = create(*a, **kw)
            del model.logit_scale
            model.register_buffer("logit_scale", torch.tensor(math.log(scale)))
            return model

        benchmark.create_model = fixed_scale
        record["pretrain_logit_scale"] = scale
    if getattr(args, "train", None):
        record["trainable"] = args.train.split(",")
    return record


def arch(args: argparse.Namespace) -> str | dict:
    """The embedded config, or a variant of it at `--width` / `--layers` (same preprocessing), named
    `chronoclip-tiny-w<W>-l<L>` so that its base has a store key of its own."""
    if (args.width, args.layers) == (None, None):
        return TINY
    a = copy.deepcopy(arch_of(TINY))
    c = a["config"]
    if args.width is not None:
        c["embed_dim"] = c["vision_cfg"]["width"] = c["text_cfg"]["width"] = args.width
    if args.layers is not None:
        c["vision_cfg"]["layers"] = c["text_cfg"]["layers"] = args.layers
    a["name"] = f"{TINY}-w{c['embed_dim']}-l{c['vision_cfg']['layers']}"
    return a


def fine_tune(train: Callable, names: list[str] | None) -> Callable:
    """`train`, fine-tuning only the parameters `names` when given (the --train lever)."""
    if not names:
        return train

    def only(model, task, cfg, **kwargs):
        cfg = cfg.model_copy(update={"train_text": False})  # the patched is_text_param alone decides
        real = train_module.is_text_param
        train_module.is_text_param = lambda n: n not in names
        try:
            return train(model, task, cfg, **kwargs)
        finally:
            train_module.is_text_param = real

    return only
