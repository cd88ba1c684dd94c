"""Ctrl-C at any moment of a command, its imports included: one line and exit 130.

Standard library only, so that the `chronomerge` command installs the handler before it imports torch,
Prefect and MLflow (seconds of start-up during which Python's default would print a traceback)."""
from __future__ import annotations

import os
import signal
import sys

LINE = "interrupted: rerun the same command to resume (finished stages are cached)"


def interrupted(signum, frame) -> None:
    """Stop at once, as a kill would. Every write is atomic and stage locks go with the process, so
    rerunning the command resumes (the MLflow run left RUNNING is marked KILLED then). Waiting for
    Prefect to report the interrupted task to its temporary server, which the terminal's Ctrl-C has
    stopped too, would hang and print pages of retries."""
    try:
        sys.stdout.flush()
        print(LINE, file=sys.stderr, flush=True)
        server = sys.modules.get("flows.prefect_server")  # loaded: stop the servers it started
        if server is not None:
            server.stop_all()
    finally:  # whatever stopping them raised, the command ends here, as interrupted
        os._exit(130)


def command() -> int:
    """The `chronomerge` console script: the handler first, then the imports and the command."""
    signal.signal(signal.SIGINT, interrupted)
    from flows.cli import main

    return main()
