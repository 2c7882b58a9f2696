"""vitca: image restoration with ViTCA, the attention-based neural cellular automaton.

Importing this package is cheap: torch is imported only by the modules that need it. ``denoise`` and ``inpaint``
(the Python API, ``vitca_cli.api``) are loaded on first use.
"""

__version__ = "0.1.0"

_API = ("denoise", "inpaint")


def __getattr__(name: str):
    if name in _API:
        from vitca_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'vitca_cli' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
