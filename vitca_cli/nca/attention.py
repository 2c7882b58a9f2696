"""The localised self-attention of ViTCA, and the choice between eager and fused (compiled) kernels.

Every cell attends to its NH×NW neighbourhood (itself included); cells beyond the border are zero "ghost"
neighbours. :func:`local_attention` computes it for the whole grid, :func:`local_attention_at` for chosen cells
only (indexed loads, for ``torch.compile``). The memory-bound parts of a step (the attention and the bias
epilogues of the linear layers) run through a small kernel registry: eager by default, fused by
:func:`use_compiled_kernels`.

:class:`LocalSelfAttention` takes its attention formulation as an argument (``attention``): the model's own
:func:`attend` by default, another one where a caller lays the cells out otherwise (the ONNX export passes its
tiled attention, ``vitca_cli.onnx.export.tiled_attention``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vitca_cli.nca.config import CAConfig


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

    q, k, v: ``(B, H, W, heads, d)``; logits are multiplied by ``scale``. Border cells see zero "ghost" neighbours
    (k = 0, v = 0) that still take softmax mass, exactly like the reference's ``padding='same'`` convolution.
    Returns the attended values ``(B, H, W, heads, d)`` and the weights ``(B, H, W, heads, NH·NW)``.
    """
    nh, nw = neighbourhood
    # Neighbour axis first: the softmax and the weighted sum then run over large contiguous slices.
    logits = torch.stack([(q * kn).sum(-1) for kn in neighbour_views(k, nh, nw)], dim=0)  # K b h w heads
    out, weights = neighbour_attention(logits, neighbour_views(v, nh, nw), scale)
    return out, weights.permute(1, 2, 3, 4, 0)


def neighbour_attention(logits: torch.Tensor, values, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax over the neighbours of ``logits`` ``(K, ..., heads)`` (q·k, neighbour axis first) times
    ``scale``, and the values it weighs: ``values`` yields one ``(..., heads, d)`` per neighbour, in the same order.
    Returns the attended values ``(..., heads, d)`` and the weights ``(K, ..., heads)``: :func:`local_attention`'s
    maths, whatever lays the neighbours out."""
    weights = (logits * scale).softmax(dim=0)  # scaling the 9 logits is cheaper than scaling q's d channels
    out = None
    for n, vn in enumerate(values):
        w = weights[n, ..., None]
        # In-place accumulation is autograd-safe: addcmul's backward needs only its factors.
        out = w * vn if out is None else out.addcmul_(w, vn)
    return out, weights


def local_attention_at(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, only: torch.Tensor, neighbourhood: tuple[int, int], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`local_attention` for the cells ``only`` (flat indices into the B·H·W grid) alone.

    q: ``(S, heads, d)`` for those cells; k, v: ``(B, H, W, heads, d)`` for the whole grid. Each neighbour is
    read by index, and neighbours beyond the border count as zero. Returns ``(S, heads, d)`` and the weights
    ``(S, heads, NH·NW)``. Written for ``torch.compile``, which turns it into one pass of indexed loads, cheaper
    than the fused attention of every cell when about half the cells update; eager, the per-neighbour gathers
    make it slower than :func:`local_attention` of the whole grid.
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
    over a grid-sized tensor; fused, steps and training iterations are faster on CPU (bench/step.py and
    bench/train.py measure by how much). The first call of each shape compiles (seconds); if compilation fails,
    the eager kernels are used from then on.
    """
    for name, fn in _EAGER_KERNELS.items():
        _kernels[name] = torch.compile(fn) if enabled else fn


def run_kernel(name: str, *args):
    """Run kernel ``name`` (eager, or fused after :func:`use_compiled_kernels`); traced and compiled callers get
    the eager one, whose maths is the same."""
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


def compiled_indexed_attention() -> bool:
    """Whether the attention of chosen cells alone runs as a fused kernel (after :func:`use_compiled_kernels`)."""
    return _kernels["attend_at"] is not local_attention_at


def attend(x, weights, heads, neighbourhood, scale):
    """Every cell's q, k and v (``x`` ``(B, H, W, E)`` times the three ``weights``, split into ``heads``) and their
    localised attention: ``(B, H, W, heads, d)`` and the weights. The default ``attend`` of
    :class:`LocalSelfAttention`; the ONNX export passes its own formulation (head-major products on tiles of
    cells) instead."""
    q, k, v = (F.linear(x, w).unflatten(-1, (heads, -1)) for w in weights)
    return run_kernel("attend", q, k, v, neighbourhood, scale)


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
        attention: Callable | None = None,
    ):
        """``residual`` + attention of ``x`` (both ``(B, H, W, E)``), and the attention weights.

        With ``only`` (flat indices into the B·H·W cells) the result is for those cells alone, ``(len(only), E)``:
        every cell's keys and values still take part, but the output projection runs on the chosen rows.
        ``attention`` replaces :func:`attend` (same signature and results) for the attention of the whole grid;
        given one, the step never takes the fused indexed path.
        """
        b, h, w, _ = x.shape  # b h w e
        # Three products with slices of the one to_qkv weight: q, k and v come out contiguous (no split copies
        # in an exported graph, and the attention reads each of them densely).
        wq, wk, wv = self.to_qkv.weight.chunk(3)
        scale = self.head_dim**-0.5
        fused = compiled_indexed_attention() or torch.compiler.is_compiling()
        indexed = attention is None and only is not None and fused
        if indexed and not torch.is_grad_enabled():
            # Fused kernels or a compiled update, inference: queries and attention of the chosen cells only. (Not
            # in training: the backward pass of the indexed loads, a scatter-add per neighbour, costs more than it
            # saves.)
            k, v = (F.linear(x, wt).view(b, h, w, self.heads, self.head_dim) for wt in (wk, wv))
            q = F.linear(x.flatten(0, 2).index_select(0, only), wq).view(-1, self.heads, self.head_dim)
            out, weights = run_kernel("attend_at", q, k, v, only, self.neighbourhood, scale)
            residual = residual.flatten(0, 2).index_select(0, only)
        else:  # the whole grid's attention: eager, cheaper than gathering each cell's neighbours
            out, weights = (attention or attend)(x, (wq, wk, wv), self.heads, self.neighbourhood, scale)
            if only is not None:
                out = out.flatten(0, 2).index_select(0, only)
                residual = residual.flatten(0, 2).index_select(0, only)
        return self.project(out, residual, head_mask), weights

    def project(self, out: torch.Tensor, residual: torch.Tensor, head_mask: torch.Tensor | None = None):
        """``residual`` + the output projection of the attended values ``out`` ``(..., heads, d)``."""
        if head_mask is not None:  # 1 = head silenced (appendix Fig. 7)
            out = out * (1.0 - head_mask.to(out.dtype))[:, None]
        out = out.flatten(-2)
        if isinstance(self.to_out, nn.Identity):
            return residual + out
        return run_kernel("bias_add", F.linear(out, self.to_out.weight), self.to_out.bias, residual)
