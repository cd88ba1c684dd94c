"""Stage locks that die with their holder: Prefect's LockManager over `flock(2)`.

Prefect's FileSystemLockManager writes a lock file and deletes it on release; a process killed
while holding one (SIGKILL, a lost machine) leaves the file behind and every later run waits on it
forever. An flock is released by the kernel when the holding process dies, so a crashed run never
blocks its resume. Locks are per open file description, hence exclusive between threads of one
process (a sweep) as well as between processes. Lock files are left in place after release:
unlinking a locked path races with a waiter that has already opened it.

On a Dask cluster (`chronomerge sweep --runner dask`) workers on different machines may not share a
filesystem with working flock (or any PREFECT_HOME at all), so `StageLockManager` also takes the
Dask scheduler's lock of the same key (`distributed.Lock`): held by the scheduler, it excludes workers
on every machine, and a dead worker's lease expires (distributed.scheduler.locks.lease-timeout, 30 s
by default) instead of blocking its point's rerun. Outside a Dask worker it is the flock alone.
"""
from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import anyio.to_thread

POLL = 0.05


class ProcessLockManager:
    """Exclusive per-key locks in `directory`, released on `release_lock` or when the holder exits.

    `hold_timeout` is accepted for the protocol but not needed: a lock outlives its holder only
    while the holding process is alive.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._held: dict[str, tuple[str, int]] = {}  # key -> (holder, fd)
        self._mutex = threading.Lock()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.lock"

    def _try(self, key: str) -> int | None:
        """An fd holding the flock on `key`, or None when someone else holds it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path(key), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        if self.is_lock_holder(key, holder):
            return True
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while (fd := self._try(key)) is None:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(POLL)
        os.ftruncate(fd, 0)
        os.write(fd, f"{holder} pid={os.getpid()}\n".encode())
        with self._mutex:
            self._held[key] = (holder, fd)
        return True

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        return await anyio.to_thread.run_sync(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        with self._mutex:
            held = self._held.get(key)
            if held is None or held[0] != holder:
                raise ValueError(f"no lock held by {holder} for key {key}")
            del self._held[key]
        fcntl.flock(held[1], fcntl.LOCK_UN)
        os.close(held[1])

    def is_locked(self, key: str) -> bool:
        with self._mutex:
            if key in self._held:
                return True
        if not self._path(key).exists():
            return False
        fd = self._try(key)
        if fd is None:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        return False

    def is_lock_holder(self, key: str, holder: str) -> bool:
        with self._mutex:
            held = self._held.get(key)
        return held is not None and held[0] == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(POLL)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return await anyio.to_thread.run_sync(self.wait_for_lock, key, timeout)


def dask_worker():
    """The Dask worker this process is, or None (not on Dask, or distributed not installed)."""
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def _dask_lock(key: str):
    """The Dask scheduler's lock named for `key` when this process is a Dask worker, else None."""
    if dask_worker() is None:
        return None
    from distributed import Lock

    return Lock(f"chronomerge-stage-{key}")


class StageLockManager(ProcessLockManager):
    """The stage locks (tasks/cache.py): the flock, and on a Dask worker first the scheduler's lock of
    the same key, so that two machines never compute one stage at once."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self._cluster: dict[str, object] = {}  # key -> the Dask lock this process holds

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        if self.is_lock_holder(key, holder):
            return True
        cluster = _dask_lock(key)
        if cluster is not None and not cluster.acquire(timeout=acquire_timeout):
            return False
        if not super().acquire_lock(key, holder, acquire_timeout, hold_timeout):
            if cluster is not None:
                cluster.release()
            return False
        if cluster is not None:
            with self._mutex:
                self._cluster[key] = cluster
        return True

    def release_lock(self, key: str, holder: str) -> None:
        super().release_lock(key, holder)
        with self._mutex:
            cluster = self._cluster.pop(key, None)
        if cluster is not None:
            cluster.release()

    def is_locked(self, key: str) -> bool:
        if super().is_locked(key):
            return True
        cluster = _dask_lock(key)
        return cluster is not None and cluster.locked()
