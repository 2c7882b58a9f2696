"""vitca: image restoration with ViTCA, the attention-based neural cellular automaton.

Importing this package is cheap: torch is imported only by the modules that need it.
"""

__version__ = "0.1.0"
