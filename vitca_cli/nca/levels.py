"""Cells across resolution levels (appendix A.1, generalised): fusion of 2×2 groups of cells into one, and
division (mitosis) back, optionally adding back the detail that fusion averaged away."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitca_cli.nca.config import CAConfig


def fuse_cells(z: torch.Tensor) -> torch.Tensor:
    """Fusion (appendix A.1): each 2×2 group of cells of ``z`` ``(B, C, H, W)`` (H, W even) averaged into one cell,
    in channels-last memory as ``seed_cells`` makes grids."""
    return F.avg_pool2d(z, 2).contiguous(memory_format=torch.channels_last)


def cell_detail(cfg: CAConfig, static: torch.Tensor) -> torch.Tensor:
    """``(B, Co·P², H, W)``: each cell's input minus the mean input of its 2×2 group, over the known pixels of a
    mask-aware grid (0 where a pixel is missing), from the grid's static channels ``(B, ≥static, H, W)``."""
    x = static[:, cfg.input_slice]
    if cfg.known_channels:
        known = static[:, cfg.known_slice].repeat_interleave(cfg.channels, dim=1)
        mean = F.avg_pool2d(x * known, 2) / F.avg_pool2d(known, 2).clamp_min(1e-6)
    else:
        known, mean = None, F.avg_pool2d(x, 2)
    detail = x - mean.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    return detail if known is None else detail * known


def divide_cells(cfg: CAConfig, fused: torch.Tensor, cells: torch.Tensor, detail: bool = False) -> torch.Tensor:
    """Mitosis (appendix A.1) into ``cells`` ``(B, C, 2H, 2W)``, the grid that was fused: every cell of a 2×2 group
    takes its fused cell's output and hidden channels, and keeps its own static channels (the input is re-injected);
    with ``detail``, its output also gains its :func:`cell_detail`. Written in place, with no full-size temporary
    but the detail; returns ``cells``. (``CellularAutomaton.mitosis`` is the same for training, out of place so
    that gradients flow.)"""
    b, c, h, w = cells.shape
    s = cfg.static_channels
    groups = cells.view(b, c, h // 2, 2, w // 2, 2)
    groups[:, s:] = fused[:, s:, :, None, :, None]
    if detail:
        cells[:, cfg.output_slice] += cell_detail(cfg, cells)
    return cells
