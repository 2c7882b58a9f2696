"""Restoring images with a trained CA: masks, padding, and the restore loop over tiles.

The loop is backend-agnostic: a *backend* (``vitca_cli.restore.backends``, which says what one has) steps the
cells. Everything random is drawn here, on the CPU, from seeded ``torch.Generator``s, so every backend and device
replays the same run for the same seed.

Update masks are drawn per fixed 64×64 block of *global* cell coordinates, each block from its own generator
seeded by (seed, block row, block column). A tile therefore sees the same masks as the whole image would, which is
what makes tiled output equal untiled output for a size-agnostic model (``vitca_cli.restore.tiles``). Each tile's
rollout runs window by window and may skip settled cells (``vitca_cli.restore.windows``). With fusion (appendix
A.1) the middle steps run on the half-resolution grid, whose masks are drawn alike at its own coordinates; tiles
then start at even cells, so that they fuse as the whole grid does.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from vitca_cli.errors import SettingError
from vitca_cli.log import log
from vitca_cli.nca.config import APPENDIX_A1, CAConfig, FusionSchedule
from vitca_cli.nca.masking import apply_mask, random_mask
from vitca_cli.nca.rollout import MASK_BLOCK, UpdateMasks
from vitca_cli.restore.defaults import default_iters, fusion_schedule
from vitca_cli.restore.grid import (
    Restored,
    Stepping,
    blended_images,
    draw_phases,
    first_outputs,
    frame_schedule,
    level_masks,
    padded,
    recorded_steps,
    run_rects,
)
from vitca_cli.restore.grid import hwc_to_tensor as _hwc_to_tensor
from vitca_cli.restore.grid import tensor_to_hwc as _tensor_to_hwc
from vitca_cli.restore.holes import restore_holes
from vitca_cli.restore.tiles import TilePlan, plan_tiles

# Cells per backend call: bounds a step's activations; on CPU, two 64×64 windows, whose activations stay in cache
# (bench/denoise.py --call-cells compares).
MAX_CELLS = {"cpu": 1 << 13, "cuda": 1 << 20}


# ---------------------------------------------------------------------------------------------------------------------
# Randomness: update masks by global block, corruption
# ---------------------------------------------------------------------------------------------------------------------
def corrupt(image: np.ndarray, prob: float, patch: int, mask_type: str = "noise", seed: int = 0) -> np.ndarray:
    """The paper's masking on a clean ``(H, W, C)`` image: each ``patch``×``patch`` block is dropped with
    probability ``prob`` (zeros, or one N(0,1) value per block). Sizes not divisible by ``patch`` are covered by
    a patch grid cropped at the right and bottom edges. The masking is ``vitca_cli.nca.masking.random_mask``'s,
    from a generator seeded with ``seed``: ``vitca eval --seed`` draws its first batch's damage the same way."""
    gen = torch.Generator().manual_seed(seed)
    return _tensor_to_hwc(random_mask(_hwc_to_tensor(image), prob, patch, mask_type, gen)[0])


def damage(image: np.ndarray, mixture, seed: int = 0, mask_type: str = "dropout") -> np.ndarray:
    """Real-world damage (a ``vitca_cli.nca.corruptions`` mixture; one kind drawn) on a clean ``(H, W, C)`` image."""
    from vitca_cli.nca.corruptions import corrupt_batch

    gen = torch.Generator().manual_seed(seed)
    damaged, _, _ = corrupt_batch(_hwc_to_tensor(image), tuple(mixture), gen, mask_type)
    return _tensor_to_hwc(damaged)


