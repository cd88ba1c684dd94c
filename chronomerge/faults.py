"""Named points where the fault-injection suite (`bench/faults.py`) and the tests kill a command.

`CHRONOMERGE_KILL_AT=<point>` in the environment makes the process SIGKILL itself when it reaches
that point (nothing runs after it: no `finally`, no atexit), which is what a preempted node or an
out-of-memory kill does. Unset, `point()` costs one dictionary look-up.

Points: `store:rename` (an object or record written and fsynced under its temp name, not renamed),
`mlflow:task-run` (a task's MLflow run created, half logged), `update:registered` (arrivals
recorded, `dvc add` not run), `update:versioned` (`dvc add` done, the stream not run),
`update:promoted` (the ref and the registered model moved, the decision not recorded); inside a
training (`chronomerge.resume`), for the stage `base` (pretraining), `train` or `align`:
`<stage>:step:<k>` (before step k runs: k steps done) and `<stage>:checkpoint:<k>` (step k's
progress checkpoint half written: its tensors on disk, its record not).
"""
from __future__ import annotations

import os
import signal


def point(name: str) -> None:
    """SIGKILL this process if `CHRONOMERGE_KILL_AT` names `name`."""
    if os.environ.get("CHRONOMERGE_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
