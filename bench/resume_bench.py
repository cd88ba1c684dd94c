"""A new user's crash, at full scale: `chronomerge run --set stream.length=3` in a fresh project,
SIGKILLed while it pretrains the base, then run again; against the same command uninterrupted.

    .venv/bin/python bench/resume_bench.py [--kill-after 250] [--out bench/results-resume.json]

Both projects are fresh (the default params.yaml, datasets generated, the base pretrained from
step 0 with the default recipe). Reports each command's wall time, the step the rerun resumed at,
and whether the rerun deployed the uninterrupted run's checkpoint and wrote its metrics.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
       "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
ENV.pop("PREFECT_HOME", None)  # each project keeps its own (./.prefect), as a user's does
COMMAND = [sys.executable, "-m", "flows.cli", "run", "--set", "stream.length=3"]


def project(scratch: Path, name: str) -> Path:
    p = scratch / name
    p.mkdir()
    shutil.copy(ROOT / "params.yaml", p / "params.yaml")
    return p


def run(cwd: Path, kill_after: float | None = None) -> tuple[float, str, str, int]:
    t0 = time.perf_counter()
    p = subprocess.Popen(COMMAND, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
    return time.perf_counter() - t0, out, err, p.returncode


def deployed(out: str) -> str | None:
    m = re.search(r"deployed: ([0-9a-f]{64})", out)
    return m.group(1) if m else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kill-after", type=float, default=250.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results-resume.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        ref = project(scratch, "uninterrupted")
        ref_s, ref_out, ref_err, ref_rc = run(ref)
        assert ref_rc == 0, ref_err[-2000:]
        crashed = project(scratch, "crashed")
        kill_s, _, kill_err, kill_rc = run(crashed, args.kill_after)
        again_s, again_out, again_err, again_rc = run(crashed)
        m = re.search(r"resumed from its progress checkpoint at step (\d+)/(\d+)", again_err)
        metrics = [(p / "outputs" / "metrics.json").read_text() for p in (ref, crashed)]
        result = {
            "command": " ".join(["chronomerge", *COMMAND[3:]]),
            "uninterrupted_s": round(ref_s, 1), "killed_after_s": round(kill_s, 1), "killed_rc": kill_rc,
            "rerun_s": round(again_s, 1), "rerun_rc": again_rc,
            "resumed_at_step": int(m.group(1)) if m else None, "of_steps": int(m.group(2)) if m else None,
            "same_deployed": deployed(ref_out) is not None and deployed(again_out) == deployed(ref_out),
            "same_metrics": metrics[0] == metrics[1],
            "progress_left": sorted(str(p.relative_to(crashed)) for p in (crashed / "store" / "progress").glob("*")),
            "resume_lines": [line for line in again_err.splitlines() if "progress checkpoint" in line],
        }
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
