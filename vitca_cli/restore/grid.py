"""The cell grid of one image: padding, the steps recorded as frames, running rectangles of the grid, and putting
their outputs together into the image.

Shared by the two ways of restoring an image: the whole grid, tile by tile (``vitca_cli.restore.loop``), and only
the cells that can reach a missing pixel, crop by crop (``vitca_cli.restore.holes``). A rectangle is given by its
top-left cell in the global grid, so its update masks are those the whole grid would have there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from vitca_cli.log import log
from vitca_cli.nca.config import CAConfig, FusionSchedule
from vitca_cli.nca.fill import push_pull_fill
from vitca_cli.nca.model import output_image, seed_cells
from vitca_cli.nca.rollout import UpdateMasks
from vitca_cli.restore.tiles import TilePlan
from vitca_cli.restore.windows import rollout_levels, rollout_windows

MAX_FRAME_BYTES = 512 << 20  # animation frames held in memory


@dataclass
class Restored:
    """The restored image ``(H, W, C)`` (not clipped), animation frames (output after each recorded step),
    the steps they were taken at, the tile plan used (None when only the holes' reach was computed), and the work:
    ``computed`` cell-steps (windows, halos and tile margins included), ``skipped`` (left out as settled),
    ``dense`` (the image's cells × iterations × runs) and, for inpainting computed only within the holes' reach,
    the ``crops`` run and the ``reached`` cells (cells computed at least once, as a share of the grid)."""

    image: np.ndarray
    frames: list[np.ndarray] = field(default_factory=list)
    frame_steps: list[int] = field(default_factory=list)
    plan: TilePlan | None = None
    computed: int = 0
    skipped: int = 0
    dense: int = 0
    crops: int = 0
    reached: float = 1.0


def hwc_to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]


def tensor_to_hwc(x: torch.Tensor) -> np.ndarray:
    return x[0].permute(1, 2, 0).contiguous().numpy()


def frame_schedule(iters: int, frames: int) -> list[int]:
    """The steps (1..iters) at which to record ``frames`` evenly spaced frames; the last is always ``iters``."""
    if frames <= 0:
        return []
    frames = min(frames, iters)
    return sorted({max(1, round(iters * (k + 1) / frames)) for k in range(frames)})


def recorded_steps(iters: int, frames: int, frame_bytes: int) -> list[int]:
    """The steps whose outputs become animation frames, fewer when ``frames`` of ``frame_bytes`` would not fit."""
    record = frame_schedule(iters, frames)
    if record and len(record) * frame_bytes > MAX_FRAME_BYTES:
        record = frame_schedule(iters, max(1, MAX_FRAME_BYTES // frame_bytes))
        log.info(f"large image: animation limited to {len(record)} frames")
    return record


def padded(cfg: CAConfig, image: np.ndarray, known: np.ndarray | None, cells: int = 1):
    """The image as a ``(1, C, H', W')`` tensor padded (edge replicate) to a multiple of ``cells`` cells, and up to
    the training size for size-dependent models; the known mask ``(1, 1, H', W')`` padded alike (or None); and
    ``(H', W')``."""
    h, w, _ = image.shape
    p = cfg.patch_size * cells
    ph, pw = -(-h // p) * p, -(-w // p) * p
    if cfg.size_dependent:
        ph, pw = max(ph, cfg.image_size[0]), max(pw, cfg.image_size[1])
    x = hwc_to_tensor(image)
    k = None if known is None else torch.from_numpy(np.asarray(known, dtype=np.float32))[None, None]
    if k is not None and k.shape[-2:] != (h, w):
        raise ValueError(f"known mask is {tuple(k.shape[-2:])}, the image {h}×{w}")
    if (ph, pw) != (h, w):
        x = F.pad(x, (0, pw - w, 0, ph - h), mode="replicate")
        k = None if k is None else F.pad(k, (0, pw - w, 0, ph - h), mode="replicate")
    return x, k, (ph, pw)


def first_outputs(cfg: CAConfig, x: torch.Tensor, k: torch.Tensor | None) -> torch.Tensor | None:
    """The outputs a ``fill`` model's cells start from, for the whole padded image ``x`` (known mask ``k``): every
    window seeds from the same fill, so windows replay the whole grid. None for other models or with no mask."""
    if cfg.cell_init != "fill" or k is None:
        return None
    return push_pull_fill(x, k)


def level_masks(seed: int, iters: int, rate: float, fusion: FusionSchedule | None) -> list[UpdateMasks]:
    """The update masks of each level: full resolution as an unfused run draws them (a phase there takes the first
    or the last steps), each fused level drawn apart at its own coordinates for the steps it runs."""
    if fusion is None:
        return [UpdateMasks(seed, iters, rate)]
    counts = fusion.level_steps(iters)
    return [UpdateMasks(seed, iters, rate)] + [
        UpdateMasks(seed, n, rate, level=level) for level, n in enumerate(counts) if level > 0
    ]


def draw_phases(
    masks: list[UpdateMasks],
    fusion: FusionSchedule | None,
    origins: list,
    size: tuple[int, int],
    needed: list | None = None,
) -> list[tuple[int, torch.Tensor]]:
    """The phases ``(level, masks (T_phase, N, h / 2^level, w / 2^level))`` of rectangles of ``size`` cells at cell
    ``origins`` (multiples of 2^levels with fusion), in the order they run, with ``masks`` from
    :func:`level_masks`: one phase of every step without ``fusion``, else one per segment of the schedule, the
    full-resolution ones taking the first steps of an unfused run's masks (before the first fusion) and the last
    (after the last division), each fused level's phases its own masks in order. ``needed`` (one per level,
    ``(N, h / 2^level, w / 2^level)`` bool, or None): blocks without a needed cell are not drawn and never update."""
    th, tw = size

    def window(level: int) -> torch.Tensor:  # (T, N, th / 2^level, tw / 2^level)
        want = None if needed is None else needed[level]
        return torch.stack(
            [
                masks[level].window(y >> level, x >> level, th >> level, tw >> level, _one(want, i))[:, 0]
                for i, (y, x) in enumerate(origins)
            ],
            dim=1,
        )

    if fusion is None:
        return [(0, window(0))]
    drawn = [window(level) for level in range(fusion.levels + 1)]
    used = [0] * len(drawn)  # steps of each level taken so far: a level's phases take its masks in order
    phases = []
    for i, (level, n) in enumerate(fusion.segments(len(drawn[0]))):
        if level == 0:  # full resolution: the first steps of an unfused run's masks, then the last
            phases.append((0, drawn[0][:n] if i == 0 else drawn[0][len(drawn[0]) - n :]))
        else:
            phases.append((level, drawn[level][used[level] : used[level] + n]))
        used[level] += n
    return phases


def _one(needed: torch.Tensor | None, i: int) -> torch.Tensor | None:
    return None if needed is None else needed[i]


@dataclass(frozen=True)
class Stepping:
    """How a rollout steps: ``settle``, the ``record``ed steps, ``max_cells`` per backend call and the ``window``
    side (None: the default) of :func:`vitca_cli.restore.windows.rollout_windows`; ``detail``: divisions add back
    each cell's detail (``FusionSchedule.detail``)."""

    settle: float
    record: tuple[int, ...]
    max_cells: int
    window: int | None = None
    detail: bool = False


def run_rects(
    backend,
    x,
    k,
    origins: list,
    size: tuple[int, int],
    phases: list,
    stepping: Stepping,
    on_step,
    until=None,
    start=None,
):
    """Run the rectangles of ``size`` cells at cell ``origins`` of the padded image ``x`` (known mask ``k``)
    together, with ``phases`` from :func:`draw_phases`; ``on_step(t)`` after each step. ``until``: each cell's
    last computed step, one map per phase (None: every step). Returns the rollout and, per recorded step and then
    the final step, the output images ``(len(origins), C, th·p, tw·p)``. ``start``: the whole image's first
    outputs (:func:`first_outputs`), for a ``fill`` model."""
    cfg: CAConfig = backend.cfg
    p = cfg.patch_size
    th, tw = size
    regions = [(..., slice(y * p, (y + th) * p), slice(xx * p, (xx + tw) * p)) for y, xx in origins]
    rects = torch.cat([x[region] for region in regions])
    rect_known = None if k is None else torch.cat([k[region] for region in regions])
    rect_start = None if start is None else torch.cat([start[region] for region in regions])
    cells = seed_cells(cfg, rects, known=rect_known, start=rect_start)
    s = stepping
    if len(phases) == 1:  # no fusion
        last = None if until is None else until[0]
        run = rollout_windows(backend, cells, phases[0][1], s.settle, s.record, s.max_cells, on_step, s.window, last)
    else:
        run = rollout_levels(
            backend, cells, phases, s.settle, s.record, s.max_cells, on_step, s.window, until, s.detail
        )
    final = output_image(cfg, run.cells).float().cpu()
    outputs = run.frames + [final] * (len(s.record) - len(run.frames)) + [final]  # settled early: final frames
    return run, outputs


def blended_images(acc, weight_sum, x, k, size: tuple[int, int]) -> list[np.ndarray]:
    """The blends normalised, known pixels put back as given, cropped to ``size``: ``(H, W, C)`` arrays."""
    h, w = size
    if not bool((weight_sum > 0).all()):  # a bug in the plan, never a user error
        raise AssertionError("tile plan leaves cells uncovered")
    blended = acc / weight_sum[0]
    if k is not None:  # known pixels exactly as given
        blended = torch.where(k[0].bool(), x[0], blended)
    return [b[:, :h, :w].permute(1, 2, 0).contiguous().numpy() for b in blended]
