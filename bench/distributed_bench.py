"""A sweep's wall time on Dask with 1 and 2 worker processes, and what the engine adds per stage.

    .venv/bin/python bench/distributed_bench.py [--points 4] [--length 3] [--steps 40] [--out FILE]

One small project (the tiny model, pretrained base made first, not timed) is copied fresh for each
runner, so every run computes every stage: `--points` streams that share nothing (each its own
`train.seed`), each `--length` tasks of `--steps` training steps. Runners: threads (1 worker, the
in-process baseline), Dask with 1 worker process, Dask with 2. The engine's overhead per stage is
(Dask 1 worker − threads 1 worker) / stages run: the cost of dispatching points to another process
(its start, imports and Prefect client) spread over the stages it runs.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tasks  # noqa: E402,F401  (Prefect's environment defaults)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=4)
    ap.add_argument("--length", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results-distributed-cpu.json"))
    args = ap.parse_args()
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from chronomerge.config import validate
    from chronomerge.stages import Workspace, run_base
    from flows.stream import check, prepare_inputs
    from flows.sweep import sweep_flow

    params = {"data": {"size_factor": 0.2}, "pretrain": {"steps": 20, "batch_size": 32},
              "stream": {"length": args.length}, "train": {"steps": args.steps, "batch_size": 32}}
    sweep = {"name": "bench", "base": {}, "grid": {"train.seed": list(range(args.points))}}
    rows = []
    with prefect_test_harness(server_startup_timeout=180), tempfile.TemporaryDirectory() as tmp:
        seed = Path(tmp) / "seed"
        seed.mkdir()
        cfg = validate(params)
        ws = Workspace(str(seed / "store"), str(seed / "data"))
        arch, sets = check(cfg)
        prepare_inputs(cfg, ws, sets)
        c = cfg.to_dict()
        run_base(ws, arch, c["model"], c["pretrain"], c["data"])
        for runner, workers in (("threads", 1), ("dask", 1), ("dask", 2)):
            project = Path(tmp) / f"{runner}-{workers}"
            shutil.copytree(seed, project)
            raw = {**params, "tracking": {"mlflow_uri": f"sqlite:///{project}/mlflow.db"}}
            (project / "params.yaml").write_text(yaml.safe_dump(raw))
            with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: project / ".prefect" / "storage"}):
                t0 = time.perf_counter()
                summary = sweep_flow(raw, sweep, project=str(project), workers=workers, runner=runner)
                wall = time.perf_counter() - t0
            assert not summary["failed"], summary["failed"]
            row = {"runner": runner, "workers": workers, "wall_s": round(wall, 1), "points": summary["points"],
                   "stages": 5 * args.points * args.length, "trainings_run": summary["trainings_run"],
                   "deployed": sorted(r["deployed"] for r in summary["results"])}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "deployed"}), flush=True)
    threads1, dask1, dask2 = rows
    out = {"threads": torch.get_num_threads(), "args": vars(args), "rows": rows,
           "speedup_2_vs_1_dask_workers": round(dask1["wall_s"] / dask2["wall_s"], 2),
           "engine_overhead_per_stage_s": round((dask1["wall_s"] - threads1["wall_s"]) / dask1["stages"], 3),
           "same_results": threads1["deployed"] == dask1["deployed"] == dask2["deployed"]}
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}))
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
