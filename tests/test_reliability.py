"""Reliability: what is detected is repaired, what arrives is validated, races are survived, nothing
is unpickled. Each test reproduces a fault an audit found (the scenario is in its docstring)."""
import json

from chronomerge.config import load_config
from chronomerge.store import CheckpointStore
from flows.cli import main as core_main
from flows.stream import stream_flow


def run(project, *sets):
    return stream_flow(load_config(project / "params.yaml", list(sets)), project=str(project), quiet=True)


def flip_middle_byte(path):
    """One byte flipped in the middle of the tensor data (past the safetensors header)."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    assert len(data) > header, f"{path} holds no tensor bytes of its own"
    data[(header + len(data)) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_object_is_replaced_when_the_same_content_is_put_again(tmp_path, tiny_base):
    store = CheckpointStore(tmp_path)
    oid = store.put(tiny_base, kind="base")
    flip_middle_byte(store.path(oid))
    store = CheckpointStore(tmp_path)
    assert not store.intact(oid)
    assert store.put(tiny_base, kind="base") == oid  # the same content: the corrupt file is rewritten
    CheckpointStore(tmp_path).verify(oid)


def test_a_rerun_over_corrupt_objects_rebuilds_them_and_verify_repair_quarantines(project, capsys):
    """Audit: a flipped byte in the deployed object left `15/15 stages cached` and the object corrupt;
    a corrupt expert failed every rerun until a person deleted it."""
    first = run(project)
    steps = json.loads((project / "outputs" / "history.json").read_text())["steps"]
    store = CheckpointStore(project / "store")
    flip_middle_byte(store.path(steps[1]["checkpoints"]["expert"]))  # task 2's expert
    flip_middle_byte(store.path(first["deployed"]))  # task 3's deployed model
    again = run(project)
    assert again["deployed"] == first["deployed"]
    computed = {(s["t"], s["stage"]) for s in again["stages"] if s["status"] == "computed"}
    assert {(2, "train"), (3, "deploy")} <= computed and (1, "train") not in computed
    assert core_main(["verify", "store"]) == 0  # every object intact: nothing reported success over one

    flip_middle_byte(store.path(first["deployed"]))
    assert core_main(["verify", "store"]) == 1
    assert core_main(["verify", "store", "--repair"]) == 0
    out = capsys.readouterr().out
    assert f"CORRUPT {first['deployed']}" in out and "quarantine" in out
    assert (project / "store" / "quarantine" / f"{first['deployed']}.safetensors").exists()
    assert first["deployed"] not in CheckpointStore(project / "store")
    assert run(project)["deployed"] == first["deployed"]
    assert core_main(["verify", "store"]) == 0


class _Payload:
    """What a planted pickle would run on load: it touches a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path
        return (Path.touch, (Path(self.marker),))


def test_a_planted_pickle_record_is_refused_never_loaded_and_failures_write_json(project, capsys):
    """Audit: a record in .prefect/storage naming the pickle serializer was deserialized (its payload
    executed) on the next run; failed runs wrote pickled exceptions there."""
    import base64
    import pickle

    import pytest

    from chronomerge.store import NonFiniteError

    first = run(project)
    storage = project / ".prefect" / "storage"
    victim = next(storage.glob("train-*"))
    record = json.loads(victim.read_text())
    record["metadata"]["serializer"] = {"type": "pickle", "picklelib": "pickle"}
    record["result"] = base64.b64encode(pickle.dumps(_Payload(project / "pwned"))).decode()
    victim.write_text(json.dumps(record))
    again = run(project)
    assert not (project / "pwned").exists(), "the planted pickle ran"
    assert f"refused Prefect result record {victim} (serializer 'pickle'" in capsys.readouterr().err
    assert again["deployed"] == first["deployed"]
    assert sum(s["stage"] == "train" and s["status"] == "computed" for s in again["stages"]) == 1
    assert json.loads(victim.read_text())["metadata"]["serializer"]["type"] == "json"  # rewritten as JSON

    with pytest.raises(NonFiniteError):
        run(project, "train.lr=1e30", "stream.length=1")
    for path in storage.iterdir():  # the failure's exception too is JSON (before: a pickle)
        content = json.loads(path.read_bytes())
        assert "metadata" not in content or content["metadata"]["serializer"]["type"] == "json", path


def test_a_killed_runs_temporary_prefect_server_is_reaped_by_the_next_command(project):
    """Audit: 11 of 13 runs killed with SIGKILL left their temporary Prefect server running."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from chronomerge.store import pid_alive

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the command boots its own server
    env.update({"PYTHONPATH": str(repo), "PREFECT_HOME": str(project / ".prefect")})
    with open(project / "crash.log", "w") as log:  # not a pipe: the orphan would hold it open
        crashed = subprocess.run([sys.executable, str(repo / "tests" / "crash_run.py"), "train", "2"],
                                 cwd=project, env=env, stdout=log, stderr=log, timeout=600)
    assert crashed.returncode == -9, (project / "crash.log").read_text()[-3000:]
    records = list((project / ".prefect" / "servers").glob("*.json"))
    assert len(records) == 1
    orphan = json.loads(records[0].read_text())["server"]
    assert pid_alive(orphan), "the killed command's server outlived it (what the next command must reap)"
    try:
        status = subprocess.run([sys.executable, "-m", "flows.cli", "status"], cwd=project, env=env,
                                capture_output=True, text=True, timeout=600)
        assert status.returncode == 0, status.stderr[-3000:]
        deadline = time.monotonic() + 10
        while pid_alive(orphan) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not pid_alive(orphan)
        assert not list((project / ".prefect" / "servers").glob("*.json"))
    finally:
        if pid_alive(orphan):
            os.kill(orphan, 9)


def test_runs_starting_at_once_in_a_fresh_project_all_get_the_tracking_database(tmp_path):
    """Audit: two runs started at once in a fresh directory lost one to a race creating MLflow's SQLite
    schema (`table … already exists`, 2 of 2 trials). Three processes open it at the same instant."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    start = time.time() + 20  # after every process has imported MLflow
    code = ("import sys, time; import tasks; from tasks.tracking import Tracker; "
            "time.sleep(max(0.0, float(sys.argv[1]) - time.time())); "
            f"Tracker('sqlite:///{tmp_path}/mlflow.db', 'chronomerge')")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(start)], cwd=tmp_path, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(repo)}) for _ in range(3)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(e[-1500:] for e in errors)


