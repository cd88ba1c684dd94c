"""The one place that talks to MLflow: one parent run per stream, one nested run per task t.

* Parent run: params = the whole validated config (flattened), tags = stream key, config digest,
  git commit, pid and host; metrics per step t (A_KA, A_ZS, GM, ACC, BWT, stage timings);
  artifacts = metrics JSON, history, plots, report. Every dataset is logged as an input with its digest.
* Task run t, named after its task, from the task's first stage to its last (a cached task takes
  milliseconds): params = what the task ran (task, datasets, init and deploy spec, training recipe);
  metrics (A_KA, A_ZS, GM, per-dataset scores, timings, final train loss); the task's data as an
  input; lineage tags: init, expert, Fisher and deployed checkpoint ids, their parents, the task's
  data digest, the git commit; `stage.<name>` = computed | cached; and a description (the UI's
  "Description" box) linking the runs that produced its init and the experts it is made of.
* Scores are fractions (0-1) in every metric, as in every file chronomerge writes.
* Every checkpoint id in a tag is the full 64-hex id (MLflow's search finds what the terminal
  prints); a list of ids longer than one tag holds continues in `<key>.2`, `<key>.3`, ….
* A parent run of the same stream left RUNNING by a process that no longer exists (SIGKILL) is
  marked KILLED, with its task runs, when the stream starts again.
Runs are addressed by id through `MlflowClient`, never through the thread-local active run.

`Audit` answers from MLflow alone, so its answers hold after the local store is gone:
* `deployed_at`: the model version promoted last at or before a time (the registered model's
  versions are created at promotion, `flows/update.py`).
* `made_of`: which experts, trained on which data, a deployed checkpoint is made of: the task run
  that deployed it carries `lineage.made_of` (the experts' ids), and each expert's
  task run carries its task, data digest and dataset inputs.
* `diff`: what changed between two runs in config (params), data (dataset inputs, lineage data
  digests) and metrics.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sqlite3
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import DatasetInput, InputTag, Metric, Param, Run, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from chronomerge import faults
from chronomerge.config import dotted
from chronomerge.store import pid_alive

STREAM_TAG = "chronomerge.stream_key"
_IDS_PER_TAG = 8000 // 65  # 64-hex ids and a comma in MLflow's 8,000-character tag value


def id_list_tags(key: str, ids: list[str]) -> dict[str, str]:
    """`{key: "id,id,…", key.2: …}`: a list of full ids over as many tags as it needs."""
    chunks = [ids[i:i + _IDS_PER_TAG] for i in range(0, len(ids), _IDS_PER_TAG)] or [[]]
    return {key if i == 0 else f"{key}.{i + 1}": ",".join(c) for i, c in enumerate(chunks)}


def read_id_list(tags: Mapping[str, str], key: str) -> list[str]:
    """The ids `id_list_tags` wrote under `key`."""
    out, i = [], 1
    while (value := tags.get(key if i == 1 else f"{key}.{i}")) is not None:
        out += filter(None, value.split(","))
        i += 1
    return out


def run_link(experiment_id: str, run_id: str) -> str:
    """The MLflow UI's address of a run, relative to the UI's root (a link in a run's description)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def _sqlite_file(uri: str) -> Path | None:
    """The database file of an SQLite tracking URI (`sqlite:///mlflow.db`), or None for other URIs."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def _sqlite_setup_lock(uri: str):
    """Hold an flock beside a SQLite tracking database while MLflow creates its schema and the
    experiment: two runs starting at once in a fresh project would both create the tables (`table …
    already exists`). Released if the process dies. Other tracking URIs need no lock."""
    db = _sqlite_file(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".setup-lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_database(uri: str) -> None:
    """Raise a ValueError naming `tracking.mlflow_uri` when it is an SQLite file that is not a readable
    database (garbage or truncated): MLflow would fail with a traceback deep inside a run."""
    db = _sqlite_file(uri)
    if db is None or not db.is_file() or db.stat().st_size == 0:
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            verdict = con.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as e:
        verdict = str(e)
    if verdict != "ok":
        raise ValueError(f"tracking.mlflow_uri: {db} is not a readable SQLite database ({verdict}); move it aside "
                         "to start a new one, or point tracking.mlflow_uri at another")


def git_commit(root: str | os.PathLike = ".") -> str:
    """The project's git commit (with `+dirty` when tracked files changed), or 'unknown'."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


class Tracker:
    """MLflow logging of one stream run; every method is a no-op when tracking is disabled."""

    def __init__(self, uri: str, experiment: str, enabled: bool = True):
        self.enabled = enabled
        self.uri = uri
        self.parent: str | None = None
        if not enabled:
            return
        with _sqlite_setup_lock(uri):
            self.client = MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(experiment)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)

    # -- stream ------------------------------------------------------------------------------
    def mark_stale(self, stream_key: str) -> list[str]:
        """Mark runs of this stream left RUNNING by dead processes on this host as KILLED."""
        if not self.enabled:
            return []
        host = socket.gethostname()
        stale = []
        for run in self.client.search_runs([self.experiment_id], f"tags.`{STREAM_TAG}` = '{stream_key}' "
                                                                  "and attributes.status = 'RUNNING'"):
            tags = run.data.tags
            if tags.get("chronomerge.host") == host and not pid_alive(int(tags.get("chronomerge.pid", "0"))):
                stale.append(run.info.run_id)
        for rid in stale:
            children = self.client.search_runs([self.experiment_id], f"tags.`mlflow.parentRunId` = '{rid}'")
            for r in [*children, self.client.get_run(rid)]:
                if r.info.status == "RUNNING":
                    self.client.set_terminated(r.info.run_id, "KILLED")
        return stale

    def start(self, stream_key: str, config: Mapping[str, Any], config_digest: str, commit: str,
              digests: Mapping[str, str], data_root: str, resumed_from: list[str],
              extra_tags: Mapping[str, str] | None = None, name: str | None = None) -> str | None:
        if not self.enabled:
            return None
        tags = {STREAM_TAG: stream_key, "chronomerge.config_digest": config_digest,
                "chronomerge.pid": str(os.getpid()), "chronomerge.host": socket.gethostname(),
                "git.commit": commit, "mlflow.source.git.commit": commit.removesuffix("+dirty")}
        if resumed_from:
            tags["chronomerge.resumed_from"] = ",".join(resumed_from)
        tags.update(extra_tags or {})
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=name or f"stream-{stream_key[:12]}")
        self.parent = run.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in dotted(config).items()]
        for chunk in _chunks(params, 100):
            self.client.log_batch(self.parent, params=chunk)
        self._log_inputs(self.parent, [self._dataset(name, dg, data_root) for name, dg in sorted(digests.items())])
        return self.parent

    def _log_inputs(self, rid: str, inputs: list[DatasetInput]) -> None:
        """`log_inputs`, retried when another run of the experiment (a sweep's other point) inserted the
        same dataset at the same instant: MLflow's SQL store then fails on its unique constraint, and
        the retry finds the dataset and links it."""
        for attempt in range(5):
            try:
                self.client.log_inputs(rid, inputs)
                return
            except MlflowException as e:
                if "UNIQUE constraint failed" not in str(e) or attempt == 4:
                    raise
                time.sleep(0.1 * (attempt + 1))

    def _dataset(self, name: str, digest: str, data_root: str) -> DatasetInput:
        ds = MetaDataset(
            LocalArtifactDatasetSource(str(Path(data_root).resolve() / name)), name=name, digest=digest[:36]
        )
        return DatasetInput(ds._to_mlflow_entity(), [InputTag("sha256", digest)])

    def log_task(self, t: int, name: str, span: tuple[float, float], params: Mapping[str, Any],
                 metrics: Mapping[str, float], parent_metrics: Mapping[str, float], tags: Mapping[str, str],
                 datasets: Mapping[str, str], data_root: str, note: str = "") -> str | None:
        """One nested run for task t that ran over `span` (start, end; seconds since the epoch),
        created and closed here, and step-t metrics on the parent."""
        if not self.enabled:
            return None
        start, end = (int(s * 1000) for s in span)
        tags = {"mlflow.parentRunId": self.parent, "chronomerge.t": str(t), **tags}
        if note:
            tags["mlflow.note.content"] = note
        rid = self.client.create_run(self.experiment_id, start_time=start, run_name=name, tags=tags).info.run_id
        for chunk in _chunks([Param(k, str(v)[:6000]) for k, v in dotted(params).items()], 100):
            self.client.log_batch(rid, params=chunk)
        faults.point("mlflow:task-run")
        self.client.log_batch(rid, metrics=[Metric(k, float(v), end, t) for k, v in metrics.items()])
        if datasets:
            self._log_inputs(rid, [self._dataset(n, d, data_root) for n, d in sorted(datasets.items())])
        self.client.set_terminated(rid, "FINISHED", end_time=end)
        self.client.log_batch(self.parent, metrics=[Metric(k, float(v), end, t) for k, v in parent_metrics.items()])
        return rid

    def finish(self, status: str, artifacts: list[Path] = (), tags: Mapping[str, str] | None = None,
               metrics: Mapping[str, float] | None = None) -> None:
        if not self.enabled or self.parent is None:
            return
        if tags or metrics:
            now = int(time.time() * 1000)
            self.client.log_batch(self.parent, tags=[RunTag(k, v) for k, v in (tags or {}).items()],
                                  metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()])
        for path in artifacts:
            if path.exists():
                self.client.log_artifact(self.parent, str(path), "plots" if path.suffix == ".png" else None)
        self.client.set_terminated(self.parent, status)


