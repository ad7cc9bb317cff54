"""Progress events: long library calls (gradients, a search, a composition, the report) call a ``Progress``
callback with dicts of ``phase``, ``done``, ``total`` and ``message``; the dashboard's jobs keep the last one, and
the CLI shows them with :class:`Bars`."""
from __future__ import annotations

import sys
import time
from typing import Callable

Progress = Callable[[dict], None]


def emit(progress: Progress | None, **event) -> None:
    """Send ``event`` to ``progress`` where there is one."""
    if progress:
        progress(event)


class Bars:
    """Turns progress events into one tqdm bar per phase on stderr; where stderr is not a terminal (a log file, CI),
    into one line per phase when it ends instead of a stream of bar redraws."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.bar, self.phase, self.last = None, None, {}
        self.t0 = self.t_last = time.perf_counter()

    def __call__(self, ev: dict) -> None:
        from tqdm import tqdm

        if ev.get("phase") != self.phase:
            self.close(at=self.t_last)  # the work after a phase's last event belongs to the next phase
            self.phase, self.t0 = ev.get("phase"), self.t_last  # a phase's work began when the last one ended
            if self.live:
                self.bar = tqdm(total=ev.get("total", 1), desc=self.phase, file=self.stream, leave=False)
        self.last, self.t_last = ev, time.perf_counter()
        if self.bar:
            self.bar.total = ev.get("total", self.bar.total)
            self.bar.n = ev.get("done", 0)
            self.bar.set_postfix_str(str(ev.get("message", ""))[:60], refresh=True)

    def close(self, at: float | None = None) -> None:
        if self.bar:
            self.bar.close()
            self.bar = None
        elif self.phase is not None and not self.live:
            done, total = self.last.get("done", 0), self.last.get("total", 1)
            print(f"{self.phase}: " + (f"{done}/{total} " if done == total else "")
                  + f"in {(at or time.perf_counter()) - self.t0:.1f} s ({str(self.last.get('message', ''))[:60]})", file=self.stream)
        self.phase = None
