"""Errors the CLI reports as one line on stderr, each with its exit code."""

EXIT_FAILED = 1  # some inputs failed; the rest were processed
EXIT_USAGE = 2  # bad command line
EXIT_WEIGHTS = 3  # weights missing or unreadable


class VitcaError(Exception):
    """An error a user can act on: printed as one line (no traceback unless -vv), then exit ``exit_code``."""

    exit_code = EXIT_FAILED


class UsageError(VitcaError):
    exit_code = EXIT_USAGE


class WeightsError(VitcaError):
    exit_code = EXIT_WEIGHTS
