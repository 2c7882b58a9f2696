"""A model's own run settings, from its checkpoint's meta (``default_iters``, ``default_fusion``,
``fusion_schedule``): what a restore uses where the caller names none. The CLI, the Python API and ``restore()``
all read them here. No torch."""

from __future__ import annotations

from vitca_cli.nca.config import APPENDIX_A1, FusionSchedule

DEFAULT_ITERS = 64  # CA iterations when neither the caller nor the weights name a number


def _meta(backend) -> dict:
    return getattr(backend, "meta", None) or {}


def default_iters(backend) -> int:
    """The steps the weights were made to run: their ``default_iters``, else the steps a training run validated
    them with (``val_steps``), else ``DEFAULT_ITERS``."""
    meta = _meta(backend)
    return int(meta.get("default_iters") or meta.get("val_steps") or DEFAULT_ITERS)


def fusion_schedule(backend, wanted: bool | None = None) -> FusionSchedule | None:
    """The fusion schedule a restore runs: the one the weights were trained with (appendix A.1's when they
    record none), by default when they were trained or shipped to run fused; ``wanted`` True/False overrides."""
    meta = _meta(backend)
    fused = bool(meta.get("default_fusion") or meta.get("fusion_mitosis")) if wanted is None else wanted
    if not fused:
        return None
    return FusionSchedule.parse(meta["fusion_schedule"]) if meta.get("fusion_schedule") else APPENDIX_A1
