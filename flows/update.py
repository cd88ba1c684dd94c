"""The continual update flow: new task data arrived → train, merge, evaluate → promote if it passes.

One run, under a project-wide lock (two at once wait in turn, so none trains a task twice or
writes the same record):
1. receive: register the complete, readable datasets in `update.incoming` that are new, in arrival
   order (`chronomerge.arrivals`), copy them under the data root and `dvc add` the incoming folder;
2. the stream flow over every arrived dataset (stream kind `arrivals`): stages of earlier tasks are
   cache hits, so only the new tasks run init → train → store → deploy → eval;
3. promote: the candidate deployed model passes the gate (`chronomerge.promotion.gate`) against the
   promoted one → the store's `latest` ref and the MLflow registered model's alias move to it;
   otherwise the previous model stays, and the decision says why. Every decision is recorded in
   `.chronomerge/promotions.json` and as tags on the stream's MLflow run.

Crash safety: before registering new arrivals the update writes a journal
(`.chronomerge/update-journal.json`: when, which arrivals are new, whether `dvc add` has run); a
rerun after a crash at any point completes it (reruns `dvc add`, reuses the cached stages, promotes
idempotently: the same run's model version is reused) and records the decision as the uninterrupted
update would have, then removes the journal.

    chronomerge update          # one run now
    chronomerge serve           # a Prefect deployment on the schedule in params (update.interval / cron)
"""
from __future__ import annotations

import contextlib
import tempfile
import time
import uuid
from pathlib import Path

from prefect import flow

from chronomerge import faults, promotion
from chronomerge.arrivals import STREAM_KIND, active, read_arrivals, record_rejections, stream_tasks, withdraw
from chronomerge.config import load_config, validate, with_values
from chronomerge.export import export_open_clip
from chronomerge.models import TINY, architecture
from chronomerge.promotion import clear_journal, read_journal, write_journal
from chronomerge.report import SUMMARY, scores_line
from chronomerge.store import CheckpointStore
from flows.stream import stream_flow
from tasks.locks import ProcessLockManager
from tasks.tracking import tag_run
from tasks.update import receive, register, register_promotion, version_data

LATEST = "latest"


@flow(name="chronomerge-update", validate_parameters=False)
def update_flow(project: str = ".", params: str | None = "params.yaml", sets: list[str] | None = None,
                announce: bool = False) -> dict:
    """One continual update of the project at `project`; returns its decision record. `announce` prints
    the decision as it is made (what `chronomerge update` and each run of `chronomerge serve` show)."""
    root = Path(project).resolve()
    with _update_lock(root):
        decision = _update(root, params, list(sets or []))
    if announce:
        print("\n".join(decision_lines(decision, root)), flush=True)
    return decision


def withdraw_arrival(project: str, params: str | None, sets: list[str], name: str, reason: str) -> list[str]:
    """`chronomerge withdraw`: take arrival `name` back, under the update lock (see chronomerge.arrivals)."""
    root = Path(project).resolve()
    cfg = load_config(None if params is None else root / params, sets)
    with _update_lock(root):
        return withdraw(root, root / cfg.update.incoming, root / cfg.data.root, name, reason)


@contextlib.contextmanager
def _update_lock(root: Path):
    """The project-wide update lock: one update (or withdrawal) at a time; released if the process dies."""
    locks = ProcessLockManager(root / ".chronomerge" / "locks")
    holder = uuid.uuid4().hex
    locks.acquire_lock("update", holder)
    try:
        yield
    finally:
        locks.release_lock("update", holder)


def decision_lines(d: dict, root: Path) -> list[str]:
    """An update's decision in words: promoted / refused / up to date / waiting and why, what was
    rejected or skipped, the candidate's scores, and what is deployed now."""
    lines = [f"{d['status']}: {d['reason']}"]
    lines += [f"{r.get('status', 'rejected')} {r['name']}: {r['reason']}" for r in d["rejected"]]
    if "candidate" in d:
        lines.append(f"candidate {d['candidate']} after {d['tasks']} tasks (new: {', '.join(d['new']) or '-'}): "
                     + scores_line(d["metrics"], SUMMARY, digits=2))
    latest = promotion.promoted(promotion.read_decisions(root))
    lines.append(f"deployed (latest): {latest['candidate'] if latest else '-'}")
    return lines


