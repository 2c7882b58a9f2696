"""Errors the CLI reports as one line on stderr, each with its exit code.

Library code names settings by their field names (``device``, ``t_min``), never by command-line flags: a message
refers to a setting as ``{0}``, ``{1}``, … with the settings listed in ``settings``. ``str(error)`` fills in the
field names; the CLI (``vitca_cli.cli.options.report``) fills in the flags (``--t-min``).
"""

from __future__ import annotations

EXIT_FAILED = 1  # some inputs failed; the rest were processed
EXIT_USAGE = 2  # bad command line
EXIT_WEIGHTS = 3  # weights missing or unreadable


class VitcaError(Exception):
    """An error a user can act on: printed as one line (no traceback unless -vv), then exit ``exit_code``."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str = "", *, settings: tuple[str, ...] = ()):
        self.template, self.settings = str(message), tuple(settings)
        super().__init__(self.render())

    def render(self, name=lambda setting: setting) -> str:
        """The message with each ``{k}`` replaced by ``name(settings[k])``."""
        text = self.template
        for k, setting in enumerate(self.settings):
            text = text.replace("{%d}" % k, name(setting))
        return text


def placeholders(count: int, start: int = 1) -> str:
    """``{start}, {start+1}, …``: ``count`` settings listed in a message (settings ``start`` on)."""
    return ", ".join("{%d}" % (start + k) for k in range(count))


class UsageError(VitcaError):
    exit_code = EXIT_USAGE


class SettingError(UsageError):
    """A bad value of one setting (more settings may appear in ``detail`` as ``{1}``, ``{2}``, …)."""

    def __init__(self, setting: str, detail: str, *others: str):
        sep = "" if detail[:1] in (",", ":") else " "
        super().__init__("{0}" + sep + detail, settings=(setting, *others))
        self.setting, self.detail = setting, detail


class WeightsError(VitcaError):
    exit_code = EXIT_WEIGHTS
