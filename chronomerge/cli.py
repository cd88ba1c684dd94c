"""The core's commands: merge safetensors checkpoints, list techniques, verify a store, show lineage.

They need neither Prefect nor MLflow. The installed `chronomerge` command (`flows.cli`) adds the
pipeline commands (run, resume, status, report, prepare, pretrain) to these.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from chronomerge.lineage import lineage_lines
from chronomerge.merge import TECHNIQUES, merge, resolve_hparams
from chronomerge.statedict import CorruptCheckpointError, LazyStateDict
from chronomerge.store import CheckpointStore, atomic_save


def _parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def cmd_merge(args) -> int:
    hp = _parse_sets(args.set)
    resolve_hparams(args.technique, hp)  # fail before reading any weights
    base = LazyStateDict.from_file(args.base)
    models = [LazyStateDict.from_file(p) for p in args.models]
    merged = merge(args.technique, base, models, weights=args.weights, device=args.device, **hp)
    atomic_save(merged, args.out, {"chronomerge_merge": json.dumps(
        {"technique": args.technique, "hparams": hp, "weights": args.weights,
         "base": str(args.base), "models": [str(p) for p in args.models]})})
    print(f"wrote {args.out}")
    return 0


def cmd_techniques(args) -> int:
    for name, t in TECHNIQUES.items():
        params = ", ".join(f"{k}={p.default!r} ({p.allowed})" for k, p in t.params.items()) or "-"
        print(f"{name:17s} {t.reference}\n{'':17s} weights: {'yes' if t.weighted else 'no'}; {params}")
    return 0


def cmd_verify(args) -> int:
    store = CheckpointStore(args.store)
    bad = 0
    for oid in args.ids or store.ids():
        try:
            store.verify(oid)
            print(f"ok      {oid} {store.meta(oid)['kind']}")
        except CorruptCheckpointError as e:
            bad += 1
            print(f"CORRUPT {oid}: {e}")
    return 1 if bad else 0


def cmd_lineage_store(args) -> int:
    store = CheckpointStore(args.store)
    print("\n".join(lineage_lines(store, args.target)))
    return 0


def add_core_commands(sub) -> None:
    m = sub.add_parser("merge", help="merge safetensors checkpoints with one technique")
    m.add_argument("technique", choices=sorted(TECHNIQUES))
    m.add_argument("--base", type=Path, required=True)
    m.add_argument("--models", type=Path, nargs="+", required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--weights", type=float, nargs="+")
    m.add_argument("--device", default=None)
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a hyperparameter")
    m.set_defaults(fn=cmd_merge)
    t = sub.add_parser("techniques", help="list merge techniques, hyperparameters and references")
    t.set_defaults(fn=cmd_techniques)
    v = sub.add_parser("verify", help="check every object of a checkpoint store against its digests")
    v.add_argument("store", type=Path)
    v.add_argument("ids", nargs="*")
    v.set_defaults(fn=cmd_verify)


def run_command(args) -> int:
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="chronomerge", description="Temporal model merging for CLIP.")
    sub = p.add_subparsers(dest="command", required=True)
    add_core_commands(sub)
    lg = sub.add_parser("lineage", help="the parent tree of a stored checkpoint")
    lg.add_argument("target", help="checkpoint id")
    lg.add_argument("--store", type=Path, default=Path("store"))
    lg.set_defaults(fn=cmd_lineage_store)
    return run_command(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
