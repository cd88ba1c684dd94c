"""The stream flow: for t = 1..T, init → train → store → deploy → eval (TIME, Sec. 3).

Each stage is a cached Prefect task (`tasks/`) keyed by content, so rerunning the same command
after a crash resumes where it stopped, and a changed setting reruns only the stages it feeds.
Only checkpoint ids, digests and metric dicts travel between stages. Every run is logged to
MLflow (`tasks.tracking`); results land in `paths.outputs` and `paths.metrics`.

    from flows.stream import stream_flow
    summary = stream_flow(load_config("params.yaml"))      # or `chronomerge run`
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import prefect.runtime
from prefect import flow
from prefect.context import FlowRunContext
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH
from prefect.transactions import BaseTransaction

from chronomerge.config import Config, ConfigError
from chronomerge.data.streams import multitask
from chronomerge.evaluate import acc_bwt
from chronomerge.lineage import experts_in
from chronomerge.models import architecture
from chronomerge.report import METRICS, SUMMARY, pct, scores_line, task_vector_cosines, write_report, write_results
from chronomerge.stages import Workspace, build_tasks, evaluation_sets, resolve_device, task_digest
from chronomerge.store import CheckpointStore, atomic_write_bytes, remove_stale_temps
from tasks.cache import refuse_unsafe_records
from tasks.deploy import deploy
from tasks.evaluate import evaluate
from tasks.init import init
from tasks.prepare import base, prepare
from tasks.store import store
from tasks.tracking import Tracker, check_database, git_commit, id_list_tags, run_link
from tasks.train import train

STAGES = ("init", "train", "store", "deploy", "eval")
ID_FIELDS = ("base", "init", "expert", "fisher", "deployed", "state")
# What each stage's result holds at least (`chronomerge.stages.run_*`); a cached record without it is recomputed.
STAGE_KEYS = {"base": ("base",), "init": ("init",), "train": ("expert",), "store": ("experts", "fishers"),
              "deploy": ("deployed",), "eval": ("scores", "row")}
STREAM_SECTIONS = ("model", "data", "pretrain", "stream", "eval", "strategy", "train")
LAST_RUN = Path(".chronomerge") / "last-run.json"


def stream_key(cfg: Config) -> str:
    """Identity of a stream: every section that determines its checkpoints and metrics."""
    return cfg.digest(*STREAM_SECTIONS)


def stream_title(cfg: Config) -> str:
    """What a stream is, in words: its tasks and its strategy (the report's title, the MLflow run's name)."""
    d = cfg.strategy.deploy
    deploy = f"continual/{d.merger}" if d.mode == "continual" else f"{d.mode}/{d.technique}"
    # the strategy first: it is what tells runs of one project apart (the MLflow UI cuts long names)
    return (f"init {cfg.strategy.init.mode}/{cfg.strategy.init.technique}, deploy {deploy} · "
            f"{cfg.stream.kind} × {cfg.stream.length}{' (multitask)' if cfg.stream.multitask else ''}")


def workspace(cfg: Config, project: Path, progress: bool = False) -> Workspace:
    r = cfg.resume
    return Workspace(store=str(project / cfg.paths.store), data=str(project / cfg.data.root),
                     device=resolve_device(cfg.device), progress=progress,
                     resume=(r.every_seconds, r.every_steps, r.keep))


def check(cfg: Config) -> tuple[dict, dict[str, list[str]]]:
    """Everything about a config that needs more than its schema, checked before any work: the
    output folders, the MLflow database, the architecture (`model.name`, `model.pretrained`), the
    evaluation sets (`eval.held_out`) and the experts' files. Returns (architecture, evaluation
    sets); raises `ConfigError` naming the field."""
    from chronomerge.checkpoints import CheckpointError, read_checkpoint

    for field in ("store", "outputs"):
        path = Path(getattr(cfg.paths, field))
        if path.exists() and not path.is_dir():
            raise ConfigError(f"paths.{field}: {path} is a file; expected a folder (made when missing)")
    if cfg.tracking.enabled:
        try:
            check_database(cfg.tracking.mlflow_uri)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    arch = architecture(cfg.model.name, cfg.model.pretrained)
    try:
        sets = evaluation_sets(cfg.stream.model_dump(mode="json"), cfg.eval.held_out)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    field = "experts" if cfg.stream.kind == "experts" else "tasks"
    for i, e in enumerate(getattr(cfg.stream, field)):
        try:
            if not isinstance(e, str):
                read_checkpoint(e.path)
        except CheckpointError as err:
            raise ConfigError(f"stream.{field}.{i}.path: {err}") from None
    return arch, sets


def prepare_inputs(cfg: Config, ws: Workspace, sets: Mapping[str, list[str]]) -> dict[str, str]:
    """Every dataset (and expert file) the stream reads, made or checked, with its digest: a task run
    inside a flow, the plain function outside one (`chronomerge prepare`, where a task run's log
    lines have no flow run to go to and Prefect warns about each)."""
    run = prepare if FlowRunContext.get() else prepare.fn
    return run(ws, cfg.data.model_dump(mode="json"), bool(cfg.model.pretrained),
               [*sets["adaptation"], *sets["held_out"]], cfg.stream.expert_paths)


def _untrusted(store: CheckpointStore, out: Any, keys: Sequence[str] = ()) -> bool:
    """Whether a cached result is not a stage's output (a record of another shape: not a dict, or
    without the stage's `keys`) or names a checkpoint that is missing or fails verification."""
    if not isinstance(out, dict) or not all(k in out for k in (*keys, "seconds")):
        return True
    try:
        ids = [out[k] for k in ID_FIELDS if k in out] + list(out.get("experts", [])) + list(out.get("fishers", []))
        return not all(store.intact(i) for i in ids if i is not None)  # an imported expert has no Fisher
    except (TypeError, ValueError, AttributeError):  # not a dict, or an id that is not a checkpoint id
        return True


