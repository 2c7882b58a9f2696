"""The UNetCA update network (reference §6, "nca_mode"): the convolutional alternative to the ViTCA rule."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitca_cli.nca.config import CAConfig


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
            nn.Sequential(conv(2 * widths[o], widths[o]), conv(widths[o], widths[o - 1])) for o in range(octaves, 0, -1)
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
