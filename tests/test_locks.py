"""Stage locks: exclusive across threads and processes, and freed when the holding process dies."""
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from tasks.locks import ProcessLockManager

REPO = Path(__file__).resolve().parents[1]


def test_a_lock_excludes_other_holders_until_released(tmp_path):
    locks = ProcessLockManager(tmp_path)
    assert not locks.is_locked("k")
    assert locks.acquire_lock("k", "a")
    assert locks.is_locked("k") and locks.is_lock_holder("k", "a") and not locks.is_lock_holder("k", "b")
    assert not locks.acquire_lock("k", "b", acquire_timeout=0.2)
    other = ProcessLockManager(tmp_path)  # a second manager: another open file description
    assert other.is_locked("k") and not other.acquire_lock("k", "c", acquire_timeout=0.2)
    locks.release_lock("k", "a")
    assert not locks.is_locked("k") and other.acquire_lock("k", "c", acquire_timeout=0.2)


def test_a_waiter_in_another_thread_gets_the_lock_when_it_is_released(tmp_path):
    locks = ProcessLockManager(tmp_path)
    locks.acquire_lock("k", "first")
    order = []

    def second():
        locks.acquire_lock("k", "second")
        order.append("second")
        locks.release_lock("k", "second")

    t = threading.Thread(target=second)
    t.start()
    t.join(0.3)
    assert t.is_alive() and order == []
    order.append("first")
    locks.release_lock("k", "first")
    t.join(5)
    assert order == ["first", "second"]


def test_a_lock_held_by_a_killed_process_is_free(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys,time; from tasks.locks import ProcessLockManager;"
         f"ProcessLockManager({str(tmp_path)!r}).acquire_lock('k', 'dead'); print('held', flush=True); time.sleep(60)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "held"
    locks = ProcessLockManager(tmp_path)
    assert locks.is_locked("k") and not locks.acquire_lock("k", "me", acquire_timeout=0.2)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert locks.acquire_lock("k", "me", acquire_timeout=5)