def run_stage(stage_task, ws: Workspace, /, **inputs) -> tuple[dict, str]:
    """Run a stage task on its named inputs; returns (output, 'computed' | 'cached').

    A cached result that names a checkpoint missing from the store (a deleted or replaced store) or
    failing verification (a corrupt file) is recomputed rather than trusted; the recomputation's
    `put` replaces the corrupt object.
    """
    state = stage_task(ws, **inputs, return_state=True)
    out = state.result()
    cached = state.name == "Cached"
    if cached and _untrusted(ws.checkpoints, out, STAGE_KEYS.get(stage_task.name, ())):
        state = stage_task.with_options(refresh_cache=True)(ws, **inputs, return_state=True)
        out, cached = state.result(), False
    return out, "cached" if cached else "computed"


@contextlib.contextmanager
def outside_transaction():
    """Run the body with no active Prefect transaction, so that each stage task commits when it returns.

    When a stream runs inside a Prefect task (a sweep point, or a user's own task), Prefect makes that
    task's transaction the parent of every transaction opened inside it, and a child commits, which
    writes its result record and releases its stage lock, only when the parent does. A sweep point's
    stages would hold their locks until the whole point ended: two points each waiting for a stage the
    other had finished deadlocked (seen in `chronomerge report --reproduce`), and a point killed midway
    lost the records of every stage it had finished. Prefect offers no public way to start a root
    transaction inside a task: this resets the context variable its `get_transaction()` reads."""
    token = BaseTransaction.__var__.set(None)
    try:
        yield
    finally:
        BaseTransaction.__var__.reset(token)


class _NotRun(Exception):
    """The runner did not run a stage (`status` walks only what is cached): the walk stops there."""


@flow(name="chronomerge-stream", validate_parameters=False,
      flow_run_name=lambda: stream_title(prefect.runtime.flow_run.parameters["cfg"]))
