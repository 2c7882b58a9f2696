"""ViTCA and UNetCA: neural cellular automata for image restoration.

Read top to bottom: helpers (update masks, patches, position encodings), the localised self-attention, the
ViTCA update rule, the UNetCA update network, and the cellular automaton that owns the cell grid.

A cell grid ``z`` has shape ``(B, C, H, W)`` with channels laid out as ``CAConfig`` describes:
``[nerf position (optional) | input | output | hidden]``. One CA step is a pure function of the grid and an
explicit per-cell update mask, so runs replay exactly and the step exports to ONNX.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitca_cli.nca.config import CAConfig


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------
def draw_update_mask(
    batch: int, height: int, width: int, rate: float, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """A per-cell Bernoulli(rate) update mask ``(B, 1, H, W)`` shared by all channels (``floor(U + σ)``)."""
    u = torch.rand(batch, 1, height, width, generator=generator, device=device)
    return torch.floor(u + rate).clamp_(max=1.0)


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
# Localised self-attention
# ---------------------------------------------------------------------------------------------------------------------
def neighbour_views(t: torch.Tensor, nh: int, nw: int):
    """Yield the NH·NW shifted views of ``t`` (b h w ...), zero padded at the borders, row-major.

    The views are strided windows of one padded copy: no stack of NH·NW copies is materialised.
    """
    b, h, w = t.shape[:3]
    rh, rw = nh // 2, nw // 2
    pad = [0, 0] * (t.dim() - 3) + [rw, rw, rh, rh]
    padded = F.pad(t, pad)
    for i in range(nh):
        for j in range(nw):
            yield padded[:, i : i + h, j : j + w]


def local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, neighbourhood: tuple[int, int], scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of every cell over its NH×NW neighbourhood (itself included).

    q, k, v: ``(B, H, W, heads, d)``; logits are multiplied by ``scale``. Border cells see zero "ghost" neighbours (k = 0, v = 0)
    that still take softmax mass, exactly like the reference's ``padding='same'`` convolution.
    Returns the attended values ``(B, H, W, heads, d)`` and the weights ``(B, H, W, heads, NH·NW)``.
    """
    nh, nw = neighbourhood
    # Neighbour axis first: the softmax and the weighted sum then run over large contiguous slices.
    logits = torch.stack([(q * kn).sum(-1) for kn in neighbour_views(k, nh, nw)], dim=0)  # K b h w heads
    weights = (logits * scale).softmax(dim=0)  # scaling the 9 logits is cheaper than scaling q's d channels
    out = None
    for n, vn in enumerate(neighbour_views(v, nh, nw)):
        w = weights[n, ..., None]
        # In-place accumulation is autograd-safe: addcmul's backward needs only its factors.
        out = w * vn if out is None else out.addcmul_(w, vn)
    return out, weights.permute(1, 2, 3, 4, 0)


