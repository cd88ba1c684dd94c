"""The sweep flow: a grid over the design space as parallel stream runs that share cached work.

A sweep file names a base (overrides of params.yaml) and a grid of fields to vary:

    name: time-pairs
    base: {}
    grid:
      strategy.init.mode: [zs, ft, ema, all]
      strategy.deploy.mode: [ft, ema, all]

Every point is a full stream run (`flows.stream.stream_flow`, its own MLflow parent run tagged
with the sweep) writing to `<outputs>/sweeps/<name>/<point>/`. Stage results are cached by content
and locked (tasks/cache.py), so points with the same init and training share their experts:
the same expert is never trained twice, even by two points running at once. The sweep ends with
a comparison table (`summary.md`, `summary.csv`) and TIME-style plots.

Points are Prefect tasks dispatched by the sweep flow's task runner (`task_runner`): threads of this
process (`threads`, the default), or the worker processes of a Dask cluster (`dask`, through
prefect-dask): a local one of `workers` processes, or an existing scheduler at `address`. A point
carries its config as JSON and names the project by an absolute path; a worker reaches the Prefect
API, the store and MLflow through the settings it is given (`worker_env`), never this process's memory.
A worker that dies mid-point has its point rerun by another (Dask reschedules it): the stages it
finished are cached and the training it was in resumes at its progress checkpoint.

GPUs: a worker offers the abstract resource `GPU: 1` per GPU it owns (`local_cluster`: one worker per
GPU of this machine, each seeing only its own through CUDA_VISIBLE_DEVICES; on a cluster of your own,
`dask worker --resources GPU=1`), and a point that trains on a GPU (`device: cuda`, or `auto` on a
local cluster with GPUs) asks for 1/K of one (`point_resources`, K = `per_gpu`, default 1), so CPU-only
workers never get a GPU point. Within a worker, K points run in threads and their training stages
take turns on the GPU (`chronomerge.train.gpu_slot`: a training holds it) while their merges and
evaluations share it. K = 1: a point has its GPU to itself.
"""
from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from chronomerge.config import Config, ConfigError, dotted, validate, with_values
from chronomerge.report import METRICS, SUMMARY, ZERO_SHOT, pct, scores_line
from chronomerge.store import atomic_write_bytes
from flows.stream import stream_flow
from tasks.locks import dask_worker
from tasks.tracking import Tracker


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read and check a sweep file: `name`, `base` (overrides), `grid` (field → list of values; empty:
    one point) and `same` (field → a grid field whose value it takes, e.g. both TIME axes' technique)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: no such sweep file")
    sweep = yaml.safe_load(p.read_text()) or {}
    unknown = sorted(set(sweep) - {"name", "base", "grid", "same"})
    if unknown:
        raise ConfigError(f"{p}: unknown field(s) {unknown}; allowed fields: ['base', 'grid', 'name', 'same']")
    grid = sweep.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{p}: grid must map each field to a non-empty list of values")
    same = sweep.get("same") or {}
    if not isinstance(same, dict) or not set(same.values()) <= set(grid):
        raise ConfigError(f"{p}: same must map fields to fields of the grid {sorted(grid)}")
    return {"name": str(sweep.get("name") or p.stem), "base": sweep.get("base") or {}, "grid": grid, "same": same}


def point_name(values: dict[str, Any]) -> str:
    """A point's display name from its grid values: `section.field=value` per field, comma-joined."""
    return ",".join(f"{'.'.join(f.split('.')[-2:])}={v}" for f, v in values.items())


def points(raw: dict, sweep: dict) -> list[tuple[dict, Config]]:
    """(grid values, validated config) for every point of the grid, outputs separated per point."""
    base = with_values(raw, dotted(sweep["base"]))
    fields = list(sweep["grid"])
    out = []
    for combo in itertools.product(*(sweep["grid"][f] for f in fields)):
        values = dict(zip(fields, combo))
        name = point_name(values)
        linked = {dst: values[src] for dst, src in sweep.get("same", {}).items()}
        cfg = validate(with_values(base, {**values, **linked}), f"sweep point {name}")
        folder = Path(cfg.paths.outputs) / "sweeps" / sweep["name"] / _slug(name)
        paths = cfg.paths.model_copy(update={"outputs": str(folder), "metrics": str(folder / "metrics.json")})
        out.append((values, cfg.model_copy(update={"paths": paths})))
    return out


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in name)


RUNNERS = ("threads", "dask")


