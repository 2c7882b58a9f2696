"""Shared pieces of the CLI commands: error handling that turns library errors into one line and an exit code."""

from __future__ import annotations

import functools
import traceback
from enum import Enum

import typer

from vitca_cli import log
from vitca_cli.errors import EXIT_FAILED, VitcaError


class MaskType(str, Enum):
    """The paper's corruption types (``vitca_cli.nca.masking.MASK_TYPES``; not imported here to keep torch out)."""

    noise = "noise"
    dropout = "dropout"


INT_LIMIT = 2**31 - 1  # what every integer option fits in (torch sizes, seeds, counts)


def check_numbers(options: dict) -> None:
    """Refuse integers beyond ``INT_LIMIT`` and non-finite floats in parsed options with a usage error naming the
    option, before they reach torch (which would answer with a C++ stack)."""
    import math

    from vitca_cli.errors import UsageError

    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            continue
        if isinstance(value, int) and abs(value) > INT_LIMIT:
            raise UsageError(f"{flag} {value}: too large (at most {INT_LIMIT:,})")
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{flag} {value}: must be a finite number")


def handle_errors(fn):
    """Report a ``VitcaError`` (or an unexpected exception) as one line on stderr and exit with its code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            check_numbers(kwargs)
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except VitcaError as exc:
            if log.verbosity() >= 2:
                traceback.print_exc()
            log.error_line(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except Exception as exc:  # noqa: BLE001 - never a traceback by default
            if log.verbosity() >= 2:
                traceback.print_exc()
            hint = "" if log.verbosity() >= 2 else " (run with -vv for the traceback)"
            log.error_line(f"{type(exc).__name__}: {exc}{hint}")
            raise typer.Exit(EXIT_FAILED) from None

    return wrapper
