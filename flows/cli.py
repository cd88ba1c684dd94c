"""`chronomerge`: the pipeline commands plus the core's (merge, techniques, verify).

    chronomerge run [--params params.yaml] [--set train.lr=1e-3 ...]   the stream; prints `deployed: <sha256>`
    chronomerge resume                         the last run started here, with the same settings
    chronomerge status                         which tasks and stages are done (cached) and what is next
    chronomerge lineage <checkpoint-id | mlflow-run-id>
    chronomerge report                         plots and the metrics table from the last run's outputs
    chronomerge sweep sweeps/time-pairs.yaml   a grid of streams sharing cached work, compared
    chronomerge prepare | pretrain             the DVC stages before the stream
    chronomerge update | serve                 one continual update now | on the params schedule (Prefect)
    chronomerge withdraw <name>                take a registered arrival back (the next update runs without it)
    chronomerge arrive <dataset>               drop an embedded dataset into update.incoming (new data)
    chronomerge lineage --at TIME              what the model promoted at TIME is made of (MLflow alone)
    chronomerge diff <run-a> <run-b>           config, data, metrics and lineage that changed
    chronomerge export <id | latest> <file>    a plain open_clip checkpoint (.safetensors)
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from flows.interrupt import interrupted

if __name__ == "__main__":  # `python -m flows.cli`: like the console script, Ctrl-C is handled from here on
    signal.signal(signal.SIGINT, interrupted)

import tasks  # noqa: E402, F401  (Prefect's environment defaults, set before anything imports Prefect)
from chronomerge import cli as core_cli  # noqa: E402
from chronomerge.config import ConfigError, load_config, validate  # noqa: E402
from chronomerge.lineage import lineage_lines  # noqa: E402
from chronomerge.report import ZERO_SHOT, scores_line, versus  # noqa: E402
from chronomerge.statedict import CorruptCheckpointError  # noqa: E402
from chronomerge.store import CheckpointStore, NonFiniteError, atomic_write_bytes  # noqa: E402
from flows.prefect_server import booting, reap_orphans, server_for_schedules  # noqa: E402

# Errors that are failures of a run (exit 1), though they are ValueErrors like a user's bad input (exit 2).
FAILURES = (NonFiniteError, CorruptCheckpointError)


def _config(args):
    return load_config(args.params, args.set)


def _checked(args):
    """(config, architecture, evaluation sets), with everything beyond the schema checked too
    (architecture, evaluation sets, experts' files): for commands that do work, a bad field fails
    here, before Prefect, MLflow or any stage starts. Audits (lineage, diff, report) need only `_config`."""
    from flows.stream import check

    cfg = _config(args)
    return (cfg, *check(cfg))


def cmd_run(args, cfg=None) -> int:
    cfg = cfg or _config(args)  # the schema: a bad value fails before Prefect starts
    with booting():  # the rest of the checks import torch and open_clip while the server boots
        from flows.stream import check, stream_flow

        check(cfg)
    summary = stream_flow(cfg, project=".", quiet=args.quiet)
    f = summary["final"]
    print(f"final: {scores_line(f, digits=2)}")
    z = summary["zero_shot"]
    gap = "" if f["GM"] is None else f"   (the deployed GM is {versus(f['GM'], z['GM'], 2)})"
    print(f"zero-shot θ0: {scores_line(z, ZERO_SHOT, digits=2)}{gap}")
    print(f"time: {summary['wall_seconds']:.1f} s in the flow, {summary['compute_seconds']:.1f} s computing stages, "
          f"{sum(s['status'] == 'cached' for s in summary['stages'])}/{len(summary['stages'])} stages cached")
    print(f"metrics: {cfg.paths.metrics}   report: {Path(cfg.paths.outputs) / 'report.md'}   "
          f"mlflow run: {summary['run_id']}")
    print(f"deployed: {summary['deployed']}")
    return 0


def cmd_resume(args) -> int:
    from flows.stream import LAST_RUN

    if not LAST_RUN.exists():
        raise ConfigError(f"nothing to resume: no run was started in this directory ({LAST_RUN} is missing)")
    return cmd_run(args, _last_run())


def _last_run():
    """The validated settings of the last run started in this directory (`resume`, `status`)."""
    from flows.stream import LAST_RUN

    return validate(json.loads(LAST_RUN.read_text()), str(LAST_RUN))


def peek_stage(stage_task, ws, /, **inputs):
    """The persisted result of a stage for these inputs, without running it (None when absent)."""
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH

    from tasks.cache import key_of

    path = Path(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value()) / key_of(stage_task, ws, **inputs)
    try:
        return json.loads(json.loads(path.read_text())["result"]), "done"
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, or a record cut short by a crash: Prefect recomputes it too


def cmd_status(args) -> int:
    """What `chronomerge run` with the same settings would do: done stages (cached), the next one, and
    the tasks after it. Without --set or --params, the settings of the last run started here."""
    from chronomerge.arrivals import digest_arrived
    from chronomerge.benchmark import base_recipe, base_ref, pretrain_recipe
    from chronomerge.checkpoints import read_checkpoint
    from chronomerge.data import catalog
    from chronomerge.progress import clock
    from chronomerge.resume import in_progress
    from chronomerge.stages import build_tasks
    from flows.stream import LAST_RUN, STAGES, check, stream_key, stream_title, walk, workspace
    from tasks.cache import key_of

    if not args.set and not args.params_given and LAST_RUN.exists():
        cfg = _last_run()
        arch, sets = check(cfg)
        source = f"the last run's ({LAST_RUN}; --set or --params for others)"
    else:
        cfg, arch, sets = _checked(args)
        source = args.params or "defaults"
    ws = workspace(cfg, Path("."))
    manifest = Path(ws.data) / "manifest.json"
    print(f"stream {stream_key(cfg)[:16]}: {stream_title(cfg)}\nsettings: {source}")
    if not manifest.exists():
        print(f"data: not prepared ({manifest} missing); next: prepare (chronomerge run does it first)")
        return 0
    known = json.loads(manifest.read_text())["datasets"]
    try:  # digests as recorded (embedded) or as the folders are (the user's); nothing is generated
        digests = digest_arrived(
            ws.data, [n for n in [*sets["adaptation"], *sets["held_out"]] if n not in known], known
        )
        digests |= {f"expert:{p}": read_checkpoint(p).digest() for p in cfg.stream.expert_paths}
    except (FileNotFoundError, ValueError) as e:
        print(f"data: not ready ({e}); next: prepare")
        return 0
    done, shown, pending = 0, 0, None
    missing: list[str] = []  # the cache key of the stage the walk stopped at

    def peek(stage_task, ws, /, **inputs):
        got = peek_stage(stage_task, ws, **inputs)
        if got is None:
            missing.append(key_of(stage_task, ws, **inputs))
        return got

    for item in walk(cfg, ws, digests, arch, sets, runner=peek):
        if item[0] == "base":
            print(f"base: done ({item[1]['base'][:16]})")
            continue
        task, outs, status = item
        shown += 1
        marks = " ".join(f"{s}:{'done' if s in status else '-'}" for s in STAGES)
        print(f"  {task.index + 1:>3} {task.name:34s} {marks}")
        if len(status) == len(STAGES):
            done += 1
        else:
            pending = f"task {task.index + 1}, stage {next(s for s in STAGES if s not in status)}"
            break
    if shown == 0:  # the base stage has no record: say what the run's base stage will do
        store = ws.checkpoints
        pool = known.get(catalog.PRETRAIN.name)
        ref = None if cfg.model.pretrained or pool is None else base_ref(
            base_recipe(arch["name"], cfg.data.seed, pool, pretrain_recipe(cfg.pretrain)))
        if cfg.model.pretrained:
            print(f"base: imported from model.pretrained ({cfg.model.pretrained}) when the run starts")
        elif ref and store.ref(ref):
            print(f"base: in the store ({store.ref(ref)[:16]}); the run records it and goes on")
        else:
            print(f"base: not pretrained yet; the run pretrains it first ({cfg.pretrain.steps} steps)")
        pending = "the base, then task 1"
    stream = build_tasks(cfg.stream.model_dump(mode="json"))
    for task in ([] if cfg.stream.multitask else stream[shown:]):
        print(f"  {task.index + 1:>3} {task.name:34s} to run")
    total = 1 if cfg.stream.multitask else cfg.stream.length
    print(f"{done}/{total} tasks complete" + (f"; next: {pending}" if pending else ""))
    if missing and (rec := in_progress(ws.store, missing[-1])):
        ago = clock(max(0.0, time.time() - rec["time"]))
        print(f"in progress: {rec['stage']} at step {rec['step']}/{rec['total']} (progress checkpoint {ago} ago); "
              "the next run resumes there")
    return 0


def cmd_lineage(args) -> int:
    cfg = _config(args)
    store = CheckpointStore(cfg.paths.store)
    target = args.target
    if args.at or (target and len(target) == 64 and target not in store):
        return cmd_lineage_at(args, cfg)
    if target is None:
        raise ValueError("lineage needs a checkpoint id (or a unique prefix), an MLflow run id, or --at TIME")
    is_hex = len(target) >= 4 and all(c in "0123456789abcdef" for c in target.lower())
    if is_hex and store.matching(target):
        target = store.resolve(target)  # a unique prefix, as git takes one; several: an error naming them
        for run in _audit(cfg).runs_that_deployed(target) if cfg.tracking.enabled else []:
            print(f"deployed by mlflow run {run.info.run_id} ({run.info.run_name}, task "
                  f"{run.data.tags.get('chronomerge.t')}); git commit {run.data.tags.get('git.commit')}")
    else:
        run = _audit(cfg).run(target)
        if run is None:
            raise ValueError(f"{target!r} is neither a checkpoint id (or a unique prefix of one) in {store.root} "
                             f"nor an MLflow run id in {cfg.tracking.mlflow_uri}")
        tags = run.data.tags
        if "lineage.deployed" not in tags:
            raise ValueError(f"MLflow run {target} carries no lineage.deployed tag (not a chronomerge run?)")
        print(f"mlflow run {target} ({run.info.run_name}, {run.info.status}); git commit {tags.get('git.commit')}")
        for k in sorted(tags):
            if k.startswith("lineage.") and k != "lineage.deployed":
                print(f"  {k}: {tags[k]}")
        target = tags["lineage.deployed"]
    print("\n".join(lineage_lines(store, target)))
    return 0


def cmd_lineage_at(args, cfg) -> int:
    """`lineage --at TIME` (and any checkpoint missing from the store): from MLflow alone."""
    from datetime import datetime, timezone

    audit = _audit(cfg)
    target = args.target
    if args.at:
        when = datetime.now(timezone.utc) if args.at == "now" else datetime.fromisoformat(args.at)
        when = when if when.tzinfo else when.astimezone()  # a time without a zone is local time
        version = audit.deployed_at(cfg.update.registered_model, int(when.timestamp() * 1000))
        if version is None:
            raise ValueError(f"nothing of {cfg.update.registered_model!r} was promoted at or before {when.isoformat()}")
        promoted = datetime.fromtimestamp(version.creation_timestamp / 1000, timezone.utc)
        target = version.tags["lineage.deployed"]
        print(f"deployed at {when.isoformat()}: {cfg.update.registered_model} version {version.version}, "
              f"promoted {promoted.isoformat()} ({version.tags.get('gate', '')})")
    found = audit.made_of(target)
    tags = found["run"].data.tags
    print(f"model {target}\n  deployed by task run {found['run'].info.run_id} ({found['run'].info.run_name}); "
          f"git commit {tags.get('git.commit')}; base {tags.get('lineage.base', '-')[:16]}")
    print(f"  made of {len(found['experts'])} expert(s):")
    for e in found["experts"]:
        data = ", ".join(f"{n} {d[:16]}" for n, d in e["datasets"]) or "-"
        print(f"    t={e['t']}  {e['task']}  expert {e['expert'][:16]}  data {str(e['data'])[:16]}  datasets: {data}")
    return 0


def _audit(cfg):
    from tasks.tracking import Audit

    return Audit(cfg.tracking.mlflow_uri, cfg.tracking.experiment)


def cmd_diff(args) -> int:
    changes = _audit(_config(args)).diff(args.run_a, args.run_b)
    for section, rows in changes.items():
        print(f"{section}: {'no change' if not rows else f'{len(rows)} change(s)'}")
        for key, a, b in rows:
            if isinstance(a, float) and isinstance(b, float):
                print(f"  {key}: {a:.4f} -> {b:.4f} ({b - a:+.4f})")
            else:
                print(f"  {key}: {a} -> {b}")
    return 0


def cmd_update(args) -> int:
    cfg = _config(args)  # a bad params file fails before Prefect starts
    with booting():  # the rest of the checks import torch and open_clip while the server boots
        from flows.stream import check
        from flows.update import update_flow

        check(cfg)
    update_flow(project=".", params=args.params, sets=args.set, announce=True)
    return 0


def cmd_withdraw(args) -> int:
    from flows.update import withdraw_arrival

    moved = withdraw_arrival(".", args.params, args.set, args.name, args.reason)
    print(f"withdrawn {args.name}: the next update rebuilds the stream without it")
    for line in moved:
        print(f"  moved {line}")
    return 0


def cmd_serve(args) -> int:
    cfg = _checked(args)[0]
    server = server_for_schedules()
    from prefect.deployments.runner import EntrypointType

    from flows.update import update_flow

    schedule = {"interval": cfg.update.interval} if cfg.update.interval else {"cron": cfg.update.cron}
    when = f"every {cfg.update.interval} s" if cfg.update.interval else f"on cron {cfg.update.cron!r}"
    print(f"serving chronomerge-update {when} (Prefect API {os.environ['PREFECT_API_URL']}, no UI); new task data "
          f"goes in {cfg.update.incoming}/; each update's decision is printed here; Ctrl-C stops", flush=True)
    try:
        update_flow.serve(name="chronomerge-update", limit=1, pause_on_shutdown=False, print_starting_message=False,
                          entrypoint_type=EntrypointType.MODULE_PATH,
                          parameters={"project": str(Path.cwd()), "params": args.params, "sets": args.set,
                                      "announce": True},
                          **schedule)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    return 0


def cmd_arrive(args) -> int:
    from chronomerge.arrivals import copy_dataset
    from chronomerge.data import catalog, prepare

    cfg = _config(args)
    names = [d.name for d in catalog.ADAPTATION]
    if args.dataset not in names:
        raise ValueError(f"arrive: {args.dataset!r} is not an adaptation dataset; expected one of {names}")
    prepare(cfg.data.root, cfg.data.seed, [args.dataset], size_factor=cfg.data.size_factor)
    target = Path(cfg.update.incoming) / args.dataset
    if target.exists():
        raise ValueError(f"arrive: {target} exists already")
    copy_dataset(Path(cfg.data.root) / args.dataset, target)
    print(f"arrived: {target}")
    return 0


def cmd_data_add(args) -> int:
    from chronomerge.data.adapters import add_dataset

    cfg = _config(args)
    meta = add_dataset(args.path, cfg.data.root, args.name, templates=args.templates,
                       test_fraction=args.test_fraction, size=args.image_size, seed=cfg.data.seed)
    n = {k: v["n"] for k, v in meta["splits"].items()}
    h, w = meta["image_size"]
    print(f"dataset {args.name}: {len(meta['classes'])} classes, train {n.get('train', 0)}, test {n.get('test', 0)} "
          f"images ({w}×{h}), digest {meta.get('digest') or '(unchanged)'}")
    print(f"in {Path(cfg.data.root) / args.name}; use it with stream.kind=custom stream.tasks=[{args.name}, ...] "
          f"or eval.held_out=[{args.name}]")
    return 0


def cmd_export(args) -> int:
    from chronomerge.export import export_open_clip

    cfg, arch, _ = _checked(args)
    store = CheckpointStore(cfg.paths.store)
    oid = store.ref(args.checkpoint) if args.checkpoint == "latest" else store.resolve(args.checkpoint)
    if oid is None:
        raise ValueError("export: nothing promoted yet (the store has no 'latest' ref)")
    path = export_open_clip(store, oid, args.path, arch)
    print(f"exported {oid} to {path}: open_clip.create_model({arch['name']!r}, pretrained={str(path)!r})")
    return 0


def cmd_sweep(args) -> int:
    import yaml

    from chronomerge.config import apply_overrides
    from flows.sweep import load_sweep, local_gpus, points, sweep_flow

    sweep = load_sweep(args.sweep)
    raw = yaml.safe_load(Path(args.params).read_text()) if args.params else {}
    raw = apply_overrides(raw or {}, args.set)
    with _server_for_workers(args.runner):
        with booting():
            runs = points(raw, sweep)  # every point validated before anything runs
            gpus = local_gpus(args.runner, args.address, args.gpus)
            at_once = gpus * args.points_per_gpu + max(args.workers - gpus, 0)
            where = (f"on the Dask scheduler at {args.address}" if args.address else
                     f"{at_once} at a time" + (" on a local Dask cluster" if args.runner == "dask" else "")
                     + (f", {gpus} of its workers with a GPU each ({args.points_per_gpu} points per GPU)"
                        if gpus else ""))
            print(f"sweep {sweep['name']}: {len(runs)} runs, {where}")
        summary = sweep_flow(raw, sweep, project=".", workers=args.workers, runs=runs, runner=args.runner,
                             address=args.address, gpus=gpus, per_gpu=args.points_per_gpu)
    folder = Path(validate(raw).paths.outputs) / "sweeps" / sweep["name"]
    print((folder / "summary.md").read_text())
    print(f"wrote {folder}/summary.md, summary.csv, plots/; {summary['wall_seconds']:.0f} s")
    return 0


@contextlib.contextmanager
def _server_for_workers(runner: str):
    """Dask workers are other processes: they need a Prefect server they can reach, not this process's
    temporary one; one is started on loopback for the command when PREFECT_API_URL is unset."""
    server = server_for_schedules() if runner == "dask" else None
    try:
        yield
    finally:
        if server is not None:
            server.terminate()


def cmd_report(args) -> int:
    from chronomerge.report import markdown, write_report

    if args.reproduce:
        return _reproduce(args)
    cfg = _config(args)
    path = Path(cfg.paths.outputs) / "history.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `chronomerge run` first")
    history = json.loads(path.read_text())
    written = write_report(history, cfg.paths.outputs)
    print(markdown(history))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _reproduce(args) -> int:
    import yaml

    if len(args.seeds) < 1:
        raise ValueError("--seeds needs at least one seed")
    if args.opcm_lengths and min(args.opcm_lengths) < 2:
        raise ValueError("--opcm-lengths: every length must be >= 2 (BWT needs two tasks)")
    raw = yaml.safe_load(Path(args.params).read_text()) if args.params else {}
    with _server_for_workers(args.runner):
        with booting():
            from flows.reproduce import reproduce
        path = reproduce(raw or {}, args.seeds, project=".", workers=args.workers, sets=args.set,
                         opcm_lengths=tuple(args.opcm_lengths or ()), runner=args.runner, address=args.address,
                         gpus=args.gpus, per_gpu=args.points_per_gpu)
    print(path.read_text())
    print(f"wrote {path}")
    return 0


def cmd_prepare(args) -> int:
    from chronomerge.stages import Workspace
    from flows.stream import prepare_inputs

    cfg, _, sets = _checked(args)
    digests = prepare_inputs(cfg, Workspace(cfg.paths.store, cfg.data.root), sets)
    print(f"{sum(not n.startswith('expert:') for n in digests)} datasets ready under {cfg.data.root}")
    return 0


def cmd_pretrain(args) -> int:
    from flows.stream import workspace
    from tasks.cache import run_uncached
    from tasks.prepare import base

    cfg, arch, _ = _checked(args)
    c = cfg.to_dict()
    out = run_uncached(base, workspace(cfg, Path("."), progress=True), arch=arch, model=c["model"],
                       pretrain=c["pretrain"], data=c["data"])
    path = Path(cfg.paths.outputs) / "base.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps({"base": out["base"], "model": c["model"]}, indent=1).encode())
    print(f"base: {out['base']}")
    return 0


def runner_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """--runner, --address and --gpus: where a sweep's points run (flows/sweep.py)."""
    parser.add_argument("--runner", choices=("threads", "dask"), default="threads",
                        help=f"{prefix}where the points run: threads of this process (default), or Dask workers "
                        "(prefect-dask)")
    parser.add_argument("--address", metavar="ADDR", help=f"{prefix}an existing Dask scheduler (tcp://host:8786) for "
                        "--runner dask; its workers need PREFECT_API_URL, the project's shared paths and the MLflow "
                        "tracking URI")
    parser.add_argument("--gpus", type=int, metavar="N", help=f"{prefix}GPUs of this machine for a local Dask cluster: "
                        "one worker per GPU (default: every GPU torch sees)")
    parser.add_argument("--points-per-gpu", type=int, default=1, metavar="K", help=f"{prefix}points a GPU runs at once "
                        "on Dask (default 1): their trainings take turns on it, their merges and evaluations share it")


def parser() -> argparse.ArgumentParser:
    """The one command line: the pipeline's commands and the core's (merge, techniques, verify)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("chronomerge")
    except PackageNotFoundError:  # run from a checkout that is not installed
        v = "unknown"
    p = argparse.ArgumentParser(prog="chronomerge", description="Temporal model merging for CLIP, orchestrated.",
                                epilog="exit status: 0 done, 1 a failure (a diverged run, a corrupt checkpoint, a "
                                       "crash), 2 a usage or configuration error, 130 interrupted")
    p.add_argument("--version", action="version", version=f"chronomerge {v}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and Prefect's console logs")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def pipeline(name: str, fn, help: str, parent=sub) -> argparse.ArgumentParser:
        c = parent.add_parser(name, help=help, description=help)
        c.add_argument("--params", help="params file (default: params.yaml, or the defaults when there is none)")
        c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a field, e.g. train.lr=1e-3 (repeatable)")
        c.set_defaults(fn=fn)
        return c

    for name, fn, help in (("run", cmd_run, "run (or resume) the stream in params.yaml"),
                           ("resume", cmd_resume, "rerun the last run started here; finished stages are cached")):
        pipeline(name, fn, help).add_argument("--quiet", action="store_true", help="no per-task progress lines")
    sw = pipeline("sweep", cmd_sweep, "run a grid of streams (a sweep file) sharing cached work")
    sw.add_argument("sweep", help="sweep file, e.g. sweeps/time-pairs.yaml")
    sw.add_argument("--workers", type=int, default=2, help="stream runs at once (default 2): threads, or the "
                    "worker processes of a local Dask cluster")
    runner_options(sw)
    pipeline("status", cmd_status, "which tasks and stages are done, and what runs next")
    lg = pipeline("lineage", cmd_lineage, "the tree a checkpoint (or an MLflow run's deployed model) was made from")
    lg.add_argument("target", nargs="?", help="checkpoint id or a unique prefix of one (as git takes them), or an "
                    "MLflow run id")
    lg.add_argument("--at", metavar="TIME", help="the model promoted at TIME (ISO 8601, or 'now'), from MLflow alone")
    df = pipeline("diff", cmd_diff, "what changed between two MLflow runs: config, data, metrics, lineage")
    df.add_argument("run_a", help="MLflow run id (the older run)")
    df.add_argument("run_b", help="MLflow run id (the newer run)")
    pipeline("update", cmd_update, "one continual update now: new data in update.incoming → train, merge, gate")
    wd = pipeline("withdraw", cmd_withdraw, "take a registered arrival back: the next update runs without it")
    wd.add_argument("name", help="the arrival's task name (as `update` printed it)")
    wd.add_argument("--reason", default="withdrawn by a user", help="why, kept in the arrivals record")
    pipeline("serve", cmd_serve, "serve the update flow as a Prefect deployment on the params schedule")
    ar = pipeline("arrive", cmd_arrive, "drop an embedded-benchmark dataset into update.incoming (a demo of new data)")
    ar.add_argument("dataset", help="an adaptation dataset of the embedded benchmark, e.g. letters-photo")
    data = sub.add_parser("data", help="your own datasets: chronomerge data add PATH --name NAME",
                          description="your own datasets: chronomerge data add PATH --name NAME")
    dsub = data.add_subparsers(dest="data_command", required=True)
    da = pipeline("add", cmd_data_add, "turn an image folder (a sub-folder per class) or a CSV/JSONL manifest into a "
                  "task dataset (under data.root)", parent=dsub)
    da.add_argument("path", help="image folder, or manifest .csv/.jsonl with columns path,label[,caption]")
    da.add_argument("--name", required=True, help="dataset name (under data.root)")
    da.add_argument(
        "--templates", nargs="+", metavar="TEMPLATE", help='zero-shot prompts with {c}, e.g. "a photo of a {c}."'
    )
    da.add_argument(
        "--test-fraction", type=float, default=0.2, help="share of each class held for testing (1: evaluation only)"
    )
    da.add_argument(
        "--image-size", type=int, help="store images at this square size (default: native, or 224 when sizes differ)"
    )
    ex = pipeline("export", cmd_export, "write a stored checkpoint as a plain open_clip checkpoint")
    ex.add_argument("checkpoint", help="checkpoint id or a unique prefix, or 'latest' for the promoted model")
    ex.add_argument("path", help="output file, ending in .safetensors")
    rp = pipeline("report", cmd_report, "plots and the metrics table of the last run's outputs")
    rp.add_argument("--reproduce", action="store_true",
                    help="run the papers' experiments over seeds and report whether their findings hold")
    rp.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="with --reproduce: the task orders (stream.seed) to run (default: 0 1 2)")
    rp.add_argument("--workers", type=int, default=2, help="with --reproduce: stream runs at once (default 2)")
    runner_options(rp, "with --reproduce: ")
    rp.add_argument("--opcm-lengths", type=int, nargs="+", metavar="T",
                    help="the OPCM setting's stream lengths (default: its Table 1's 8 14 20)")
    pipeline("prepare", cmd_prepare, "generate or check the datasets (DVC stage)")
    pipeline("pretrain", cmd_pretrain, "the base model θ0 (DVC stage)")
    core_cli.add_core_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.params_given = getattr(args, "params", None) is not None
    if hasattr(args, "params") and args.params is None and Path("params.yaml").exists():
        args.params = "params.yaml"
    reap_orphans()  # the Prefect servers of commands killed before they could stop them
    if args.debug:
        return args.fn(args)
    # Prefect's console logs (a failed task's traceback) stay off, the API still gets them; MLflow says
    # nothing of its database set-up. Our own lines say what happens.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    previous = signal.signal(signal.SIGINT, interrupted) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        return args.fn(args)
    except Exception as e:
        if args.debug:
            raise
        usage = isinstance(e, (ValueError, FileNotFoundError, KeyError)) and not isinstance(e, FAILURES)
        hint = "" if usage else " (--debug shows the traceback)"
        print(f"error: {error_line(e)}{hint}", file=sys.stderr)
        return 2 if usage else 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def error_line(e: BaseException) -> str:
    """One readable line: where it happened (a stage's task and name, from the exception's notes) and why."""
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
        # (safetensors reports a full disk as its own error, not as an OSError)
        where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
        return (f"no space left on device{where}: free some space (or set "
                "paths.store elsewhere) and rerun; every finished stage is kept and nothing was half-written")
    why = e.args[0] if isinstance(e, KeyError) and e.args else str(e) or type(e).__name__
    if not isinstance(e, (ValueError, FileNotFoundError, KeyError)):
        why = f"{type(e).__name__}: {why}"
    where = "; ".join(getattr(e, "__notes__", ()))
    return f"{where}: {why}" if where else why


if __name__ == "__main__":
    sys.exit(main())
