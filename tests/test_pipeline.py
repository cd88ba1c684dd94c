"""The stream flow with real Prefect, MLflow and the checkpoint store on a 3-task tiny stream."""
import json
import math

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from chronomerge.config import load_config
from chronomerge.data.streams import build_stream, multitask
from chronomerge.stages import task_digest
from chronomerge.store import CheckpointStore
from flows.cli import main
from flows.stream import STAGES, stream_flow


def run(project, *sets):
    cfg = load_config(project / "params.yaml", list(sets))
    return stream_flow(cfg, project=str(project), quiet=True)


def statuses(summary, stage=None):
    return [(s["t"], s["stage"], s["status"]) for s in summary["stages"] if stage in (None, s["stage"])]


def test_first_run_computes_every_stage_and_a_rerun_computes_none(project):
    first = run(project)
    assert all(s == "computed" for _, _, s in statuses(first))
    # Prefect's runs are named after what they do: the flow run after the stream, stage runs after their task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort

    from flows.stream import stream_title

    with get_client(sync_client=True) as client:  # the newest runs: this test's
        flow_runs = {r.name for r in client.read_flow_runs(limit=20, sort=FlowRunSort.START_TIME_DESC)}
        stage_runs = {r.name for r in client.read_task_runs(limit=200, sort=TaskRunSort.EXPECTED_START_TIME_DESC)}
    assert stream_title(load_config(project / "params.yaml")) in flow_runs
    first_task = build_stream("dataset-incremental", 3, 0)[0].name
    assert {"base", "init task 1", f"train {first_task}", "store task 1", f"deploy {first_task}",
            f"eval {first_task}", "eval zero-shot θ0"} <= stage_runs
    # ... its logs reach the Prefect API (the UI), and the stream's outcome is an artifact of its flow run
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    title = stream_title(load_config(project / "params.yaml"))
    with get_client(sync_client=True) as client:
        run_id = next(r.id for r in client.read_flow_runs(limit=20, sort=FlowRunSort.START_TIME_DESC)
                      if r.name == title)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        artifacts = [a for a in client.read_artifacts(limit=200) if a.key == f"stream-{first['stream_key'][:16]}"]
    assert any("Finished in state" in entry.message for entry in logs)
    assert any(first["deployed"] in a.data and "| GM |" in a.data and "zero-shot θ0" in a.data for a in artifacts)
    assert len(first["stages"]) == 3 * len(STAGES)
    again = run(project)
    assert all(s == "cached" for _, _, s in statuses(again))
    assert again["deployed"] == first["deployed"] and again["final"] == first["final"]
    metrics = json.loads((project / "outputs" / "metrics.json").read_text())
    assert set(metrics) == {"A_KA", "A_ZS", "GM", "ACC", "BWT"}, "DVC metrics: numbers only"
    assert 0 < metrics["A_KA"] <= 1 and 0 < metrics["A_ZS"] <= 1 and metrics["GM"] == round(first["final"]["GM"], 6)
    assert metrics["GM"] == pytest.approx(math.sqrt(metrics["A_KA"] * metrics["A_ZS"]), abs=1e-5)
    assert metrics["GM"] == pytest.approx(first["final"]["GM"], abs=1e-6)
    for f in ("history.json", "curves.csv", "report.md", "plots/metrics.png", "plots/accuracy_matrix.png"):
        assert (project / "outputs" / f).stat().st_size > 0
    # the zero-shot reference: θ0 on the same sets, in the history and the report
    reference = json.loads((project / "outputs" / "history.json").read_text())["zero_shot"]
    assert reference == first["zero_shot"] and set(reference) == {"A_KA", "A_ZS", "GM", "ACC"}
    assert reference["GM"] == pytest.approx(math.sqrt(reference["A_KA"] * reference["A_ZS"]))
    assert f"GM {100 * reference['GM']:.1f}%" in (project / "outputs" / "report.md").read_text()


def test_changing_the_deploy_technique_reruns_only_deploy_and_eval(project):
    first = run(project)
    second = run(project, "strategy.deploy.technique=ties")
    for t, stage, status in statuses(second):
        assert status == ("computed" if stage in ("deploy", "eval") else "cached"), (t, stage)
    assert second["deployed"] != first["deployed"]


