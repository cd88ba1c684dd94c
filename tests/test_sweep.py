"""Sweeps: a grid of stream runs in parallel that never train the same expert twice."""
import contextlib
import csv
import io
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from chronomerge.config import ConfigError, load_config, validate
from flows.stream import stream_flow
from flows.sweep import load_sweep, point_name, points, sweep_flow


def test_a_parallel_sweep_trains_each_distinct_expert_once_and_compares_the_runs(project):
    raw = yaml.safe_load((project / "params.yaml").read_text())
    sweep = {"name": "pairs", "base": {"strategy": {"init": {"weight": 0.5}}},
             "grid": {"strategy.init.mode": ["zs", "ema"], "strategy.deploy.mode": ["ft", "ema"]}}
    summary = sweep_flow(raw, sweep, project=str(project), workers=2)
    # zs trains tasks 1-3 from θ0; ema shares task 1 (its init is θ0 too) and trains 2-3: 5 of 12.
    assert summary["points"] == 4 and summary["train_stages"] == 12
    assert summary["trainings_run"] == 5 and summary["trainings_shared"] == 7
    folder = project / "outputs" / "sweeps" / "pairs"
    for f in ("summary.md", "summary.csv", "summary.json", "plots/curves.png", "plots/final_gm.png"):
        assert (folder / f).stat().st_size > 0
    # Each point equals the same stream run on its own.
    best = next(r for r in summary["results"] if r["point"] == "init.mode=ema,deploy.mode=ema")
    alone = stream_flow(load_config(project / "params.yaml"), project=str(project), quiet=True)
    assert alone["deployed"] == best["deployed"] and alone["final"]["GM"] == pytest.approx(best["GM"])
    # Every point is set against zero-shot θ0 on the same sets: one reference for one task order.
    assert all(r["zero_shot"] == alone["zero_shot"] for r in summary["results"])
    md = (folder / "summary.md").read_text()
    zs = alone["zero_shot"]["GM"]
    for r in summary["results"]:
        d = 100 * (r["GM"] - zs)
        assert f"| {r['point']} | " in md and f" | {'+' if d >= 0 else '−'}{abs(d):.1f} |\n" in md
    above = sum(r["GM"] > zs for r in summary["results"])
    assert f"Zero-shot θ0 on the same sets: A_KA {100 * alone['zero_shot']['A_KA']:.1f}%" in md
    assert f"{above} of 4 points end above it in GM." in md
    header, *csv_rows = csv.reader(io.StringIO((folder / "summary.csv").read_text()))
    assert header[-5:] == ["zero_shot_A_KA", "zero_shot_A_ZS", "zero_shot_GM", "zero_shot_ACC", "deployed"]
    assert len(csv_rows) == 4 and all(float(row[-3]) == pytest.approx(zs, abs=1e-6) for row in csv_rows)
    client = MlflowClient(tracking_uri=raw["tracking"]["mlflow_uri"])
    tagged = client.search_runs([client.get_experiment_by_name("chronomerge").experiment_id],
                                "tags.`chronomerge.sweep` = 'pairs'")
    assert sorted(r.data.tags["chronomerge.point"] for r in tagged) == sorted(r["point"] for r in summary["results"])


def test_sweep_files_and_points_are_validated_before_anything_runs(tmp_path):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"grid": {"strategy.deploy.mode": ["ema", "latest"]}}))
    sweep = load_sweep(tmp_path / "s.yaml")
    assert sweep["name"] == "s"
    with pytest.raises(ConfigError, match="strategy.deploy.mode: 'latest' is not allowed"):
        points({}, sweep)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"grid": {"train.lr": []}}))
    with pytest.raises(ConfigError, match="non-empty list"):
        load_sweep(tmp_path / "bad.yaml")
    (tmp_path / "extra.yaml").write_text(yaml.safe_dump({"grid": {"train.lr": [1]}, "workers": 3}))
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['workers'\]"):
        load_sweep(tmp_path / "extra.yaml")
    got = points({}, {"name": "x", "base": {"train": {"steps": 7}}, "grid": {"train.lr": [0.1, 0.2]}})
    assert [values for values, _ in got] == [{"train.lr": 0.1}, {"train.lr": 0.2}]  # grid values as data
    assert [c.train.lr for _, c in got] == [0.1, 0.2] and {c.train.steps for _, c in got} == {7}
    assert got[0][1].paths.metrics == "outputs/sweeps/x/train.lr=0.1/metrics.json"
    assert got[0][1].paths.outputs == "outputs/sweeps/x/train.lr=0.1"