def local_attention_at(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, only: torch.Tensor, neighbourhood: tuple[int, int], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`local_attention` for the cells ``only`` (flat indices into the B·H·W grid) alone.

    q: ``(S, heads, d)`` for those cells; k, v: ``(B, H, W, heads, d)`` for the whole grid. Each neighbour is
    read by index, and neighbours beyond the border count as zero. Returns ``(S, heads, d)`` and the weights
    ``(S, heads, NH·NW)``. Written for ``torch.compile``, which turns it into one pass of indexed loads (at
    64×64×8 with σ = 0.5: 3.2 ms against 5.3 for the fused attention of every cell); eager, the per-neighbour
    gathers make it slower than :func:`local_attention` of the whole grid.
    """
    nh, nw = neighbourhood
    b, h, w = k.shape[:3]
    keys, values = k.flatten(0, 2), v.flatten(0, 2)
    row, col = only % (h * w) // w, only % w
    neighbours = []  # (index, inside the grid) of each neighbour, row-major
    for dy in range(-(nh // 2), nh // 2 + 1):
        for dx in range(-(nw // 2), nw // 2 + 1):
            inside = (row + dy >= 0) & (row + dy < h) & (col + dx >= 0) & (col + dx < w)
            neighbours.append(((only + dy * w + dx).clamp(0, b * h * w - 1), inside[:, None, None]))
    logits = torch.stack([torch.where(inside, q * keys[n], 0.0).sum(-1) for n, inside in neighbours])
    weights = (logits * scale).softmax(dim=0)  # K s heads
    out = None
    for t, (n, inside) in enumerate(neighbours):
        term = weights[t, ..., None] * torch.where(inside, values[n], 0.0)
        out = term if out is None else out + term
    return out, weights.permute(1, 2, 0)


def bias_gelu(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU(y + bias): the MLP's first layer, after its bias-free matrix product."""
    return F.gelu(y + bias)


def bias_add(y: torch.Tensor, bias: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """y + bias + other: a layer's bias and what is added to its output (residual, position encoding).

    Summed as y + (bias + other): where ``other`` is constant (a position encoding in an ONNX session of fixed
    shape), ONNX Runtime folds bias + other, and the embedding is a product and one addition."""
    return y + (bias + other)


# The memory-bound parts of a step, by name. Eager by default; ``use_compiled_kernels`` fuses each into one
# ``torch.compile`` kernel. The linear layers whose bias goes through ``bias_gelu``/``bias_add`` run their matrix
# product without bias, so a fused epilogue adds the bias in the same pass as the GELU or the residual.
_EAGER_KERNELS = {
    "attend": local_attention,
    "attend_at": local_attention_at,
    "bias_gelu": bias_gelu,
    "bias_add": bias_add,
}
_kernels = dict(_EAGER_KERNELS)


def use_compiled_kernels(enabled: bool = True) -> None:
    """Run the localised attention and the bias epilogues as fused kernels from ``torch.compile`` (needs a C++
    compiler on CPU).

    They are memory-bound: eager, each neighbour of the attention and each bias, GELU and residual costs a pass
    over a grid-sized tensor. Fused, a step is ~1.4× faster and a training iteration ~2× faster on CPU
    (bench/step.py, bench/train.py). The first call of each shape compiles (seconds); if compilation fails, the
    eager kernels are used from then on.
    """
    for name, fn in _EAGER_KERNELS.items():
        _kernels[name] = torch.compile(fn) if enabled else fn


def _kernel(name: str, *args):
    eager = _EAGER_KERNELS[name]
    fn = _kernels[name]
    if fn is eager or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return eager(*args)
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - e.g. no C++ compiler: fall back, once, to the same maths in eager
        import warnings

        warnings.warn(f"compiled kernels unavailable ({type(exc).__name__}); using eager ones", stacklevel=3)
        _kernels.update(_EAGER_KERNELS)
        return eager(*args)


def attend(x, weights, heads, neighbourhood, scale):
    """Every cell's q, k and v (``x`` ``(B, H, W, E)`` times the three ``weights``, split into ``heads``) and their
    localised attention: ``(B, H, W, heads, d)`` and the weights. The seam the ONNX export swaps for its own
    formulation (head-major products on tiles of cells)."""
    q, k, v = (F.linear(x, w).unflatten(-1, (heads, -1)) for w in weights)
    return _kernel("attend", q, k, v, neighbourhood, scale)


class LocalSelfAttention(nn.Module):
    """Multi-head self-attention restricted to each cell's neighbourhood."""

    def __init__(self, cfg: CAConfig):
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.embed // cfg.heads
        self.neighbourhood = cfg.neighbourhood
        inner = self.heads * self.head_dim
        self.to_qkv = nn.Linear(cfg.embed, 3 * inner, bias=False)
        # The reference drops the output projection only when a single head spans the whole embedding.
        single = cfg.heads == 1 and self.head_dim == cfg.embed
        self.to_out = nn.Identity() if single else nn.Linear(inner, cfg.embed)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        head_mask: torch.Tensor | None = None,
        only: torch.Tensor | None = None,
    ):
        """``residual`` + attention of ``x`` (both ``(B, H, W, E)``), and the attention weights.

        With ``only`` (flat indices into the B·H·W cells) the result is for those cells alone, ``(len(only), E)``:
        every cell's keys and values still take part, but the output projection runs on the chosen rows.
        """
        b, h, w, _ = x.shape  # b h w e
        # Three products with slices of the one to_qkv weight: q, k and v come out contiguous (no split copies
        # in an exported graph, and the attention reads each of them densely).
        wq, wk, wv = self.to_qkv.weight.chunk(3)
        scale = self.head_dim**-0.5
        if only is not None and _kernels["attend_at"] is not local_attention_at and not torch.is_grad_enabled():
            # Fused kernels, inference: queries and attention of the chosen cells only. (Not in training: the
            # backward pass of the indexed loads, a scatter-add per neighbour, costs more than it saves.)
            k, v = (F.linear(x, wt).view(b, h, w, self.heads, self.head_dim) for wt in (wk, wv))
            q = F.linear(x.flatten(0, 2).index_select(0, only), wq).view(-1, self.heads, self.head_dim)
            out, weights = _kernel("attend_at", q, k, v, only, self.neighbourhood, scale)
            residual = residual.flatten(0, 2).index_select(0, only)
        else:  # the whole grid's attention: eager, cheaper than gathering each cell's neighbours
            out, weights = attend(x, (wq, wk, wv), self.heads, self.neighbourhood, scale)
            if only is not None:
                out = out.flatten(0, 2).index_select(0, only)
                residual = residual.flatten(0, 2).index_select(0, only)
        if head_mask is not None:  # 1 = head silenced (appendix Fig. 7)
            out = out * (1.0 - head_mask.to(out.dtype))[:, None]
        out = out.flatten(-2)
        if isinstance(self.to_out, nn.Identity):
            return residual + out, weights
        return _kernel("bias_add", F.linear(out, self.to_out.weight), self.to_out.bias, residual), weights


class FeedForward(nn.Sequential):
    """Linear → GELU → Linear, called as ``ff(x, residual)`` = residual + FF(x), biases in fused epilogues."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        first, _, second = self
        h = _kernel("bias_gelu", F.linear(x, first.weight), first.bias)
        return _kernel("bias_add", F.linear(h, second.weight), second.bias, residual)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + Attn(LN(x))``, then ``x + FF(LN(x))``."""

    def __init__(self, cfg: CAConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed)
        self.attn = LocalSelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed)
        self.ff = FeedForward(cfg.embed, cfg.mlp)

    def forward(self, x: torch.Tensor, head_mask: torch.Tensor | None = None, only: torch.Tensor | None = None):
        x, weights = self.attn(self.norm1(x), x, head_mask, only)
        return self.ff(self.norm2(x), x), weights


