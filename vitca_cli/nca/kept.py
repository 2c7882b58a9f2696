"""One ViTCA step for chosen cells of a grid, each cell's keys and values kept while the cell does not change.

A one-block ViTCA rule without a position encoding tied to the grid reads a cell's neighbours through their keys
and values only, and those depend on the neighbour's own state alone (embedding, LayerNorm, two products). A cell
that did not update since they were computed still has them: :class:`KeptKeys` keeps them per cell and computes
them only for the neighbours that changed, where a step of whole windows computes every cell's each step. With an
update rate of 0.5, about half of a step's neighbours did not change at the step before.

The maths is the rule's own, op for op (the exact step, float32, eager): each product and LayerNorm computes a
cell's row independently of the other rows, as long as a call has more than a few rows, so rows are padded to a
multiple of ``ROW_BUCKET`` (as the windowed step pads its updating cells); the attention is
:func:`vitca_cli.nca.attention.neighbour_attention`, the whole grid's, over the kept keys and values. The bytes are
those of the windowed step (``tests/restore/test_holes.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitca_cli.nca.attention import neighbour_attention
from vitca_cli.nca.model import ROW_BUCKET, ViTCAUpdate


def keeps_keys(rule: nn.Module) -> bool:
    """Whether :class:`KeptKeys` can step ``rule``: a one-block ViTCA rule whose embedding does not depend on the
    cell's place (no vit or learned position encoding)."""
    return isinstance(rule, ViTCAUpdate) and len(rule.blocks) == 1 and rule.cfg.pos_encoding in ("none", "nerf")


class KeptKeys:
    """The keys and values of ``cells`` cells of a grid (ids 0..cells-1; id ``cells`` is the ghost neighbour
    beyond the grid's border, zero keys and values), kept from the step that last computed them until
    :meth:`forget` says the cell changed. ``max_rows``: the cells one product takes at most, which bounds the
    activations of a call."""

    def __init__(self, rule: ViTCAUpdate, cells: int, max_rows: int, device=None):
        if not keeps_keys(rule):
            raise ValueError("only one-block ViTCA rules without a vit or learned position encoding keep keys")
        self.rule = rule
        self.block = rule.blocks[0]
        attn = self.block.attn
        self.shape = (attn.heads, attn.head_dim)
        inner = attn.heads * attn.head_dim
        self.keys = torch.zeros(cells + 1, inner, device=device)
        self.values = torch.zeros(cells + 1, inner, device=device)
        self.kept = torch.zeros(cells + 1, dtype=torch.bool, device=device)
        self.kept[cells] = True  # the ghost neighbour
        self.max_rows = max(ROW_BUCKET, max_rows // ROW_BUCKET * ROW_BUCKET)

    def missing(self, neighbours: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The ids among ``neighbours`` whose keys and values are not kept (ascending), and how many cells
        ``neighbours`` names."""
        named = torch.zeros_like(self.kept)
        named[neighbours.reshape(-1)] = True
        return (named & ~self.kept).nonzero().squeeze(1), int(named[:-1].sum())

    @torch.no_grad()
    def keep(self, ids: torch.Tensor, cells: torch.Tensor) -> None:
        """Compute and keep the keys and values of the cells ``ids`` from their states ``cells`` ``(S, C)``."""
        _, wk, wv = self.block.attn.to_qkv.weight.chunk(3)
        for lo in range(0, len(ids), self.max_rows):
            part = _padded(cells[lo : lo + self.max_rows])
            normed = self.block.norm1(self._embedded(part))
            count = min(self.max_rows, len(ids) - lo)
            for store, weight in ((self.keys, wk), (self.values, wv)):
                store.index_copy_(0, ids[lo : lo + count], F.linear(normed, weight)[:count])
        self.kept[ids] = True

    def forget(self, ids: torch.Tensor) -> None:
        """The cells ``ids`` changed: their keys and values are computed again when next read."""
        self.kept[ids] = False

    @torch.no_grad()
    def step(self, cells: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """The new states of the cells ``cells`` ``(S, C)``, each updated, whose neighbours (row-major, the cell
        itself included) are ``neighbours`` ``(S, K)`` ids, every one kept (:meth:`missing`, :meth:`keep`)."""
        out = []
        for lo in range(0, len(cells), self.max_rows):
            part, near = _padded(cells[lo : lo + self.max_rows]), _padded(neighbours[lo : lo + self.max_rows])
            out.append(self._updated(part, near)[: min(self.max_rows, len(cells) - lo)])
        return out[0] if len(out) == 1 else torch.cat(out or [cells[:0].float()])

    def _embedded(self, cells: torch.Tensor) -> torch.Tensor:
        """As :meth:`ViTCAUpdate.update_cells` embeds cells without a position encoding: the product, then the bias."""
        return F.linear(cells, self.rule.embed.weight) + self.rule.embed.bias

    def _updated(self, cells: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        rule, block = self.rule, self.block
        attn = block.attn
        x = self._embedded(cells)
        wq = attn.to_qkv.weight.chunk(3)[0]
        q = F.linear(block.norm1(x), wq).unflatten(-1, self.shape)
        listed = neighbours.t().reshape(-1)  # neighbour-major, as the whole grid's attention lays them out
        keys = self.keys.index_select(0, listed).view(-1, *q.shape)  # K S heads d
        values = self.values.index_select(0, listed).view(-1, *q.shape)
        out, _ = neighbour_attention((q * keys).sum(-1), values, attn.head_dim**-0.5)
        x = attn.project(out, x)
        delta = rule.head(block.ff(block.norm2(x), x))
        return cells.float() + F.pad(delta.float(), (rule.cfg.static_channels, 0))


def _padded(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` with copies of its first row up to a multiple of ``ROW_BUCKET`` rows (whose results are dropped)."""
    extra = -len(rows) % ROW_BUCKET
    return rows if extra == 0 else torch.cat([rows, rows[:1].expand(extra, *rows.shape[1:])])
