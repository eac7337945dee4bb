"""Progress that works on a terminal and in a log file (nohup, SLURM, a pipe).

On a terminal: a tqdm bar. Elsewhere tqdm prints nothing, so `Progress` prints one plain line
every `every_seconds` (and when done) instead:
    [train run 3/10] 120/500 (24%) 41.3 it/s ETA 0:00:09 loss 0.4121
Only rank 0 speaks under a launcher. The interval is `log.every_seconds` of the recipe (jobs call
`set_interval`), else $DISTILL_PROGRESS_EVERY, else 30 s.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator, TextIO

from tqdm.auto import tqdm

DEFAULT_EVERY_SECONDS = 30.0
_every: float | None = None


def set_interval(seconds: float | None) -> None:
    """Seconds between plain progress lines when not on a terminal (None: the default)."""
    global _every
    _every = seconds


def interval() -> float:
    if _every is not None:
        return _every
    return float(os.environ.get("DISTILL_PROGRESS_EVERY", DEFAULT_EVERY_SECONDS))


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """A tqdm-like progress over `iterable` (or `total` steps fed with `update`). `enabled=False`
    silences it (other ranks, tests); `leave=False` drops the bar when done (inner loops)."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
                 enabled: bool = True, leave: bool = True, stream: TextIO | None = None,
                 clock=time.monotonic):
        self.iterable, self.desc, self.unit, self.leave = iterable, desc, unit, leave
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.stream = stream or sys.stdout
        self.enabled = enabled and int(os.environ.get("RANK", "0")) == 0
        self.tty = self.enabled and self.stream.isatty()
        self.bar = tqdm(total=self.total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                        file=self.stream) if self.tty else None
        self.clock, self.n, self.postfix, self.printed = clock, 0, "", -1
        self.start = self.last = clock()

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.clock() - self.last >= interval():
            self._line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k} {v}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)

    def line(self) -> str:
        """The plain line: step/total, rate, ETA and the postfix (e.g. the current loss)."""
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = self.n / elapsed
        parts = [f"[{self.desc}]" if self.desc else "", f"{self.n}/{self.total}" if self.total else f"{self.n}"]
        if self.total:
            parts.append(f"({100 * self.n / self.total:.0f}%)")
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total and rate > 0:
            parts.append(f"ETA {_clock((self.total - self.n) / rate)}")
        parts.append(self.postfix)
        return " ".join(p for p in parts if p)

    def _line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.last, self.printed = self.clock(), self.n

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.leave and self.n and self.printed != self.n:
            self._line()  # a log shows where the loop ended
        self.enabled = False


def say(message: str) -> None:
    """A line that does not break a live bar (rank 0 only)."""
    if int(os.environ.get("RANK", "0")) == 0:
        tqdm.write(message)
