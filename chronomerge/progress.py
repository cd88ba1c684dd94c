"""Progress of a long loop (pretraining, fine-tuning): a bar on a terminal, and where output goes to a
file or a pipe (a log, CI, `nohup`) one line at a steady interval (none for a loop shorter than that),
so a long stage is never silent:

    pretrain: step 1200/3000 (40%), loss 2.314, 2m36s elapsed, about 3m54s left
"""
from __future__ import annotations

import sys
import time

INTERVAL = 30.0  # seconds between lines when not on a terminal


def clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """`update(step, loss)` after each of `total` steps; `loss` is called only when a line or the bar
    shows it (reading a GPU loss waits for the device). `close()` at the end. `start`: the steps
    already done (a loop resumed from a progress checkpoint)."""

    def __init__(self, label: str, total: int, stream=None, interval: float | None = None, start: int = 0):
        self.label, self.total, self.start = label, total, start
        self.interval = INTERVAL if interval is None else interval
        self.stream = stream or sys.stderr
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc=label, leave=False, file=self.stream)

    def update(self, step: int, loss) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if step % 10 == 0:
                self.bar.set_postfix(loss=f"{float(loss()):.3f}")
            return
        now = time.perf_counter()
        if now - self.last < self.interval:
            return
        self.last = now
        done = step + 1
        left = (now - self.t0) / max(1, done - self.start) * (self.total - done)
        print(f"{self.label}: step {done}/{self.total} ({100 * done / self.total:.0f}%), loss {float(loss()):.3f}, "
              f"{clock(now - self.t0)} elapsed, about {clock(left)} left", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif time.perf_counter() - self.t0 >= self.interval:
            print(f"{self.label}: done in {clock(time.perf_counter() - self.t0)}", file=self.stream, flush=True)
