"""Audits answered from MLflow alone, so they hold after the local store is gone.

* `deployed_at`: the model version promoted last at or before a time (the registered model's
  versions are created at promotion, `flows/update.py`).
* `made_of`: which experts, trained on which data, a deployed checkpoint is made of: the task run
  that deployed it carries `lineage.made_of` (16-hex prefixes of the experts), and each expert's
  task run carries its task, data digest and dataset inputs.
* `diff`: what changed between two runs in config (params), data (dataset inputs, lineage data
  digests) and metrics.
"""
from __future__ import annotations

from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion


def deployed_at(client: MlflowClient, model: str, when_ms: int) -> ModelVersion | None:
    versions = [v for v in client.search_model_versions(f"name = '{model}'") if v.creation_timestamp <= when_ms]
    return max(versions, key=lambda v: (v.creation_timestamp, int(v.version)), default=None)


def _task_runs(client: MlflowClient, experiment_id: str, tag: str, value: str, like: bool = False) -> list[Run]:
    op = "LIKE" if like else "="
    runs = client.search_runs([experiment_id], f"tags.`{tag}` {op} '{value}{'%' if like else ''}'",
                              order_by=["attributes.start_time DESC"])
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def _datasets(run: Run) -> list[tuple[str, str]]:
    return sorted((d.dataset.name, next((t.value for t in d.tags if t.key == "sha256"), d.dataset.digest))
                  for d in run.inputs.dataset_inputs)


def made_of(client: MlflowClient, experiment_id: str, deployed: str) -> dict[str, Any]:
    """{deployed, run (the task run that deployed it), experts: [{expert, t, task, data, datasets, run_id}]}."""
    runs = _task_runs(client, experiment_id, "lineage.deployed", deployed)
    if not runs:
        raise KeyError(f"no MLflow task run deployed {deployed} in this experiment")
    run = runs[0]
    experts = []
    for prefix in filter(None, run.data.tags.get("lineage.made_of", "").split(",")):
        producers = _task_runs(client, experiment_id, "lineage.expert", prefix, like=True)
        if not producers:
            experts.append({"expert": prefix, "t": None, "task": "(no MLflow run found)", "data": None,
                            "datasets": [], "run_id": None})
            continue
        p = producers[-1]  # the first run that trained it
        experts.append({"expert": p.data.tags["lineage.expert"], "t": int(p.data.tags.get("chronomerge.t", 0)),
                        "task": p.info.run_name, "data": p.data.tags.get("lineage.data"),
                        "datasets": _datasets(p), "run_id": p.info.run_id})
    return {"deployed": deployed, "run": run, "experts": experts}


def _changes(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    return [(k, a.get(k, "-"), b.get(k, "-")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def diff(client: MlflowClient, run_a: str, run_b: str) -> dict[str, list[tuple[str, Any, Any]]]:
    """{config, data, metrics, lineage}: each a list of (key, value in a, value in b) that differ."""
    a, b = client.get_run(run_a), client.get_run(run_b)

    def data(r: Run) -> dict[str, str]:
        return dict(_datasets(r)) | {k: v for k, v in r.data.tags.items() if k in ("lineage.data", "update.new_tasks")}

    def lineage(r: Run) -> dict[str, str]:
        return {k: v for k, v in r.data.tags.items()
                if k.startswith(("lineage.", "git.commit", "gate.")) and k != "lineage.data"}

    return {"config": _changes(a.data.params, b.data.params), "data": _changes(data(a), data(b)),
            "metrics": _changes(a.data.metrics, b.data.metrics), "lineage": _changes(lineage(a), lineage(b))}
