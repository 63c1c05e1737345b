"""Progress of long loops, for a person watching a paid machine: a bar on a terminal, and where the output goes to a
file or a container log (where a redrawn bar is unreadable or silent), a log line every LOG_EVERY_S seconds."""

from __future__ import annotations

import logging
import sys
import time

from tqdm.auto import tqdm

log = logging.getLogger("medcot.progress")
# Seconds between two log lines where there is no terminal.
LOG_EVERY_S = 10.0


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """`total` units of work (decoding steps, rows...); `update(n, note)` after each piece, `close()` at the end.
    The line shows done/total, the rate, the time left at that rate, and the caller's note (tokens/s, say)."""

    def __init__(self, desc: str, total: int, unit: str, every: float | None = None) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.every = LOG_EVERY_S if every is None else every
        self.done = 0
        self.note = ""
        self.t0 = self.last = time.monotonic()
        self.bar = tqdm(total=total, desc=desc, unit=unit, mininterval=1.0) if sys.stderr.isatty() else None

    def update(self, n: int = 1, note: str = "") -> None:
        if n <= 0:
            return
        self.done += n
        self.note = note or self.note
        if self.bar is not None:
            self.bar.update(n)
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            return
        now = time.monotonic()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = f", {duration((self.total - self.done) / rate)} left" if rate > 0 and self.done < self.total else ""
        note = f", {self.note}" if self.note else ""
        return f"{self.desc}: {self.done}/{self.total} {self.unit} ({rate:.1f} {self.unit}/s{left}{note})"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