def worker_env() -> dict[str, str]:
    """What a point needs to find in a worker process: the Prefect API and this project's Prefect home
    and result storage (as this process has them, from its environment or its settings context)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_RESULTS_LOCAL_STORAGE_PATH

    if not PREFECT_API_URL.value():
        raise ConfigError("--runner dask needs a Prefect server its workers can reach: set PREFECT_API_URL "
                          "(chronomerge sweep starts one when it is unset)")
    env = {k: v for k, v in os.environ.items() if k.startswith(("PREFECT_", "MLFLOW_", "CHRONOMERGE_"))}
    return env | {"PREFECT_API_URL": str(PREFECT_API_URL.value()), "PREFECT_HOME": str(PREFECT_HOME.value()),
                  "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value())}


def task_runner(runner: str, workers: int, address: str | None = None, gpus: int = 0,
                per_gpu: int = 1) -> TaskRunner:
    """The task runner that runs a sweep's points: `workers` threads, a local Dask cluster
    (`local_cluster`), or the Dask scheduler at `address` (whose workers are configured by their owner)."""
    if runner not in RUNNERS:
        raise ConfigError(f"--runner {runner!r} is not allowed; expected one of {', '.join(RUNNERS)}")
    if runner == "threads":
        if address or gpus:
            raise ConfigError(f"{'--address' if address else '--gpus'} is for Dask: use it with --runner dask")
        return ThreadPoolTaskRunner(max_workers=max(1, workers))
    from prefect_dask import DaskTaskRunner

    if address:
        if gpus:
            raise ConfigError("--gpus lays out a local cluster: the workers at --address offer their own GPUs")
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_class="distributed.SpecCluster", cluster_kwargs=local_cluster(workers, gpus, per_gpu))


def local_cluster(workers: int, gpus: int, per_gpu: int = 1) -> dict:
    """SpecCluster arguments for a local Dask cluster of max(workers, gpus) worker processes: the first
    `gpus` each own one GPU (CUDA_VISIBLE_DEVICES=i, resource GPU=1) and run `per_gpu` points at once
    in threads, the rest own none (CUDA_VISIBLE_DEVICES empty) and run one. Every worker gets
    `worker_env`."""
    from distributed import Nanny, Scheduler

    if gpus < 0 or workers < 1 or per_gpu < 1:
        raise ConfigError(f"--workers and --points-per-gpu must be >= 1 and --gpus >= 0 "
                          f"(got {workers}, {per_gpu} and {gpus})")
    env = worker_env()
    specs = {}
    for i in range(max(workers, gpus)):
        gpu = i < gpus
        specs[f"{'gpu' if gpu else 'cpu'}-{i}"] = {"cls": Nanny, "options": {
            "nthreads": per_gpu if gpu else 1, "env": {**env, "CUDA_VISIBLE_DEVICES": str(i) if gpu else ""},
            **({"resources": {"GPU": 1}} if gpu else {})}}
    return {"workers": specs, "scheduler": {"cls": Scheduler, "options": {"dashboard_address": None}}}


def local_gpus(runner: str, address: str | None, gpus: int | None) -> int:
    """The GPUs a sweep's local Dask cluster lays its workers on: `gpus` when given, else every GPU torch
    sees (0 for threads and for a scheduler at `address`, whose workers offer their own)."""
    if gpus is not None:
        return gpus
    return torch.cuda.device_count() if runner == "dask" and not address else 0


def point_resources(config: Config, runner: str, address: str | None, gpus: int, per_gpu: int = 1) -> dict:
    """What a point asks the Dask scheduler for: 1/`per_gpu` of a GPU when it trains on one (`device:
    cuda`, or `auto` on a local cluster with GPUs); nothing otherwise, and nothing on threads."""
    if runner != "dask":
        return {}
    wants = config.device == "cuda" or (config.device == "auto" and not address and gpus > 0)
    return {"GPU": 1 / per_gpu} if wants else {}


@task(name="sweep point", cache_policy=NO_CACHE, persist_result=False,
      task_run_name=lambda: f"point {point_name(__import__('prefect').runtime.task_run.parameters['values'])}")
def run_point(values: dict, config: dict, project: str, quiet: bool, tags: dict, threads: int) -> dict:
    """A point's run summary, or its error: a diverged configuration is a result, not the sweep's end.
    Runs wherever the task runner puts it; `config` is the point's params as JSON, `project` absolute.
    `threads`: torch's intra-op threads, the submitting process's: CPU results are bit-identical only
    at one thread count (a matmul's reductions split by thread), and a Dask worker's task thread
    otherwise runs torch on 1."""
    import tasks  # noqa: F401  (Prefect's environment defaults, in a fresh worker process)

    torch.set_num_threads(threads)

    name = point_name(values)
    where = {"chronomerge.point": name, "chronomerge.worker": os.uname().nodename, **_dask_worker()}
    try:
        summary = stream_flow(validate(config, f"sweep point {name}"), project=project, quiet=quiet,
                              tags={**tags, **where})
    except Exception as e:
        return {"point": name, "values": values, "error": f"{type(e).__name__}: {e}"}
    return {"point": name, "values": values, **summary}


def _dask_worker() -> dict:
    """MLflow tags naming the Dask worker running this point and the GPUs it sees (none off Dask)."""
    if (worker := dask_worker()) is None:
        return {}
    return {"chronomerge.dask_worker": worker.name if isinstance(worker.name, str) else worker.address,
            "chronomerge.cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}


def sweep_flow(raw: dict, sweep: dict, project: str = ".", workers: int = 2, quiet: bool = True,
               runs: list[tuple[dict, Config]] | None = None, runner: str = "threads",
               address: str | None = None, gpus: int | None = None, per_gpu: int = 1) -> dict:
    """Run every point of `sweep` over the raw params `raw`; returns the comparison summary.
    `runs` are the sweep's `points`, when the caller has validated them already; `runner`, `workers`,
    `address`, `gpus` and `per_gpu` say where the points run (`task_runner`, `point_resources`)."""
    runs = points(raw, sweep) if runs is None else runs
    gpus = local_gpus(runner, address, gpus)
    resources = [point_resources(config, runner, address, gpus, per_gpu) for _, config in runs]
    with environment_kept():
        return _sweep.with_options(task_runner=task_runner(runner, workers, address, gpus, per_gpu))(
            raw, sweep, project, quiet, runs, resources)


@contextlib.contextmanager
def environment_kept():
    """Put this process's environment back as it was: a local Dask cluster's nannies write their workers'
    pre-spawn variables (OMP_NUM_THREADS=1, MKL_NUM_THREADS=1, PYTHONHASHSEED, ...) into the *parent's*
    `os.environ` before each spawn, and every later subprocess would inherit them (a CLI run on 1 torch
    thread trains different last bits)."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@flow(name="chronomerge-sweep", validate_parameters=False)
def _sweep(raw: dict, sweep: dict, project: str, quiet: bool, runs: list[tuple[dict, Config]],
           resources: list[dict]) -> dict:
    import dask

    t0 = time.perf_counter()
    first = runs[0][1]  # every point is validated before any runs
    Tracker(first.tracking.mlflow_uri, first.tracking.experiment, first.tracking.enabled)  # experiment made once
    tags = {"chronomerge.sweep": sweep["name"]}
    where = str(Path(project).resolve())
    threads = torch.get_num_threads()
    futures = []
    for (values, config), asks in zip(runs, resources):
        with dask.annotate(resources=asks) if asks else contextlib.nullcontext():
            futures.append(run_point.submit(values, config.to_dict(), where, quiet, tags, threads))
    outcomes = [f.result() for f in futures]
    wall = time.perf_counter() - t0
    done = [(o, config) for o, (_, config) in zip(outcomes, runs) if "error" not in o]
    failed = [o for o in outcomes if "error" in o]
    trained = sum(s["status"] == "computed" for r, _ in done for s in r["stages"] if s["stage"] == "train")
    requested = sum(1 for r, _ in done for s in r["stages"] if s["stage"] == "train")
    summary = {"sweep": sweep["name"], "points": len(outcomes), "wall_seconds": wall,
               "train_stages": requested, "trainings_run": trained, "trainings_shared": requested - trained,
               "results": [{"point": r["point"], "values": r["values"], "deployed": r["deployed"],
                            "run_id": r["run_id"], "outputs": str(Path(project) / config.paths.outputs),
                            "base": r["base"], "matrix": r["matrix"], "scores": r["scores"],
                            "zero_shot": r["zero_shot"], **r["final"]}
                           for r, config in done],
               "failed": failed}
    folder = Path(project) / validate(raw).paths.outputs / "sweeps" / sweep["name"]
    write_sweep_outputs(summary, folder)
    return summary


def write_sweep_outputs(summary: dict, folder: Path) -> list[Path]:
    """summary.json, summary.csv, summary.md and plots/{curves,final_gm}.png under `folder`.

    Every point is set against its own zero-shot reference (θ0 on the point's evaluation sets, the
    stream summary's `zero_shot`): points of one task order share it, points of several differ.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rank = _rank_metric(summary)
    rows = sorted(summary["results"], key=lambda r: -r[rank])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["point", *METRICS, *(f"zero_shot_{m}" for m in ZERO_SHOT), "deployed"])
    for r in rows:
        w.writerow([r["point"], *(_csv(r[m]) for m in METRICS), *(_csv(r["zero_shot"][m]) for m in ZERO_SHOT),
                    r["deployed"]])
    atomic_write_bytes(folder / "summary.csv", buf.getvalue().encode())
    atomic_write_bytes(folder / "summary.json", json.dumps(summary, indent=1).encode())
    lines = [f"# sweep {summary['sweep']}: {summary['points']} runs in {summary['wall_seconds']:.0f} s", "",
             f"Train stages: {summary['train_stages']} requested, {summary['trainings_run']} run, "
             f"{summary['trainings_shared']} shared through the cache.", "",
             "| point | " + " | ".join(METRICS) + f" | {rank} − zero-shot |", "|---" * (len(METRICS) + 2) + "|"]
    lines += [f"| {r['point']} | " + " | ".join(pct(r[m]) for m in METRICS) + f" | {_points(r, rank)} |" for r in rows]
    references = {json.dumps(r["zero_shot"], sort_keys=True) for r in rows}
    if len(references) == 1:
        lines += ["", f"Zero-shot θ0 on the same sets: {scores_line(rows[0]['zero_shot'], ZERO_SHOT)}. "
                  f"{sum(r[rank] > r['zero_shot'][rank] for r in rows)} of {len(rows)} points end above it in {rank}."]
    elif rows:
        lines += ["", f"Each point against θ0 on its own sets (they differ: other tasks or orders); "
                  f"{sum(r[rank] > r['zero_shot'][rank] for r in rows)} of {len(rows)} end above it in {rank}."]
    if summary["failed"]:
        lines += ["", f"{len(summary['failed'])} point(s) failed:", ""]
        lines += [f"- {f['point']}: {f['error']}" for f in summary["failed"]]
    atomic_write_bytes(folder / "summary.md", ("\n".join(lines) + "\n").encode())
    return [folder / "summary.csv", folder / "summary.json", folder / "summary.md", *_plots(summary, folder)]


def _csv(x: float | None) -> str:
    return "" if x is None else f"{x:.6f}"


def _points(r: dict, metric: str) -> str:
    """A point's `metric` minus its zero-shot reference's, in signed points (`+1.2`, `−3.8`)."""
    d = 100 * (r[metric] - r["zero_shot"][metric])
    return f"{'+' if d >= 0 else '−'}{abs(d):.1f}"


def _rank_metric(summary: dict) -> str:
    """GM ranks the points; without held-out sets (GM absent) A_KA does."""
    return "GM" if all(r["GM"] is not None for r in summary["results"]) else "A_KA"


def _plots(summary: dict, folder: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from chronomerge.report import _save

    (folder / "plots").mkdir(exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharex=True)
    for r in summary["results"]:
        steps = json.loads((Path(r["outputs"]) / "history.json").read_text())["steps"]
        for ax, m in zip(axes, SUMMARY):
            ax.plot([s["t"] for s in steps], [float("nan") if s[m] is None else 100 * s[m] for s in steps],
                    label=r["point"], lw=1.2)
    shared = {json.dumps(r["zero_shot"], sort_keys=True) for r in summary["results"]}
    for ax, m in zip(axes, SUMMARY):
        if len(shared) == 1 and summary["results"][0]["zero_shot"][m] is not None:
            ax.axhline(100 * summary["results"][0]["zero_shot"][m], color="0.3", ls="--", lw=1, label="zero-shot θ0")
        ax.set_title(m)
        ax.set_xlabel("task t (1-based)")
        ax.set_ylabel(f"{m} (%)")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    curves = folder / "plots" / "curves.png"
    _save(fig, curves)
    rank = _rank_metric(summary)
    rows = sorted(summary["results"], key=lambda r: r[rank])
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(rows) + 1.2))
    ax.barh([r["point"] for r in rows], [100 * r[rank] for r in rows])
    ax.scatter([100 * r["zero_shot"][rank] for r in rows], [r["point"] for r in rows], marker="|", s=220,
               color="0.1", zorder=3, label="zero-shot θ0 (its own sets)")
    ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1, 1), frameon=False, borderaxespad=0.2)
    ax.set_xlabel(f"final {rank} (%)")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    bars = folder / "plots" / "final_gm.png"
    _save(fig, bars)
    plt.close("all")
    return [curves, bars]