def test_arrivals_are_validated_before_registration_and_a_bad_one_blocks_no_other(project):
    """Audit: float images with a NaN failed as "training or merging diverged"; a meta.json listing 2
    classes with labels 0..5 trained and was promoted."""
    import shutil
    import time

    import torch
    from safetensors.torch import load_file, save_file

    from chronomerge.arrivals import scan

    source = next(p for p in sorted((project / "data").iterdir()) if (p / "meta.json").exists()
                  and p.name != "pretrain-pool")
    incoming = project / "incoming"

    def arrival(name, change=None, meta=None):
        folder = incoming / name
        shutil.copytree(source, folder)
        if change:
            t = load_file(folder / "train.safetensors")
            save_file(change(t), folder / "train.safetensors")
        if meta:
            m = json.loads((folder / "meta.json").read_text())
            (folder / "meta.json").write_text(json.dumps(meta(m)))
        time.sleep(0.02)  # arrival order follows modification times

    def nan_floats(t):
        x = t["images"].float()
        x[0, 0, 0, 0] = float("nan")
        return {**t, "images": x}

    arrival("floats", nan_floats)
    arrival("labels", meta=lambda m: {**m, "classes": m["classes"][:2]})
    arrival("tiny", lambda t: {**t, "images": t["images"][:, :4, :4].contiguous()})
    arrival("good")
    new, rejected = scan(incoming, project / "data", [])
    assert [a["name"] for a in new] == ["good"]
    reasons = {r["name"]: r["reason"] for r in rejected}
    assert "images must be uint8 N×H×W×3" in reasons["floats"] and "float32" in reasons["floats"]
    assert "train.safetensors: labels run 0.." in reasons["labels"] and "lists 2 classes" in reasons["labels"]
    assert "at least 8×8" in reasons["tiny"]
    assert all(str(incoming) in r for r in reasons.values()), "each reason names the file"
    assert torch.equal(load_file(incoming / "good" / "train.safetensors")["images"],
                       load_file(source / "train.safetensors")["images"])


def test_user_mistakes_are_one_line_naming_the_field_or_file_before_any_work(project, capsys):
    """Audit: each of these surfaced as a traceback, often after 40-80 s of work."""
    import sqlite3

    (project / "afile").write_text("not a folder")
    (project / "bad.csv").write_bytes(b"path,label\n\xff\xfeimg.png,a\n")
    (project / "bad.jsonl").write_text('["a.png", "a"]\n')
    cases = [(["run", "--set", "tracking.mlflow_uri=bogus://x"], "tracking.mlflow_uri"),
             (["run", "--set", "paths.store=afile"], "paths.store: afile is a file"),
             (["data", "add", "bad.csv", "--name", "bad"], "bad.csv: not UTF-8 text"),
             (["data", "add", "bad.jsonl", "--name", "bad"], "bad.jsonl:1: a line is a JSON object")]
    for argv, says in cases:
        capsys.readouterr()
        assert core_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err and "Traceback" not in err, (argv, err)
    db = project / "mlflow.db"
    with sqlite3.connect(db) as con:  # a database of many pages, then cut in half
        con.execute("CREATE TABLE t (x TEXT)")
        con.executemany("INSERT INTO t VALUES (?)", [("x" * 500,)] * 2000)
    for garbage in (db.read_bytes()[: db.stat().st_size // 2], bytes(range(256)) * 20):
        db.write_bytes(garbage)
        capsys.readouterr()
        assert core_main(["run", "--set", "tracking.mlflow_uri=sqlite:///mlflow.db"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: tracking.mlflow_uri: mlflow.db is not a readable SQLite database"), err
    assert not (project / "outputs" / "metrics.json").exists() and not (project / "data" / "bad").exists()


def test_a_cached_record_of_another_shape_is_recomputed_not_read(tmp_path, tiny_base):
    """Audit (bench/faults.py): Prefect records rewritten as valid JSON of another shape made the rerun
    fail with `error: base` (a KeyError) instead of recomputing the stage."""
    from flows.stream import STAGE_KEYS, _untrusted

    store = CheckpointStore(tmp_path)
    oid = store.put(tiny_base, kind="base")
    assert not _untrusted(store, {"base": oid, "seconds": 1.0}, STAGE_KEYS["base"])
    for record in ({"unexpected": [1, 2, 3]}, {"base": oid}, [oid], "text", {"base": "not-an-id", "seconds": 1}):
        assert _untrusted(store, record, STAGE_KEYS["base"]), record