def _update(root: Path, params: str | None, sets: list[str]) -> dict:
    cfg = load_config(None if params is None else root / params, sets)
    incoming, data_root = root / cfg.update.incoming, root / cfg.data.root
    journal = read_journal(root)
    known = read_arrivals(root)
    new, rejected = receive(incoming, data_root, known)
    record_rejections(root, rejected)
    if new:  # the journal names the arrivals before any effect, so a crash cannot lose them
        before = journal or {"id": uuid.uuid4().hex, "time": time.time(), "new": [], "entries": []}
        fresh = [a for a in new if a["entry"] not in before["entries"]]  # a dataset and an expert may share a name
        journal = {"id": before["id"], "time": before["time"], "phase": "received", "incoming_dvc_md5": None,
                   "new": [*before["new"], *(a["name"] for a in fresh)],
                   "entries": [*before["entries"], *(a["entry"] for a in fresh)]}
        write_journal(root, journal)
        known = register(root, incoming, data_root, known, new)
        faults.point("update:registered")
    if journal and journal["phase"] == "received":  # a crash during `dvc add` reruns it
        journal = {**journal, "phase": "versioned", "incoming_dvc_md5": version_data(root, cfg.update.incoming)}
        write_journal(root, journal)
        faults.point("update:versioned")
    arrived = active(known)
    names = [a["name"] for a in arrived]
    decisions = promotion.read_decisions(root)
    base = {"time": journal["time"] if journal else time.time(), "new": journal["new"] if journal else [],
            "rejected": rejected, "tasks": len(arrived), "stream": names}
    if not arrived:
        clear_journal(root)
        return {**base, "status": "waiting", "promoted": False, "reason": f"no task data in {incoming} yet"}
    if decisions and decisions[-1].get("stream", names) == names and decisions[-1]["tasks"] == len(arrived):
        clear_journal(root)  # a crash after the decision was recorded: nothing is left to do
        return {**base, "status": "up to date", "promoted": False,
                "reason": f"no new data since the last update ({len(arrived)} tasks)"}
    if journal is None:  # a stream changed by a withdrawal: the promotion below must be idempotent too
        journal = {"id": uuid.uuid4().hex, "time": base["time"], "new": [], "entries": [], "phase": "versioned",
                   "incoming_dvc_md5": None}
        write_journal(root, journal)
    dvc_md5 = journal["incoming_dvc_md5"]
    stream = validate(with_values(cfg.to_dict(), {"stream.kind": STREAM_KIND, "stream.length": len(arrived),
                                                  "stream.tasks": stream_tasks(arrived, data_root)}), "update")
    summary = stream_flow(stream, project=str(root), quiet=True,
                          tags={"chronomerge.update": "true", "update.new_tasks": ",".join(base["new"]) or "-"})
    current = promotion.promoted(decisions)
    ok, reason = promotion.gate(summary["final"], current["metrics"] if current else None,
                                cfg.update.gate.metrics, cfg.update.gate.tolerance, cfg.update.gate.floor)
    deployed = summary["deployed"]
    decision = {**base, "status": "promoted" if ok else "refused", "promoted": ok, "reason": reason,
                "candidate": deployed, "previous": current["candidate"] if current else None,
                "metrics": summary["final"], "run_id": summary["run_id"], "incoming_dvc_md5": dvc_md5,
                "update_id": journal["id"]}
    if ok:
        store = CheckpointStore(root / cfg.paths.store)
        store.set_ref(LATEST, deployed)
        if cfg.tracking.enabled:
            with tempfile.TemporaryDirectory() as folder:
                model_dir = _model_files(store, deployed, stream, Path(folder))
                decision["model_version"] = register_promotion(
                    cfg.tracking.mlflow_uri, cfg.update.registered_model, cfg.update.alias, deployed, model_dir,
                    summary["run_id"], journal["id"], {"tasks": str(len(arrived)), "gate": reason,
                                        **{k: f"{v:.6f}" for k, v in summary["final"].items() if v is not None}})
    if cfg.tracking.enabled:
        tag_run(cfg.tracking.mlflow_uri, summary["run_id"],
                {"gate.decision": decision["status"], "gate.reason": reason,
                 "gate.previous": decision["previous"] or "-", "update.incoming.dvc_md5": dvc_md5 or "-"})
    faults.point("update:promoted")
    promotion.record(root, decision)
    clear_journal(root)
    return decision


def _model_files(store: CheckpointStore, deployed: str, cfg, folder: Path) -> Path:
    """The promoted model as a registered model version holds it: a plain open_clip checkpoint and a
    README saying how to load it."""
    arch = architecture(cfg.model.name, cfg.model.pretrained)
    export_open_clip(store, deployed, folder / "model.safetensors", arch)
    register = "import chronomerge.models  # registers chronomerge's embedded config with open_clip\n" \
        if arch["name"] == TINY else ""
    (folder / "README.md").write_text(
        f"# chronomerge checkpoint {deployed}\n\n"
        "A plain open_clip state dict (safetensors); its header records the architecture and preprocessing.\n\n"
        f"```python\nimport mlflow\nimport open_clip\n{register}\n"
        "folder = mlflow.artifacts.download_artifacts(\"models:/<registered model>@<alias>\")\n"
        f"model = open_clip.create_model({arch['name']!r}, pretrained=folder + \"/model.safetensors\")\n```\n")
    return folder
