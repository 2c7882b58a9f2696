"""Where the tiles of a large image go, and how their results blend (all sizes in cells; a cell holds P×P pixels).

A tile is what one rollout holds in memory: its cell state for every step. Tiles are large (up to ``TILE_CELLS``):
each step inside a tile is computed window by window (``vitca_cli.restore.windows``), so the memory a step needs
does not depend on the tile size, and an image of up to ``TILE_CELLS`` cells runs as one tile with no overlap.

- Size-dependent models (a position encoding tied to ``cfg.image_size``) run on tiles of exactly the training size;
  neighbouring tiles overlap by a quarter tile and are blended with linear ramps, so there are no seams.
- Size-agnostic models run untiled up to ``TILE_CELLS``; larger grids are split into as few tiles as fit, each with
  a *margin* of ``iters · radius`` cells on every side that borders another tile. A cell's state after T steps
  depends only on cells within T·radius of it, so the zero "ghost" neighbours at a tile's artificial edge never
  reach the blended part: tiled output equals untiled output up to float rounding. The margin is capped at
  ``MAX_MARGIN`` cells (beyond ~128 iterations), where tiling becomes a close approximation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vitca_cli.nca.config import CAConfig

MAX_MARGIN = 128  # cells; beyond this the exact tiling margin costs more than it is worth
BLEND_BAND = 8  # cells over which size-agnostic tiles cross-fade (beyond the margin)
TILE_CELLS = 1 << 22  # cells held by one tile of a size-agnostic model: bounds the state's memory
MAX_SPLIT = 16  # tiles per axis tried when splitting a large grid


def step_radius(cfg: CAConfig) -> int:
    """How many cells one step's information can travel: depth · NH//2 for ViTCA; for UNetCA its pooling reach
    (an approximation: max-pooling windows also depend on the tile's alignment)."""
    if cfg.arch == "vitca":
        return cfg.depth * (max(cfg.neighbourhood) // 2)
    return 2 ** (cfg.unet_octaves + 1)


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles go on a cell grid of ``grid`` = (gh, gw) cells: tile size ``tile``, origins ``ys`` × ``xs``,
    and per axis the ``margin`` (weight 0) and ``band`` (linear ramp) at edges that border another tile."""

    grid: tuple[int, int]
    tile: tuple[int, int]
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    margin: int = 0
    band: int = 0
    exact: bool = True

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def origins(self) -> list[tuple[int, int]]:
        return [(y, x) for y in self.ys for x in self.xs]

    def weights(self, y0: int, x0: int) -> torch.Tensor:
        """Blending weights ``(th, tw)`` of the tile at (y0, x0)."""
        wy = _axis_weights(self.tile[0], self.margin, self.band, y0 > 0, y0 + self.tile[0] < self.grid[0])
        wx = _axis_weights(self.tile[1], self.margin, self.band, x0 > 0, x0 + self.tile[1] < self.grid[1])
        return wy[:, None] * wx[None, :]


def _axis_weights(size: int, margin: int, band: int, ramp_start: bool, ramp_end: bool) -> torch.Tensor:
    i = torch.arange(size, dtype=torch.float32)
    ramp = ((i - margin + 1) / (band + 1)).clamp(0, 1)  # 0 inside the margin, then rising to 1 over the band
    w = torch.ones(size)
    if ramp_start:
        w = torch.minimum(w, ramp)
    if ramp_end:
        w = torch.minimum(w, ramp.flip(0))
    return w


def axis_origins(length: int, size: int, stride: int) -> tuple[int, ...]:
    """Origins of windows of ``size`` every ``stride`` along ``length``; the last sits flush with the far edge."""
    if length <= size:
        return (0,)
    origins = list(range(0, length - size, stride))
    return tuple(origins + [length - size])


def _split_side(length: int, parts: int, overlap: int) -> int:
    """The tile side that covers ``length`` with ``parts`` tiles overlapping by ``overlap``."""
    return length if parts == 1 else math.ceil((length + (parts - 1) * overlap) / parts)


def plan_tiles(
    cfg: CAConfig,
    grid: tuple[int, int],
    iters: int,
    tile: int | None = None,
    max_cells: int = TILE_CELLS,
    align: int = 1,
) -> TilePlan:
    """Choose tiles for a grid of ``grid`` cells (already padded to at least the training size for a
    size-dependent model) for ``iters`` steps of reach. ``tile``: None = automatic (as few tiles of at most
    ``max_cells`` as cover the grid), 0 = never tile, N = tile side in cells. ``align``: tile sides and origins are
    multiples of it (the grid must be), so that fused tiles fuse as the whole grid does."""
    gh, gw = grid
    if cfg.size_dependent:
        th, tw = (s // cfg.patch_size for s in cfg.image_size)
        band = min(max(1, th // 4), max(1, tw // 4))
        return TilePlan(
            grid, (th, tw), axis_origins(gh, th, th - band), axis_origins(gw, tw, tw - band), 0, band, exact=False
        )
    if tile == 0 or (tile is None and gh * gw <= max_cells):
        return TilePlan(grid, (gh, gw), (0,), (0,))
    want = iters * step_radius(cfg)
    margin = min(want, MAX_MARGIN)
    overlap = _aligned(2 * margin + BLEND_BAND, align)
    exact = margin >= want and cfg.arch == "vitca"
    if tile is not None:
        side = _aligned(max(tile, overlap + 1), align)  # room for at least one blended cell per tile
        th, tw = min(side, gh), min(side, gw)
    else:
        th, tw = _fewest_cells_split(gh, gw, overlap, max_cells, align)
    ys, xs = axis_origins(gh, th, th - overlap), axis_origins(gw, tw, tw - overlap)
    return TilePlan(grid, (th, tw), ys, xs, margin, BLEND_BAND, exact)


def _aligned(n: int, align: int) -> int:
    return -(-n // align) * align


def _fewest_cells_split(gh: int, gw: int, overlap: int, max_cells: int, align: int = 1) -> tuple[int, int]:
    """The tile size of the split (rows × columns of tiles) that computes the fewest cells within the budget."""
    best = None
    for ny in range(1, MAX_SPLIT + 1):
        for nx in range(1, MAX_SPLIT + 1):
            th = min(_aligned(_split_side(gh, ny, overlap), align), gh)
            tw = min(_aligned(_split_side(gw, nx, overlap), align), gw)
            if th * tw > max_cells or (ny > 1 and th <= overlap) or (nx > 1 and tw <= overlap):
                continue
            cost = ny * nx * th * tw
            if best is None or cost < best[0]:
                best = (cost, th, tw)
    if best is None:  # a grid beyond MAX_SPLIT² tiles: tiles of the budget's side
        side = _aligned(max(math.isqrt(max_cells), overlap + 1), align)
        return min(side, gh), min(side, gw)
    return best[1], best[2]