def test_changing_the_learning_rate_reruns_from_the_first_train_on(project):
    first = run(project)
    second = run(project, "train.lr=0.001")
    got = {(t, stage): status for t, stage, status in statuses(second)}
    assert got.pop((1, "init")) == "cached"  # θ^I_1 = θ0 does not depend on training
    assert set(got.values()) == {"computed"}
    store = CheckpointStore(project / "store")
    experts = [store.meta(h["checkpoints"]["expert"]) for h in
               json.loads((project / "outputs" / "history.json").read_text())["steps"]]
    assert [e["hparams"]["lr"] for e in experts] == [0.001] * 3
    assert second["deployed"] != first["deployed"]


def test_lengthening_the_stream_runs_only_the_new_tasks(project):
    run(project)
    longer = run(project, "stream.length=5")
    for t, stage, status in statuses(longer):
        assert status == ("cached" if t <= 3 else "computed"), (t, stage)


def test_a_cached_result_whose_checkpoint_left_the_store_is_recomputed(project):
    import shutil

    shutil.copytree(project / "store", project / "store-with-base-only")
    first = run(project)
    shutil.rmtree(project / "store")
    (project / "store-with-base-only").rename(project / "store")
    again = run(project)
    assert again["deployed"] == first["deployed"]
    assert {s for _, stage, s in statuses(again) if stage == "train"} == {"computed"}
    assert again["deployed"] in CheckpointStore(project / "store")


def test_mlflow_holds_one_parent_run_with_nested_task_runs_and_lineage(project, capsys):
    summary = run(project)
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    parent = client.get_run(summary["run_id"])
    assert parent.info.status == "FINISHED"
    assert (
        parent.data.params["train.lr"] == str(load_config(None).train.lr) and parent.data.params["stream.length"] == "3"
    )
    assert parent.data.tags["lineage.deployed"] == summary["deployed"]
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "GM")] == [1, 2, 3]
    assert {k: parent.data.metrics[f"zero_shot/{k}"] for k in summary["zero_shot"]} == pytest.approx(
        summary["zero_shot"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)} | {
        a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"metrics.json", "history.json", "report.md", "plots/metrics.png", "plots/accuracy_matrix.png"} <= artifacts
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 3
    history = json.loads((project / "outputs" / "history.json").read_text())
    store = CheckpointStore(project / "store")
    for child in children:
        t = int(child.data.tags["chronomerge.t"])
        ids = history["steps"][t - 1]["checkpoints"]
        for k in ("init", "expert", "deployed"):
            assert child.data.tags[f"lineage.{k}"] == ids[k]
            tag = child.data.tags[f"lineage.{k}.parents"]
            assert (tag.split(",") if tag else []) == store.meta(ids[k])["parents"]
        assert child.data.tags["stage.train"] == "computed"
        assert "acc/eval-colours" in child.data.metrics
        assert child.inputs.dataset_inputs, "the task's data is logged as an MLflow input"
        # the run lasts as long as its task did (training included), and says what the task ran
        assert child.info.end_time - child.info.start_time >= 1000 * history["steps"][t - 1]["seconds"]["train"]
        assert child.data.params["task"] == child.info.run_name == history["steps"][t - 1]["task"]
        assert child.data.params["train.lr"] == parent.data.params["train.lr"]
        assert child.data.params["deploy.mode"] == parent.data.params["strategy.deploy.mode"]
        # every id in a tag is a full id; the description links the runs that made the experts it is made of
        made_of = child.data.tags["lineage.made_of"].split(",")
        assert made_of == [s["checkpoints"]["expert"] for s in history["steps"][:t]]
        note = child.data.tags["mlflow.note.content"]
        for earlier in children:
            if int(earlier.data.tags["chronomerge.t"]) < t:
                assert f"#/experiments/{parent.info.experiment_id}/runs/{earlier.info.run_id}" in note
    assert main(["lineage", summary["run_id"]]) == 0
    out = capsys.readouterr().out
    assert summary["deployed"][:16] in out and "expert" in out and "base" in out
    assert main(["lineage", summary["deployed"]]) == 0
    out = capsys.readouterr().out
    last = next(c for c in children if c.data.tags["chronomerge.t"] == "3")
    assert f"deployed by mlflow run {last.info.run_id}" in out
    assert "git commit unknown" in out  # the test project is not a git repository
    assert out.count("expert  ") == 3, "each of the three experts is shown once"
    assert main(["lineage", summary["deployed"][:16]]) == 0  # the ids lineage prints can be pasted back
    assert capsys.readouterr().out == out