def mask_missing(image: np.ndarray, missing: np.ndarray, mask_type: str = "noise", seed: int = 0) -> np.ndarray:
    """Mask the pixels where ``missing`` ``(H, W)`` is True, the way a model was trained (zeros or N(0,1) noise)."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.from_numpy(~np.asarray(missing, dtype=bool)).float()[None, None]
    return _tensor_to_hwc(apply_mask(_hwc_to_tensor(image), keep, mask_type, 1, gen))


# ---------------------------------------------------------------------------------------------------------------------
# The rollout
# ---------------------------------------------------------------------------------------------------------------------
def _check_tile(cfg: CAConfig, tile: int | None) -> int | None:
    """The tile side in pixels → cells (None = automatic, 0 = off), refused where the model's encoding forbids it."""
    if tile is not None and tile > 0:
        if cfg.size_dependent and tile != cfg.image_size[0]:
            raise SettingError(
                "tile",
                f"{tile}: this model's position encoding ties it to "
                f"{cfg.image_size[0]}×{cfg.image_size[1]} tiles; leave {{0}} out",
            )
        return max(1, tile // cfg.patch_size)
    if tile == 0 and cfg.size_dependent:
        raise SettingError(
            "tile", f"0: this model's position encoding ties it to {cfg.image_size[0]}×{cfg.image_size[1]} tiles"
        )
    return tile


def restore(
    backend,
    image: np.ndarray,
    iters: int | None = None,
    update_rate: float | None = None,
    seed: int = 0,
    tile: int | None = None,
    frames: int = 0,
    max_cells: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    known: np.ndarray | None = None,
    settle: float = 0.0,
    fusion: FusionSchedule | bool | None = None,
    runs: int = 1,
    holes_only: bool = True,
) -> Restored:
    """Run the CA on ``image`` ``(H, W, C)`` (C = the model's channels, values as the model expects: masked
    image in [0, 1] plus any noise) for ``iters`` steps and return the output channels. ``iters`` and ``fusion``
    left None are the weights' own (``vitca_cli.restore.defaults``).

    Padding: H and W are padded (edge replicate) to a multiple of the patch size, and for a size-dependent model
    to at least its training size; the result is cropped back. ``tile`` is in pixels (None = automatic, 0 = off).
    ``frames`` > 0 records that many outputs along the way (for animations). ``progress(done, total)`` counts
    tile-steps. ``max_cells`` bounds the cells of one backend call. ``settle`` > 0 stops updating cells whose
    output has settled (see ``vitca_cli.restore.windows``); 0 runs every step on every cell.

    ``known`` ``(H, W)`` (True = the pixel is given; inpainting) is shown to a mask-aware model, and every known
    pixel of the result (and of each frame) is the input's own value: only missing pixels come from the cells.
    With ``holes_only`` (and a ViTCA model free of position encodings) only the cells that can reach a missing
    pixel are computed, crop by crop (``vitca_cli.restore.holes``; ``tile`` does not apply): the same missing
    pixels as the whole grid's computation, at a fraction of the work for a few holes.

    ``fusion`` (a ``FusionSchedule``, or True for appendix A.1's) runs the steps on several levels: e.g. A.1's
    2 steps, the grid fused 2×2, ``iters - 4`` steps at half resolution, mitosis (the input re-injected), 2 steps:
    about a quarter of the cell-steps, for models trained with it. The grid is padded to a multiple of
    2^levels cells for it.

    ``runs`` > 1 averages that many runs, run ``r`` with the update masks of seed ``seed + r`` (so ``runs=2`` at
    seed 0 is the mean of seeds 0 and 1): each run's asynchronous updates leave their own error, and the mean
    cancels part of it, at ``runs`` times the work.
    """
    cfg: CAConfig = backend.cfg
    iters = default_iters(backend) if iters is None else iters
    fusion = fusion_schedule(backend) if fusion is None else APPENDIX_A1 if fusion is True else fusion or None
    if iters < 1:
        raise SettingError("iters", f"must be at least 1, got {iters}")
    if settle < 0:
        raise SettingError("settle", f"must be at least 0, got {settle}")
    if runs < 1:
        raise SettingError("runs", f"must be at least 1, got {runs}")
    if fusion and iters < fusion.outer_steps:
        raise SettingError("iters", f"{iters}: fusion schedule {fusion} needs at least {fusion.outer_steps} steps")
    if fusion and (cfg.size_dependent or cfg.arch != "vitca"):
        raise SettingError("fusion", "needs a ViTCA model without a position encoding tied to its training size")
    h, w, c = image.shape
    if c != cfg.channels:
        raise ValueError(f"image has {c} channels, the model expects {cfg.channels}")
    device = getattr(backend, "tensor_device", torch.device("cpu"))
    max_cells = max_cells or MAX_CELLS.get(torch.device(device).type, MAX_CELLS["cpu"])
    rate = cfg.update_rate if update_rate is None else update_rate
    p = cfg.patch_size
    tile = _check_tile(cfg, tile)
    align = 1 << fusion.levels if fusion else 1
    x, k, (ph, pw) = padded(cfg, image, known, align)
    initial = first_outputs(cfg, x, k)
    record = recorded_steps(iters, frames, ph * pw * c * 4)
    stepping = Stepping(settle, tuple(record), max_cells, detail=bool(fusion and fusion.detail))
    if known is not None and holes_only and cfg.arch == "vitca" and not cfg.size_dependent:
        args = (iters, rate, seed, runs, fusion, stepping, progress)
        result = restore_holes(backend, x, k, (h, w), *args, initial=initial)
        if result is not None:
            return result
    reach = fusion.reach(iters) if fusion else iters  # full-resolution cells a cell's state can come from
    plan = plan_tiles(cfg, (ph // p, pw // p), reach, tile, align=align)
    if plan.count > 1:
        note = "" if plan.exact else ", blended" if cfg.size_dependent else ", approximate beyond the margin cap"
        log.debug(f"tiling {ph}×{pw} px into {plan.count} tiles of {plan.tile[0] * p}×{plan.tile[1] * p} px{note}")

    if hasattr(backend, "prepare"):
        backend.prepare((ph // p) * (pw // p) * iters, settle)
    acc = torch.zeros(len(record) + 1, c, ph, pw)  # running blend for each frame, the final output last
    weight_sum = torch.zeros(1, 1, ph, pw)  # every run adds its weights: the blend is the mean over runs

    th, tw = plan.tile
    # Tiles run together when several fit one call (small size-dependent tiles); large ones one at a time.
    per_batch = max(1, max_cells // (th * tw))
    origins = plan.origins
    batches = [origins[i : i + per_batch] for i in range(0, len(origins), per_batch)]
    done, total, computed, skipped = 0, runs * len(batches) * iters, 0, 0
    for r in range(runs):
        masks = level_masks(seed + r, iters, rate, fusion)
        for batch in batches:
            start = done

            def on_step(t: int, start: int = start) -> None:
                if progress is not None:
                    progress(start + t, total)

            phases = draw_phases(masks, fusion, batch, plan.tile)
            run, outputs = run_rects(backend, x, k, batch, plan.tile, phases, stepping, on_step, start=initial)
            computed, skipped = computed + run.computed, skipped + run.skipped
            done = start + iters
            if progress is not None and run.steps_run < iters:
                progress(done, total)
            _blend(acc, weight_sum, plan, batch, outputs, p)
    result = blended_images(acc, weight_sum, x, k, (h, w))
    dense = (ph // p) * (pw // p) * iters * runs
    return Restored(result[-1], result[:-1], record, plan, computed, skipped, dense)


def _blend(acc: torch.Tensor, weight_sum: torch.Tensor, plan: TilePlan, batch, outputs, p: int) -> None:
    """Add each tile's outputs, weighted by the plan, into the running blends ``acc`` and their ``weight_sum``."""
    th, tw = plan.tile
    for i, (y, xx) in enumerate(batch):
        wgt = plan.weights(y, xx).repeat_interleave(p, 0).repeat_interleave(p, 1)
        region = (..., slice(y * p, (y + th) * p), slice(xx * p, (xx + tw) * p))
        weight_sum[region] += wgt
        for f, out in enumerate(outputs):
            acc[f][region] += out[i] * wgt


__all__ = [
    "UpdateMasks",
    "corrupt",
    "damage",
    "mask_missing",
    "Restored",
    "frame_schedule",
    "restore",
    "MASK_BLOCK",
    "MAX_CELLS",
]
