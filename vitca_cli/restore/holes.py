"""Inpainting computed only where the holes can see, with as many steps as the holes are deep.

After T steps a cell's output depends only on the cells within T·r of it (r: how far one step reads,
``step_radius``); with fusion (appendix A.1) the middle steps read twice as far. So the missing pixels of an
inpainting job depend only on the cells within that *reach* of a hole, and only those are run:

- the missing cells are shared out among *cores*, squares of ``CORE`` cells of the global grid; each core with a
  hole runs as a *crop*: the bounding box of its holes widened by the reach (clamped to the image, aligned to the
  fused grid with fusion), seeded from the image as the whole grid would be there;
- in a crop a cell is computed only up to the last step whose value can still reach one of the core's holes
  (``until``, from a chessboard distance transform: the holes' light cone, narrowing step by step), windows
  without such a cell are left out, and update masks are drawn only for the global blocks that hold one.

Each missing pixel then comes out as the whole grid's computation makes it, to the bit: update masks are drawn by
global block, and the exact step computes each cell's row independently of the other rows of its window. Known
pixels are the input's, as always. Where the reach covers most of the grid, the whole grid runs instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from vitca_cli.log import log
from vitca_cli.nca.config import CAConfig
from vitca_cli.nca.rollout import UpdateMasks
from vitca_cli.restore.grid import Restored, Stepping, blended_images, draw_masks, run_rects
from vitca_cli.restore.tiles import step_radius
from vitca_cli.restore.windows import FUSED_OUTER

CORE = 512  # cells per side of the squares of the global grid that share the holes out among crops
# Cells per side of a step window in a crop: smaller than the whole grid's, so that the windows follow the narrow
# light cone of a thin hole more closely (bench/inpaint_reach.py); each window has the same one-step halo.
HOLE_WINDOW = 24
WHOLE_GRID_SHARE = 0.5  # the holes' reach holding this share of the grid's cells or more: the whole grid runs


# ---------------------------------------------------------------------------------------------------------------------
# Enough steps for the holes
# ---------------------------------------------------------------------------------------------------------------------
def hole_depth(missing: np.ndarray) -> float | None:
    """The largest Euclidean distance in pixels from a missing pixel to the nearest known one (0 without holes;
    None when no pixel is known).

    The chessboard distance d (cheap to transform) bounds the Euclidean one from both sides, d to √2·d: the deepest
    pixel is among those at d ≥ D/√2 (D the largest d), and its nearest known pixel lies within √2·D of it, so the
    Euclidean transform runs on the box around those pixels only."""
    if not missing.any():
        return 0.0
    if missing.all():
        return None
    chess = ndimage.distance_transform_cdt(missing, metric="chessboard")
    deepest = int(chess.max())
    deep = chess * math.sqrt(2) >= deepest
    pad = math.ceil(math.sqrt(2) * deepest) + 1
    ys, xs = np.flatnonzero(deep.any(1)), np.flatnonzero(deep.any(0))
    box = (slice(max(0, ys[0] - pad), ys[-1] + 1 + pad), slice(max(0, xs[0] - pad), xs[-1] + 1 + pad))
    return float(ndimage.distance_transform_edt(missing[box])[deep[box]].max())


def hole_steps(depth: float | None, default: int, cfg: CAConfig, rate: float, fusion: bool, cap: int) -> int:
    """Steps for the known border's content to reach a hole's middle ``depth`` pixels in, at least ``default``
    and at most ``cap`` (``default`` itself when it is more).

    A step moves content ``r`` cells (``step_radius``) at full resolution, 2r on the fused grid, but a cell takes
    its neighbours' news only on the steps it updates (a share ``rate`` of them): on average ``rate``·r cells, of
    the patch size in pixels each, per step."""
    if not depth:
        return default
    speed = rate * step_radius(cfg) * cfg.patch_size  # pixels per full-resolution step
    if fusion:  # 2·FUSED_OUTER steps at full resolution, the rest at twice the speed
        steps = 2 * FUSED_OUTER + math.ceil(max(0.0, depth - 2 * FUSED_OUTER * speed) / (2 * speed))
    else:
        steps = math.ceil(depth / speed)
    return max(default, min(steps, cap))


# ---------------------------------------------------------------------------------------------------------------------
# Crops
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Crop:
    """A rectangle of the cell grid with its top-left cell at (y0, x0), and the holes it computes: ``holes``
    ``(h, w)`` (bool, in crop coordinates), the missing cells of its core."""

    y0: int
    x0: int
    holes: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        return self.holes.shape


def reach_cells(cfg: CAConfig, iters: int, fusion: bool) -> int:
    """How far (cells) the cells a hole's output depends on lie from it: ``iters`` steps of ``step_radius``; with
    fusion, 2r for each fused step and 2 more for the 2×2 groups of fusion and mitosis."""
    r = step_radius(cfg)
    return r * (2 * iters - 2 * FUSED_OUTER) + 2 if fusion else r * iters


def plan_crops(
    missing: np.ndarray, margin: int, align: int = 1, min_side: int | None = None, core: int | None = None
) -> list[Crop]:
    """The crops for the missing cells ``missing`` ``(gh, gw)`` (bool) of a grid: one per ``core`` square (default
    ``CORE``) with a missing cell, its holes' bounding box widened by ``margin`` cells, clamped to the grid, its
    sides at least ``min_side`` (default ``HOLE_WINDOW``, where the grid allows) and its edges on multiples of
    ``align`` (as the grid's sides are)."""
    core, min_side = core or CORE, min_side or HOLE_WINDOW
    gh, gw = missing.shape
    crops = []
    for cy in range(0, gh, core):
        for cx in range(0, gw, core):
            block = missing[cy : cy + core, cx : cx + core]
            if not block.any():
                continue
            ys, xs = np.flatnonzero(block.any(1)), np.flatnonzero(block.any(0))
            top, bottom, left, right = cy + ys[0], cy + ys[-1] + 1, cx + xs[0], cx + xs[-1] + 1  # the holes' box
            y0, y1 = _span(top, bottom, margin, gh, align, min_side)
            x0, x1 = _span(left, right, margin, gw, align, min_side)
            holes = np.zeros((y1 - y0, x1 - x0), bool)
            holes[top - y0 : bottom - y0, left - x0 : right - x0] = missing[top:bottom, left:right]
            crops.append(Crop(y0, x0, holes))
    return crops


def _span(lo: int, hi: int, margin: int, length: int, align: int, min_side: int) -> tuple[int, int]:
    """[lo, hi) widened by ``margin``, clamped to [0, length), on multiples of ``align``, at least ``min_side``
    long where ``length`` allows (``length`` is a multiple of ``align``)."""
    lo, hi = max(0, lo - margin) // align * align, min(length, -(-(hi + margin) // align) * align)
    want = -(-min(min_side, length) // align) * align
    if hi - lo < want:
        hi = min(length, lo + want)
        lo = hi - want
    return lo, hi


def _last_steps(targets: np.ndarray, steps: int, radius: int) -> np.ndarray:
    """For each cell, the last of ``steps`` steps at which it is computed for the ``targets`` to come out exact
    after them: ``steps`` less its chessboard distance to a target in steps of ``radius`` (below 1: never
    computed; below 0: not even read)."""
    d = ndimage.distance_transform_cdt(~targets, metric="chessboard")
    return steps - (-(-d // radius))


def until_maps(holes: np.ndarray, iters: int, radius: int, fusion: bool) -> list[np.ndarray]:
    """Each cell's last computed step, per phase of the rollout (one phase; with fusion three: the steps before
    fusion, on the fused grid, after mitosis), for the ``holes`` to come out exact."""
    if not fusion:
        return [_last_steps(holes, iters, radius)]
    late = _last_steps(holes, FUSED_OUTER, radius)
    h, w = late.shape
    parents = (late >= 0).reshape(h // 2, 2, w // 2, 2).any((1, 3))  # the fused cells mitosis copies from
    middle = _last_steps(parents, iters - 2 * FUSED_OUTER, radius)
    children = (middle >= 0).repeat(2, 0).repeat(2, 1)  # the cells fusion averages
    return [_last_steps(children, FUSED_OUTER, radius), middle, late]


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------
def missing_cells(k: torch.Tensor, patch: int) -> np.ndarray:
    """The cells ``(gh, gw)`` (bool) with a missing pixel, from the padded known mask ``k`` ``(1, 1, H, W)``."""
    return (F.max_pool2d(1 - k, patch)[0, 0] > 0).numpy()


def restore_holes(backend, x, k, size, iters, rate, seed, runs, fusion, stepping: Stepping, progress=None):
    """The inpainted image of the padded image ``x`` with known mask ``k`` (both as ``restore`` pads them),
    cropped to ``size``: ``restore``'s result, computing only the holes' reach; None where that reach covers
    ``WHOLE_GRID_SHARE`` of the grid or more (the whole grid's tiles are then cheaper than overlapping crops)."""
    cfg: CAConfig = backend.cfg
    p, c = cfg.patch_size, cfg.channels
    ph, pw = x.shape[-2:]
    grid_cells = (ph // p) * (pw // p)
    radius = step_radius(cfg)
    missing = missing_cells(k, p)
    crops = plan_crops(missing, reach_cells(cfg, iters, fusion), 2 if fusion else 1)
    maps = [until_maps(crop.holes, iters, radius, fusion) for crop in crops]
    reached = np.zeros(missing.shape, bool)  # the cells computed at least once
    for crop, until in zip(crops, maps):
        (h, w), (y0, x0) = crop.size, (crop.y0, crop.x0)
        reached[y0 : y0 + h, x0 : x0 + w] |= np.logical_or.reduce([_full_size(u >= 1, h) for u in until])
    share = float(reached.sum() / grid_cells)
    if share >= WHOLE_GRID_SHARE:
        log.debug(f"holes' reach: {share:.0%} of the grid; computing every cell")
        return None
    if hasattr(backend, "prepare"):  # the work: each cell's steps up to its last
        backend.prepare(sum(int(np.clip(u, 0, None).sum()) for until in maps for u in until), stepping.settle)
    record = stepping.record
    stepping = replace(stepping, window=HOLE_WINDOW)
    acc = torch.zeros(len(record) + 1, c, ph, pw)
    sources = [
        (UpdateMasks(seed + r, iters, rate), UpdateMasks(seed + r, iters - 2 * FUSED_OUTER, rate, level=1))
        if fusion
        else (UpdateMasks(seed + r, iters, rate), None)
        for r in range(runs)
    ]
    done, total, computed, skipped = 0, runs * len(crops) * iters, 0, 0
    for crop, until in zip(crops, maps):
        (h, w), (y0, x0) = crop.size, (crop.y0, crop.x0)
        needed = _needed(until)
        limits = [torch.from_numpy(u.astype(np.int32))[None] for u in until]
        for source in sources:
            start = done

            def on_step(t: int, start: int = start) -> None:
                if progress is not None:
                    progress(start + t, total)

            masks = draw_masks(source, [(y0, x0)], (h, w), needed)
            run, outputs = run_rects(
                backend, x, k, [(y0, x0)], (h, w), masks, stepping, on_step, limits if fusion else limits[0]
            )
            computed, skipped, done = computed + run.computed, skipped + run.skipped, start + iters
            _add_holes(acc, outputs, crop, p)
    if progress is not None and total:
        progress(total, total)
    images = blended_images(acc, torch.full((1, 1, ph, pw), float(runs)), x, k, size)
    dense = grid_cells * iters * runs
    log.debug(
        f"holes' reach: {len(crops)} crops; {share:.2%} of the image's cells computed, "
        f"{computed / max(1, dense):.2%} of its cell-steps ({computed:,} of {dense:,})"
    )
    return Restored(images[-1], images[:-1], list(record), None, computed, skipped, dense, len(crops), share)


def _full_size(cells: np.ndarray, h: int) -> np.ndarray:
    """A fused grid's cells at full resolution (a full grid's as they are)."""
    return cells if cells.shape[0] == h else cells.repeat(2, 0).repeat(2, 1)


def _needed(until: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The cells whose update masks are drawn: the full grid's (computed before fusion or after mitosis) and the
    fused grid's, each ``(1, h, w)``."""
    if len(until) == 1:
        return torch.from_numpy(until[0] >= 1)[None], None
    early, middle, late = until
    return torch.from_numpy((early >= 1) | (late >= 1))[None], torch.from_numpy(middle >= 1)[None]


def _add_holes(acc: torch.Tensor, outputs: list[torch.Tensor], crop: Crop, p: int) -> None:
    """Add a crop's output at its holes' pixels into the running sums ``acc`` (one per frame, the final last)."""
    h, w = crop.size
    holes = torch.from_numpy(crop.holes).repeat_interleave(p, 0).repeat_interleave(p, 1)
    region = (..., slice(crop.y0 * p, (crop.y0 + h) * p), slice(crop.x0 * p, (crop.x0 + w) * p))
    for f, out in enumerate(outputs):
        acc[f][region] += torch.where(holes, out[0], 0.0)
