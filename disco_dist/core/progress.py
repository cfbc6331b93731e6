"""Progress of a long pass (the teacher-cache pass, shard making) that a person can read: a bar on a terminal,
and in a log file (SLURM, CI) a line every 30 seconds, e.g.

    cache pass: 12,288/100,000 sentences (12%), 16.2 sentences/s, ETA 1h30m

`DISCO_PROGRESS_SECONDS` sets the interval of the lines (0: after every update).
"""

import os
import sys
import time

from .errors import UserError


def duration(seconds: float) -> str:
    """`1h05m` from an hour on, `4m09s` below."""
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def line_interval() -> float:
    value = os.environ.get("DISCO_PROGRESS_SECONDS", "30")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds < 0:
        raise UserError(f"DISCO_PROGRESS_SECONDS={value!r}: give a number of seconds, 0 or more (default 30)")
    return seconds


class Progress:
    """Counts `unit`s done out of `total` (None: unknown, no percentage or ETA). Silent where `enabled` is false
    (every rank but 0); a bar when stderr is a terminal, else a line through `log` every `line_interval()` s."""

    def __init__(self, what: str, unit: str, total: int | None = None, log=print, enabled: bool = True):
        self.what, self.unit, self.total, self.log, self.enabled = what, unit, total, log, enabled
        self.count, self.start = 0, time.perf_counter()
        self.every, self.last = line_interval(), self.start
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit=f" {unit}", dynamic_ncols=True, leave=False)

    def update(self, n: int = 1) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            now = time.perf_counter()
            if now - self.last >= self.every:
                self.last = now
                self.log(self.line(now))

    def line(self, now: float | None = None) -> str:
        rate = self.count / max((now or time.perf_counter()) - self.start, 1e-9)
        if self.total:
            done = f"{self.count:,}/{self.total:,} {self.unit} ({self.count / self.total:.0%})"
        else:
            done = f"{self.count:,} {self.unit}"
        parts = [f"{self.what}: {done}", f"{rate:,.1f} {self.unit}/s"]
        if self.total and rate > 0:
            parts.append(f"ETA {duration(max(self.total - self.count, 0) / rate)}")
        return ", ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
