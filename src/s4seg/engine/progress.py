"""Progress of a long loop: a tqdm bar on a terminal, rate-limited one-line log messages elsewhere.

When stderr is not a terminal (CI logs, `dvc queue` workers, `nohup`), a bar would print nothing useful
(or thousands of carriage returns); instead a line such as

    train fixmatch: step 40/168 (24%), loss 0.4312, 1.52 s/iter, ETA 3m14s

goes to the log at most every `every_s` seconds, and once at the end.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """`update(step, **postfix)` after each step (cheap: the caller decides how often to pass values that
    need a device sync); `close()` at the end."""

    def __init__(self, total: int, initial: int, desc: str, *, every_s: float = 30.0, tty: bool | None = None,
                 enabled: bool = True) -> None:
        self.total, self.initial, self.desc, self.every_s = total, initial, desc, every_s
        self.enabled = enabled
        self.started = time.perf_counter()
        self.last_line = self.started
        self.step = initial
        self.bar: Any = None
        if enabled and (sys.stderr.isatty() if tty is None else tty):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True)

    def seconds_per_step(self) -> float | None:
        done = self.step - self.initial
        return (time.perf_counter() - self.started) / done if done > 0 else None

    def update(self, step: int, **postfix: str) -> None:
        if not self.enabled:
            return
        self.step = step
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if postfix:
                self.bar.set_postfix(refresh=False, **postfix)
            return
        now = time.perf_counter()
        if now - self.last_line >= self.every_s or step == self.total:
            self.last_line = now
            log.info("%s", self.line(**postfix))

    def line(self, **postfix: str) -> str:
        parts = [f"{self.desc}: step {self.step}/{self.total} ({100 * self.step / max(self.total, 1):.0f}%)"]
        parts += [f"{k} {v}" for k, v in postfix.items()]
        rate = self.seconds_per_step()
        if rate is not None:
            parts += [f"{rate:.2f} s/iter", f"ETA {format_duration(rate * (self.total - self.step))}"]
        return ", ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
