"""Crash and resume with real processes: SIGKILL mid-train and mid-write, then rerun the command."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.cli import main
from tests.conftest import run_uninterrupted

REPO = Path(__file__).resolve().parents[1]


def cli(project: Path, api: str, *args: str, script: str | None = None,
        env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": api, "PYTHONPATH": str(REPO),
           "PREFECT_HOME": str(project / ".prefect"), **(env or {})}
    cmd = [sys.executable, script, *args] if script else [sys.executable, "-m", "flows.cli", *args]
    return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, seeded_project):
    """The deployed hash and metrics of the TINY stream run without interruption (another project)."""
    summary, metrics = run_uninterrupted(tmp_path_factory.mktemp("reference"), seeded_project, [])
    return summary["deployed"], metrics


@pytest.mark.slow
@pytest.mark.parametrize("where,n,resumed", [
    # 5 steps per task: the 12th step is task 3's 2nd; tasks 1-2 and task 3's init had finished.
    ("train", 12, {(3, "init")}),
    # writes: t1 expert, fisher, deployed; t2 init, expert, fisher, deployed (7th, half written).
    ("store", 7, {(2, "init"), (2, "train"), (2, "store")}),
], ids=["sigkill-in-train", "sigkill-in-store-write"])
def test_sigkill_then_rerun_equals_an_uninterrupted_run(project, prefect_api, reference, where, n, resumed):
    crashed = cli(project, prefect_api, where, str(n), script=str(REPO / "tests" / "crash_run.py"))
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    objects = project / "store" / "objects"
    if where == "store":
        assert list(objects.glob(".tmp-*")), "the killed writer left its half-written temp file"
    done = cli(project, prefect_api, "run", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    deployed, metrics = reference
    assert f"deployed: {deployed}" in done.stdout
    assert json.loads((project / "outputs" / "metrics.json").read_text()) == metrics
    # No stage that had finished before the kill ran again; everything after it did.
    steps = json.loads((project / "outputs" / "history.json").read_text())["steps"]
    first_unfinished = min(t for t, _ in resumed) if where == "store" else 3
    for step in steps:
        for stage, status in step["status"].items():
            finished_before = step["t"] < first_unfinished or (step["t"], stage) in resumed
            assert status == ("cached" if finished_before else "computed"), (step["t"], stage)
    # The store holds no partial object, and every object verifies.
    assert not list(objects.glob(".tmp-*"))
    assert main(["verify", str(project / "store")]) == 0
    # The killed run is marked in MLflow; the resumed one finished.
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("chronomerge").experiment_id],
                              "tags.`chronomerge.stream_key` != ''", order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.status for r in parents] == ["KILLED", "FINISHED"]
    assert parents[1].data.tags["chronomerge.resumed_from"] == parents[0].info.run_id


@pytest.mark.slow
def test_resume_reruns_the_last_started_run_and_status_reports_progress(project, prefect_api):
    crashed = cli(project, prefect_api, "train", "7", script=str(REPO / "tests" / "crash_run.py"))
    assert crashed.returncode == -9
    status = cli(project, prefect_api, "status")
    assert status.returncode == 0, status.stderr
    assert "next: task 2, stage train" in status.stdout and "0/3 tasks complete" not in status.stdout
    assert "1/3 tasks complete" in status.stdout
    assert "settings: the last run's" in status.stdout  # what `resume` would run, without repeating --set
    assert status.stdout.count(" to run") == 1 and "t002-" in status.stdout  # the task after the next is listed
    resumed = cli(project, prefect_api, "resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "deployed: " in resumed.stdout
    status = cli(project, prefect_api, "status")
    assert "3/3 tasks complete" in status.stdout
    longer = cli(project, prefect_api, "status", "--set", "stream.length=4")
    assert "next: task 4, stage init" in longer.stdout


def test_status_of_a_fresh_project_says_the_run_starts_from_the_stored_base(project, prefect_api):
    status = cli(project, prefect_api, "status")
    assert status.returncode == 0, status.stderr
    assert "base: in the store (" in status.stdout and "settings: params.yaml" in status.stdout
    assert status.stdout.count(" to run") == 3 and "0/3 tasks complete; next: the base, then task 1" in status.stdout


# -- inside a stage: progress checkpoints (chronomerge.resume) -----------------------------------
LONGER = ["pretrain.steps=24", "train.steps=8", "resume.every_steps=3"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, seeded_project):
    """Deployed id, metrics and expert ids of the LONGER stream run without interruption, and without
    progress checkpoints (another project)."""
    ref = tmp_path_factory.mktemp("uninterrupted")
    summary, metrics = run_uninterrupted(ref, seeded_project,
                                         [*LONGER, "resume.every_steps=null", "resume.every_seconds=null"])
    history = json.loads((ref / "outputs" / "history.json").read_text())
    return summary["deployed"], metrics, [s["checkpoints"]["expert"] for s in history["steps"]]


@pytest.mark.slow
@pytest.mark.parametrize("kill_at,resumed_line,resumed", [
    # pretraining killed before its 13th step: checkpoints at 3, 6, 9, 12 (the newest two kept)
    ("base:step:13", "pretraining the base θ0 (chronoclip-tiny, seed 0): resumed from its progress checkpoint "
                     "at step 12/24", {"base": 12}),
    # task 1's training killed inside the write of step 6's checkpoint: 6 is partial, 3 serves
    ("train:checkpoint:6", "train t000-letters-photo: resumed from its progress checkpoint at step 3/8", {"train": 3}),
], ids=["sigkill-in-pretraining", "sigkill-in-an-experts-checkpoint-write"])
def test_a_stage_killed_midway_resumes_at_its_last_progress_checkpoint(project, prefect_api, uninterrupted,
                                                                       kill_at, resumed_line, resumed):
    sets = [a for s in LONGER for a in ("--set", s)]
    crashed = cli(project, prefect_api, "run", *sets, env={"CHRONOMERGE_KILL_AT": kill_at})
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    progress = project / "store" / "progress"
    if "base" in resumed:
        status = cli(project, prefect_api, "status")
        assert "in progress: base at step 12/24" in status.stdout, status.stdout
    else:
        assert len(list(progress.glob("*/step-000000006.safetensors"))) == 1  # tensors written, record not
    done = cli(project, prefect_api, "run", *sets)
    assert done.returncode == 0, done.stderr[-3000:]
    assert resumed_line in done.stderr, done.stderr
    if "train" in resumed:
        assert "step-000000006.safetensors: its record is missing (a write cut short)" in done.stderr
    deployed, metrics, experts = uninterrupted
    assert f"deployed: {deployed}" in done.stdout
    assert json.loads((project / "outputs" / "metrics.json").read_text()) == metrics
    history = json.loads((project / "outputs" / "history.json").read_text())
    assert [s["checkpoints"]["expert"] for s in history["steps"]] == experts
    assert list(progress.iterdir()) == []  # every stage removed its progress when it finished
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("chronomerge").experiment_id],
                              "attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    task1 = next(r for r in runs if r.data.tags.get("chronomerge.t") == "1"
                 and r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    assert parent.data.metrics["base/resumed_steps"] == resumed.get("base", 0)
    assert task1.data.metrics["train/resumed_steps"] == resumed.get("train", 0)
