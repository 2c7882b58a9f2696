"""A straightforward ``unfold``-based ViTCA step: the plain reference that tests and benches (bench/step.py)
compare the model's step against.

It materialises every cell's NH×NW neighbourhood of keys and values with ``F.unfold`` (zero padding, like the
reference implementation's one-hot convolution) and attends with batched matrix products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitca_cli.nca.model import CellularAutomaton


def unfold_delta(ca: CellularAutomaton, z: torch.Tensor) -> torch.Tensor:
    rule, cfg = ca.rule, ca.cfg
    b, _, h, w = z.shape
    nh, nw = cfg.neighbourhood
    heads, d = cfg.heads, cfg.embed // cfg.heads
    x = rule.embed(z.flatten(2).transpose(1, 2))  # b n e
    pe = rule.position_encoding(h, w, x)
    if pe is not None:
        x = x + pe.reshape(h * w, -1)
    for block in rule.blocks:
        q, k, v = block.attn.to_qkv(block.norm1(x)).chunk(3, dim=-1)  # b n e

        def neighbourhoods(t):  # b n e -> b heads n K d
            cols = F.unfold(t.transpose(1, 2).reshape(b, -1, h, w), (nh, nw), padding=(nh // 2, nw // 2))
            return cols.view(b, heads, d, nh * nw, h * w).permute(0, 1, 4, 3, 2)

        q = q.view(b, h * w, heads, d).permute(0, 2, 1, 3).unsqueeze(-2)  # b heads n 1 d
        attn = (q @ neighbourhoods(k).transpose(-1, -2) * d**-0.5).softmax(-1)  # b heads n 1 K
        out = (attn @ neighbourhoods(v)).squeeze(-2).permute(0, 2, 1, 3).reshape(b, h * w, -1)
        x = x + block.attn.to_out(out)
        ff0, _, ff2 = block.ff
        x = x + ff2(F.gelu(ff0(block.norm2(x))))
    return rule.head(x).transpose(1, 2).reshape(b, -1, h, w)


def unfold_step(ca: CellularAutomaton, z: torch.Tensor, update_mask: torch.Tensor) -> torch.Tensor:
    k = ca.cfg.static_channels
    return torch.cat([z[:, :k], z[:, k:] + update_mask * unfold_delta(ca, z)], dim=1)
