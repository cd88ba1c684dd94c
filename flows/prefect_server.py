"""Prefect servers for the commands: the temporary one a flow runs against, and the long-running one
that scheduled runs need.

* `booting()`: Prefect's temporary local server takes seconds to boot; a command checks its params'
  schema, starts the server in the background, imports torch and open_clip and checks the rest meanwhile,
  and waits for it before the flow starts.
* `server_for_schedules()`: the temporary server refuses to schedule, so `chronomerge serve` starts
  `prefect server start` on loopback under PREFECT_HOME and points PREFECT_API_URL at it.
* Orphans: a server outlives a command killed with SIGKILL (nothing in the command runs then). Each
  server a command starts is recorded in PREFECT_HOME/servers/<pid>.json with the command's pid, and
  every command (`flows/cli.main`) first reaps the recorded servers whose command is gone.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

_STARTED: list[subprocess.Popen] = []  # long-running servers this process started


def _registry() -> Path:
    return Path(os.environ["PREFECT_HOME"]) / "servers"


def _record(pid: int) -> None:
    from chronomerge.store import atomic_write_bytes

    _registry().mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(_registry() / f"{pid}.json", json.dumps({"server": pid, "owner": os.getpid()}).encode())


def _is_prefect_server(pid: int) -> bool:
    """Whether `pid` runs a Prefect server (a recorded pid may since belong to another process)."""
    try:
        return b"prefect" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def reap_orphans() -> list[int]:
    """Stop the recorded Prefect servers whose command no longer runs; returns their pids."""
    from chronomerge.store import pid_alive

    reaped = []
    for path in sorted(_registry().glob("*.json")) if _registry().is_dir() else []:
        try:
            rec = json.loads(path.read_text())
            server, owner = int(rec["server"]), int(rec["owner"])
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            continue
        if pid_alive(owner):
            continue
        if pid_alive(server) and _is_prefect_server(server):
            os.kill(server, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while pid_alive(server) and time.monotonic() < deadline:
                time.sleep(0.1)
            if pid_alive(server):
                os.kill(server, signal.SIGKILL)
            reaped.append(server)
        path.unlink(missing_ok=True)
    return reaped


@contextlib.contextmanager
def booting():
    """Boot the temporary server in the background for the body of the `with` (imports, checks), and
    wait for it at the end. When the body fails (a user's bad field), the server is stopped before the
    error goes on, so a refused command leaves none running. Nothing to boot when PREFECT_API_URL names
    a server."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    boot = None
    if not PREFECT_API_URL.value() and PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        boot = threading.Thread(target=server.start, daemon=True)
        boot.start()
    try:
        yield
    except BaseException:
        if boot is not None:
            boot.join()
            server.stop()
        raise
    if boot is not None:
        boot.join()
        if server.server_process is not None:
            _record(server.server_process.pid)


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 180) -> bool:
    """Wait until `url` answers (a server's health endpoint); False when `process` exits first or
    `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return True
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.5)


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
    if not wait_healthy(f"{url}/health", server):
        server.kill()
        raise RuntimeError(f"the Prefect server did not start; see {log}")
    os.environ["PREFECT_API_URL"] = url
    _STARTED.append(server)
    _record(server.pid)
    return server


def stop_all() -> None:
    """Stop every Prefect server this process started (an interrupted command leaves none behind)."""
    server = sys.modules.get("prefect.server.api.server")  # not imported yet: it started no server
    instances = server.SubprocessASGIServer._instances.values() if server is not None else ()
    temporary = [s.server_process for s in list(instances)]
    for process in [*temporary, *_STARTED]:
        if process is not None and process.poll() is None:
            process.terminate()
