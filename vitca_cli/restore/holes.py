"""Inpainting computed only where the holes can see, with as many steps as the holes are deep.

After T steps a cell's output depends only on the cells within T·r of it (r: how far one step reads,
``step_radius``); with fusion (a ``FusionSchedule``: appendix A.1's, or over several levels) a step on level l
reads 2^l times as far, and each fusion or division may shift by a group. So the missing pixels of an
inpainting job depend only on the cells within that *reach* of a hole, and only those are run:

- the missing cells are shared out among *cores*, squares of ``CORE`` cells of the global grid; each core with a
  hole runs as a *crop*: the bounding box of its holes widened by the reach (clamped to the image, aligned to
  2^levels cells with fusion, so that it fuses as the whole grid does), seeded from the image as the whole grid
  would be there;
- in a crop a cell is computed only up to the last step whose value can still reach one of the core's holes
  (``until``, from a chessboard distance transform: the holes' light cone, narrowing step by step; with fusion
  one map per phase of the schedule, traced back from the last: a division needs the fused cells above the
  needed ones, a fusion all four cells of each needed group), windows without such a cell are left out, and
  update masks are drawn only for the global blocks that hold one, from the same per-level draws as the whole
  grid's (``vitca_cli.restore.grid.draw_phases``);
- with the exact step of a one-block ViTCA rule, a crop runs cell by cell (``vitca_cli.restore.sparse``): traced
  back through the drawn masks, each step computes only the cells that update and that the holes depend on, with
  their neighbours' keys and values kept while those do not change.

Each missing pixel then comes out as the whole grid's computation makes it, to the bit: update masks are drawn by
global block, and the exact step computes each cell's row independently of the other rows of its window, as long
as every window, in the crops and in the whole grid, is of the full size (``HOLE_WINDOW`` and ``WINDOW`` cells a
side): a grid that fits in one smaller window leaves some of its cells to the scalar tails of vectorised kernels,
which round differently. So crops are at least ``HOLE_WINDOW`` cells a side on their coarsest level, and a grid
whose coarsest level is narrower than ``WINDOW`` cells (a small image, or one fused too often for its size) runs
whole. Known pixels are the input's, as always. Where the reach covers most of the grid, the whole grid runs too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from vitca_cli.log import log
from vitca_cli.nca.config import APPENDIX_A1, CAConfig, FusionSchedule
from vitca_cli.restore.grid import Restored, Stepping, draw_phases, level_masks, run_rects
from vitca_cli.restore.tiles import step_radius
from vitca_cli.restore.windows import WINDOW

CORE = 512  # cells per side of the squares of the global grid that share the holes out among crops
# Cells per side of a step window in a crop: smaller than the whole grid's, so that the windows follow the narrow
# light cone of a thin hole more closely (bench/inpaint_reach.py); each window has the same one-step halo.
HOLE_WINDOW = 24
WHOLE_GRID_SHARE = 0.5  # the holes' reach holding this share of the grid's cells or more: the whole grid runs
DEPTH_TILE = 256  # pixels a side of the tiles whose holes' depth is measured apart (hole_depth)
DEPTH_MARGIN = 64  # pixels around a tile that its chessboard transform reads: deeper holes take the whole image's


# ---------------------------------------------------------------------------------------------------------------------
# Enough steps for the holes
# ---------------------------------------------------------------------------------------------------------------------
def hole_depth(missing: np.ndarray) -> float | None:
    """The largest Euclidean distance in pixels from a missing pixel to the nearest known one (0 without holes;
    None when no pixel is known).

    The chessboard distance d (cheap to transform) bounds the Euclidean one from both sides, d to √2·d: the deepest
    pixel is among those at d ≥ D/√2 (D the largest d), and its nearest known pixel lies within √2·D of it, so the
    Euclidean transform runs around those pixels only. Both transforms run on the tiles (``DEPTH_TILE`` pixels a
    side) that hold a missing pixel, each widened by a margin that holds its pixels' nearest known pixels: the
    chessboard one by ``DEPTH_MARGIN`` (on the whole image where a hole is deeper), the Euclidean one by √2·D."""
    if not missing.any():
        return 0.0
    if missing.all():
        return None
    h, w = missing.shape
    tiles = [
        (slice(y, min(h, y + DEPTH_TILE)), slice(x, min(w, x + DEPTH_TILE)))
        for y in range(0, h, DEPTH_TILE)
        for x in range(0, w, DEPTH_TILE)
    ]
    tiles = [tile for tile in tiles if missing[tile].any()]
    chess = [_around(missing, tile, DEPTH_MARGIN, _chessboard) for tile in tiles]
    if any(d.min() < 0 or d.max() > DEPTH_MARGIN for d in chess):  # a known pixel may lie beyond the margin
        tiles, chess = [(slice(0, h), slice(0, w))], [_chessboard(missing)]
    deepest = max(int(d.max()) for d in chess)
    pad = math.ceil(math.sqrt(2) * deepest) + 1
    depth = 0.0
    from scipy import ndimage  # here, not at import: SciPy's import costs every denoise run about half a second

    for tile, d in zip(tiles, chess):
        deep = d * math.sqrt(2) >= deepest
        if deep.any():
            depth = max(depth, float(_around(missing, tile, pad, ndimage.distance_transform_edt)[deep].max()))
    return depth


def _chessboard(missing: np.ndarray) -> np.ndarray:
    """Each missing pixel's chessboard distance to the nearest known one (-1 where none is known)."""
    from scipy import ndimage

    return ndimage.distance_transform_cdt(missing, metric="chessboard")


