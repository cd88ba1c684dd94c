"""Run `chronomerge run` in this process and SIGKILL it at a chosen point (for the resume tests).

    python tests/crash_run.py train N   kill at the N-th training step of this process
    python tests/crash_run.py store N   kill during the N-th checkpoint write, the file half written

A real SIGKILL: nothing is flushed or cleaned up, exactly as when a machine loses the process.
"""
import os
import signal
import sys

import chronomerge.store
import chronomerge.train
from flows.cli import main

where, n = sys.argv[1], int(sys.argv[2])
calls = 0


def _count() -> bool:
    global calls
    calls += 1
    return calls == n


if where == "train":
    real_step = chronomerge.train._clip_step

    def step(*args, **kwargs):
        if _count():
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(*args, **kwargs)

    chronomerge.train._clip_step = step
elif where == "store":
    real_save = chronomerge.store.save_file

    def save_file(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata)
        if _count():
            size = os.path.getsize(filename)
            os.truncate(filename, size // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    chronomerge.store.save_file = save_file
else:
    raise SystemExit(f"unknown kill point {where!r}; expected train or store")

sys.exit(main(["run", "--quiet"]))