# ---------------------------------------------------------------------------------------------------------------------
# Update networks: grid (B, C, H, W) -> residual update of output and hidden channels (B, Co·P² + Ch, H, W)
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
    ) -> torch.Tensor:
        """The same on a channels-last grid: cells ``(B, H, W, C)`` -> update ``(B, H, W, Co·P² + Ch)``.

        ``only`` (flat indices into the B·H·W cells) asks for the update of those cells alone,
        ``(len(only), Co·P² + Ch)``: the last block's output projection, MLP and the head then run on those
        rows only (the attention still reads every cell). ``position`` replaces this rule's position encoding
        of an H×W grid, for a caller that lays the cells out otherwise (the ONNX export runs the step on tiles
        of cells; see ``vitca_cli.onnx.export``).
        """
        b, h, w, _ = cells.shape
        x = F.linear(cells, self.embed.weight)  # b h w e
        pe = self.position_encoding(h, w, x) if position is None else position
        x = x + self.embed.bias if pe is None else _kernel("bias_add", x, self.embed.bias, pe)
        maps = []
        for i, block in enumerate(self.blocks):
            x, weights = block(x, head_mask, only if i == len(self.blocks) - 1 else None)
            maps.append(weights)
        if keep_attention:
            self.last_attention = [m.detach() for m in maps]
        return self.head(x)


