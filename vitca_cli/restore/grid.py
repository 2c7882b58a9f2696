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
from vitca_cli.nca.config import CAConfig
from vitca_cli.nca.model import output_image, seed_cells
from vitca_cli.restore.tiles import TilePlan
from vitca_cli.restore.windows import FUSED_OUTER, rollout_fused, rollout_windows

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


def draw_masks(sources: tuple, origins: list, size: tuple[int, int], needed: tuple | None = None) -> tuple:
    """The update masks of rectangles of ``size`` cells at cell ``origins`` from ``sources`` = (the full grid's
    ``UpdateMasks``, the fused grid's or None): the full grid's ``(T, N, h, w)`` (with fusion only the steps
    before fusion and after mitosis, ``(4, N, h, w)``) and the fused grid's ``(T - 4, N, h/2, w/2)`` or None.
    ``needed`` (the same two, ``(N, h, w)`` and ``(N, h/2, w/2)`` bool): blocks without a needed cell are not
    drawn and never update."""
    full, fused = sources
    th, tw = size
    want = (None, None) if needed is None else needed
    outer = torch.stack(
        [full.window(y, x, th, tw, _one(want[0], i))[:, 0] for i, (y, x) in enumerate(origins)], dim=1
    )  # T n th tw
    if fused is None:
        return outer, None
    inner = torch.stack(
        [fused.window(y // 2, x // 2, th // 2, tw // 2, _one(want[1], i))[:, 0] for i, (y, x) in enumerate(origins)],
        dim=1,
    )
    return torch.cat([outer[:FUSED_OUTER], outer[-FUSED_OUTER:]]), inner


def _one(needed: torch.Tensor | None, i: int) -> torch.Tensor | None:
    return None if needed is None else needed[i]


@dataclass(frozen=True)
class Stepping:
    """How a rollout steps: ``settle``, the ``record``ed steps, ``max_cells`` per backend call and the ``window``
    side (None: the default) of :func:`vitca_cli.restore.windows.rollout_windows`."""

    settle: float
    record: tuple[int, ...]
    max_cells: int
    window: int | None = None


def run_rects(
    backend, x, k, origins: list, size: tuple[int, int], masks: tuple, stepping: Stepping, on_step, until=None
):
    """Run the rectangles of ``size`` cells at cell ``origins`` of the padded image ``x`` (known mask ``k``)
    together, with ``masks`` from :func:`draw_masks`; ``on_step(t)`` after each step. ``until``: each cell's last
    computed step (a tensor, or one per phase with fusion; None: every step). Returns the rollout and, per recorded
    step and then the final step, the output images ``(len(origins), C, th·p, tw·p)``."""
    cfg: CAConfig = backend.cfg
    p = cfg.patch_size
    th, tw = size
    regions = [(..., slice(y * p, (y + th) * p), slice(xx * p, (xx + tw) * p)) for y, xx in origins]
    rects = torch.cat([x[region] for region in regions])
    rect_known = None if k is None else torch.cat([k[region] for region in regions])
    cells = seed_cells(cfg, rects, known=rect_known)
    full, fused = masks
    s = stepping
    common = (s.settle, s.record, s.max_cells, on_step, s.window, until)
    if fused is None:
        run = rollout_windows(backend, cells, full, *common)
    else:
        run = rollout_fused(backend, cells, full, fused, *common)
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
