"""Progress on stderr, one display for every long run (``vitca denoise``, ``vitca eval``/``probe``, ``vitca train``).

On a terminal: a rich bar, ``LABEL ━━━━━ done/total UNIT  STATUS  time left``. Otherwise (a log file, a pipe): a log
line now and then, ``LABEL: done/total UNIT (P%), STATUS, ETA …``, so that batch logs show a long run is alive. The
callers choose how often (every so many seconds, every so much of the total, when forced) and whether the last step
gets a line of its own. Imports nothing from ``vitca_cli.cli``: the restore loop's callers and training use it alike.
"""

from __future__ import annotations

import logging
import sys
import time

from vitca_cli.log import log


def _duration(seconds: float) -> str:
    """``42s``, ``4.6 min`` or ``2.3 h``."""
    if seconds != seconds:  # no rate yet
        return "?"
    if seconds < 60:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


class Progress:
    """A progress display for ``total`` units of work, from ``start`` done.

    ``update(done)`` (or ``advance(n)``) reports; on a terminal the bar follows every update, elsewhere a line is
    logged when ``every_s`` seconds and ``every_fraction`` of the total have passed since the last one (or when
    ``force``), and when the work completes if ``final``. ``enabled`` defaults to "the log shows info lines"; a
    ``transient`` bar disappears when closed. Use it as a context manager, or call ``close()``."""

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        unit: str = "steps",
        start: int = 0,
        every_s: float = 5.0,
        every_fraction: float = 0.0,
        final: bool = False,
        transient: bool = True,
        enabled: bool | None = None,
        status: str = "",
    ):
        self.label, self.total, self.unit, self.start, self.done = label, total, unit, start, start
        self.every_s, self.every_fraction, self.final, self.transient = every_s, every_fraction, final, transient
        self.enabled = log.level <= logging.INFO if enabled is None else enabled
        self.status = status
        self.tty = sys.stderr.isatty()
        self._t0 = self._last_time = time.perf_counter()
        self._last_done = start
        self._bar = self._task = None

    # -- the bar ------------------------------------------------------------------------------------------------
    def _open_bar(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            "[progress.description]{task.description}",
            BarColumn(),
            f"{{task.completed}}/{{task.total}} {self.unit}",
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=self.transient,
        )
        self._bar.start()
        self._task = self._bar.add_task(self.label, total=self.total, completed=self.done, status=self.status)

    def open(self) -> Progress:
        """Show the bar now (on a terminal), before the first update."""
        if self.enabled and self.tty and self._bar is None:
            self._open_bar()
        return self

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    __enter__ = open

    def __exit__(self, *exc) -> None:
        self.close()

    # -- updates ------------------------------------------------------------------------------------------------
    def update(self, done: int, total: int | None = None, status: str | None = None, force: bool = False) -> None:
        """``done`` units of ``total`` (if it changed) are done; ``status`` replaces the text shown after them."""
        self.done = done
        self.total = total if total is not None else self.total
        self.status = status if status is not None else self.status
        if not self.enabled:
            return
        if self.tty:
            if self._bar is None:
                self._open_bar()
            self._bar.update(self._task, completed=done, total=self.total, status=self.status)
        elif self._line_due(force):
            self._log_line()

    def advance(self, n: int) -> None:
        """``n`` more units done."""
        self.update(self.done + n)

    def _line_due(self, force: bool) -> bool:
        total, now = self.total or 0, time.perf_counter()
        if force:
            return True
        if self.done >= total:
            return self.final
        step = max(1, int(total * self.every_fraction))
        return now - self._last_time >= self.every_s and self.done - self._last_done >= step

    def _log_line(self) -> None:
        now, done, total = time.perf_counter(), self.done, self.total or 0
        rate = (done - self.start) / max(now - self._t0, 1e-9)
        eta = (total - done) / rate if rate > 0 else float("nan")
        parts = [f"{self.label}: {done}/{total} {self.unit} ({100 * done / max(total, 1):.0f}%)"]
        parts += [self.status] if self.status else []
        log.info(", ".join(parts + [f"ETA {_duration(eta)}"]))
        self._last_time, self._last_done = now, done