def test_a_diverging_point_is_reported_and_the_other_points_finish(project):
    raw = yaml.safe_load((project / "params.yaml").read_text())
    lr = load_config(project / "params.yaml").train.lr
    summary = sweep_flow(raw, {"name": "lr", "base": {"stream": {"length": 1}}, "grid": {"train.lr": [lr, 1e30]}},
                         project=str(project))
    assert [r["point"] for r in summary["results"]] == [f"train.lr={lr}"]
    assert [r["values"] for r in summary["results"]] == [{"train.lr": lr}]
    (failed,) = summary["failed"]
    assert failed["point"] == "train.lr=1e+30" and "NonFiniteError" in failed["error"]
    assert "has NaN or infinite values" in failed["error"]
    assert "train.lr=1e+30: NonFiniteError" in (project / "outputs" / "sweeps" / "lr" / "summary.md").read_text()
    client = MlflowClient(tracking_uri=raw["tracking"]["mlflow_uri"])
    runs = client.search_runs([client.get_experiment_by_name("chronomerge").experiment_id],
                              "tags.`chronomerge.point` = 'train.lr=1e+30'")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "NaN or infinite" in runs[0].data.tags["chronomerge.error"]


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[1] / "sweeps").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_committed_sweep_file_is_valid(path):
    sweep = load_sweep(path)
    runs = points({}, sweep)
    assert len(runs) == len({point_name(values) for values, _ in runs}) > 1


def test_the_reproduction_experiments_are_sweep_files():
    from chronomerge.merge import TECHNIQUES
    from flows.reproduce import SETTING_SWEEPS, SWEEPS, experiments

    assert sorted(p.stem for p in SWEEPS.glob("*.yaml")) == sorted(SETTING_SWEEPS)
    techniques = points({}, load_sweep(SWEEPS / "techniques.yaml"))
    # every technique but CMM's Fisher merge and the plain forms of DARE and Breadcrumbs, on both axes
    assert sorted(c.strategy.init.technique for _, c in techniques) == sorted(
        set(TECHNIQUES) - {"fisher", "dare", "breadcrumbs"})
    assert all(c.strategy.deploy.technique == c.strategy.init.technique for _, c in techniques)
    exps = experiments([0, 1], (2, 3))
    assert [e["name"] for e in exps[:len(SETTING_SWEEPS)]] == list(SETTING_SWEEPS)
    for exp in exps:  # every experiment's every point is a valid config, run over both seeds
        runs = points({}, exp)
        assert {v["stream.seed"] for v, _ in runs} == {0, 1}
        assert len(runs) == 2 * len({point_name({k: x for k, x in v.items() if k != "stream.seed"}) for v, _ in runs})


def test_runner_options_are_checked(project):
    from flows.sweep import task_runner

    with pytest.raises(ConfigError, match="--runner 'ray' is not allowed; expected one of threads, dask"):
        task_runner("ray", 2)
    with pytest.raises(ConfigError, match="--address is for Dask: use it with --runner dask"):
        task_runner("threads", 2, "tcp://127.0.0.1:8786")
    with pytest.raises(ConfigError, match="--gpus is for Dask: use it with --runner dask"):
        task_runner("threads", 2, gpus=1)
    with pytest.raises(ConfigError, match="--gpus lays out a local cluster"):
        task_runner("dask", 2, "tcp://127.0.0.1:8786", gpus=1)
    with pytest.raises(ConfigError, match="--workers and --points-per-gpu must be >= 1 and --gpus >= 0"):
        task_runner("dask", 2, gpus=-1)
    with pytest.raises(ConfigError, match=r"\(got 2, 0 and 1\)"):
        task_runner("dask", 2, gpus=1, per_gpu=0)


