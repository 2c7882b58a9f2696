"""The ViTCA update rule rewritten for inference: the embedding folded into the first LayerNorm's q, k, v products.

A cell's keys and values are ``W_k LN(e)`` and ``W_v LN(e)`` of its embedding ``e = W_e c + b`` (``c``: the cell's
C channels, 39 for the photo model, against E = 128 embedding channels). LayerNorm subtracts the mean of ``e`` and
divides by its deviation s, so with the centring ``P = I - 11ᵀ/E`` and the LayerNorm's gain γ and shift β:

    W_k LN(e) = (A_k c + a_k) / s + W_k β,   A_k = W_k diag(γ) P W_e,   a_k = W_k diag(γ) P b,
    s² = mean((P W_e c + P b)²) + eps.

So one product of the cells with ``[P W_e; A_k; A_v]`` (C inputs, E + 2E outputs) gives every cell's keys, values
and LayerNorm deviation, where the rule's own form takes two products (C → E, then E → 2E): 2.5× fewer
multiply-adds for the part of a step that every cell needs, and no E-wide LayerNorm pass. The queries and the
embedding itself (the residual) are needed only for the cells that update, from a second product with
``[W_e; A_q]``. Everything after the attention is the rule's own code.

The maths is the rule's; the rounding differs (``tests/nca/test_folded.py`` compares them). It applies to one-block
ViTCA rules whose embedding does not depend on the cell's place (no vit or learned position encoding), in
inference (no gradients) and for chosen cells (``only``); otherwise :meth:`FoldedUpdate.update_cells` runs the
rule's own :meth:`~vitca_cli.nca.model.ViTCAUpdate.update_cells`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vitca_cli.nca.attention import run_kernel
from vitca_cli.nca.model import ViTCAUpdate


def foldable(rule: nn.Module) -> bool:
    """Whether :class:`FoldedUpdate` can rewrite ``rule``."""
    return isinstance(rule, ViTCAUpdate) and len(rule.blocks) == 1 and rule.cfg.pos_encoding in ("none", "nerf")


class FoldedUpdate(nn.Module):
    """``rule``'s update with the embedding folded into the first block's LayerNorm and q, k, v products (module
    docstring). Built from the rule's weights as they are; build it again after changing them. ``compiler`` (e.g.
    ``torch.compile``) is applied to the folded computation; the neighbour tables stay outside it."""

    def __init__(self, rule: ViTCAUpdate, compiler: Callable | None = None):
        super().__init__()
        if not foldable(rule):
            raise ValueError("only one-block ViTCA rules without a vit or learned position encoding fold")
        self.rule = rule
        block = rule.blocks[0]
        attn, norm = block.attn, block.norm1
        self.eps = norm.eps
        self.embed_dim = rule.cfg.embed
        self.inner = attn.heads * attn.head_dim
        with torch.no_grad():
            w_e, b_e = rule.embed.weight.double(), rule.embed.bias.double()  # E×C, E
            centred_w, centred_b = w_e - w_e.mean(0), b_e - b_e.mean()  # P W_e, P b
            gain, shift = norm.weight.double(), norm.bias.double()
            wq, wk, wv = (w.double() for w in attn.to_qkv.weight.chunk(3))  # inner×E each
            fold = [(w * gain) @ centred_w for w in (wq, wk, wv)]  # A = W diag(γ) P W_e: inner×C
            offset = [(w * gain) @ centred_b for w in (wq, wk, wv)]  # a = W diag(γ) P b
            after = [w @ shift for w in (wq, wk, wv)]  # W β
        dtype = rule.embed.weight.dtype
        # Every cell: [P W_e; A_k; A_v] (E + 2·inner rows), its bias [P b; a_k; a_v]; then W_k β, W_v β.
        self.register_buffer("all_weight", torch.cat([centred_w, fold[1], fold[2]]).to(dtype), persistent=False)
        self.register_buffer("all_bias", torch.cat([centred_b, offset[1], offset[2]]).to(dtype), persistent=False)
        self.register_buffer("kv_shift", torch.cat([after[1], after[2]]).to(dtype), persistent=False)
        # Updating cells: [W_e; A_q] (E + inner rows), its bias [b; a_q]; then W_q β.
        self.register_buffer("sel_weight", torch.cat([w_e, fold[0]]).to(dtype), persistent=False)
        self.register_buffer("sel_bias", torch.cat([b_e, offset[0]]).to(dtype), persistent=False)
        self.register_buffer("q_shift", after[0].to(dtype), persistent=False)
        self._tables: dict = {}
        self.compile_with(compiler)

    def compile_with(self, compiler: Callable | None) -> None:
        """Run :meth:`folded` as ``compiler(self.folded)`` returns it (None: as it is)."""
        self._apply_folded = compiler(self.folded) if compiler else self.folded

    def update_cells(
        self,
        cells: torch.Tensor,
        head_mask: torch.Tensor | None = None,
        keep_attention: bool = False,
        position: torch.Tensor | None = None,
        only: torch.Tensor | None = None,
        attention=None,
    ) -> torch.Tensor:
        """:meth:`ViTCAUpdate.update_cells`, folded where it applies: cells ``(B, H, W, C)`` and the flat indices
        ``only`` of the cells that update -> their update ``(len(only), Co·P² + Ch)``."""
        special = head_mask is not None or keep_attention or position is not None or attention is not None
        if only is None or special or torch.is_grad_enabled():
            return self.rule.update_cells(cells, head_mask, keep_attention, position, only, attention)
        key = (tuple(cells.shape[:3]), cells.device)
        if key not in self._tables:
            self._tables = {key: neighbour_table(*cells.shape[:3], self.rule.cfg.neighbourhood, cells.device)}
        return self._apply_folded(cells, only, self._tables[key])

    def folded(self, cells: torch.Tensor, only: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """The update of the cells ``only`` of ``cells`` ``(B, H, W, C)``; ``neighbours``: :func:`neighbour_table`
        of the grid."""
        rule = self.rule
        block = rule.blocks[0]
        attn = block.attn
        e, inner = self.embed_dim, self.inner
        every = F.linear(cells, self.all_weight)
        dtype = every.dtype  # q, k and v stay in the products' precision (bfloat16 under autocast), as in the rule
        centred, kv = (every + self.all_bias).split([e, 2 * inner], dim=-1)
        inv_dev = torch.rsqrt(centred.float().square().mean(-1, keepdim=True) + self.eps)  # 1 / s
        kv = (kv * inv_dev + self.kv_shift).to(dtype).flatten(0, 2)
        kv = torch.cat([kv, kv.new_zeros(1, 2 * inner)])  # the ghost neighbour beyond the border: k = v = 0
        k, v = (t.unflatten(-1, (attn.heads, attn.head_dim)) for t in kv.split(inner, dim=-1))
        chosen = F.linear(cells.flatten(0, 2).index_select(0, only), self.sel_weight)
        embedded, q = (chosen + self.sel_bias).split([e, inner], dim=-1)
        q = (q * inv_dev.flatten(0, 2).index_select(0, only) + self.q_shift).to(dtype)
        q = q.unflatten(-1, (attn.heads, attn.head_dim))
        out = listed_attention(q, k, v, neighbours.index_select(0, only), attn.head_dim**-0.5).flatten(-2)
        if isinstance(attn.to_out, nn.Identity):
            x = embedded + out
        else:
            x = run_kernel("bias_add", F.linear(out, attn.to_out.weight), attn.to_out.bias, embedded)
        return rule.head(block.ff(block.norm2(x), x))


def neighbour_table(b: int, h: int, w: int, neighbourhood: tuple[int, int], device=None) -> torch.Tensor:
    """``(B·H·W, NH·NW)``: the flat index of each cell's neighbours (row-major, itself included) in a B×H×W grid,
    and B·H·W (the ghost neighbour) for those beyond the border."""
    nh, nw = neighbourhood
    rows = torch.arange(h, device=device)[:, None, None]
    cols = torch.arange(w, device=device)[None, :, None]
    dy = torch.arange(nh, device=device).repeat_interleave(nw) - nh // 2
    dx = torch.arange(nw, device=device).repeat(nh) - nw // 2
    r, c = rows + dy, cols + dx  # h w K
    inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
    images = torch.arange(b, device=device)[:, None, None, None] * (h * w)
    return torch.where(inside, images + r * w + c, b * h * w).flatten(0, 2)


def listed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, neighbours: torch.Tensor, scale: float
) -> torch.Tensor:
    """Softmax attention of S cells over listed neighbours: q ``(S, heads, d)``, k and v ``(N, heads, d)``,
    ``neighbours`` ``(S, K)`` indices into k and v (the ghost neighbour is a zero row of k and v: it still takes
    softmax mass, as in :func:`vitca_cli.nca.attention.local_attention`). Returns ``(S, heads, d)``."""
    logits = torch.stack([(q * k[neighbours[:, t]]).sum(-1) for t in range(neighbours.shape[1])])  # K s heads
    weights = (logits * scale).softmax(dim=0)
    out = None
    for t in range(neighbours.shape[1]):
        term = weights[t, ..., None] * v[neighbours[:, t]]
        out = term if out is None else out + term
    return out
