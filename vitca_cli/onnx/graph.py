"""The exported graph: one CA step on a channels-last grid (:class:`StepGraph`), with ViTCA run on tiles of cells.

The model's eager attention loops over the NH·NW neighbours with strided views, which are free in torch but
each become a copying ``Slice`` plus ``Mul``/``ReduceSum``/``Add`` nodes in ONNX. The exported ViTCA step instead
runs on tiles of ``EXPORT_TILE`` cells: every per-cell layer runs in tile order, q, k and v come out of
head-major products, and the attention is :func:`tiled_local_attention`, the same maths as dense attention of
each tile's queries over its halo (two Gathers and two batched MatMuls, a constant -inf mask outside each
query's window). The rule takes this attention as an argument (``ViTCAUpdate.update_cells(attention=...)``);
nothing of the model is swapped.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn

from vitca_cli.nca.model import ViTCAUpdate, vit_position_encoding_at

# Cells per tile of the exported ViTCA step: each tile's 2×6 queries attend to a 4×8 halo for a 3×3 window.
# ONNX has no strided views, so the overlapping halos are copies (2.7× the keys and values), and the logits
# outside each query's window are wasted work (32 per query for 9). Larger tiles copy less and waste more;
# bench/onnx_step.py times tile shapes against the torch step.
EXPORT_TILE = (2, 6)


@dataclasses.dataclass(frozen=True)
class TileGrid:
    """An ``h``×``w`` grid of cells cut into ``tile`` = (th, tw) tiles, ``gh``×``gw`` of them (padded up to whole
    tiles). In tile order a grid is ``(B, GH, GW·th·tw, C)``: tiles in raster order, each tile's cells together."""

    h: int
    w: int
    tile: tuple[int, int] = EXPORT_TILE

    @property
    def gh(self) -> int:
        return (self.h + self.tile[0] - 1) // self.tile[0]

    @property
    def gw(self) -> int:
        return (self.w + self.tile[1] - 1) // self.tile[1]

    def raster_index(self, index: torch.Tensor) -> torch.Tensor:
        """Flat tile-order cell indices (into B·GH·GW·th·tw) -> flat raster indices (into B·H·W)."""
        th, tw = self.tile
        per_row, per_image = self.gw * th * tw, self.gh * self.gw * th * tw  # cells in a row of tiles, an image
        # a - (a // n)·n, not a % n: the exporter cannot take a remainder by a symbolic size
        image = index // per_image
        tile_row = (index - image * per_image) // per_row
        rest = index - image * per_image - tile_row * per_row
        tile_col, cell = rest // (th * tw), rest % (th * tw)
        return (image * self.h + tile_row * th + cell // tw) * self.w + tile_col * tw + cell % tw


def to_tiles(t: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B, GH, GW·th·tw, C)``, zero padded to whole tiles."""
    (th, tw), b, c = grid.tile, t.shape[0], t.shape[-1]
    t = F.pad(t, [0, 0, 0, grid.gw * tw - grid.w, 0, grid.gh * th - grid.h])
    t = t.reshape(b, grid.gh, th, grid.gw, tw, c).permute(0, 1, 3, 2, 4, 5)
    return t.reshape(b, grid.gh, grid.gw * th * tw, c)


def from_tiles(t: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """Inverse of :func:`to_tiles`, padding cropped."""
    (th, tw), b, c = grid.tile, t.shape[0], t.shape[-1]
    t = t.reshape(b, grid.gh, grid.gw, th, tw, c).permute(0, 1, 3, 2, 4, 5)
    return t.reshape(b, grid.gh * th, grid.gw * tw, c)[:, : grid.h, : grid.w]


def tiled_position_encoding(rule: ViTCAUpdate, grid: TileGrid) -> torch.Tensor | None:
    """The rule's position encoding in tile order ``(GH, GW·th·tw, E)``; the vit sinusoid is computed in that
    order directly (from row and column tables), not permuted."""
    kind, (th, tw), dim = rule.cfg.pos_encoding, grid.tile, rule.cfg.embed
    if kind == "learned":
        return to_tiles(rule.learned_pe[None], grid)[0]
    if kind != "vit":
        return None
    rows = (torch.arange(grid.gh)[:, None] * th + torch.arange(th)).float()  # gh th
    cols = (torch.arange(grid.gw)[:, None] * tw + torch.arange(tw)).float()  # gw tw
    pe = vit_position_encoding_at(rows[:, None, :, None], cols[None, :, None, :], grid.w, dim)  # gh gw th tw E
    return pe.reshape(grid.gh, grid.gw * th * tw, dim)


def _window_bias(tile: tuple[int, int], neighbourhood: tuple[int, int]) -> torch.Tensor:
    """``(th·tw, kh·kw)``: 0 where a halo cell lies in the query's NH×NW window, -inf elsewhere."""
    (th, tw), (nh, nw) = tile, neighbourhood
    kh, kw = th + nh - 1, tw + nw - 1
    dy = torch.arange(kh)[None, None, :, None] - torch.arange(th)[:, None, None, None]  # halo row - query row
    dx = torch.arange(kw)[None, None, None, :] - torch.arange(tw)[None, :, None, None]
    inside = (dy >= 0) & (dy < nh) & (dx >= 0) & (dx < nw)
    return torch.where(inside, 0.0, float("-inf")).reshape(th * tw, kh * kw)


def tiled_local_attention(q, k, v, neighbourhood: tuple[int, int], scale: float, grid: TileGrid):
    """:func:`vitca_cli.nca.attention.local_attention` (same maths) of tile-ordered, head-major q, k, v
    ``(B, heads, GH·GW·th·tw, d)``, in a form that exports to few ONNX nodes; ``(B, GH, GW·th·tw, heads, d)``.

    Each tile of queries attends densely to its halo, the (th+NH-1)×(tw+NW-1) cells around it, gathered (one
    ``Gather`` for k and one for v) from the tile-ordered keys. Halo cells outside the h×w grid are zero "ghost"
    neighbours, as in the model: their logit is 0 (they take softmax mass) and their value is zero. Halo
    cells outside a query's own window get -inf logits and thus exactly zero weight. Returns ``(out, None)``: the
    attention maps are not an output of the exported step.
    """
    (nh, nw), (th, tw) = neighbourhood, grid.tile
    b, heads, n, d = q.shape
    tiles, per_tile = grid.gh * grid.gw, th * tw
    kh, kw = th + nh - 1, tw + nw - 1

    # Halo of every tile as indices into the tile-ordered cells; ghosts (outside the grid) read cell 0 and are
    # then made zero neighbours by ``real``: their logit is set to 0 and their weight is dropped after the
    # softmax. (Appending a zero row to k and v instead costs two grid-sized copies per step.)
    r = (torch.arange(grid.gh) * th - nh // 2)[:, None, None, None] + torch.arange(kh)[None, None, :, None]
    c = (torch.arange(grid.gw) * tw - nw // 2)[None, :, None, None] + torch.arange(kw)[None, None, None, :]
    inside = (r >= 0) & (r < grid.h) & (c >= 0) & (c < grid.w)
    r, c = r.clamp(min=0), c.clamp(min=0)
    index = torch.where(inside, ((r // th) * grid.gw + c // tw) * per_tile + (r % th) * tw + c % tw, 0).reshape(-1)
    real = inside.reshape(tiles, 1, kh * kw).float()

    def halo(t):  # b heads n d -> b heads tiles (kh kw) d
        return t.index_select(2, index).reshape(b, heads, tiles, kh * kw, d)

    queries = q.reshape(b, heads, tiles, per_tile, d)
    logits = (queries @ halo(k).transpose(-1, -2)) * scale * real + _window_bias(grid.tile, neighbourhood)
    out = (logits.softmax(dim=-1) * real) @ halo(v)  # b heads tiles (th tw) d
    return out.reshape(b, heads, n, d).transpose(1, 2).reshape(b, grid.gh, n // grid.gh, heads, d), None


def tiled_attention(x, weights, heads: int, neighbourhood: tuple[int, int], scale: float, grid: TileGrid):
    """The export's :func:`vitca_cli.nca.attention.attend`, passed to the rule as its ``attention``: q, k and v
    of the tile-ordered cells ``x`` ``(B, GH, GW·th·tw, E)`` as head-major products (``(B, 1, N, E) @ (heads, E,
    d)``: no transposes, faster in ONNX Runtime than a product and a transpose), then
    :func:`tiled_local_attention`."""
    b, e = x.shape[0], x.shape[-1]
    cells = x.reshape(b, 1, -1, e)
    q, k, v = (cells @ w.reshape(heads, -1, e).transpose(1, 2) for w in weights)  # b heads n d
    return tiled_local_attention(q, k, v, neighbourhood, scale, grid)


class StepGraph(nn.Module):
    """One CA step on a channels-last grid: the module that is exported.

    A ViTCA step runs on tiles of cells (:class:`TileGrid`): the grid is put in tile order once, every per-cell
    layer runs in that order, and only the update is put back. The attention then reads each tile's queries in
    place and gathers its keys and values in one pass, with no per-step rearranging of the 128-wide embeddings
    (faster in ONNX Runtime than the same graph in raster order; bench/onnx_step.py). As in the torch step,
    the output projection, MLP and head run only for the cells whose mask is non-zero (``NonZero``, then
    Gathers and one ``ScatterND`` add into the grid). UNetCA steps export as they are.
    """

    def __init__(self, ca: nn.Module):
        super().__init__()
        self.ca = ca

    def forward(self, cells: torch.Tensor, update_mask: torch.Tensor, head_mask: torch.Tensor | None = None):
        rule = self.ca.rule
        if not isinstance(rule, ViTCAUpdate):  # dense: the graph has no data-dependent shapes
            return self.ca.apply_update(cells, update_mask, rule.update_cells(cells, head_mask))
        grid = TileGrid(cells.shape[1], cells.shape[2])
        mask = to_tiles(update_mask, grid).reshape(-1)  # 0 on the padding
        only = mask.nonzero().squeeze(1)  # the cells that update, in tile order
        attention = functools.partial(tiled_attention, grid=grid)
        position = tiled_position_encoding(rule, grid)
        delta = rule.update_cells(to_tiles(cells, grid), head_mask, position=position, only=only, attention=attention)
        return self.ca.apply_update_at(cells, grid.raster_index(only), delta * mask.index_select(0, only)[:, None])
