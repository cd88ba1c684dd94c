"""Continual operations with real Prefect, MLflow and DVC: arriving data, the promotion gate both
ways, two updates at once, a served deployment, audits from MLflow alone, open_clip export."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from mlflow import MlflowClient

from chronomerge.arrivals import read_arrivals
from chronomerge.config import ConfigError, load_config
from chronomerge.models import CONFIG_DIR
from chronomerge.promotion import gate, read_decisions
from chronomerge.store import CheckpointStore
from flows.cli import main
from flows.update import update_flow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def dvc_project(project):
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=project, check=True)
    return project


def test_the_gate_compares_with_the_promoted_model_and_the_floors():
    prev = {"A_ZS": 0.40, "GM": 0.30}
    assert gate({"A_ZS": 0.39, "GM": 0.2}, prev, ["A_ZS"], 0.02)[0]
    ok, why = gate({"A_ZS": 0.37, "GM": 0.2}, prev, ["A_ZS"], 0.02)
    assert not ok and why == "gate refused: A_ZS 37.00 < 40.00 - 2.00"
    assert not gate({"A_ZS": 0.45, "GM": 0.2}, prev, ["A_ZS", "GM"], 0.05)[0]
    assert gate({"A_ZS": 0.1}, None, ["A_ZS"], 0.0)[0]
    ok, why = gate({"A_ZS": 0.1}, None, ["A_ZS"], 0.0, {"A_ZS": 0.2})
    assert not ok and "A_ZS 10.00 < floor 20.00" in why
    ok, why = gate({"A_KA": 0.5, "A_ZS": None, "GM": None}, None, ["A_ZS"], 0.0)  # no held-out sets
    assert not ok and why.startswith("gate refused: A_ZS not measured")


def test_update_settings_are_validated(tmp_path):
    for sets, msg in ((["update.alias=latest"], "reserved by MLflow"),
                      (["update.cron=0 * * * *"], "exactly one of interval"),
                      (["update.gate.metrics=[BWT]"], "update.gate.metrics.0: 'BWT' is not allowed"),
                      (["update.gate.floor={A_ZS: 2}"], "floors are accuracies in [0, 1]"),
                      (["stream.tasks=[letters-photo]"], "kind 'dataset-incremental' builds its own tasks")):
        with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            load_config(None, sets)


@pytest.mark.slow
def test_arriving_data_is_trained_merged_gated_and_audited(dvc_project, capsys):
    project = dvc_project
    assert update_flow(project=str(project))["status"] == "waiting"
    for name in ("letters-photo", "numerals-neon"):
        assert main(["arrive", name]) == 0
    (project / "incoming" / "half-written").mkdir()  # no meta.json yet: still arriving, left alone
    (project / "incoming" / "broken").mkdir()
    (project / "incoming" / "broken" / "meta.json").write_text("{}")

    first = update_flow(project=str(project))
    assert first["status"] == "promoted" and first["new"] == ["letters-photo", "numerals-neon"]
    reported = {r["name"]: r for r in first["rejected"]}
    assert sorted(reported) == ["broken", "half-written"]
    assert reported["broken"]["status"] == "rejected" and "unreadable" in reported["broken"]["reason"]
    assert (
        reported["half-written"]["status"] == "skipped"
        and "not a dataset (meta.json)" in reported["half-written"]["reason"]
    )
    store = CheckpointStore(project / "store")
    assert store.ref("latest") == first["candidate"]
    dvc_file = yaml.safe_load((project / "incoming.dvc").read_text())
    assert dvc_file["outs"][0]["md5"] == first["incoming_dvc_md5"]
    cfg = load_config(project / "params.yaml")
    client = MlflowClient(tracking_uri=cfg.tracking.mlflow_uri)
    v = client.get_model_version_by_alias(cfg.update.registered_model, cfg.update.alias)
    assert v.tags["lineage.deployed"] == first["candidate"] and v.version == first["model_version"]
    # The registered version is downloadable: the weights (a plain open_clip checkpoint) and how to load them.
    import mlflow
    from safetensors.torch import load_file

    mlflow.set_tracking_uri(cfg.tracking.mlflow_uri)
    got = Path(mlflow.artifacts.download_artifacts(f"models:/{cfg.update.registered_model}@{cfg.update.alias}",
                                                   dst_path=str(project / "downloaded")))
    weights = load_file(got / "model.safetensors")
    assert weights.keys() == store.load(first["candidate"]).keys()
    assert all(torch.equal(w, store.load(first["candidate"])[k]) for k, w in weights.items())
    open_clip.create_model("chronoclip-tiny", pretrained=str(got / "model.safetensors"))  # loads as documented
    assert "open_clip.create_model('chronoclip-tiny'" in (got / "README.md").read_text()
    assert client.get_run(first["run_id"]).data.tags["gate.decision"] == "promoted"

    again = update_flow(project=str(project))
    assert again["status"] == "up to date" and len(read_decisions(project)) == 1

    # A third task with a floor no model can meet: refused, the previous model stays deployed.
    main(["arrive", "handwritten-digits"])
    refused = update_flow(project=str(project), sets=["update.gate.floor={A_ZS: 1.0}"])
    assert refused["status"] == "refused" and refused["new"] == ["handwritten-digits"]
    assert refused["reason"].startswith("gate refused: A_ZS") and "< floor 100.00" in refused["reason"]
    assert store.ref("latest") == first["candidate"] and refused["previous"] == first["candidate"]
    assert client.get_model_version_by_alias(cfg.update.registered_model, cfg.update.alias).version == v.version
    stages = client.search_runs([client.get_run(refused["run_id"]).info.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{refused['run_id']}'")
    computed = sorted(r.data.tags["chronomerge.t"] for r in stages if r.data.tags["stage.train"] == "computed")
    assert computed == ["3"]  # only the new task trained
    assert client.get_run(refused["run_id"]).data.tags["gate.reason"] == refused["reason"]

    # Relative gate: promoted iff every gated metric is within the tolerance of the promoted model's.
    main(["arrive", "new-shapes-photo"])
    fourth = update_flow(project=str(project), sets=["update.gate.metrics=[A_KA, A_ZS]", "update.gate.tolerance=0.05"])
    expected = all(fourth["metrics"][m] >= first["metrics"][m] - 0.05 for m in ("A_KA", "A_ZS"))
    assert fourth["promoted"] == expected and fourth["previous"] == first["candidate"]
    promoted_now = fourth["candidate"] if expected else first["candidate"]
    assert store.ref("latest") == promoted_now
    assert [a["name"] for a in read_arrivals(project)] == ["letters-photo", "numerals-neon", "handwritten-digits",
                                                            "new-shapes-photo"]

    # Export: a plain open_clip checkpoint of the promoted model.
    capsys.readouterr()
    assert main(["export", "latest", "export/model.safetensors"]) == 0
    open_clip.add_model_config(CONFIG_DIR / "chronoclip-tiny.json")
    model = open_clip.create_model("chronoclip-tiny", pretrained=str(project / "export" / "model.safetensors"))
    stored = store.load(promoted_now)
    assert all(torch.equal(t, stored[k]) for k, t in model.state_dict().items())
    assert main(["export", "latest", "export/model.pt"]) == 2

    # Audits from MLflow alone: the store is gone.
    shutil.rmtree(project / "store")
    capsys.readouterr()
    assert main(["lineage", "--at", "now"]) == 0
    out = capsys.readouterr().out
    assert f"model {promoted_now}" in out
    made_of = ["letters-photo", "numerals-neon", "handwritten-digits", "new-shapes-photo"][:4 if expected else 2]
    assert out.count("  t=") == len(made_of) and all(f"-{n}  expert" in out for n in made_of)
    first_time = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(math.ceil(v.creation_timestamp / 1000)))
    assert main(["lineage", "--at", first_time]) == 0
    out = capsys.readouterr().out
    assert f"model {first['candidate']}" in out and out.count("  t=") == 2
    assert main(["lineage", "--at", "2000-01-01T00:00:00"]) == 2

    assert main(["diff", first["run_id"], refused["run_id"]]) == 0
    out = capsys.readouterr().out
    assert (
        "stream.tasks: ['letters-photo', 'numerals-neon'] -> ['letters-photo', 'numerals-neon', 'handwritten-digits']"
        in out
    )
    assert "update.new_tasks: letters-photo,numerals-neon -> handwritten-digits" in out
    assert "gate.decision: promoted -> refused" in out and "A_ZS:" in out


def test_two_updates_at_once_train_each_task_once(dvc_project, prefect_api):
    project = dvc_project
    for name in ("letters-photo", "numerals-neon"):
        assert main(["arrive", name]) == 0
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO),
           "PREFECT_HOME": str(project / ".prefect")}
    procs = [subprocess.Popen([sys.executable, "-m", "flows.cli", "update"], cwd=project, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    firsts = sorted(o.splitlines()[0].split(":")[0] for o, _ in outs)
    assert firsts == ["promoted", "up to date"]
    assert [a["name"] for a in read_arrivals(project)] == ["letters-photo", "numerals-neon"]
    assert len(read_decisions(project)) == 1
    store = CheckpointStore(project / "store")
    for oid in store.ids():
        store.verify(oid)
    cfg = load_config(project / "params.yaml")
    client = MlflowClient(tracking_uri=cfg.tracking.mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                              "tags.`stage.train` = 'computed'")
    assert sorted(r.data.tags["chronomerge.t"] for r in runs) == ["1", "2"]


@pytest.mark.slow
def test_a_served_deployment_picks_up_arriving_data(dvc_project):
    project = dvc_project
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["update"] = {"interval": 10}  # each run is a process (imports ~5 s of CPU): not back to back
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    # No PREFECT_API_URL: `serve` starts its own Prefect server, whose scheduler creates the runs.
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({"PYTHONPATH": str(REPO), "PREFECT_HOME": str(project / ".prefect")})
    serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve"], cwd=project, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert main(["arrive", "letters-photo"]) == 0
        deadline = time.time() + 300
        while time.time() < deadline and not read_decisions(project):
            assert serve.poll() is None, serve.stdout.read()[-3000:]
            time.sleep(2)
        (decision,) = read_decisions(project)
        assert decision["promoted"] and decision["new"] == ["letters-photo"]
        assert CheckpointStore(project / "store").ref("latest") == decision["candidate"]
        assert main(["arrive", "numerals-neon"]) == 0
        while time.time() < deadline and len(read_decisions(project)) < 2:
            time.sleep(2)
        second = read_decisions(project)[1]
        assert second["new"] == ["numerals-neon"] and second["tasks"] == 2
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
    out = serve.stdout.read()
    assert serve.returncode == 130, out[-3000:]  # Ctrl-C
    banner = out.splitlines()[0]
    assert banner.startswith("serving chronomerge-update every 10 s") and "no UI" in banner
    assert "Prefect UI" not in out and "/deployments/" not in out  # no link to a UI that is not served
    assert "promoted: first model" in out and "candidate " in out  # each update's decision, as it happened
    assert out.count("deployed (latest): ") >= 2
    import urllib.request

    api = banner.split("Prefect API ")[1].split(",")[0]
    with pytest.raises(OSError):  # the Prefect server serve started is stopped with it
        urllib.request.urlopen(f"{api}/health", timeout=5)


def test_update_takes_image_folders_manifests_and_experts_and_reports_the_rest(project, capsys):
    from conftest import make_image_folder
    from safetensors.torch import save_file

    from chronomerge.models import create_model

    incoming = project / "incoming"
    make_image_folder(incoming / "colours", n=5)
    make_image_folder(project / "pics", classes=("red", "blue"), n=3, seed=4)
    rows = [f"../pics/{c}/{i}.png,{c}" for c in ("red", "blue") for i in range(3)]
    (incoming / "few.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    time.sleep(0.05)  # arrival order follows modification times
    g = torch.Generator().manual_seed(5)
    expert = {k: (v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v).contiguous()
              for k, v in create_model(seed=1).state_dict().items()}
    save_file(expert, incoming / "colours.safetensors")  # evaluated on the dataset of the same name
    (incoming / "notes.txt").write_text("not a task")

    first = update_flow(project=str(project))
    assert first["status"] == "promoted" and first["new"] == ["colours", "few", "colours"]
    assert [(r["name"], r["status"]) for r in first["rejected"]] == [("notes.txt", "skipped")]
    assert [a["kind"] for a in read_arrivals(project)] == ["folder", "manifest", "expert"]
    assert (project / "data" / "colours" / "meta.json").exists() and (project / "data" / "few" / "meta.json").exists()
    store = CheckpointStore(project / "store")
    client = MlflowClient(tracking_uri=load_config(project / "params.yaml").tracking.mlflow_uri)
    runs = client.search_runs([client.get_run(first["run_id"]).info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{first['run_id']}'")
    by_t = {r.data.tags["chronomerge.t"]: r for r in runs}
    imported = store.meta(by_t["3"].data.tags["lineage.expert"])
    assert imported["technique"] == "import" and imported["extra"]["format"] == "open_clip"
    assert imported["extra"]["source"].endswith("data/.experts/colours.safetensors")
    assert by_t["3"].data.metrics["acc/colours"] >= 0 and "acc/few" in by_t["3"].data.metrics

    again = update_flow(project=str(project))
    assert again["status"] == "up to date" and [r["name"] for r in again["rejected"]] == ["notes.txt"]
    capsys.readouterr()
    assert main(["update"]) == 0
    assert "skipped notes.txt: not a dataset (meta.json), an image folder" in capsys.readouterr().out


def test_an_update_killed_at_any_point_completes_its_decision_and_a_withdrawn_arrival_leaves_the_stream(
        dvc_project, prefect_api):
    """Audit: an update killed after the arrivals record was written reran with `"new": []` and no
    `dvc add`. Each kill here is a SIGKILL at a named point (chronomerge.faults)."""
    from chronomerge.arrivals import REJECTED, WITHDRAWN
    from chronomerge.promotion import JOURNAL

    project = dvc_project
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO),
           "PREFECT_HOME": str(project / ".prefect")}

    def killed_update(at):
        done = subprocess.run([sys.executable, "-m", "flows.cli", "update"], cwd=project, capture_output=True,
                              text=True, timeout=600, env={**env, "CHRONOMERGE_KILL_AT": at})
        assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]

    assert main(["arrive", "letters-photo"]) == 0
    (project / "incoming" / "broken").mkdir()
    (project / "incoming" / "broken" / "meta.json").write_text("{}")
    killed_update("update:registered")
    assert [a["name"] for a in read_arrivals(project)] == ["letters-photo"] and (project / JOURNAL).exists()
    first = update_flow(project=str(project))
    assert first["status"] == "promoted" and first["new"] == ["letters-photo"]
    assert first["incoming_dvc_md5"] == yaml.safe_load((project / "incoming.dvc").read_text())["outs"][0]["md5"]
    assert not (project / JOURNAL).exists() and len(read_decisions(project)) == 1
    assert "unreadable" in json.loads((project / REJECTED).read_text())["broken"]["reason"]

    assert main(["arrive", "numerals-neon"]) == 0
    killed_update("update:promoted")  # the ref and the registered model moved, the decision not recorded
    second = update_flow(project=str(project), sets=["update.gate.tolerance=1"])
    assert second["promoted"] and second["new"] == ["numerals-neon"] and len(read_decisions(project)) == 2
    cfg = load_config(project / "params.yaml")
    client = MlflowClient(tracking_uri=cfg.tracking.mlflow_uri)
    versions = client.search_model_versions(f"name = '{cfg.update.registered_model}'")
    assert sorted(int(v.version) for v in versions) == [1, 2], "the resumed update reused its model version"

    assert main(["withdraw", "numerals-neon", "--reason", "mislabelled"]) == 0
    record = read_arrivals(project)
    assert record[-1]["withdraw_reason"] == "mislabelled" and "withdrawn" in record[-1]
    assert (project / "incoming" / WITHDRAWN / "numerals-neon" / "meta.json").exists()
    assert not (project / "data" / "numerals-neon").exists()
    assert (project / "data" / WITHDRAWN / "numerals-neon").exists()
    third = update_flow(project=str(project), sets=["update.gate.tolerance=1"])
    assert third["stream"] == ["letters-photo"] and third["tasks"] == 1 and third["candidate"] == first["candidate"]
    assert update_flow(project=str(project))["status"] == "up to date"
    assert main(["withdraw", "numerals-neon"]) == 2  # withdrawn already: one clear error