def _around(missing: np.ndarray, tile: tuple[slice, slice], margin: int, transform) -> np.ndarray:
    """``transform`` of ``missing`` on ``tile`` widened by ``margin`` pixels (within the image), at the tile."""
    (ys, xs), (h, w) = tile, missing.shape
    y0, x0 = max(0, ys.start - margin), max(0, xs.start - margin)
    window = missing[y0 : min(h, ys.stop + margin), x0 : min(w, xs.stop + margin)]
    return transform(window)[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]


def hole_steps(
    depth: float | None, default: int, cfg: CAConfig, rate: float, fusion: FusionSchedule | bool | None, cap: int
) -> int:
    """Steps for the known border's content to reach a hole's middle ``depth`` pixels in, at least ``default``
    and at most ``cap`` (``default`` itself when it is more).

    A step moves content ``r`` cells (``step_radius``) at full resolution, 2^l·r on fusion level l, but a cell
    takes its neighbours' news only on the steps it updates (a share ``rate`` of them): on average ``rate``·r
    cells, of the patch size in pixels each, per full-resolution step. With ``fusion`` (a schedule, True: appendix
    A.1's) the schedule's fixed steps on each level come first; the rest run on its coarsest level."""
    if not depth:
        return default
    speed = rate * step_radius(cfg) * cfg.patch_size  # pixels per full-resolution step
    fusion = APPENDIX_A1 if fusion is True else fusion or None
    if fusion:
        fixed = fusion.segments(fusion.outer_steps)  # the coarsest level's share 0
        covered = sum(n * speed * (1 << level) for level, n in fixed)
        coarse = speed * (1 << fusion.levels)
        steps = fusion.outer_steps + math.ceil(max(0.0, depth - covered) / coarse)
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