@pytest.mark.parametrize("device,runner,address,gpus,per_gpu,asks", [
    ("cuda", "dask", "tcp://h:8786", 0, 1, {"GPU": 1}),  # a GPU point on someone's cluster asks for a GPU worker
    ("auto", "dask", "tcp://h:8786", 0, 1, {}),  # ... an `auto` one runs wherever it lands
    ("auto", "dask", None, 2, 1, {"GPU": 1}),  # a local cluster with GPUs: `auto` trains on one
    ("auto", "dask", None, 2, 4, {"GPU": 0.25}),  # four points share a GPU
    ("auto", "dask", None, 0, 1, {}),
    ("cpu", "dask", None, 2, 1, {}),  # a CPU point leaves the GPUs to others
    ("cuda", "threads", None, 0, 1, {}),  # threads share this process's devices: nothing to ask
])
def test_a_point_asks_for_a_gpu_when_it_trains_on_one(device, runner, address, gpus, per_gpu, asks):
    from flows.sweep import point_resources

    assert point_resources(validate({"device": device}), runner, address, gpus, per_gpu) == asks


def test_a_local_cluster_gives_each_gpu_a_worker_running_k_points():
    from flows.sweep import local_cluster

    specs = local_cluster(workers=3, gpus=2, per_gpu=4)["workers"]
    got = {name: (s["options"]["nthreads"], s["options"]["env"]["CUDA_VISIBLE_DEVICES"], s["options"].get("resources"))
           for name, s in specs.items()}
    assert got == {"gpu-0": (4, "0", {"GPU": 1}), "gpu-1": (4, "1", {"GPU": 1}), "cpu-2": (1, "", None)}


def test_trainings_on_one_gpu_take_turns_and_cpu_trainings_do_not():
    """`gpu_slot` is the GPU's training lock (no GPU is touched: it only orders threads)."""
    import threading

    from chronomerge.train import gpu_slot

    cuda, got = torch.device("cuda"), []
    with gpu_slot(cuda):
        other = threading.Thread(target=lambda: got.append(gpu_slot(cuda).acquire(timeout=0.2)))
        other.start()
        other.join()
    assert got == [False]  # a second training found the GPU taken
    assert gpu_slot(cuda).acquire(timeout=0.2)  # and it is free once the first has ended
    gpu_slot(cuda).release()
    assert gpu_slot(torch.device("cpu")) is not gpu_slot(cuda) and not hasattr(gpu_slot(torch.device("cpu")), "acquire")


def test_a_points_stages_commit_when_they_return_not_when_the_point_ends(tmp_path, prefect_api):
    """A stage run inside a sweep point (any Prefect task) releases its lock and writes its record as soon
    as it returns. Under Prefect's nesting (the point task's transaction as the stages' parent) both
    waited for the whole point, and two points each waiting for a stage the other had finished deadlocked."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE, CacheKeyFnPolicy
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    from flows.stream import outside_transaction
    from tasks.locks import StageLockManager

    locks = StageLockManager(tmp_path / "locks")
    policy = CacheKeyFnPolicy(cache_key_fn=lambda ctx, p: f"stage-{p['x']}").configure(
        isolation_level="SERIALIZABLE", lock_manager=locks)
    records = tmp_path / "records"

    @task(cache_policy=policy, persist_result=True, result_serializer="json")
    def stage(x: int) -> int:
        return x

    @flow
    def stream(x: int, detached: bool) -> tuple[bool, bool]:  # as stream_flow runs its stages
        with outside_transaction() if detached else contextlib.nullcontext():
            stage(x)  # finished: is its lock free and its record written, while the point still runs?
        return locks.is_locked(f"stage-{x}"), (records / f"stage-{x}").exists()

    @task(cache_policy=NO_CACHE, persist_result=False)
    def point(x: int, detached: bool) -> tuple[bool, bool]:
        return stream(x, detached)

    @flow
    def sweep(x: int, detached: bool) -> tuple[bool, bool]:
        return point(x, detached)

    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: records}):
        assert sweep(1, False) == (True, False)  # Prefect's nesting: held and unwritten until the point ends
        assert sweep(2, True) == (False, True)
    assert not locks.is_locked("stage-1")  # released in the end either way