def tag_run(uri: str, run_id: str, tags: Mapping[str, str]) -> None:
    """Add tags to a finished run (an update's gate decision on its stream run)."""
    MlflowClient(tracking_uri=uri).log_batch(run_id, tags=[RunTag(k, str(v)[:8000]) for k, v in tags.items()])


def register_promotion(uri: str, model: str, alias: str, deployed: str, model_dir: Path, run_id: str,
                       update_id: str, tags: Mapping[str, str]) -> str:
    """A new version of registered model `model` for a promoted checkpoint, and `alias` moved to it.

    The files of `model_dir` (the checkpoint as a plain open_clip safetensors file and how to load it)
    become the run's `model/` artifacts and the version's source (`runs:/<run>/model`), so
    `mlflow.artifacts.download_artifacts("models:/<model>@<alias>")` returns the weights wherever the
    tracking server and its artifact store are reachable. The version's creation time is when it was
    promoted; `chronomerge lineage --at` reads it. Idempotent per update: an update resumed after a crash
    (the same `update_id`, tagged `update.id`) reuses the version it registered."""
    client = MlflowClient(tracking_uri=uri)
    client.log_artifacts(run_id, str(model_dir), artifact_path="model")
    try:
        client.get_registered_model(model)
    except MlflowException:
        client.create_registered_model(model, description="chronomerge: models promoted by continual updates")
    done = client.search_model_versions(f"name = '{model}' and tags.`update.id` = '{update_id}'")
    version = done[0] if done else client.create_model_version(
        model, f"runs:/{run_id}/model", run_id=run_id, tags={"lineage.deployed": deployed, "update.id": update_id,
                                                              **tags})
    client.set_registered_model_alias(model, alias, version.version)
    return version.version


