"""Orchestration cost of the default stream: a full run, then a rerun of the finished stream.

    python bench/pipeline_bench.py [--project /tmp/chronomerge-bench] [--set stream.length=20 ...]

Runs `chronomerge run` twice as separate processes in `--project` (created with the repo's
params.yaml; the datasets and the pretrained base are made there first and not timed). Reports:
* the first run's command wall time, the seconds spent inside train, merge (init + deploy) and
  eval stages, and the overhead = wall − those seconds, as a share of the wall time
  (target ≤ 10%: Prefect, MLflow, the store's verification, process start and imports);
* the rerun's command wall time (target ≤ 30 s), with every stage a cache hit.
Writes the figures as JSON to stdout and to `--out` when given.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def chronomerge(project: Path, *args: str) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=project, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"chronomerge {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return wall, done.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", type=Path, default=Path("/tmp/chronomerge-bench"))
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    proj = args.project
    proj.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", proj / "params.yaml")
    sets = [x for s in args.set for x in ("--set", s)]
    for stage in ("prepare", "pretrain"):  # not timed
        chronomerge(proj, stage, *sets)
    for stale in (".prefect/storage", "outputs"):  # a fresh stream: no cached stages
        shutil.rmtree(proj / stale, ignore_errors=True)
    wall, out = chronomerge(proj, "run", "--quiet", *sets)
    history = json.loads((proj / "outputs" / "history.json").read_text())
    inside = {s: sum(step["seconds"][s] for step in history["steps"] if step["status"][s] == "computed")
              for s in ("init", "train", "store", "deploy", "eval")}
    work = inside["train"] + inside["init"] + inside["deploy"] + inside["eval"]
    rerun_wall, rerun_out = chronomerge(proj, "run", "--quiet", *sets)
    rerun = json.loads((proj / "outputs" / "history.json").read_text())
    cached = sum(v == "cached" for step in rerun["steps"] for v in step["status"].values())
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "tasks": len(history["steps"]),
        "run_wall_s": round(wall, 1), "stage_seconds": {k: round(v, 1) for k, v in inside.items()},
        "train_merge_eval_s": round(work, 1), "overhead_s": round(wall - work, 1),
        "overhead_share": round((wall - work) / wall, 3),
        "rerun_wall_s": round(rerun_wall, 1), "rerun_cached_stages": f"{cached}/{5 * len(rerun['steps'])}",
        "same_deployed": out.strip().splitlines()[-1] == rerun_out.strip().splitlines()[-1],
        "final": json.loads((proj / "outputs" / "metrics.json").read_text()),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
