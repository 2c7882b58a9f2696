"""ViTCA and UNetCA: neural cellular automata for image restoration.

Read top to bottom: helpers (patches, position encodings), the transformer block around the localised
self-attention (``vitca_cli.nca.attention``), the ViTCA update rule, seeding and reading out a cell grid, and the
cellular automaton that owns the grid and its update rule (ViTCA, or UNetCA from ``vitca_cli.nca.unet``). The
rollout of many steps and its update masks are ``vitca_cli.nca.rollout``.

A cell grid ``z`` has shape ``(B, C, H, W)`` with channels laid out as ``CAConfig`` describes:
``[nerf position (optional) | input | output | hidden]``. One CA step is a pure function of the grid and an
explicit per-cell update mask, so runs replay exactly and the step exports to ONNX.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vitca_cli.nca.attention import LocalSelfAttention, run_kernel
from vitca_cli.nca.config import CAConfig
from vitca_cli.nca.fill import push_pull_fill
from vitca_cli.nca.levels import cell_detail, fuse_cells
from vitca_cli.nca.rollout import APPENDIX_A1, FusionSchedule, GeneratorMasks, GivenMasks, fusion_rollout, rollout
from vitca_cli.nca.unet import UNetUpdate


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------
def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``b c (h p1) (w p2) -> b (p1 p2 c) h w``: a cell holds a p×p patch of pixels."""
    if p == 1:
        return x
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)  # b c h p1 w p2
    return x.permute(0, 3, 5, 1, 2, 4).reshape(b, p * p * c, h // p, w // p)


def unpatchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    if p == 1:
        return z
    b, ppc, h, w = z.shape
    c = ppc // (p * p)
    z = z.reshape(b, p, p, c, h, w)  # b p1 p2 c h w
    return z.permute(0, 3, 4, 1, 5, 2).reshape(b, c, h * p, w * p)


def vit_position_encoding_at(rows: torch.Tensor, cols: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """The reference's 1-D sinusoid over the raster index n = r·W + c at the cells whose row and column
    coordinates are ``rows`` and ``cols`` (float tensors that broadcast together) on a grid ``width`` cells wide:
    shape ``broadcast(rows, cols) + (E,)``.

    Channel e has frequency f = exp(-e·ln(1e4)/E), sine on even and cosine on odd channels: the odd channels use
    exponent 2k+1, not the 2k of the usual formula (reference pitfall 2). Written as sin(n·f + φ) with φ = π/2 on
    odd channels, and n·f = r·W·f + c·f split by angle addition into row and column tables: the grid-sized work
    is two products and a sum, no sine per element (exported ONNX graphs recompute this every step).
    """
    e = torch.arange(dim, device=rows.device, dtype=torch.float32)
    freq = torch.exp(-e * (math.log(1e4) / dim))
    phase = (e % 2) * (math.pi / 2)
    row = rows[..., None] * (width * freq)
    col = cols[..., None] * freq + phase
    return torch.sin(row) * torch.cos(col) + torch.cos(row) * torch.sin(col)


def vit_position_encoding(height: int, width: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """:func:`vit_position_encoding_at` of a whole H×W grid, shape ``(H, W, E)``."""
    rows = torch.arange(height, device=device, dtype=torch.float32)[:, None]
    cols = torch.arange(width, device=device, dtype=torch.float32)[None, :]
    return vit_position_encoding_at(rows, cols, width, dim).to(dtype)


def nerf_position_channels(height: int, width: int, freqs: int, device=None) -> torch.Tensor:
    """NeRF-style xy encoding ``(4L, H, W)``: [sin(2^l π x)]_l, [sin(2^l π y)]_l, [cos(2^l π x)]_l, [cos(2^l π y)]_l."""
    y, x = torch.meshgrid(
        torch.linspace(-1, 1, height, device=device), torch.linspace(-1, 1, width, device=device), indexing="ij"
    )
    scales = (2.0 ** torch.arange(freqs, device=device) * math.pi)[:, None, None]
    xs, ys = scales * x, scales * y
    return torch.cat([torch.sin(xs), torch.sin(ys), torch.cos(xs), torch.cos(ys)], dim=0)


# ---------------------------------------------------------------------------------------------------------------------
# The transformer block (its localised self-attention: vitca_cli.nca.attention)
# ---------------------------------------------------------------------------------------------------------------------
class FeedForward(nn.Sequential):
    """Linear → GELU → Linear, called as ``ff(x, residual)`` = residual + FF(x), biases in fused epilogues."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        first, _, second = self
        h = run_kernel("bias_gelu", F.linear(x, first.weight), first.bias)
        return run_kernel("bias_add", F.linear(h, second.weight), second.bias, residual)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + Attn(LN(x))``, then ``x + FF(LN(x))``."""

    def __init__(self, cfg: CAConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed)
        self.attn = LocalSelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed)
        self.ff = FeedForward(cfg.embed, cfg.mlp)

    def forward(
        self, x: torch.Tensor, head_mask: torch.Tensor | None = None, only: torch.Tensor | None = None, attention=None
    ):
        x, weights = self.attn(self.norm1(x), x, head_mask, only, attention)
        return self.ff(self.norm2(x), x), weights


# ---------------------------------------------------------------------------------------------------------------------
# The ViTCA update rule: grid (B, C, H, W) -> residual update of output and hidden channels (B, Co·P² + Ch, H, W)
# ---------------------------------------------------------------------------------------------------------------------
class ViTCAUpdate(nn.Module):
    """The ViTCA update rule F_θ: embed each cell, a localised transformer, a zero-initialised head."""

    def __init__(self, cfg: CAConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(cfg.cell_channels, cfg.embed)
        if cfg.pos_encoding == "learned":
            gh, gw = (s // cfg.patch_size for s in cfg.image_size)
            self.learned_pe = nn.Parameter(torch.randn(gh, gw, cfg.embed))
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.depth))
        self.head = nn.Sequential(nn.LayerNorm(cfg.embed), nn.Linear(cfg.embed, cfg.pixel_channels + cfg.hidden))
        if cfg.zero_init_head:  # a fresh rule leaves the grid unchanged
            nn.init.zeros_(self.head[1].weight)
            nn.init.zeros_(self.head[1].bias)
        self._pe_cache: dict = {}
        self.last_attention: list[torch.Tensor] | None = None

    def position_encoding(self, height: int, width: int, x: torch.Tensor) -> torch.Tensor | None:
        kind = self.cfg.pos_encoding
        if kind == "learned":
            if (height, width) != tuple(self.learned_pe.shape[:2]):
                raise ValueError(
                    f"learned position encoding was built for a {tuple(self.learned_pe.shape[:2])} grid, "
                    f"got {(height, width)}: run tiled at the training size"
                )
            return self.learned_pe
        if kind != "vit":
            return None
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return vit_position_encoding(height, width, self.cfg.embed, x.device, x.dtype)
        key = (height, width, x.device, x.dtype)
        if key not in self._pe_cache:
            self._pe_cache = {key: vit_position_encoding(height, width, self.cfg.embed, x.device, x.dtype)}
        return self._pe_cache[key]

    def forward(
        self, z: torch.Tensor, head_mask: torch.Tensor | None = None, keep_attention: bool = False
    ) -> torch.Tensor:
        """Grid ``(B, C, H, W)`` -> update ``(B, Co·P² + Ch, H, W)``."""
        return self.update_cells(z.permute(0, 2, 3, 1), head_mask, keep_attention).permute(0, 3, 1, 2)

    def update_cells(
        self,
        cells: torch.Tensor,
        head_mask: torch.Tensor | None = None,
        keep_attention: bool = False,
        position: torch.Tensor | None = None,
        only: torch.Tensor | None = None,
        attention=None,
    ) -> torch.Tensor:
        """The same on a channels-last grid: cells ``(B, H, W, C)`` -> update ``(B, H, W, Co·P² + Ch)``.

        ``only`` (flat indices into the B·H·W cells) asks for the update of those cells alone,
        ``(len(only), Co·P² + Ch)``: the last block's output projection, MLP and the head then run on those
        rows only (the attention still reads every cell). ``position`` and ``attention`` are for a caller that
        lays the cells out otherwise (the ONNX export runs the step on tiles of cells; see
        ``vitca_cli.onnx.export``): ``position`` replaces this rule's position encoding of an H×W grid, and
        ``attention`` the blocks' attention (:func:`vitca_cli.nca.attention.attend`, same signature).
        """
        b, h, w, _ = cells.shape
        x = F.linear(cells, self.embed.weight)  # b h w e
        pe = self.position_encoding(h, w, x) if position is None else position
        x = x + self.embed.bias if pe is None else run_kernel("bias_add", x, self.embed.bias, pe)
        maps = []
        for i, block in enumerate(self.blocks):
            x, weights = block(x, head_mask, only if i == len(self.blocks) - 1 else None, attention)
            maps.append(weights)
        if keep_attention:
            self.last_attention = [m.detach() for m in maps]
        return self.head(x)


# ---------------------------------------------------------------------------------------------------------------------
# The cell grid: seeding and reading out (functions of the config alone, shared by every backend)
# ---------------------------------------------------------------------------------------------------------------------
def seed_cells(
    cfg: CAConfig,
    image: torch.Tensor,
    generator: torch.Generator | None = None,
    known: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cells for a (masked) image ``(B, Ci, H, W)``, H and W divisible by the patch size.

    Input channels hold the image; output is 0.5 and hidden 0 (``constant``), U[0,1) and U[-1,1) (``random``),
    or the input image and 0 (``input``: 0.5 where a pixel is missing; ``fill``: a push-pull fill there, or
    ``start`` ``(B, Ci, H, W)`` where given, e.g. the fill of the whole image this grid is a window of). ``known``
    ``(B|1, 1, H, W)`` (1 = the pixel is given, 0 = missing; default all given) fills the known channels of a
    ``mask_channel`` model and tells ``input``/``fill`` which pixels are missing. NeRF position channels, if any,
    come first.
    """
    x = patchify(image, cfg.patch_size)
    b, _, h, w = x.shape
    shape_out, shape_hidden = (b, cfg.pixel_channels, h, w), (b, cfg.hidden, h, w)
    kp = None
    if known is not None:
        kp = patchify(known.to(x.dtype).expand(b, 1, -1, -1), cfg.patch_size)  # b p² h w
    out: torch.Tensor | float = 0.5
    hidden: torch.Tensor | float = 0.0
    if cfg.cell_init == "random":
        out = torch.rand(shape_out, generator=generator, device=x.device).to(x.dtype)
        hidden = (torch.rand(shape_hidden, generator=generator, device=x.device) * 2 - 1).to(x.dtype)
    elif cfg.cell_init == "input" or (cfg.cell_init == "fill" and known is None and start is None):
        kx = None if kp is None else kp.repeat_interleave(cfg.channels, dim=1)  # b (p1 p2 c) h w
        out = x if kx is None else x * kx + 0.5 * (1 - kx)
    elif cfg.cell_init == "fill":
        out = patchify(push_pull_fill(image, known) if start is None else start.to(image.dtype), cfg.patch_size)
    layout: list[tuple[int, torch.Tensor | float]] = []  # (channels, values or a constant), in cell order
    if cfg.pos_encoding == "nerf":
        pe = nerf_position_channels(h, w, cfg.nerf_freqs, device=x.device).to(x.dtype)
        layout.append((pe.shape[0], pe.expand(b, -1, -1, -1)))
    layout.append((x.shape[1], x))
    if cfg.mask_channel:
        layout.append((cfg.known_channels, 1.0 if kp is None else kp))
    layout += [(cfg.pixel_channels, out), (cfg.hidden, hidden)]
    # Channels-last memory: each cell's channels are contiguous, so the per-cell linear layers read the grid
    # without a transposing copy, and the step's output keeps the layout. Written part by part into one grid.
    cells = torch.empty(b, h, w, sum(c for c, _ in layout), dtype=x.dtype, device=x.device)
    start = 0
    for count, part in layout:
        target = cells[..., start : start + count]
        if isinstance(part, float):
            target.fill_(part)
        else:
            target.copy_(part.permute(0, 2, 3, 1))
        start += count
    return cells.permute(0, 3, 1, 2)


def output_image(cfg: CAConfig, z: torch.Tensor) -> torch.Tensor:
    """The image held by the output channels ``(B, Co, H·P, W·P)`` (not clipped)."""
    return unpatchify(z[:, cfg.output_slice], cfg.patch_size)


SPARSE_BELOW = 0.9  # step_cells computes updates for the selected cells only when fewer than this share are
ROW_BUCKET = 128  # ... and for a multiple of this many cells (padded with cells that do not update; see bucketed)


def bucketed(only: torch.Tensor, cells: int) -> torch.Tensor:
    """The flat cell indices ``only`` padded (with the grid's first cells, at most ``cells`` rows in all) to a
    multiple of ``ROW_BUCKET``: a handful of row counts instead of a new one every step. bfloat16 products go
    through oneDNN, which builds a kernel for each new shape, so a fresh row count every step would cost a kernel
    build every step (``bench/train.py --compare-precision``). The padding rows' updates are to be dropped."""
    rows = min(cells, -(-len(only) // ROW_BUCKET) * ROW_BUCKET)
    if rows <= len(only):
        return only
    return torch.cat([only, torch.arange(rows - len(only), device=only.device, dtype=only.dtype)])


# ---------------------------------------------------------------------------------------------------------------------
# The cellular automaton: cell grid seeding, one step, rollouts, fusion and mitosis
# ---------------------------------------------------------------------------------------------------------------------
class CellularAutomaton(nn.Module):
    """A cell grid and its learned update rule (ViTCA or UNetCA, chosen by ``cfg.arch``)."""

    def __init__(self, cfg: CAConfig):
        super().__init__()
        self.cfg = cfg
        self.rule = ViTCAUpdate(cfg) if cfg.arch == "vitca" else UNetUpdate(cfg)

    # -- cells ------------------------------------------------------------------------------------------------------
    def seed(
        self,
        image: torch.Tensor,
        generator: torch.Generator | None = None,
        known: torch.Tensor | None = None,
        start: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return seed_cells(self.cfg, image, generator, known, start)

    def output(self, z: torch.Tensor) -> torch.Tensor:
        return output_image(self.cfg, z)

    def hidden(self, z: torch.Tensor) -> torch.Tensor:
        return z[:, self.cfg.hidden_slice]

    # -- dynamics ---------------------------------------------------------------------------------------------------
    def step(
        self,
        z: torch.Tensor,
        update_mask: torch.Tensor,
        head_mask: torch.Tensor | None = None,
        keep_attention: bool = False,
        update: Callable | None = None,
    ) -> torch.Tensor:
        """One CA step: a residual update of the output and hidden channels of the cells where ``update_mask``
        (``(B, 1, H, W)``, 1 = update) is set. Input and position channels never change. ``update`` replaces the
        rule's :meth:`ViTCAUpdate.update_cells` (same signature and maths; e.g. a compiled copy of it).
        """
        cells = self.step_cells(
            z.permute(0, 2, 3, 1), update_mask.permute(0, 2, 3, 1), head_mask, keep_attention, update
        )
        return cells.permute(0, 3, 1, 2)  # channels-last grids stay channels-last: the permutes are views

    def step_cells(
        self,
        cells: torch.Tensor,
        update_mask: torch.Tensor,
        head_mask: torch.Tensor | None = None,
        keep_attention: bool = False,
        update: Callable | None = None,
    ) -> torch.Tensor:
        """:meth:`step` on a channels-last grid ``(B, H, W, C)`` with mask ``(B, H, W, 1)``.

        The update is computed only for the cells the mask selects when it selects fewer than
        ``SPARSE_BELOW`` of them (σ = 0.5 in training and denoising: half the cells skip the output projection,
        MLP and head); the result is the same as the dense :meth:`apply_update`. Traced or compiled steps and
        steps that keep the attention maps of every cell stay dense.
        """
        update = update or self.rule.update_cells
        flat_mask = update_mask.reshape(-1)
        dense = keep_attention or torch.compiler.is_compiling() or torch.jit.is_tracing()
        only = None if dense else flat_mask.nonzero().squeeze(1)
        if only is None or len(only) >= SPARSE_BELOW * flat_mask.numel():
            return self.apply_update(cells, update_mask, update(cells, head_mask, keep_attention))
        if len(only) == 0:
            return cells.clone()
        scale = flat_mask[only, None]
        padded = bucketed(only, flat_mask.numel())
        scale = F.pad(scale, (0, 0, 0, len(padded) - len(only)))  # padding rows: their update multiplied by 0
        delta = update(cells, head_mask, only=padded)
        return self.apply_update_at(cells, padded, delta * scale)

    def update_rows(self, cells: torch.Tensor, only: torch.Tensor, update: Callable | None = None) -> torch.Tensor:
        """The cells at flat indices ``only`` of a grid ``(B, H, W, C)`` after one step that updates each of them:
        ``(len(only), C)``, float32. The rest of the grid is read as neighbours only (the windowed restore writes
        these rows back itself). ``update`` as in :meth:`step`."""
        update = update or self.rule.update_cells
        flat = cells.reshape(-1, cells.shape[-1])
        if len(only) == 0:
            return flat[:0].float()
        delta = update(cells, None, only=bucketed(only, len(flat)))[: len(only)]
        return flat.index_select(0, only).float() + F.pad(delta.float(), (self.cfg.static_channels, 0))

    def apply_update(self, cells: torch.Tensor, update_mask: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Cells ``(B, H, W, C)`` plus the rule's update ``delta`` ``(B, H, W, Co·P² + Ch)`` where the mask is set."""
        return cells + update_mask * F.pad(delta, (self.cfg.static_channels, 0))  # static channels: + 0

    def apply_update_at(self, cells: torch.Tensor, only: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Cells ``(B, H, W, C)`` plus ``delta`` ``(S, Co·P² + Ch)`` at the flat cell indices ``only``."""
        flat = cells.reshape(-1, cells.shape[-1])
        return flat.index_add(0, only, F.pad(delta.to(flat.dtype), (self.cfg.static_channels, 0))).view(cells.shape)

    def update_masks(
        self, z: torch.Tensor, steps: int, update_rate: float | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``steps`` update masks ``(T, B, 1, H, W)`` for grid ``z``, drawn from ``generator``."""
        return self.mask_source(update_rate, generator).draw(z, steps)

    def mask_source(self, update_rate: float | None = None, generator: torch.Generator | None = None):
        """Bernoulli update masks at ``update_rate`` (default: the model's σ) drawn from ``generator``."""
        return GeneratorMasks(self.cfg.update_rate if update_rate is None else update_rate, generator)

    def forward(
        self,
        z: torch.Tensor,
        steps: int,
        update_rate: float | None = None,
        generator: torch.Generator | None = None,
        masks: torch.Tensor | None = None,
        checkpoint_segments: int = 0,
        head_mask: torch.Tensor | None = None,
        keep_attention: bool = False,
        fusion: FusionSchedule | None = None,
    ) -> torch.Tensor:
        """Apply ``steps`` CA steps (:func:`vitca_cli.nca.rollout.rollout`) with the given ``masks``
        ``(T, B|1, 1, H, W)``, else masks drawn from ``generator``. ``checkpoint_segments`` > 1 splits the rollout
        into that many gradient-checkpointed segments. ``fusion`` runs :meth:`fusion_rollout` with that schedule
        instead (through ``forward``, so a ``DistributedDataParallel`` wrapper sees it).
        """
        if fusion is not None:
            return self.fusion_rollout(z, steps, update_rate, generator, fusion)
        source = GivenMasks(masks) if masks is not None else self.mask_source(update_rate, generator)
        return rollout(self.step, z, steps, source, head_mask, keep_attention, checkpoint_segments)

    @property
    def last_attention(self) -> list[torch.Tensor] | None:
        """Attention weights ``(B, H, W, heads, NH·NW)`` per block from the last step run with ``keep_attention``."""
        return getattr(self.rule, "last_attention", None)

    # -- fusion and mitosis (appendix A.1) --------------------------------------------------------------------------
    def fusion(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Average 2×2 groups of cells into one; returns the fused grid and the stashed input (and position)
        channels for re-injection after mitosis."""
        stash = z[:, : self.cfg.static_channels]
        return fuse_cells(z), stash

    def mitosis(self, z: torch.Tensor, stash: torch.Tensor, detail: bool = False) -> torch.Tensor:
        """Duplicate every cell to its right, bottom and bottom-right, then re-inject the stashed channels; with
        ``detail``, add each cell's :func:`cell_detail` to its output."""
        z = z.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        z = z[..., : stash.shape[-2], : stash.shape[-1]]
        if not detail:
            return torch.cat([stash, z[:, self.cfg.static_channels :]], dim=1)
        output = z[:, self.cfg.output_slice] + cell_detail(self.cfg, stash)
        return torch.cat([stash, output, z[:, self.cfg.hidden_slice]], dim=1)

    def fusion_rollout(
        self,
        z: torch.Tensor,
        steps: int,
        update_rate: float | None = None,
        generator: torch.Generator | None = None,
        schedule: FusionSchedule = APPENDIX_A1,
    ) -> torch.Tensor:
        """``steps`` steps with fusion and mitosis by ``schedule`` (appendix A.1 by default: 2 steps, fusion,
        ``steps - 4`` steps at half resolution, mitosis with re-injection, 2 steps)."""
        return fusion_rollout(self, z, steps, self.mask_source(update_rate, generator), schedule)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
