"""The ``vitca`` command line: parsing and dispatch only; the work lives in library modules.

Exit codes: 0 all done; 1 some inputs failed (the rest were processed); 2 usage error; 3 weights missing.
Each command lives in ``vitca_cli/cli/<name>.py`` and exposes ``register(app)``; none imports torch or
onnxruntime at module level, so ``vitca --help`` and ``--version`` stay fast.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import Optional

import typer

from vitca_cli import __version__, log
from vitca_cli.cli.options import report

EPILOG = "Exit codes: 0 done; 1 some inputs failed; 2 usage error; 3 weights missing. Add -vv for tracebacks."

app = typer.Typer(
    name="vitca",
    help="Restore images with ViTCA, the attention-based neural cellular automaton.",
    epilog=EPILOG,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"vitca {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: int = typer.Option(
        0,
        "--verbose",
        "-v",
        count=True,
        show_default=False,
        help="More logging; -vv shows tracebacks (also after the command).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors (also after the command)."),
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Show version."),
) -> None:
    log.setup(verbose, quiet)


# Commands, in the order --help lists them.
COMMAND_ORDER = [
    "denoise",
    "inpaint",
    "train",
    "eval",
    "analyze",
    "profile",
    "probe",
    "export-onnx",
    "weights",
    "model",
]


def _register_commands() -> None:
    import vitca_cli.cli as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(app)
    order = {name: i for i, name in enumerate(COMMAND_ORDER)}
    app.registered_commands.sort(key=lambda c: order.get(c.name or "", len(order)))
    app.registered_groups.sort(key=lambda g: order.get(g.name or "", len(order)))


_register_commands()


GLOBAL_FLAGS = {"-q", "--quiet", "-v", "--verbose"}


def hoist_global_flags(argv: list[str]) -> list[str]:
    """Move ``-q``/``-v``/``-vv``/``--quiet``/``--verbose`` given after the command to the front, where the group
    parses them (``vitca denoise a.png -o b.png -q`` works like ``vitca -q denoise ...``). Tokens after ``--`` and
    values of other options are left alone."""
    front, rest = [], []
    for k, token in enumerate(argv):
        if token == "--":
            rest.extend(argv[k:])
            break
        counted = len(token) > 2 and token.startswith("-v") and set(token[1:]) == {"v"}
        (front if token in GLOBAL_FLAGS or counted else rest).append(token)
    return front + rest


def _click_exceptions():
    """Click's exception classes: vendored inside newer Typer releases, the click package with older ones."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def main(argv: list[str] | None = None) -> None:
    """Console entry point: every error is one ``error:`` line on stderr with its exit code (usage errors 2);
    tracebacks only with -vv."""
    from vitca_cli.runtime import passive_openmp, persistent_compile_cache

    passive_openmp()  # before any command imports torch, which reads it once
    persistent_compile_cache()
    click = _click_exceptions()
    args = hoist_global_flags(list(sys.argv[1:] if argv is None else argv))
    try:
        code = app(args=args, prog_name="vitca", standalone_mode=False)
    except click.NoArgsIsHelpError as exc:  # plain `vitca`: the help, as no_args_is_help promises
        print(exc.ctx.get_help() if exc.ctx is not None else exc.format_message())
        sys.exit(2)
    except click.UsageError as exc:  # bad or missing options and arguments, unknown commands
        where = exc.ctx.command_path if exc.ctx is not None else "vitca"
        log.error_line(f"{exc.format_message()} (see '{where} --help')")
        sys.exit(2)
    except typer.Abort:
        log.error_line("interrupted")
        sys.exit(130)
    except click.ClickException as exc:
        log.error_line(exc.format_message())
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        log.error_line("interrupted")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence against a traceback
        sys.exit(report(exc))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