def test_opcm_deploys_through_its_stored_state_and_logs_lambda(project):
    import math

    from chronomerge.merge import OPCM, load_merger

    sets = ["strategy.init.mode=zs", "train.mode=vision", "strategy.deploy.mode=continual",
            "strategy.deploy.merger=opcm"]
    summary = run(project, *sets)
    history = json.loads((project / "outputs" / "history.json").read_text())
    store = CheckpointStore(project / "store")
    experts = [store.load(s["checkpoints"]["expert"]) for s in history["steps"]]
    reference = OPCM(store.get(summary["base"]), device="cpu")
    for step, expert in zip(history["steps"], experts):
        merged = reference.update(expert)
        deployed = store.load(step["checkpoints"]["deployed"])
        assert all(torch.equal(deployed[k], merged[k]) for k in merged), step["t"]
        assert step["lambda"] == pytest.approx(reference.lam)
    state = store.meta(history["steps"][-1]["checkpoints"]["deployed"])["parents"][0]
    assert store.meta(state)["kind"] == "merger-state"
    assert load_merger(store, state, store.get(summary["base"])).t == 3
    cos = np.asarray(history["task_vector_cosine"])
    assert cos.shape == (3, 3) and np.allclose(np.diag(cos), 1)
    assert (project / "outputs" / "plots" / "opcm_lambda.png").exists()
    assert (project / "outputs" / "plots" / "task_vector_cosine.png").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    lam = client.get_metric_history(summary["run_id"], "opcm/lambda")
    assert [m.step for m in lam] == [1, 2, 3] and lam[0].value == 1.0
    assert client.get_metric_history(summary["run_id"], "opcm/sqrt_t")[-1].value == pytest.approx(math.sqrt(3))
    # Switching the merger's diagonal convention reuses every expert.
    other = run(project, *sets, "strategy.deploy.hparams={zero_diagonal: false}")
    assert {s for _, stage, s in statuses(other) if stage in ("init", "train", "store")} == {"cached"}
    assert other["deployed"] != summary["deployed"]


def test_cmm_fisher_merge_with_alignment_and_the_zero_shot_baseline(project):
    from chronomerge.merge import FisherMerge

    summary = run(project, "strategy.init.mode=zs", "train.mode=linear", "strategy.deploy.mode=continual",
                  "strategy.deploy.merger=fisher_merge", "strategy.deploy.align=l2")
    history = json.loads((project / "outputs" / "history.json").read_text())
    store = CheckpointStore(project / "store")
    base = store.get(summary["base"])
    reference = FisherMerge(base, device="cpu")
    for step in history["steps"]:
        ids = step["checkpoints"]
        merged = reference.update(store.get(ids["expert"]), fisher=store.get(ids["fisher"]))
        deployed = store.load(ids["deployed"])
        # Everything but the aligned projection is the Fisher merge; the projection moved.
        assert all(torch.equal(deployed[k], merged[k]) for k in merged if k != "visual.proj")
        assert not torch.equal(deployed["visual.proj"], merged["visual.proj"])
        reference.current["visual.proj"] = deployed["visual.proj"].clone()  # carried forward
    zs = run(project, "strategy.init.mode=zs", "train.mode=linear", "strategy.deploy.mode=zs")
    assert zs["deployed"] == summary["base"]
    # a stream that deploys θ0 at every task ends where every stream's zero-shot reference is
    assert zs["zero_shot"] == summary["zero_shot"]
    assert {k: zs["final"][k] for k in ("A_KA", "A_ZS", "GM", "ACC")} == pytest.approx(summary["zero_shot"])
    assert {s for _, stage, s in statuses(zs) if stage == "train"} == {"cached"}


def test_the_multitask_baseline_trains_once_on_all_the_streams_data_with_its_whole_budget(project):
    summary = run(project, "stream.multitask=true", "strategy.deploy.mode=ft")
    history = json.loads((project / "outputs" / "history.json").read_text())
    assert len(history["steps"]) == 1 and summary["deployed"] == history["steps"][0]["checkpoints"]["expert"]
    expert = CheckpointStore(project / "store").meta(summary["deployed"])
    assert expert["hparams"]["steps"] == 3 * 5
    assert expert["extra"]["task"] == "multitask"
    joint = multitask(build_stream("dataset-incremental", 3))
    assert len(joint.parts) == 3
    digests = json.loads((project / "data" / "manifest.json").read_text())["datasets"]
    assert expert["data_digest"] == task_digest(joint, digests), "trained on the three datasets joined"
    assert len(history["steps"][0]["row"]) == 1
