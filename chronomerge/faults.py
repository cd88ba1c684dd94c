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
    """SIGKILL this process if `CHRONOMERGE_KILL_AT` names `name`. With `CHRONOMERGE_KILL_ONCE=<file>`,
    only the first process to reach the point dies (it creates the file first): a worker of a cluster
    killed once, whose task is then rerun by another worker with the same environment."""
    if os.environ.get("CHRONOMERGE_KILL_AT") != name:
        return
    once = os.environ.get("CHRONOMERGE_KILL_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)