class UNetUpdate(nn.Module):
    """The UNetCA update network (reference §6, "nca_mode"): only the first convolution is 3×3, the rest 1×1, and
    max-pooling widens the receptive field. Encoder widths F, 2F, …, F·2^octaves; each decoder stage joins the
    skip of its level; the last stage joins the first features and the raw cells, then 1×1 convolutions to 64,
    32 and the update (no activation, not zero-initialised, as in the reference).
    """

    def __init__(self, cfg: CAConfig):
        super().__init__()
        f, octaves = cfg.unet_features, cfg.unet_octaves
        widths = [f * 2**o for o in range(octaves + 1)]

        def conv(cin, cout, k=1):
            return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.LeakyReLU(0.1))

        self.enc = nn.ModuleList([conv(cfg.cell_channels, widths[0], 3)])
        self.enc.extend(conv(widths[o], widths[o + 1]) for o in range(octaves))
        self.bottleneck = conv(widths[-1], widths[-1])
        self.dec = nn.ModuleList(  # deepest first
            nn.Sequential(conv(2 * widths[o], widths[o]), conv(widths[o], widths[o - 1]))
            for o in range(octaves, 0, -1)
        )
        self.out = nn.Sequential(
            conv(2 * widths[0] + cfg.cell_channels, 64), conv(64, 32), nn.Conv2d(32, cfg.pixel_channels + cfg.hidden, 1)
        )

    def forward(self, z: torch.Tensor, head_mask=None, keep_attention: bool = False) -> torch.Tensor:
        feats = [self.enc[0](z)]  # level 0 .. octaves
        for enc in self.enc[1:]:
            feats.append(enc(F.max_pool2d(feats[-1], 2, ceil_mode=True)))
        x = self.bottleneck(feats[-1])
        for dec, skip, finer in zip(self.dec, reversed(feats[1:]), reversed(feats[:-1])):
            x = dec(torch.cat([x, skip], 1))
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")[..., : finer.shape[-2], : finer.shape[-1]]
        return self.out(torch.cat([x, feats[0], z], 1))

    def update_cells(
        self, cells: torch.Tensor, head_mask=None, keep_attention: bool = False, only: torch.Tensor | None = None
    ) -> torch.Tensor:
        """:meth:`forward` on a channels-last grid ``(B, H, W, C)`` (convolutions run channels-first); with
        ``only`` (flat cell indices), the rows of those cells."""
        delta = self(cells.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return delta if only is None else delta.flatten(0, 2).index_select(0, only)


# ---------------------------------------------------------------------------------------------------------------------
# The cell grid: seeding and reading out (functions of the config alone, shared by every backend)
# ---------------------------------------------------------------------------------------------------------------------
def seed_cells(
    cfg: CAConfig, image: torch.Tensor, generator: torch.Generator | None = None, known: torch.Tensor | None = None
) -> torch.Tensor:
    """Cells for a (masked) image ``(B, Ci, H, W)``, H and W divisible by the patch size.

    Input channels hold the image; output is 0.5 and hidden 0 (``constant``), U[0,1) and U[-1,1) (``random``),
    or the input image and 0 (``input``: 0.5 where a pixel is missing). ``known`` ``(B|1, 1, H, W)`` (1 = the pixel
    is given, 0 = missing; default all given) fills the known channels of a ``mask_channel`` model and tells
    ``input`` where to start from 0.5. NeRF position channels, if any, come first.
    """
    x = patchify(image, cfg.patch_size)
    b, _, h, w = x.shape
    shape_out, shape_hidden = (b, cfg.pixel_channels, h, w), (b, cfg.hidden, h, w)
    kp = None
    if known is not None:
        kp = patchify(known.to(x.dtype).expand(b, 1, -1, -1), cfg.patch_size)  # b p² h w
    if cfg.cell_init == "random":
        out = torch.rand(shape_out, generator=generator, device=x.device).to(x.dtype)
        hidden = (torch.rand(shape_hidden, generator=generator, device=x.device) * 2 - 1).to(x.dtype)
    else:
        hidden = torch.zeros(shape_hidden, dtype=x.dtype, device=x.device)
        if cfg.cell_init == "input":
            kx = None if kp is None else kp.repeat_interleave(cfg.channels, dim=1)  # b (p1 p2 c) h w
            out = x.clone() if kx is None else x * kx + 0.5 * (1 - kx)
        else:
            out = torch.full(shape_out, 0.5, dtype=x.dtype, device=x.device)
    parts = [x, out, hidden]
    if cfg.mask_channel:
        parts.insert(1, kp if kp is not None else torch.ones(b, cfg.known_channels, h, w, dtype=x.dtype,
                                                             device=x.device))
    if cfg.pos_encoding == "nerf":
        pe = nerf_position_channels(h, w, cfg.nerf_freqs, device=x.device).to(x.dtype)
        parts.insert(0, pe.expand(b, -1, -1, -1))
    # Channels-last memory: each cell's channels are contiguous, so the per-cell linear layers read the grid
    # without a transposing copy, and the step's output keeps the layout.
    return torch.cat(parts, dim=1).contiguous(memory_format=torch.channels_last)


def output_image(cfg: CAConfig, z: torch.Tensor) -> torch.Tensor:
    """The image held by the output channels ``(B, Co, H·P, W·P)`` (not clipped)."""
    return unpatchify(z[:, cfg.output_slice], cfg.patch_size)


SPARSE_BELOW = 0.9  # step_cells computes updates for the selected cells only when fewer than this share are
ROW_BUCKET = 128  # ... and for a multiple of this many cells (padded with cells that do not update; see step_cells)


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
        self, image: torch.Tensor, generator: torch.Generator | None = None, known: torch.Tensor | None = None
    ) -> torch.Tensor:
        return seed_cells(self.cfg, image, generator, known)

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
    ) -> torch.Tensor:
        """One CA step: a residual update of the output and hidden channels of the cells where ``update_mask``
        (``(B, 1, H, W)``, 1 = update) is set. Input and position channels never change.
        """
        cells = self.step_cells(z.permute(0, 2, 3, 1), update_mask.permute(0, 2, 3, 1), head_mask, keep_attention)
        return cells.permute(0, 3, 1, 2)  # channels-last grids stay channels-last: the permutes are views

    def step_cells(
        self,
        cells: torch.Tensor,
        update_mask: torch.Tensor,
        head_mask: torch.Tensor | None = None,
        keep_attention: bool = False,
    ) -> torch.Tensor:
        """:meth:`step` on a channels-last grid ``(B, H, W, C)`` with mask ``(B, H, W, 1)``.

        The update is computed only for the cells the mask selects when it selects fewer than
        ``SPARSE_BELOW`` of them (σ = 0.5 in training and denoising: half the cells skip the output projection,
        MLP and head); the result is the same as the dense :meth:`apply_update`. Traced or compiled steps and
        steps that keep the attention maps of every cell stay dense.
        """
        flat_mask = update_mask.reshape(-1)
        dense = keep_attention or torch.compiler.is_compiling() or torch.jit.is_tracing()
        only = None if dense else flat_mask.nonzero().squeeze(1)
        if only is None or len(only) >= SPARSE_BELOW * flat_mask.numel():
            return self.apply_update(cells, update_mask, self.rule.update_cells(cells, head_mask, keep_attention))
        if len(only) == 0:
            return cells.clone()
        # Round the row count up to a multiple of ROW_BUCKET with cells the mask leaves alone (their update is
        # multiplied by 0 below): a handful of shapes instead of a new one every step. bfloat16 products (training
        # with --precision bf16) go through oneDNN, which builds a kernel for each new shape; with a fresh row count
        # every step they ran slower than fp32 (bench/train.py --compare-precision).
        rows = min(flat_mask.numel(), -(-len(only) // ROW_BUCKET) * ROW_BUCKET)
        if rows > len(only):
            only = torch.argsort(flat_mask, descending=True, stable=True)[:rows]  # the selected cells first
        delta = self.rule.update_cells(cells, head_mask, only=only)
        return self.apply_update_at(cells, only, delta * flat_mask[only, None])

    def apply_update(self, cells: torch.Tensor, update_mask: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Cells ``(B, H, W, C)`` plus the rule's update ``delta`` ``(B, H, W, Co·P² + Ch)`` where the mask is set."""
        return cells + update_mask * F.pad(delta, (self.cfg.static_channels, 0))  # static channels: + 0

    def apply_update_at(self, cells: torch.Tensor, only: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Cells ``(B, H, W, C)`` plus ``delta`` ``(S, Co·P² + Ch)`` at the flat cell indices ``only``."""
        flat = cells.reshape(-1, cells.shape[-1])
        return flat.index_add(0, only, F.pad(delta, (self.cfg.static_channels, 0))).view(cells.shape)

    def update_masks(
        self, z: torch.Tensor, steps: int, update_rate: float | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``steps`` update masks ``(T, B, 1, H, W)`` for grid ``z``, drawn from ``generator``."""
        rate = self.cfg.update_rate if update_rate is None else update_rate
        b, _, h, w = z.shape
        return draw_update_mask(steps * b, h, w, rate, generator, z.device).view(steps, b, 1, h, w).to(z.dtype)

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
        fusion_mitosis: bool = False,
    ) -> torch.Tensor:
        """Apply ``steps`` CA steps. Masks are drawn up front (or given), so a checkpointed backward pass replays
        exactly the same updates. ``checkpoint_segments`` > 1 splits the rollout into that many segments whose
        activations are recomputed during the backward pass. ``fusion_mitosis`` runs :meth:`fusion_mitosis_rollout`
        instead (through ``forward``, so a ``DistributedDataParallel`` wrapper sees it).
        """
        if fusion_mitosis:
            return self.fusion_mitosis_rollout(z, steps, update_rate, generator)
        if masks is None:
            masks = self.update_masks(z, steps, update_rate, generator)
        if checkpoint_segments > 1 and torch.is_grad_enabled():
            bounds = torch.linspace(0, steps, checkpoint_segments + 1).round().long().tolist()
            for start, stop in zip(bounds[:-1], bounds[1:]):
                z = checkpoint(self._segment, z, masks[start:stop], head_mask, use_reentrant=False)
            return z
        for t in range(steps):
            z = self.step(z, masks[t], head_mask, keep_attention and t == steps - 1)
        return z

    def _segment(self, z: torch.Tensor, masks: torch.Tensor, head_mask: torch.Tensor | None) -> torch.Tensor:
        for m in masks:
            z = self.step(z, m, head_mask)
        return z

    @property
    def last_attention(self) -> list[torch.Tensor] | None:
        """Attention weights ``(B, H, W, heads, NH·NW)`` per block from the last step run with ``keep_attention``."""
        return getattr(self.rule, "last_attention", None)

    # -- fusion and mitosis (appendix A.1) --------------------------------------------------------------------------
    def fusion(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Average 2×2 groups of cells into one; returns the fused grid and the stashed input (and position)
        channels for re-injection after mitosis."""
        stash = z[:, : self.cfg.static_channels]
        return F.avg_pool2d(z, 2), stash

    def mitosis(self, z: torch.Tensor, stash: torch.Tensor) -> torch.Tensor:
        """Duplicate every cell to its right, bottom and bottom-right, then re-inject the stashed channels."""
        z = z.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        z = z[..., : stash.shape[-2], : stash.shape[-1]]
        return torch.cat([stash, z[:, self.cfg.static_channels :]], dim=1)

    def fusion_mitosis_rollout(
        self, z: torch.Tensor, steps: int, update_rate: float | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Appendix A.1: 2 steps, fusion, ``steps - 4`` steps at half resolution, mitosis with re-injection, 2 steps."""
        if steps < 4:
            raise ValueError(f"fusion/mitosis needs at least 4 steps, got {steps}")
        z = self(z, 2, update_rate, generator)
        fused, stash = self.fusion(z)
        fused = self(fused, steps - 4, update_rate, generator)
        return self(self.mitosis(fused, stash), 2, update_rate, generator)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
