"""A progress line for long loops: redrawn in place on a terminal, a log line otherwise."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("graphq")


class Progress:
    """``Progress("calibrate", total=n).update(i)`` ... ``.close()``."""

    def __init__(self, what: str, total: int | None = None, unit: str = "step",
                 every: float = 5.0) -> None:
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.start = self.last = time.perf_counter()
        self.tty = sys.stderr.isatty() and log.isEnabledFor(logging.INFO)
        self.done = 0

    def update(self, done: int, extra: str = "") -> None:
        self.done = done
        now = time.perf_counter()
        if not self.tty and now - self.last < self.every:
            return
        self.last = now
        line = self._line(now, extra)
        if self.tty:
            sys.stderr.write("\r" + line)
            sys.stderr.flush()
        else:
            log.info("%s", line)

    def step(self, extra: str = "") -> None:
        """One more done (a loop that does not count for itself)."""
        self.update(self.done + 1, extra)

    def _line(self, now: float, extra: str) -> str:
        rate = self.done / max(now - self.start, 1e-9)
        of = f"/{self.total}" if self.total else ""
        tail = f", {extra}" if extra else ""
        return f"{self.what}: {self.done}{of} {_plural(self.unit, self.total or self.done)} " \
               f"({rate:.1f}/s){tail}"

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\r" + self._line(time.perf_counter(), "") + "\n")
            sys.stderr.flush()


def _plural(unit: str, n: int) -> str:
    """``unit`` for ``n`` of it: "1 batch", "2 batches", "2 steps"."""
    if n == 1:
        return unit
    return unit + ("es" if unit.endswith(("ch", "sh", "s", "x")) else "s")
