"""Shared pieces of the CLI commands: option groups declared once, and the one mapper from library errors to a
message line and an exit code."""

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


class Backend(str, Enum):
    torch = "torch"
    onnx = "onnx"


# ---------------------------------------------------------------------------------------------------------------------
# Option groups several commands share, declared once (``panel``: the --help section, for `vitca train`)
# ---------------------------------------------------------------------------------------------------------------------
DEVICE_HELP = "auto, cpu, cuda or cuda:N."
THREADS_HELP = "CPU threads (default: every usable core; waiting threads sleep, so a busy core costs little)."
SET_THREADS_HELP = "CPU threads (1 is fastest on a busy machine: no waiting at OpenMP barriers)."
WEIGHTS_HELP = "Weights NAME or PATH."
UPDATE_RATE_HELP = "Per-cell update probability σ (default: as the model was trained)."
RUNS_HELP = (
    "Average this many runs, each with its own update masks (seeds SEED, SEED+1 and so on): cancels part of what the "
    "random asynchronous updates leave, at RUNS times the work."
)


def _option(default, *names, help: str, panel: str | None = None, **kw):
    if panel is not None:
        kw["rich_help_panel"] = panel
    return typer.Option(default, *names, help=help, **kw)


def weights_option(help: str = WEIGHTS_HELP, required: bool = False, **kw):
    return _option(... if required else None, "--weights", "-w", help=help, **kw)


def device_option(help: str = DEVICE_HELP, **kw):
    return _option("auto", "--device", help=help, **kw)


def threads_option(help: str = THREADS_HELP, **kw):
    return _option(None, "--threads", min=1, help=help, **kw)


def seed_option(help: str, default=0, **kw):
    return _option(default, "--seed", help=help, **kw)


def iters_option(default, help: str, **kw):
    return _option(default, "--iters", help=help, **kw)


def update_rate_option(help: str = UPDATE_RATE_HELP, **kw):
    return _option(None, "--update-rate", help=help, **kw)


def runs_option(help: str = RUNS_HELP, **kw):
    return _option(1, "--runs", help=help, **kw)


def backend_option(**kw):
    return _option(Backend.torch, "--backend", help="Run the CA with torch or ONNX Runtime.", **kw)


def tile_option(**kw):
    return _option(None, "--tile", help="Tile side in pixels (default: automatic; 0 = no tiling).", **kw)


INT_LIMIT = 2**31 - 1  # what every integer option fits in (torch sizes, seeds, counts)


def check_numbers(options: dict) -> None:
    """Refuse integers beyond ``INT_LIMIT`` and non-finite floats in parsed options with a usage error naming the
    option, before they reach torch (which would answer with a C++ stack)."""
    import math

    from vitca_cli.errors import SettingError

    for name, value in options.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int) and abs(value) > INT_LIMIT:
            raise SettingError(name, f"{value}: too large (at most {INT_LIMIT:,})")
        if isinstance(value, float) and not math.isfinite(value):
            raise SettingError(name, f"{value}: must be a finite number")


def flag(setting: str) -> str:
    """The command-line flag of a library setting: ``t_min`` → ``--t-min``."""
    return "--" + setting.replace("_", "-")


def error_message(exc: BaseException) -> str:
    """The one line an error prints: settings named by their flags; the exception type for a surprise."""
    if isinstance(exc, VitcaError):
        return exc.render(flag)
    hint = "" if log.verbosity() >= 2 else " (run with -vv for the traceback)"
    return f"{type(exc).__name__}: {exc}{hint}"


def exit_code(exc: BaseException) -> int:
    return exc.exit_code if isinstance(exc, VitcaError) else EXIT_FAILED


def report(exc: BaseException, prefix: str = "") -> int:
    """The error→exit-code mapper of every command: the traceback with -vv, one ``error:`` line, the exit code."""
    if log.verbosity() >= 2:
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    log.error_line(prefix + error_message(exc))
    return exit_code(exc)


def handle_errors(fn):
    """Report a ``VitcaError`` (or an unexpected exception) as one line on stderr and exit with its code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            check_numbers(kwargs)
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - never a traceback by default
            raise typer.Exit(report(exc)) from None

    return wrapper