def stream_flow(cfg: Config, project: str = ".", quiet: bool = False, tags: dict | None = None) -> dict:
    """Run (or resume) the stream that the validated params `cfg` describe; returns its summary.
    `tags` are added to the MLflow parent run (a sweep names itself and the point)."""
    t_start = time.perf_counter()
    echo = (lambda s: None) if quiet else (lambda s: print(s, flush=True))
    arch, sets = check(cfg)  # before anything is written or started
    for line in refuse_unsafe_records(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value()):
        print(f"warning: {line}", file=sys.stderr, flush=True)
    root = Path(project)
    remove_stale_temps(root / LAST_RUN.parent, root / cfg.paths.outputs)  # left by a killed command
    c = cfg.to_dict()
    key = stream_key(cfg)
    ws = workspace(cfg, root, progress=not quiet)
    (root / LAST_RUN).parent.mkdir(exist_ok=True)
    atomic_write_bytes(root / LAST_RUN, json.dumps(c, indent=1).encode())
    tracker = Tracker(cfg.tracking.mlflow_uri, cfg.tracking.experiment, cfg.tracking.enabled)
    stale = tracker.mark_stale(key)
    if stale:
        echo(f"marked {len(stale)} MLflow run(s) of an interrupted run of this stream as KILLED")
    commit = git_commit(root)
    with outside_transaction():  # every stage task below commits as it returns, inside a task or not
        digests = prepare_inputs(cfg, ws, sets)
        tracker.start(key, c, cfg.digest(), commit, {n: d for n, d in digests.items() if not n.startswith("expert:")},
                      ws.data, stale, tags or {}, name=stream_title(cfg))
        try:
            summary = _run_tasks(cfg, ws, key, digests, tracker, commit, echo, arch, sets)
        except BaseException as e:
            tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED",
                           tags={"chronomerge.error": f"{type(e).__name__}: {e}"[:4000]})
            raise
    history = summary.pop("history")
    paths = write_results(history, root / cfg.paths.outputs, root / cfg.paths.metrics)
    paths += write_report(history, root / cfg.paths.outputs)
    summary["wall_seconds"] = time.perf_counter() - t_start
    summary["overhead_seconds"] = summary["wall_seconds"] - summary["compute_seconds"]
    tracker.finish("FINISHED", paths, {"lineage.deployed": summary["deployed"],
                                       "chronomerge.overhead_seconds": f"{summary['overhead_seconds']:.2f}"},
                   {"base/resumed_steps": summary["base_resumed_steps"],
                    **{f"zero_shot/{k}": v for k, v in summary["zero_shot"].items() if v is not None}})
    summary["run_id"] = tracker.parent
    _summary_artifact(cfg, key, summary)
    return summary


def _summary_artifact(cfg: Config, key: str, summary: dict) -> None:
    """The stream's outcome on its Prefect flow run (the UI's Artifacts tab): final metrics, deployed id."""
    from prefect.artifacts import create_markdown_artifact

    f, z, title = summary["final"], summary["zero_shot"], stream_title(cfg)
    rows = "\n".join(f"| {k} | {pct(f[k], 2)} | {pct(z.get(k), 2)} |" for k in METRICS)
    create_markdown_artifact(
        key=f"stream-{key[:16]}", description=title,
        markdown=f"# {title}\n\n| metric | deployed, % | zero-shot θ0, % |\n|---|---|---|\n{rows}\n\n"
                 f"deployed: `{summary['deployed']}`  \nMLflow run: `{summary['run_id']}`  \n"
                 f"{sum(s['status'] == 'cached' for s in summary['stages'])}/{len(summary['stages'])} stages cached, "
                 f"{summary['wall_seconds']:.1f} s")


def walk(cfg: Config, ws: Workspace, digests: dict, arch: dict, sets: dict, runner=run_stage):
    """The stream's stages in order, each through `runner(stage_task, ws, **inputs) -> (output, status)`.

    Yields ("base", output, status) once, then one (task, outputs, statuses) per step t, the
    outputs and statuses keyed by stage name. Stops early when `runner` returns None (`status` uses
    this to walk the cache without computing). `arch` and `sets` are what `check(cfg)` returns.
    """
    c = cfg.to_dict()
    got = runner(base, ws, arch=arch, model=c["model"], pretrain=c["pretrain"], data=c["data"])
    if got is None:
        return
    yield "base", *got
    theta0 = got[0]["base"]
    stream = build_tasks(c["stream"])
    train_cfg = c["train"]
    if cfg.stream.multitask:  # one task, all the data, the stream's whole training budget
        stream = [dataclasses.replace(multitask(stream), index=0)]
        train_cfg = {**train_cfg, "steps": train_cfg["steps"] * cfg.stream.length}
    eval_digests = _eval_digests(digests, sets)
    storage: dict[str, list] = {"experts": [], "fishers": []}  # the store S: experts so far, their Fishers
    prev_init = prev_deploy = prev_state = None
    for t, task in enumerate(stream, 1):
        outs: dict[str, dict] = {}
        status: dict[str, str] = {}

        def run(name: str, stage_task, /, **inputs) -> dict:
            try:
                got = runner(stage_task, ws, **inputs)
            except Exception as e:  # say once where it happened: the CLI prints it before the reason
                e.add_note(f"task {t}/{len(stream)} {task.name}, stage {name}")
                raise
            if got is None:
                raise _NotRun
            outs[name], status[name] = got
            return got[0]

        try:
            initialized = run("init", init, spec=c["strategy"]["init"], base=theta0, experts=storage["experts"],
                              previous=prev_init)
            trained = run("train", train, cfg=train_cfg, arch=arch, task=task.to_dict(), init=initialized["init"],
                          data_digest=task_digest(task, digests), base=theta0,
                          previous_tasks=[x.to_dict() for x in stream[:t - 1]] if cfg.train.replay_previous else [])
            stored = run("store", store, storage=storage, expert=trained["expert"], fisher=trained["fisher"])
            deployed = run("deploy", deploy, spec=c["strategy"]["deploy"], arch=arch, base=theta0,
                           experts=stored["experts"], fishers=stored["fishers"], previous=prev_deploy,
                           previous_state=prev_state, task=task.to_dict())
            run("eval", evaluate, arch=arch, deployed=deployed["deployed"], tasks=[x.to_dict() for x in stream[:t]],
                sets=sets, digests=eval_digests)
        except _NotRun:
            yield task, outs, status
            return
        yield task, outs, status
        storage = {"experts": stored["experts"], "fishers": stored["fishers"]}
        prev_init, prev_deploy, prev_state = initialized["init"], deployed["deployed"], deployed.get("state")


