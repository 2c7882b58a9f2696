"""Shared pieces of the CLI commands: error handling that turns library errors into one line and an exit code."""

from __future__ import annotations

import functools
import traceback
from enum import Enum

import typer

from vitca_cli import log
from vitca_cli.errors import EXIT_FAILED, VitcaError


class MaskType(str, Enum):
    """The paper's corruption types (``vitca_cli.masking.MASK_TYPES``; not imported here to keep torch out)."""

    noise = "noise"
    dropout = "dropout"


def handle_errors(fn):
    """Report a ``VitcaError`` (or an unexpected exception) as one line on stderr and exit with its code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
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
            log.error_line(f"{type(exc).__name__}: {exc} (run with -vv for the traceback)")
            raise typer.Exit(EXIT_FAILED) from None

    return wrapper