class Audit:
    """Read-only questions to one tracking server and experiment (`chronomerge lineage`, `diff`).
    A run or experiment that is not there is a `ValueError` naming it and the tracking URI."""

    def __init__(self, uri: str, experiment: str):
        self.uri, self.experiment = uri, experiment
        self.client = MlflowClient(tracking_uri=uri)

    def run(self, run_id: str) -> Run | None:
        """The run with this id, or None when the tracking server has none."""
        try:
            return self.client.get_run(run_id)
        except MlflowException:
            return None

    def experiment_id(self) -> str | None:
        exp = self.client.get_experiment_by_name(self.experiment)
        return None if exp is None else exp.experiment_id

    def runs_that_deployed(self, oid: str) -> list[Run]:
        """The task runs whose deployed checkpoint is `oid` (newest first)."""
        exp = self.experiment_id()
        return [] if exp is None else _task_runs(self.client, exp, "lineage.deployed", oid)

    def deployed_at(self, model: str, when_ms: int) -> ModelVersion | None:
        versions = [v for v in self.client.search_model_versions(f"name = '{model}'")
                    if v.creation_timestamp <= when_ms]
        return max(versions, key=lambda v: (v.creation_timestamp, int(v.version)), default=None)

    def made_of(self, deployed: str) -> dict[str, Any]:
        """{deployed, run (the task run that deployed it), experts: [{expert, t, task, data, datasets, run_id}]}."""
        exp = self.experiment_id()
        if exp is None:
            raise ValueError(f"no MLflow experiment {self.experiment!r} in {self.uri}")
        runs = _task_runs(self.client, exp, "lineage.deployed", deployed)
        if not runs:
            raise ValueError(f"no MLflow task run deployed {deployed} in experiment {self.experiment!r}")
        run = runs[0]
        experts = []
        for oid in read_id_list(run.data.tags, "lineage.made_of"):
            producers = _task_runs(self.client, exp, "lineage.expert", oid)
            if not producers:
                experts.append({"expert": oid, "t": None, "task": "(no MLflow run found)", "data": None,
                                "datasets": [], "run_id": None})
                continue
            p = producers[-1]  # the first run that trained it
            experts.append({"expert": p.data.tags["lineage.expert"], "t": int(p.data.tags.get("chronomerge.t", 0)),
                            "task": p.info.run_name, "data": p.data.tags.get("lineage.data"),
                            "datasets": _datasets(p), "run_id": p.info.run_id})
        return {"deployed": deployed, "run": run, "experts": experts}

    def diff(self, run_a: str, run_b: str) -> dict[str, list[tuple[str, Any, Any]]]:
        """{config, data, metrics, lineage}: each a list of (key, value in a, value in b) that differ."""
        runs = [self.run(r) for r in (run_a, run_b)]
        for rid, r in zip((run_a, run_b), runs):
            if r is None:
                raise ValueError(f"diff: no MLflow run {rid!r} in {self.uri}")
        a, b = runs

        def data(r: Run) -> dict[str, str]:
            return dict(_datasets(r)) | {k: v for k, v in r.data.tags.items()
                                         if k in ("lineage.data", "update.new_tasks")}

        def lineage(r: Run) -> dict[str, str]:
            return {k: v for k, v in r.data.tags.items()
                    if k.startswith(("lineage.", "git.commit", "gate.")) and k != "lineage.data"}

        return {"config": _changes(a.data.params, b.data.params), "data": _changes(data(a), data(b)),
                "metrics": _changes(a.data.metrics, b.data.metrics), "lineage": _changes(lineage(a), lineage(b))}


def _task_runs(client: MlflowClient, experiment_id: str, tag: str, value: str) -> list[Run]:
    runs = client.search_runs([experiment_id], f"tags.`{tag}` = '{value}'", order_by=["attributes.start_time DESC"])
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def _datasets(run: Run) -> list[tuple[str, str]]:
    return sorted((d.dataset.name, next((t.value for t in d.tags if t.key == "sha256"), d.dataset.digest))
                  for d in run.inputs.dataset_inputs)


def _changes(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    return [(k, a.get(k, "-"), b.get(k, "-")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
