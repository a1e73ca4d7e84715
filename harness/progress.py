"""Sweep progress: one redrawn line (cells done / total, the current cell, time left) on a terminal, plain log
lines otherwise (CI logs, files), so a log never fills with carriage returns."""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """start(cell) before a cell, done() after it. Time left = mean time per finished cell x cells left: cells
    differ (a parallel cell starts processes), so it is an estimate, and says so ('~')."""

    def __init__(self, total: int, log: Callable[[str], None] = print, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.perf_counter, width: int = 24):
        self.total, self.log, self.clock, self.width = total, log, clock, width
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.finished, self.current, self.started, self.cell_started = 0, "", clock(), clock()

    def eta(self) -> str:
        if not self.finished:
            return "?"
        per_cell = (self.clock() - self.started) / self.finished
        return "~" + _clock(per_cell * (self.total - self.finished))

    def line(self) -> str:
        filled = self.width * self.finished // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        return f"[{bar}] {self.finished}/{self.total} cells, left {self.eta()} | {self.current}"

    def start(self, cell: str) -> None:
        self.current, self.cell_started = cell, self.clock()
        if self.interactive:
            self.stream.write("\r\x1b[2K" + self.line())
            self.stream.flush()
        else:
            self.log(f"cell {self.finished + 1}/{self.total} {cell} (left {self.eta()})")

    def done(self) -> None:
        self.finished += 1
        took = self.clock() - self.cell_started
        if self.interactive:
            # The finished cell keeps a line of its own above the redrawn bar.
            self.stream.write(f"\r\x1b[2K  {self.current} done in {took:.1f}s\n" + self.line())
            if self.finished == self.total:
                self.stream.write("\n")
            self.stream.flush()
        else:
            self.log(f"  done in {took:.1f}s ({self.finished}/{self.total}, left {self.eta()})")
