"""One tile's rollout, step by step, window by window, skipping cells that have settled.

A step of a large grid is computed on *windows*: squares of ``WINDOW`` cells whose *core* cells are updated and
whose ``halo`` (how far one step reads: depth · NH//2 cells for ViTCA) is only read. The new values of a step's
updating cells are written into the grid once every window of the step has been read. A window's core cells see
exactly the neighbours they see in the whole grid, so a windowed step equals the whole-grid step (up to float
rounding), while the memory a step needs is bounded by ``max_cells`` whatever the grid's size. All windows have
the same shape, ``WINDOW`` cells a side on grids at least that large (the first and last of a row take the extra
halo as core), so a backend sees one fixed shape.

Settling (``settle`` > 0): a cell whose output changed by less than ``settle`` (largest change over its output
channels) on ``PATIENCE`` consecutive updates is *settled*: it is no longer updated, but it still serves as a
neighbour. A window whose core holds only settled cells is not computed; the rollout ends when every cell has
settled. Settling is decided per cell from that cell's own history, so tiles still equal the untiled run.

Reach (``until``): a cell may be given the last step at which it is computed; after it, the cell keeps its value
and still serves as a neighbour. A caller that wants some cells exact and computes each other cell only while its
value can still reach them (``vitca_cli.restore.holes``) gets those cells exactly as the full rollout would. A
window whose core holds no cell still computed at a step is left out of it. Without settling, a backend that keeps
each cell's keys and values (``kept_keys``) runs such a rollout cell by cell instead of window by window
(``vitca_cli.restore.sparse``): the same bytes where the caller wants them exact, computing only the updating
cells those depend on and the keys and values of neighbours that changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from vitca_cli.nca.config import CAConfig
from vitca_cli.nca.levels import divide_cells, fuse_cells
from vitca_cli.nca.model import output_image
from vitca_cli.restore import sparse
from vitca_cli.restore.sparse import Rollout
from vitca_cli.restore.tiles import axis_origins

WINDOW = 64  # cells per side of a step window at most, halo included
PATIENCE = 2  # consecutive quiet updates before a cell settles


@dataclass(frozen=True)
class AxisWindow:
    """A window [origin, origin + size) along one axis and the core [lo, hi) it writes."""

    origin: int
    size: int
    lo: int
    hi: int


def axis_windows(length: int, window: int, halo: int) -> list[AxisWindow]:
    """Windows of exactly ``window`` cells covering ``length`` (one window, the whole axis, if it is shorter):
    cores partition the axis, each core has ``halo`` cells of window on every inner side. The last window sits
    flush with the far edge, so it may overlap its neighbour by more than the halo: its core starts where the
    previous one ends. One window size for every grid keeps the compiled step to one shape (each new shape is a
    recompile, and the recompiled kernels take any size and run slower)."""
    if length <= window:
        return [AxisWindow(0, length, 0, length)]
    origins = axis_origins(length, window, window - 2 * halo)
    out, lo = [], 0
    for i, origin in enumerate(origins):
        hi = length if i == len(origins) - 1 else origin + window - halo
        out.append(AxisWindow(origin, window, lo, hi))
        lo = hi
    return out


def window_plan(cfg: CAConfig, grid: tuple[int, int], window: int) -> tuple[list, list]:
    """The windows of a grid: whole-grid windows for models that must see the whole grid (a position encoding
    tied to the grid, or UNetCA's pooling), else ``window`` cells with ViTCA's one-step reach as halo."""
    if cfg.size_dependent or cfg.arch != "vitca":
        return axis_windows(grid[0], grid[0], 0), axis_windows(grid[1], grid[1], 0)
    halo = cfg.depth * (max(cfg.neighbourhood) // 2)
    window = max(window, 2 * halo + 1)
    return axis_windows(grid[0], window, halo), axis_windows(grid[1], window, halo)


def _chunks(items: list, per_call: int) -> list[list]:
    """``items`` in near-equal chunks of at most ``per_call``."""
    count = -(-len(items) // per_call)
    size = -(-len(items) // count) if items else 0
    return [items[i : i + size] for i in range(0, len(items), size)] if items else []


def rollout_windows(
    backend,
    cells: torch.Tensor,
    masks: torch.Tensor,
    settle: float = 0.0,
    record: tuple[int, ...] = (),
    max_cells: int = 1 << 16,
    on_step: Callable[[int], None] | None = None,
    window: int | None = None,
    until: torch.Tensor | None = None,
) -> Rollout:
    """Run ``masks.shape[0]`` steps of ``backend`` on ``cells`` ``(N, C, H, W)`` (N independent grids) with update
    masks ``masks`` ``(T, N, H, W)`` (bool), window by window, settling cells when ``settle`` > 0. Outputs after the
    steps in ``record`` (1-based) are returned as frames. ``on_step(t)`` is called after each step. A channels-last
    ``cells`` (as ``seed_cells`` makes them) is used up: the rollout runs in its memory. ``until`` ``(N, H, W)``
    (int): each cell's last computed step (1-based; below 1: never), None: every step.

    Each call computes the new values of its windows' updating core cells only; they are written into the grid
    when the step's last window has read its neighbours, so a step needs no second copy of the grid."""
    if until is not None and settle == 0 and hasattr(backend, "kept_keys"):
        kept = sparse.rollout_kept(backend, cells, masks, record, max_cells, on_step, until)
        if kept is not None:
            return kept
    cfg: CAConfig = backend.cfg
    device = getattr(backend, "tensor_device", torch.device("cpu"))
    steps = masks.shape[0]
    n, c, h, w = cells.shape
    state = cells.permute(0, 2, 3, 1).contiguous()  # n h w c, updated in place (a channels-last grid's own memory)
    flat = state.view(-1, c)
    wys, wxs = window_plan(cfg, (h, w), window or WINDOW)
    wins = [(b, wy, wx) for b in range(n) for wy in wys for wx in wxs]
    area = wys[0].size * wxs[0].size
    per_call = max(1, max_cells // area)
    fixed = getattr(backend, "fixed_shapes", False)  # e.g. ONNX Runtime sessions specialised to each shape
    out_ch = cfg.output_slice
    settled = torch.zeros(n * h * w, dtype=torch.bool) if settle > 0 else None
    quiet = torch.zeros(n * h * w, dtype=torch.uint8) if settle > 0 else None
    result = Rollout(cells, dense=n * h * w * steps)
    todo = list(range(len(wins)))
    last = None if until is None else [int(until[b, wy.lo : wy.hi, wx.lo : wx.hi].max()) for b, wy, wx in wins]
    cores: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for t in range(steps):
        if not todo:
            break
        mask = masks[t].reshape(-1) if settled is None else masks[t].reshape(-1) & ~settled
        if until is not None:
            mask = mask & (until.reshape(-1) > t)
        live = todo if last is None else [i for i in todo if last[i] > t]
        updates = []
        for chunk in _chunks(live, per_call):
            batch = chunk + chunk[:1] * ((1 << (len(chunk) - 1).bit_length()) - len(chunk)) if fixed else chunk
            z = torch.stack(
                [
                    state[b, wy.origin : wy.origin + wy.size, wx.origin : wx.origin + wx.size]
                    for b, wy, wx in (wins[i] for i in batch)
                ]
            )
            local, grid = _stacked_cores(cores, wins, chunk, (h, w), area)
            chosen = mask[grid]
            only, dest = local[chosen], grid[chosen]
            rows = _step_rows(backend, z.to(device), only.to(device)).cpu()
            if settled is not None:
                change = (rows[:, out_ch] - flat[dest][:, out_ch]).abs().amax(-1)
                quiet[dest] = torch.where(change < settle, quiet[dest] + 1, 0).to(torch.uint8)
            updates.append((dest, rows))
            result.computed += len(batch) * area
        result.skipped += (len(wins) - len(todo)) * area
        for dest, rows in updates:
            flat.index_copy_(0, dest, rows)
        if settled is not None:
            settled |= quiet >= PATIENCE
            grid_settled = settled.view(n, h, w)
            todo = [i for i in todo if not _core_settled(grid_settled, wins[i])]
        result.steps_run = t + 1
        if t + 1 in record:
            result.frames.append(output_image(cfg, state.permute(0, 3, 1, 2)).to("cpu", torch.float32, copy=True))
        if on_step is not None:
            on_step(t + 1)
    result.skipped += len(wins) * area * (steps - result.steps_run)
    result.cells = state.permute(0, 3, 1, 2)
    return result


def rollout_levels(
    backend,
    cells: torch.Tensor,
    phases: list[tuple[int, torch.Tensor]],
    settle: float = 0.0,
    record: tuple[int, ...] = (),
    max_cells: int = 1 << 16,
    on_step: Callable[[int], None] | None = None,
    window: int | None = None,
    until: list[torch.Tensor] | None = None,
    detail: bool = False,
) -> Rollout:
    """A rollout with fusion and mitosis (appendix A.1, over several levels): ``phases`` lists ``(level, masks)`` in
    the order they run, ``masks`` ``(T_phase, N, H / 2^level, W / 2^level)``, each phase run by
    :func:`rollout_windows`. Going down a level fuses 2×2 groups of cells; going up divides them again, each cell
    keeping its own input channels (with ``detail`` also adding back its detail). ``cells`` ``(N, C, H, W)`` with
    H and W multiples of 2^(deepest level). Frames recorded on a fused grid are shown at full size; settling works
    within each phase. ``window`` and ``until`` (one map per phase, each counted from the phase's first step; None:
    every cell every step) go to :func:`rollout_windows`."""
    cfg: CAConfig = backend.cfg
    n, _, h, w = cells.shape
    steps = sum(len(m) for _, m in phases)
    total = Rollout(cells, dense=n * h * w * steps, steps_run=steps)
    grids = [cells]  # the grid of each level reached so far, full resolution first
    before = 0
    for i, (level, masks) in enumerate(phases):
        while level > len(grids) - 1:
            grids.append(fuse_cells(grids[-1]))
        while level < len(grids) - 1:
            fused = grids.pop()
            grids[-1] = divide_cells(cfg, fused, grids[-1], detail)
        wanted = tuple(t - before for t in record if before < t <= before + len(masks))
        ticks = None if on_step is None else (lambda t, before=before: on_step(before + t))
        last = None if until is None else until[i]
        run = rollout_windows(backend, grids[-1], masks, settle, wanted, max_cells, ticks, window, last)
        total.computed, total.skipped = total.computed + run.computed, total.skipped + run.skipped
        frames = run.frames + [output_image(cfg, run.cells).float().cpu()] * (len(wanted) - len(run.frames))
        scale = h // run.cells.shape[-2]
        total.frames += [f.repeat_interleave(scale, -2).repeat_interleave(scale, -1) for f in frames]
        grids[-1] = run.cells
        before += len(masks)
    total.cells = grids[0]
    return total


def core_indices(wins: list, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For windows ``(b, AxisWindow, AxisWindow)`` stacked in this order: the flat index of each core cell in the
    stack ``(len(wins), wy.size, wx.size)`` and in the grids ``(N, H, W)``, in the same order."""
    h, w = grid
    local, flat = [], []
    for j, (b, wy, wx) in enumerate(wins):
        ys = torch.arange(wy.lo, wy.hi)[:, None]
        xs = torch.arange(wx.lo, wx.hi)[None, :]
        local.append(((j * wy.size + ys - wy.origin) * wx.size + xs - wx.origin).reshape(-1))
        flat.append(((b * h + ys) * w + xs).reshape(-1))
    return torch.cat(local), torch.cat(flat)


def _stacked_cores(cache: dict, wins: list, chunk: list[int], grid: tuple[int, int], area: int):
    """:func:`core_indices` of the windows ``chunk`` stacked in this order, from a cache of each window's own."""
    parts = []
    for j, i in enumerate(chunk):
        if i not in cache:
            cache[i] = core_indices([wins[i]], grid)
        local, flat = cache[i]
        parts.append((local + j * area, flat))
    if len(parts) == 1:
        return parts[0]
    return torch.cat([local for local, _ in parts]), torch.cat([flat for _, flat in parts])


def _step_rows(backend, z: torch.Tensor, only: torch.Tensor) -> torch.Tensor:
    """The new values of the cells ``only`` (flat indices) of the windows ``z`` ``(B, H, W, C)``, each updated: the
    backend's own ``step_rows`` where it has one, else its whole-window ``step`` with a mask of those cells."""
    if hasattr(backend, "step_rows"):
        return backend.step_rows(z, only)
    m = torch.zeros(z.shape[:3].numel(), dtype=z.dtype, device=z.device)
    m[only] = 1
    out = backend.step(z.permute(0, 3, 1, 2), m.view(z.shape[0], 1, *z.shape[1:3]))
    return out.permute(0, 2, 3, 1).reshape(-1, z.shape[-1]).index_select(0, only).float()


def _core_settled(settled: torch.Tensor, win) -> bool:
    b, wy, wx = win
    return bool(settled[b, wy.lo : wy.hi, wx.lo : wx.hi].all())
