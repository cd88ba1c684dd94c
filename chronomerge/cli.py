"""The core's commands of `chronomerge` (`flows/cli.py` is the one command line): merge safetensors
checkpoints, list techniques, verify a store. They need neither Prefect nor MLflow.
"""
from __future__ import annotations

import json
from pathlib import Path

from chronomerge.checkpoints import as_expert, header_metadata, read_checkpoint
from chronomerge.config import parse_sets
from chronomerge.merge import CONTINUAL, TECHNIQUES, merge, resolve_hparams
from chronomerge.merge import params as P
from chronomerge.statedict import CorruptCheckpointError
from chronomerge.store import CheckpointStore, atomic_save


def cmd_merge(args) -> int:
    """Merge experts over a base with one technique, or fold them in the given order into a continual
    merger (OPCM, continual TA / TIES / averaging, EMA). Inputs: open_clip safetensors files or
    Hugging Face CLIP folders (a vision-only expert takes the base's text tower). The output is a
    plain open_clip state dict; it records the architecture when the base does (`model.name: auto`)."""
    hp = dict(parse_sets(args.set))
    continual = args.technique in CONTINUAL
    if continual:  # fail before reading any weights
        P.resolve(args.technique, CONTINUAL[args.technique].PARAMS, hp)
        if args.weights:
            raise ValueError(f"--weights: {args.technique} folds the models in order and takes no weights")
    else:
        resolve_hparams(args.technique, hp)
    if Path(args.out).suffix != ".safetensors":
        raise ValueError(f"--out {args.out}: the output must end in .safetensors")
    base = read_checkpoint(args.base)
    if base.vision_only:
        raise ValueError(f"--base {args.base}: holds only an image tower; the base must be a whole CLIP model")
    models = [as_expert(read_checkpoint(p), base.state) for p in args.models]
    if continual:
        merger = CONTINUAL[args.technique](base.state, device=args.device, **hp)
        for m in models:
            merged = merger.update(m)
    else:
        merged = merge(args.technique, base.state, models, weights=args.weights, device=args.device, **hp)
    meta = {"chronomerge_merge": json.dumps({"technique": args.technique, "hparams": hp, "weights": args.weights,
                                             "base": str(args.base), "models": [str(p) for p in args.models]})}
    if base.config is not None and base.name is not None:
        meta |= header_metadata(base.name, base.config, base.preprocess or {})
    atomic_save({k: v.contiguous() for k, v in merged.items()}, args.out, meta)
    print(f"wrote {args.out} ({args.technique} of {len(models)} model(s) over {args.base})")
    return 0


def cmd_techniques(args) -> int:
    w = max(map(len, [*TECHNIQUES, *CONTINUAL])) + 1
    for name, t in TECHNIQUES.items():
        params = ", ".join(f"{k}={p.default!r} ({p.allowed})" for k, p in t.params.items()) or "-"
        print(f"{name:{w}s} {t.reference}\n{'':{w}s} weights: {'yes' if t.weighted else 'no'}; {params}")
    print("\ncontinual mergers (one model at a time; strategy.deploy.mode=continual, strategy.deploy.merger=NAME):")
    for name, cls in CONTINUAL.items():
        params = ", ".join(f"{k}={p.default!r} ({p.allowed})" for k, p in cls.PARAMS.items()) or "-"
        print(f"{name:{w}s} {cls.reference}\n{'':{w}s} {params}")
    return 0


def cmd_verify(args) -> int:
    if not args.store.is_dir():
        raise ValueError(f"verify: {args.store} is not a checkpoint store folder")
    store = CheckpointStore(args.store)
    bad = 0
    for oid in [store.resolve(i) for i in args.ids] or store.ids():
        try:
            store.verify(oid)
            print(f"ok      {oid} {store.meta(oid)['kind']}")
        except CorruptCheckpointError as e:
            bad += 1
            print(f"CORRUPT {oid}: {e}")
            if args.repair:
                print(f"        moved to {store.quarantine(oid)}; the next run rebuilds it")
    if bad and args.repair:
        return 0
    return 1 if bad else 0


def add_core_commands(sub) -> None:
    what = "merge checkpoints with one technique, or fold them in order into a continual merger"
    m = sub.add_parser("merge", help=what, description=what)
    m.add_argument("technique", choices=sorted(TECHNIQUES) + sorted(CONTINUAL),
                   help="a technique or continual merger (`chronomerge techniques` lists them)")
    m.add_argument("--base", type=Path, required=True, help="open_clip .safetensors or Hugging Face CLIP folder")
    m.add_argument("--models", type=Path, nargs="+", required=True,
                   help="experts in order (open_clip .safetensors or HF CLIP folders; vision-only HF experts take "
                        "the base's text tower)")
    m.add_argument("--out", type=Path, required=True, help="the merged checkpoint, a .safetensors file")
    m.add_argument("--weights", type=float, nargs="+", help="per-model weights (weighted techniques only)")
    m.add_argument("--device", default=None, help="cpu or cuda (default: cuda when visible)")
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a hyperparameter, e.g. keep=0.3 (repeatable; the value is read as YAML, as everywhere)")
    m.set_defaults(fn=cmd_merge)
    what = "list merge techniques and continual mergers, with hyperparameters and references"
    t = sub.add_parser("techniques", help=what, description=what)
    t.set_defaults(fn=cmd_techniques)
    what = "check every object of a checkpoint store against its digests"
    v = sub.add_parser("verify", help=what, description=what)
    v.add_argument("store", type=Path, help="the store's folder (paths.store, e.g. store)")
    v.add_argument("ids", nargs="*", help="only these checkpoint ids or unique prefixes (default: every object)")
    v.add_argument("--repair", action="store_true",
                   help="move corrupt objects to <store>/quarantine/ so that the next run rebuilds them "
                        "(exit 0 once every corrupt object is out of the store)")
    v.set_defaults(fn=cmd_verify)