def _eval_digests(digests: Mapping[str, str], sets: Mapping[str, list[str]]) -> dict[str, str]:
    """The digests of the evaluation sets: part of every eval stage's cache key."""
    return {n: digests[n] for n in [*sets["adaptation"], *sets["held_out"]]}


def zero_shot(ws: Workspace, arch: dict, theta0: str, tasks: Sequence, sets: dict,
              digests: dict) -> tuple[dict, float]:
    """θ0 scored as the deployed models are (the eval stage, cached): the stream's zero-shot reference,
    and the seconds spent computing it (0 when cached).

    A_KA, A_ZS and GM are over every evaluation set, so θ0's are the same after every task; ACC is θ0's
    mean over the test splits of the stream's tasks (its accuracy-matrix row after the last task).
    """
    out, status = run_stage(evaluate.with_options(task_run_name="eval zero-shot θ0"), ws, arch=arch, deployed=theta0,
                            tasks=[x.to_dict() for x in tasks], sets=sets, digests=_eval_digests(digests, sets))
    row = [v for v in out["row"] if v is not None]
    reference = {**{k: out[k] for k in SUMMARY}, "ACC": float(sum(row) / len(row)) if row else None}
    return reference, out["seconds"] if status == "computed" else 0.0


def _run_tasks(cfg: Config, ws: Workspace, key: str, digests: dict, tracker: Tracker,
               commit: str, echo: Callable[[str], None], arch: dict, sets: dict) -> dict:
    steps, stages, rows = [], [], []
    compute = 0.0
    c = cfg.to_dict()
    length = 1 if cfg.stream.multitask else cfg.stream.length
    walker = walk(cfg, ws, digests, arch, sets)
    _, base_out, base_status = next(walker)
    theta0 = base_out["base"]
    if base_status == "computed":
        compute += base_out["seconds"]
    base_resumed = base_out.get("resumed_steps", 0)  # records made before progress checkpoints lack it
    produced_by: dict[str, tuple[str, str]] = {}  # checkpoint id -> (MLflow task run, its name)
    started = time.time()
    tasks = []
    for t, (task, outs, status) in enumerate(walker, 1):
        tasks.append(task)
        span, started = (started, time.time()), time.time()
        seconds = {name: outs[name]["seconds"] for name in STAGES}
        compute += sum(seconds[n] for n in STAGES if status[n] == "computed")
        stages += [{"t": t, "stage": n, "status": status[n]} for n in STAGES]
        rows.append(outs["eval"]["row"])
        e_out = outs["eval"]
        ids = {"init": outs["init"]["init"], "expert": outs["train"]["expert"], "fisher": outs["train"]["fisher"],
               "deployed": outs["deploy"]["deployed"]}
        step = {"t": t, "task": task.name, "A_KA": e_out["A_KA"], "A_ZS": e_out["A_ZS"], "GM": e_out["GM"],
                **acc_bwt(rows), "scores": e_out["scores"], "row": e_out["row"], "checkpoints": ids,
                "seconds": seconds, "status": status, "loss": outs["train"]["loss"],
                "data_digest": task_digest(task, digests), "lambda": outs["deploy"].get("lambda"),
                "resumed_steps": outs["train"].get("resumed_steps", 0)}
        steps.append(step)
        params = {"task": task.name, "t": t, "datasets": ",".join(task.datasets), "init": c["strategy"]["init"],
                  "deploy": c["strategy"]["deploy"], "train": c["train"]}
        rid = _log_task(tracker, ws, step, span, params, theta0, commit, {n: digests[n] for n in task.datasets},
                        produced_by)
        for k in ("expert", "deployed"):
            produced_by.setdefault(ids[k], (rid, task.name))
        started = time.time()
        echo(f"[{t:>3}/{length}] {task.name:34s} " + " ".join(
            f"{s}:{'·' if status[s] == 'cached' else f'{seconds[s]:.1f}s'}" for s in STAGES)
            + "  " + scores_line(step, SUMMARY))
    title = stream_title(cfg)
    experts = [s["checkpoints"]["expert"] for s in steps]
    reference, seconds = zero_shot(ws, arch, theta0, tasks, sets, digests)
    compute += seconds
    history = {"title": title, "stream_key": key, "base": theta0, "commit": commit, "steps": steps,
               "zero_shot": reference, "task_vector_cosine": task_vector_cosines(ws.checkpoints, theta0, experts)}
    return {"deployed": steps[-1]["checkpoints"]["deployed"], "stream_key": key, "base": theta0,
            "stages": stages, "compute_seconds": compute, "history": history, "matrix": rows,
            "scores": steps[-1]["scores"], "base_resumed_steps": base_resumed,
            "final": {k: steps[-1][k] for k in METRICS}, "zero_shot": reference}


