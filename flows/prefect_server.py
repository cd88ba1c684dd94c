"""Prefect servers for the commands: the temporary one a flow runs against, and the long-running one
that scheduled runs need.

* `booting()`: Prefect's temporary local server takes seconds to boot; a command starts it in the
  background, imports torch and open_clip meanwhile, and waits for it before the flow starts.
* `server_for_schedules()`: the temporary server refuses to schedule, so `chronomerge serve` starts
  `prefect server start` on loopback under PREFECT_HOME and points PREFECT_API_URL at it.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

_STARTED: list[subprocess.Popen] = []  # long-running servers this process started


@contextlib.contextmanager
def booting():
    """Boot the temporary server in the background for the body of the `with` (imports, checks), and
    wait for it at the end. Nothing to boot when PREFECT_API_URL names a server."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    boot = None
    if not PREFECT_API_URL.value() and PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        from prefect.server.api.server import SubprocessASGIServer

        boot = threading.Thread(target=SubprocessASGIServer().start, daemon=True)
        boot.start()
    yield
    if boot is not None:
        boot.join()


def server_for_schedules() -> subprocess.Popen | None:
    """A long-running Prefect server with its scheduler on a free loopback port, PREFECT_API_URL set
    to it; None when PREFECT_API_URL already names a server. The caller terminates it."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = Path(os.environ["PREFECT_HOME"]) / "server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "10"}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port), "--no-ui"], env=env, stdout=log.open("ab"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"the Prefect server did not start; see {log}") from None
            time.sleep(0.5)
    os.environ["PREFECT_API_URL"] = url
    _STARTED.append(server)
    return server


def stop_all() -> None:
    """Stop every Prefect server this process started (an interrupted command leaves none behind)."""
    from prefect.server.api.server import SubprocessASGIServer

    temporary = [s.server_process for s in list(SubprocessASGIServer._instances.values())]
    for process in [*temporary, *_STARTED]:
        if process is not None and process.poll() is None:
            process.terminate()
