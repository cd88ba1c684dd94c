"""Beyond one process: a sweep on a real local Dask cluster (two worker processes, prefect-dask),
tracked to a real MLflow tracking server whose artifact store is an S3-compatible server (moto), all on
loopback."""
import contextlib
import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from chronomerge.config import load_config
from chronomerge.export import export_open_clip
from chronomerge.models import architecture
from chronomerge.store import CheckpointStore
from flows.prefect_server import wait_healthy
from flows.stream import stream_flow
from flows.sweep import sweep_flow
from tasks.tracking import register_promotion
from tests.conftest import run_uninterrupted


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(cmd: list[str], health: str, log: Path, env: dict | None = None):
    """A server subprocess (its own session), up once `health` answers, stopped on exit."""
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})})
    try:
        assert wait_healthy(health, proc), log.read_text()[-3000:]
        yield
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


# An S3-compatible object store: moto's server, on loopback, with its test credentials.
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "chronomerge-artifacts"


@pytest.fixture
def s3_server(tmp_path):
    """moto's S3 server on a free loopback port, with the bucket BUCKET; yields its endpoint URL."""
    url = f"http://127.0.0.1:{(port := free_port())}"
    with server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], url,
                tmp_path / "s3-server.log", S3_ENV):
        s3(url).create_bucket(Bucket=BUCKET)
        yield url


def s3(url: str):
    import boto3

    return boto3.client("s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing",
                        region_name="us-east-1")


@pytest.fixture
def mlflow_server(tmp_path, s3_server):
    """`mlflow server` on a free loopback port: a SQLite backend, and artifacts in the S3 bucket, proxied by
    the server (clients and workers reach them over HTTP and need no S3 credentials); yields its URI."""
    srv = tmp_path / "mlflow-server"
    srv.mkdir()
    uri = f"http://127.0.0.1:{(port := free_port())}"
    with server([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers",
                 "1", "--backend-store-uri", f"sqlite:///{srv}/backend.db",
                 "--artifacts-destination", f"s3://{BUCKET}/mlflow"], f"{uri}/health", srv / "server.log",
                {**S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_server, "MLFLOW_DISABLE_TELEMETRY": "true"}):
        yield uri


@contextlib.contextmanager
def two_machines(tmp_path: Path):
    """A local Dask cluster of two worker processes (`local_cluster`) that share the store and the Prefect
    records but each have their own PREFECT_HOME, so their flock folders differ as on two machines;
    yields the scheduler's address and the two homes."""
    from distributed import SpecCluster

    from flows.sweep import environment_kept, local_cluster

    spec = local_cluster(workers=2, gpus=0)
    homes = {name: tmp_path / f"home-{name}" for name in spec["workers"]}
    for name, home in homes.items():
        spec["workers"][name]["options"]["env"]["PREFECT_HOME"] = str(home)
    with environment_kept(), SpecCluster(**spec) as cluster:  # the nannies write into this process's environment
        yield cluster.scheduler_address, homes


@pytest.mark.slow
def test_a_dask_sweep_across_two_machines_trains_each_expert_once_tracked_to_an_mlflow_server(
        project, mlflow_server, s3_server, tmp_path):
    """Two workers with no shared lock folder: the Dask scheduler's stage locks alone keep each expert
    trained once (six trainings without them). Everything is tracked to the MLflow server, whose
    artifacts live in the S3-compatible server."""
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["tracking"]["mlflow_uri"] = mlflow_server
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    sweep = {"name": "dask", "base": {}, "grid": {"strategy.deploy.mode": ["ft", "ema"]}}
    with two_machines(tmp_path) as (address, homes):
        summary = sweep_flow(raw, sweep, project=str(project), runner="dask", address=address)
    assert summary["points"] == 2 and not summary["failed"], summary["failed"]
    # deploy differs, init and training do not: 3 experts for 6 train stages, across two processes
    assert summary["train_stages"] == 6 and summary["trainings_run"] == 3
    assert all(list((home / "locks").glob("*.lock")) for home in homes.values())  # each took its own flocks
    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("chronomerge").experiment_id],
                              "tags.`chronomerge.sweep` = 'dask'")
    assert sorted(r.data.tags["chronomerge.dask_worker"] for r in runs) == sorted(homes)  # one point on each
    assert all(int(r.data.tags["chronomerge.pid"]) != os.getpid() for r in runs)
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
    # ... from the S3-compatible store, where the server put them
    stored = [o["Key"] for o in s3(s3_server).list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert any(k.endswith(f"{ema['run_id']}/artifacts/metrics.json") for k in stored), stored
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


@pytest.mark.slow
def test_a_dask_worker_killed_mid_training_is_survived_with_identical_results(project, seeded_project, tmp_path,
                                                                               monkeypatch):
    """SIGKILL the worker process running a point inside an expert's training (once: the rerun goes
    through): Dask reruns the point, which resumes at the training's progress checkpoint and ends at the
    deployed id of an uninterrupted run. The cluster is laid out for one GPU and two workers (`--workers 2
    --gpus 1`): gpu-0 offers the resource GPU=1 and sees only GPU 0, cpu-1 offers none; the point asks
    for the GPU (device auto on a local cluster with GPUs; on this CPU it then trains on the CPU), so its
    rerun waits for gpu-0's restart rather than going to the idle cpu-1."""
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["resume"] = {"every_steps": 2}
    sweep = {"name": "killed", "base": {}, "grid": {"strategy.deploy.mode": ["ema"]}}
    monkeypatch.setenv("CHRONOMERGE_KILL_AT", "train:step:3")  # the workers' environment (sweep.worker_env)
    monkeypatch.setenv("CHRONOMERGE_KILL_ONCE", str(tmp_path / "killed-once"))
    environment = dict(os.environ)
    summary = sweep_flow(raw, sweep, project=str(project), workers=2, runner="dask", gpus=1)
    # the nannies' OMP_NUM_THREADS=1 & co. do not stay in this process (its later subprocesses inherit it)
    assert dict(os.environ) == environment
    monkeypatch.delenv("CHRONOMERGE_KILL_AT")
    assert (tmp_path / "killed-once").exists()  # a worker did die there
    assert not summary["failed"], summary["failed"]
    (point,) = summary["results"]
    # the same stream computed from scratch in this process (fresh Prefect records: every stage runs)
    reference = tmp_path / "reference"
    reference.mkdir()
    alone, _ = run_uninterrupted(reference, seeded_project, [])
    assert all(s["status"] == "computed" for s in alone["stages"])
    assert alone["deployed"] == point["deployed"]
    assert list((project / "store" / "progress").iterdir()) == []
    run = MlflowClient(tracking_uri=raw["tracking"]["mlflow_uri"]).get_run(point["run_id"])
    assert (run.data.tags["chronomerge.dask_worker"], run.data.tags["chronomerge.cuda_visible_devices"]) == \
        ("gpu-0", "0")