def reach_cells(cfg: CAConfig, iters: int, fusion: FusionSchedule | None) -> int:
    """How far (cells) the cells a hole's output depends on lie from it: ``iters`` steps of ``step_radius``; with
    fusion, ``step_radius`` times the schedule's reach (a step on level l reaches 2^l cells, each fusion or
    division shifts by a group: ``FusionSchedule.reach``)."""
    r = step_radius(cfg)
    return r * fusion.reach(iters) if fusion else r * iters


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
    from scipy import ndimage

    d = ndimage.distance_transform_cdt(~targets, metric="chessboard")
    return steps - (-(-d // radius))


def until_maps(holes: np.ndarray, iters: int, radius: int, fusion: FusionSchedule | None) -> list[np.ndarray]:
    """Each cell's last computed step, per phase of the rollout (one phase; with fusion one per segment of the
    schedule, each on its level's grid), for the ``holes`` to come out exact. Traced back from the last phase: the
    cells a phase needs at its start (read at least once) are, one level up, the fused cells a division copies
    from, or, one level down, all four cells of each group a fusion averages. (A division also keeps each cell's
    own input channels, which no step changes: they are the crop's own.)"""
    if not fusion:
        return [_last_steps(holes, iters, radius)]
    segments = fusion.segments(iters)
    maps: list[np.ndarray] = [holes] * len(segments)
    targets = holes
    for i in range(len(segments) - 1, -1, -1):
        level, n = segments[i]
        maps[i] = _last_steps(targets, n, radius)
        if i == 0:
            break
        needed = maps[i] >= 0
        if segments[i - 1][0] < level:  # fused into this level: every cell of each needed group
            targets = needed.repeat(2, 0).repeat(2, 1)
        else:  # divided from the level above: the fused cells the needed ones copy from
            h, w = needed.shape
            targets = needed.reshape(h // 2, 2, w // 2, 2).any((1, 3))
    return maps


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------
def missing_cells(k: torch.Tensor, patch: int) -> np.ndarray:
    """The cells ``(gh, gw)`` (bool) with a missing pixel, from the padded known mask ``k`` ``(1, 1, H, W)``."""
    gaps = k[0, 0] < 1
    return (F.max_pool2d(gaps[None].float(), patch)[0] > 0).numpy() if patch > 1 else gaps.numpy()


def restore_holes(
    backend,
    x,
    k,
    size,
    iters,
    rate,
    seed,
    runs,
    fusion: FusionSchedule | None,
    stepping: Stepping,
    progress=None,
    initial=None,
):
    """The inpainted image of the padded image ``x`` with known mask ``k`` (both as ``restore`` pads them, to
    2^levels cells with ``fusion``), cropped to ``size``: ``restore``'s result, computing only the holes' reach;
    None where that reach covers ``WHOLE_GRID_SHARE`` of the grid or more (the whole grid's tiles are then cheaper
    than overlapping crops). ``initial``: the whole image's first outputs (``grid.first_outputs``)."""
    cfg: CAConfig = backend.cfg
    p, c = cfg.patch_size, cfg.channels
    ph, pw = x.shape[-2:]
    grid_cells = (ph // p) * (pw // p)
    radius = step_radius(cfg)
    align = 1 << fusion.levels if fusion else 1
    if min(ph, pw) // p // align < WINDOW:  # the whole grid's coarsest level in one window smaller than WINDOW
        log.debug(f"holes' reach: the grid's coarsest level is narrower than {WINDOW} cells; computing every cell")
        return None
    missing = missing_cells(k, p)
    crops = plan_crops(missing, reach_cells(cfg, iters, fusion), align, HOLE_WINDOW * align)
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
    images = [x[0, :, : size[0], : size[1]].permute(1, 2, 0).numpy().copy() for _ in range(len(record) + 1)]
    sources = [level_masks(seed + r, iters, rate, fusion) for r in range(runs)]  # as the whole grid's
    done, total, computed, skipped = 0, runs * len(crops) * iters, 0, 0
    for crop, until in zip(crops, maps):
        (h, w), (y0, x0) = crop.size, (crop.y0, crop.x0)
        needed = _needed(until, fusion, iters)
        limits = [torch.from_numpy(u.astype(np.int32))[None] for u in until]
        acc = torch.zeros(len(record) + 1, c, h * p, w * p)  # the runs' sums, one per frame, the final last
        for source in sources:
            start = done

            def on_step(t: int, start: int = start) -> None:
                if progress is not None:
                    progress(start + t, total)

            phases = draw_phases(source, fusion, [(y0, x0)], (h, w), needed)
            run, outputs = run_rects(backend, x, k, [(y0, x0)], (h, w), phases, stepping, on_step, limits, initial)
            computed, skipped, done = computed + run.computed, skipped + run.skipped, start + iters
            _add_holes(acc, outputs, crop, p)
        _put_holes(images, acc / torch.full((1, 1, h * p, w * p), float(runs)), crop, k, p)
    if progress is not None and total:
        progress(total, total)
    dense = grid_cells * iters * runs
    log.debug(
        f"holes' reach: {len(crops)} crops; {share:.2%} of the image's cells computed, "
        f"{computed / max(1, dense):.2%} of its cell-steps ({computed:,} of {dense:,})"
    )
    return Restored(images[-1], images[:-1], list(record), None, computed, skipped, dense, len(crops), share)


def _full_size(cells: np.ndarray, h: int) -> np.ndarray:
    """A fused level's cells at full resolution (a full grid's as they are)."""
    scale = h // cells.shape[0]
    return cells if scale == 1 else cells.repeat(scale, 0).repeat(scale, 1)


def _needed(until: list[np.ndarray], fusion: FusionSchedule | None, iters: int) -> list[torch.Tensor]:
    """The cells whose update masks are drawn, one ``(1, h / 2^level, w / 2^level)`` map per level: those computed
    at least once in one of the level's phases."""
    levels = [0] if fusion is None else [level for level, _ in fusion.segments(iters)]
    needed: list = [None] * (max(levels) + 1)
    for level, u in zip(levels, until):
        needed[level] = u >= 1 if needed[level] is None else needed[level] | (u >= 1)
    return [torch.from_numpy(m)[None] for m in needed]


def _add_holes(acc: torch.Tensor, outputs: list[torch.Tensor], crop: Crop, p: int) -> None:
    """Add a crop's outputs at its holes' pixels into its running sums ``acc`` (one per frame, the final last)."""
    holes = torch.from_numpy(crop.holes).repeat_interleave(p, 0).repeat_interleave(p, 1)
    for f, out in enumerate(outputs):
        acc[f] += torch.where(holes, out[0], 0.0)


def _put_holes(images: list[np.ndarray], means: torch.Tensor, crop: Crop, k: torch.Tensor, p: int) -> None:
    """Write a crop's mean outputs ``means`` (one per frame) into the ``images`` ``(H, W, C)`` at its holes' missing
    pixels (``k``: the padded known mask), as ``grid.blended_images`` blends the whole grid's."""
    h, w = images[0].shape[:2]
    top, left = crop.y0 * p, crop.x0 * p
    bottom, right = min(h, top + crop.size[0] * p), min(w, left + crop.size[1] * p)
    holes = torch.from_numpy(crop.holes).repeat_interleave(p, 0).repeat_interleave(p, 1)
    put = (holes[: bottom - top, : right - left] & ~k[0, 0, top:bottom, left:right].bool()).numpy()
    for image, mean in zip(images, means):
        image[top:bottom, left:right][put] = mean[:, : bottom - top, : right - left].permute(1, 2, 0).numpy()[put]
