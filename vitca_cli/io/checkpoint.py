"""Checkpoint files: one format for training checkpoints and shipped weights, written atomically.

A checkpoint is a dict loadable with ``torch.load(weights_only=True)``::

    {"format": "vitca-checkpoint", "version": 1, "config": CAConfig.to_dict(), "model": state_dict,
     "meta": {...}, ...training state (optimizer, scheduler, pool, rng, iteration) when written by training}
"""

from __future__ import annotations

from pathlib import Path

from vitca_cli.errors import WeightsError
from vitca_cli.io.files import atomic_write_bytes  # noqa: F401 - also imported from here

FORMAT = "vitca-checkpoint"
VERSION = 1


def save_checkpoint(path: Path, cfg, state_dict: dict, meta: dict | None = None, **extra) -> None:
    """Write a checkpoint atomically (temporary file, fsync, rename)."""
    import torch

    obj = {"format": FORMAT, "version": VERSION, "config": cfg.to_dict(), "model": state_dict, "meta": meta or {}}
    obj.update(extra)
    atomic_write_bytes(Path(path), lambda f: torch.save(obj, f))


def read_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint dict safely (``weights_only=True``); unreadable or foreign files raise ``WeightsError``."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise WeightsError(
            f"{path}: not a readable vitca checkpoint ({type(exc).__name__}); re-download or re-train it"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise WeightsError(f"{path}: not a vitca checkpoint (no '{FORMAT}' header)")
    return obj


def load_model(path: Path, device="cpu"):
    """The ``CellularAutomaton`` stored in a checkpoint, in eval mode, and the checkpoint's ``meta`` dict."""
    from vitca_cli.nca.config import CAConfig
    from vitca_cli.nca.model import CellularAutomaton

    obj = read_checkpoint(path)
    try:
        cfg = CAConfig.from_dict(obj["config"])
        model = CellularAutomaton(cfg)
        model.load_state_dict(obj["model"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"{path}: checkpoint does not match its config ({exc})") from None
    return model.to(device).eval(), obj.get("meta", {})
