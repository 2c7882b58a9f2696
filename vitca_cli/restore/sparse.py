"""A rollout that computes, each step, only the cells that update and the keys and values of their neighbours.

For the holes' reach (``vitca_cli.restore.holes``). Its ``until`` maps bound the cells each step may need whatever
the update masks; with the masks drawn, the cells needed are traced back from the last step exactly: the cells
wanted after a step that update at it, and every cell their update reads (its NH×NW neighbourhood), are needed
before it. About half of a cell's steps update it, so this set narrows towards the holes more slowly than the
cone, and each step computes only its cells that update: their new states, reading their neighbours' keys and
values as :class:`vitca_cli.nca.kept.KeptKeys` keeps them (computed again only for cells that changed since), where
a step of whole windows computes every cell of each window. The cells wanted after the last step (``until`` at its
last step: the holes, or the next phase's cells) come out as the windowed rollout makes them, to the bit, with the
exact step of a backend that has ``kept_keys`` (the torch backend's, for a one-block ViTCA rule); other backends
and steps run the windowed rollout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from vitca_cli.nca.folded import neighbour_table
from vitca_cli.nca.model import output_image

# Cells a call updates: half as many as a window call reads (each reads its neighbours' kept keys and values, not a
# window's), and at most this many, whose gathered keys and values take about a gigabyte.
KEPT_ROWS = 1 << 16


@dataclass
class Rollout:
    """A tile's final cells, the output images recorded along the way, and the work: ``computed`` cell-steps (window
    cells, halos included), ``skipped`` (windows of settled cells left out), ``dense`` (the grid's cells × steps),
    and the steps run before every cell settled."""

    cells: torch.Tensor
    frames: list[torch.Tensor] = field(default_factory=list)
    computed: int = 0
    skipped: int = 0
    dense: int = 0
    steps_run: int = 0


def rollout_kept(
    backend,
    cells: torch.Tensor,
    masks: torch.Tensor,
    record: tuple[int, ...],
    max_cells: int,
    on_step: Callable[[int], None] | None,
    until: torch.Tensor,
):
    """:func:`vitca_cli.restore.windows.rollout_windows` with ``until`` and without settling, each step computing
    only its updating cells that the cells wanted after the last step (``until`` at least the steps) depend on, or
    None where ``backend`` keeps no keys. The rollout's ``computed`` counts the cells each step reads: the updating
    ones and their neighbours."""
    cfg = backend.cfg
    device = getattr(backend, "tensor_device", torch.device("cpu"))
    steps = masks.shape[0]
    n, c, h, w = cells.shape
    until, masks = until.to(device), masks.to(device)
    nh, nw = cfg.neighbourhood
    need = until >= steps  # the cells wanted after the last step
    todo = torch.empty_like(masks)  # per step, traced back from the last: the cells that update and are needed
    for t in range(steps - 1, -1, -1):
        todo[t] = masks[t] & need
        need |= _spread(todo[t], nh, nw)  # what they read
    todo = todo.flatten(1)  # (T, n·h·w)
    where = need.flatten().nonzero().squeeze(1)  # each cell read at some step, by id
    kept = backend.kept_keys(len(where), min(max_cells // 2, KEPT_ROWS))
    if kept is None:
        return None
    ids = torch.full((n * h * w + 1,), len(where), dtype=torch.long, device=device)  # the last: the ghost
    ids[where] = torch.arange(len(where), device=device)
    chosen = todo.any(0).nonzero().squeeze(1)  # the cells computed at some step
    near = ids[neighbour_table(n, h, w, cfg.neighbourhood, device)[chosen]]  # (P, K) ids of their neighbours
    own = ids[chosen]
    todo = todo[:, chosen]

    state = cells.permute(0, 2, 3, 1).to(device).contiguous()  # n h w c
    flat = state.view(-1, c)
    result = Rollout(cells, dense=n * h * w * steps)
    for t in range(steps):
        sel = todo[t].nonzero().squeeze(1)
        if len(sel):
            neighbours = near[sel]
            missing, named = kept.missing(neighbours)
            kept.keep(missing, flat.index_select(0, where[missing]))
            dest = chosen[sel]
            flat.index_copy_(0, dest, kept.step(flat.index_select(0, dest), neighbours))
            kept.forget(own[sel])
            result.computed += named
        result.steps_run = t + 1
        if t + 1 in record:
            result.frames.append(output_image(cfg, state.permute(0, 3, 1, 2)).to("cpu", torch.float32, copy=True))
        if on_step is not None:
            on_step(t + 1)
    result.cells = state.permute(0, 3, 1, 2).cpu()
    return result


def _spread(cells: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
    """The cells ``(N, H, W)`` (bool) whose NH×NW neighbourhood holds one of ``cells``: what their step reads."""
    out = cells.clone()
    for d in range(1, nw // 2 + 1):
        out[..., d:] |= cells[..., :-d]
        out[..., :-d] |= cells[..., d:]
    rows = out.clone()
    for d in range(1, nh // 2 + 1):
        out[..., d:, :] |= rows[..., :-d, :]
        out[..., :-d, :] |= rows[..., d:, :]
    return out