def _log_task(tracker: Tracker, ws: Workspace, step: dict, span: tuple[float, float], params: dict, theta0: str,
              commit: str, datasets: dict, produced_by: dict[str, tuple[str, str]]) -> str | None:
    store_ = ws.checkpoints
    ids = step["checkpoints"]
    made_of = experts_in(store_, ids["deployed"])
    tags = {f"lineage.{k}": v for k, v in ids.items()}
    for k in ("init", "expert", "deployed"):
        tags.update(id_list_tags(f"lineage.{k}.parents", store_.meta(ids[k])["parents"]))
    # What the deployed model is made of: `chronomerge lineage --at` answers from MLflow alone.
    tags.update(id_list_tags("lineage.made_of", made_of))
    source = store_.meta(ids["expert"])["extra"]
    if "source" in source:  # an expert trained elsewhere: where it came from
        tags.update({f"lineage.expert.{k}": str(source[k]) for k in ("source", "source_digest", "format")})
    tags.update({"lineage.base": theta0, "lineage.data": step["data_digest"], "git.commit": commit,
                 **{f"stage.{s}": v for s, v in step["status"].items()}})
    metrics = {k: step[k] for k in (*METRICS, "loss") if step[k] is not None}
    metrics["train/resumed_steps"] = step["resumed_steps"]  # steps a killed training did not redo
    metrics.update({f"acc/{n}": v for n, v in step["scores"].items()})
    metrics.update({f"time/{s}": v for s, v in step["seconds"].items()})
    if step["lambda"] is not None:
        metrics.update({"opcm/lambda": step["lambda"], "opcm/sqrt_t": math.sqrt(step["t"])})
    parent = {k: step[k] for k in METRICS if step[k] is not None}
    parent.update({k: v for k, v in metrics.items() if k.startswith("opcm/")})
    parent.update({f"time/{s}": v for s, v in step["seconds"].items()})
    note = _lineage_note(tracker, ids, made_of, produced_by, step["status"])
    return tracker.log_task(step["t"], step["task"], span, params, metrics, parent, tags, datasets, ws.data, note)


def _lineage_note(tracker: Tracker, ids: dict, made_of: list[str], produced_by: dict, status: dict) -> str:
    """The task run's description: what its deployed model is made of, each expert linked to the run of
    this stream that trained it (the UI shows the first lines folded, so they come first)."""
    if not tracker.enabled:
        return ""

    def ref(oid: str) -> str:
        got = produced_by.get(oid)
        if got is None:
            return f"`{oid[:16]}` (this run)" if oid == ids["expert"] else f"`{oid[:16]}`"
        return f"[{got[1]}]({run_link(tracker.experiment_id, got[0])}) `{oid[:16]}`"

    return "\n".join([
        f"**Deployed `{ids['deployed'][:16]}`, made of {len(made_of)} expert(s):** " + ", ".join(map(ref, made_of)),
        "", f"init {ref(ids['init'])} · expert `{ids['expert'][:16]}` ({status['train']}) · "
            "full ids in the `lineage.*` tags; `chronomerge lineage <id>` takes any unique prefix"])
