"""Logging to stderr only, so ``-o -`` pipes stay clean. Verbosity: 0 warnings+info, 1 debug, 2 tracebacks."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("vitca")
_state = {"verbosity": 0}


def setup(verbosity: int = 0, quiet: bool = False) -> None:
    _state["verbosity"] = verbosity
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.DEBUG if verbosity else logging.INFO)
    log.propagate = False


def verbosity() -> int:
    return _state["verbosity"]


def error_line(message: str) -> None:
    """One line on stderr, whatever the log level."""
    print(f"error: {message}", file=sys.stderr, flush=True)
