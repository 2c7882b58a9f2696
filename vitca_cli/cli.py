"""The ``vitca`` command line: parsing and dispatch only; the work lives in library modules.

Exit codes: 0 all done; 1 some inputs failed (the rest were processed); 2 usage error; 3 weights missing.
Each command lives in ``vitca_cli/commands/<name>.py`` and exposes ``register(app)``; none imports torch or
onnxruntime at module level, so ``vitca --help`` and ``--version`` stay fast.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import traceback
from typing import Optional

import typer

from vitca_cli import __version__, log
from vitca_cli.errors import EXIT_FAILED, VitcaError

EPILOG = "Exit codes: 0 done; 1 some inputs failed; 2 usage error; 3 weights missing. Add -vv for tracebacks."

app = typer.Typer(
    name="vitca",
    help="Restore images with ViTCA, the attention-based neural cellular automaton.",
    epilog=EPILOG,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"vitca {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More logging; -vv shows tracebacks."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Show version."),
) -> None:
    log.setup(verbose, quiet)


# Commands, in the order --help lists them.
COMMAND_ORDER = ["denoise", "inpaint", "train", "eval", "analyze", "profile", "probe", "export-onnx", "weights", "model"]


def _register_commands() -> None:
    import vitca_cli.commands as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(app)
    order = {name: i for i, name in enumerate(COMMAND_ORDER)}
    app.registered_commands.sort(key=lambda c: order.get(c.name or "", len(order)))
    app.registered_groups.sort(key=lambda g: order.get(g.name or "", len(order)))


_register_commands()


def main() -> None:
    """Console entry point: one-line errors with their exit codes; tracebacks only with -vv."""
    try:
        app()
    except VitcaError as exc:
        if log.verbosity() >= 2:
            traceback.print_exc()
        log.error_line(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        log.error_line("interrupted")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence against a traceback
        if log.verbosity() >= 2:
            traceback.print_exc()
        log.error_line(f"{type(exc).__name__}: {exc} (run with -vv for the traceback)")
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
