"""The one place that talks to MLflow: one parent run per stream, one nested run per task t.

* Parent run: params = the whole validated config (flattened), tags = stream key, config digest,
  git commit, pid and host; metrics per step t (A_KA, A_ZS, GM, ACC, BWT, stage timings);
  artifacts = metrics JSON, history, plots, report. Every dataset is logged as an input with its digest.
* Task run t: metrics (A_KA, A_ZS, GM, per-dataset scores, timings, final train loss), the task's
  data as an input, and lineage tags: init, expert, Fisher and deployed checkpoint ids, their
  parents, the task's data digest, the git commit; `stage.<name>` = computed | cached.
* A parent run of the same stream left RUNNING by a process that no longer exists (SIGKILL) is
  marked KILLED, with its task runs, when the stream starts again.
Runs are addressed by id through `MlflowClient`, never through the thread-local active run.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

from chronomerge.config import dotted
from chronomerge.store import pid_alive

STREAM_TAG = "chronomerge.stream_key"


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
              extra_tags: Mapping[str, str] | None = None) -> str | None:
        if not self.enabled:
            return None
        tags = {STREAM_TAG: stream_key, "chronomerge.config_digest": config_digest,
                "chronomerge.pid": str(os.getpid()), "chronomerge.host": socket.gethostname(),
                "git.commit": commit, "mlflow.source.git.commit": commit.removesuffix("+dirty")}
        if resumed_from:
            tags["chronomerge.resumed_from"] = ",".join(resumed_from)
        tags.update(extra_tags or {})
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=f"stream-{stream_key[:12]}")
        self.parent = run.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in dotted(config).items()]
        for chunk in _chunks(params, 100):
            self.client.log_batch(self.parent, params=chunk)
        self.client.log_inputs(
            self.parent, [self._dataset(name, dg, data_root) for name, dg in sorted(digests.items())]
        )
        return self.parent

    def _dataset(self, name: str, digest: str, data_root: str) -> DatasetInput:
        ds = MetaDataset(
            LocalArtifactDatasetSource(str(Path(data_root).resolve() / name)), name=name, digest=digest[:36]
        )
        return DatasetInput(ds._to_mlflow_entity(), [InputTag("sha256", digest)])

    def log_task(self, t: int, name: str, metrics: Mapping[str, float], parent_metrics: Mapping[str, float],
                 tags: Mapping[str, str], datasets: Mapping[str, str], data_root: str) -> str | None:
        """One nested run for task t (created and closed here), and step-t metrics on the parent."""
        if not self.enabled:
            return None
        now = int(time.time() * 1000)
        run = self.client.create_run(self.experiment_id, run_name=f"t{t:03d}-{name}",
                                     tags={"mlflow.parentRunId": self.parent, "chronomerge.t": str(t), **tags})
        rid = run.info.run_id
        self.client.log_batch(rid, metrics=[Metric(k, float(v), now, t) for k, v in metrics.items()])
        if datasets:
            self.client.log_inputs(rid, [self._dataset(n, d, data_root) for n, d in sorted(datasets.items())])
        self.client.set_terminated(rid, "FINISHED")
        self.client.log_batch(self.parent, metrics=[Metric(k, float(v), now, t) for k, v in parent_metrics.items()])
        return rid

    def finish(self, status: str, artifacts: list[Path] = (), tags: Mapping[str, str] | None = None) -> None:
        if not self.enabled or self.parent is None:
            return
        if tags:
            self.client.log_batch(self.parent, tags=[RunTag(k, v) for k, v in tags.items()])
        for path in artifacts:
            if path.exists():
                self.client.log_artifact(self.parent, str(path), "plots" if path.suffix == ".png" else None)
        self.client.set_terminated(self.parent, status)


def tag_run(uri: str, run_id: str, tags: Mapping[str, str]) -> None:
    """Add tags to a finished run (an update's gate decision on its stream run)."""
    MlflowClient(tracking_uri=uri).log_batch(run_id, tags=[RunTag(k, str(v)[:8000]) for k, v in tags.items()])


def register_promotion(uri: str, model: str, alias: str, deployed: str, source: str, run_id: str,
                       tags: Mapping[str, str]) -> str:
    """A new version of registered model `model` for a promoted checkpoint, and `alias` moved to it.
    The version's creation time is when it was promoted; `chronomerge lineage --at` reads it."""
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    try:
        client.get_registered_model(model)
    except MlflowException:
        client.create_registered_model(model, description="chronomerge: models promoted by continual updates")
    version = client.create_model_version(model, source, run_id=run_id,
                                          tags={"lineage.deployed": deployed, **tags})
    client.set_registered_model_alias(model, alias, version.version)
    return version.version
