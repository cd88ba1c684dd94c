"""Beyond one process: a sweep on a real local Dask cluster (two worker processes, prefect-dask),
tracked to a real MLflow tracking server with its own artifact store, all on loopback."""
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

from chronomerge.config import load_config
from chronomerge.export import export_open_clip
from chronomerge.models import architecture
from chronomerge.store import CheckpointStore
from flows.stream import stream_flow
from flows.sweep import sweep_flow
from tasks.tracking import register_promotion


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on a free loopback port: SQLite backend, artifacts served from its own folder
    (clients reach them over HTTP only); yields its URI."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = tmp_path / "mlflow-server"
    srv.mkdir()
    log = (srv / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{srv}/backend.db",
                             "--artifacts-destination", str(srv / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (srv / "server.log").read_text()[-3000:]
            time.sleep(0.5)
    yield uri
    os.killpg(proc.pid, 15)
    proc.wait(timeout=60)


def test_a_dask_sweep_tracked_to_an_mlflow_server_trains_each_expert_once(project, mlflow_server, tmp_path):
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["tracking"]["mlflow_uri"] = mlflow_server
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    sweep = {"name": "dask", "base": {}, "grid": {"strategy.deploy.mode": ["ft", "ema"]}}
    environment = dict(os.environ)
    summary = sweep_flow(raw, sweep, project=str(project), workers=2, runner="dask")
    assert summary["points"] == 2 and not summary["failed"], summary["failed"]
    # the nannies' OMP_NUM_THREADS=1 & co. do not stay in this process (its later subprocesses inherit it)
    assert dict(os.environ) == environment
    # deploy differs, init and training do not: 3 experts for 6 train stages, across two processes
    assert summary["train_stages"] == 6 and summary["trainings_run"] == 3
    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("chronomerge").experiment_id],
                              "tags.`chronomerge.sweep` = 'dask'")
    assert len(runs) == 2 and all(int(r.data.tags["chronomerge.pid"]) != os.getpid() for r in runs)
    assert not (project / "mlflow.db").exists() and not (project / "mlruns").exists()  # all on the server
    ema = next(r for r in summary["results"] if r["point"] == "deploy.mode=ema")
    alone = stream_flow(load_config(project / "params.yaml"), project=str(project), quiet=True)
    assert alone["deployed"] == ema["deployed"]  # the same result as a run in this process
    assert all(s["status"] == "cached" for s in alone["stages"])
    # the runs' artifacts come back over HTTP
    got = mlflow.artifacts.download_artifacts(run_id=ema["run_id"], artifact_path="metrics.json",
                                              tracking_uri=mlflow_server, dst_path=str(tmp_path / "dl"))
    assert (project / "outputs" / "sweeps" / "dask" / "deploy.mode=ema" / "metrics.json").read_bytes() == \
        open(got, "rb").read()
    # a registered model version of the deployed checkpoint downloads from the server
    cfg = load_config(project / "params.yaml")
    folder = tmp_path / "promoted"
    export_open_clip(CheckpointStore(project / "store"), ema["deployed"], folder / "model.safetensors",
                     architecture(cfg.model.name, cfg.model.pretrained))
    register_promotion(mlflow_server, "chronomerge-deployed", "production", ema["deployed"], folder, ema["run_id"],
                       "u1", {})
    mlflow.set_tracking_uri(mlflow_server)
    try:
        down = mlflow.artifacts.download_artifacts("models:/chronomerge-deployed@production",
                                                   dst_path=str(tmp_path / "model"))
    finally:
        mlflow.set_tracking_uri(None)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (folder / "model.safetensors",
                                                                    tmp_path / "model" / "model.safetensors")]
    assert digest[0] == digest[1], down


def test_a_dask_worker_killed_mid_training_is_survived_with_identical_results(project, tmp_path, monkeypatch):
    """SIGKILL the worker process running a point inside an expert's training (once: the rerun on another
    worker goes through): Dask reruns the point, which resumes at the training's progress checkpoint and
    ends at the deployed id of an uninterrupted run."""
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["resume"] = {"every_steps": 2}
    sweep = {"name": "killed", "base": {}, "grid": {"strategy.deploy.mode": ["ema"]}}
    monkeypatch.setenv("CHRONOMERGE_KILL_AT", "train:step:3")  # the workers' environment (sweep.worker_env)
    monkeypatch.setenv("CHRONOMERGE_KILL_ONCE", str(tmp_path / "killed-once"))
    summary = sweep_flow(raw, sweep, project=str(project), workers=2, runner="dask")
    monkeypatch.delenv("CHRONOMERGE_KILL_AT")
    assert (tmp_path / "killed-once").exists()  # a worker did die there
    assert not summary["failed"], summary["failed"]
    (point,) = summary["results"]
    # the same stream computed from scratch in this process (fresh Prefect records: every stage runs)
    reference = tmp_path / "reference"
    for d in ("data", "store"):
        shutil.copytree(project / d, reference / d)
    cfg = load_config(project / "params.yaml", [f"tracking.mlflow_uri=sqlite:///{reference}/m.db"])
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: reference / ".prefect" / "storage"}):
        alone = stream_flow(cfg, project=str(reference), quiet=True)
    assert all(s["status"] == "computed" for s in alone["stages"])
    assert alone["deployed"] == point["deployed"]
    assert list((project / "store" / "progress").iterdir()) == []
