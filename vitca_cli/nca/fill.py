"""A smooth first guess for missing pixels: push-pull interpolation over an image pyramid.

Pull: halve the image again and again, each pixel of a coarser level the mean of its known pixels below (known where
any is). Push: from the coarsest level down, every missing pixel takes the bilinear enlargement of the level above.
Linear in the pixels, deterministic, and the same for any crop that holds the whole pyramid's reach.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def push_pull_fill(image: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """``image`` ``(B, C, H, W)`` with its missing pixels (``known`` ``(B|1, 1, H, W)`` 0) filled smoothly from
    the known ones; known pixels unchanged. An image with no known pixel comes back 0.5 where missing."""
    k = known.to(image.dtype).expand(image.shape[0], 1, *image.shape[-2:])
    levels = [(image * k, k)]
    while min(levels[-1][1].shape[-2:]) > 1 and not bool((levels[-1][1] > 0).all()):
        x, w = levels[-1]
        h, wd = x.shape[-2:]
        pad = (0, wd % 2, 0, h % 2)
        x, w = F.pad(x, pad), F.pad(w, pad)
        sx, sw = F.avg_pool2d(x, 2), F.avg_pool2d(w, 2)
        levels.append((sx / sw.clamp_min(1e-12) * (sw > 0), (sw > 0).to(x.dtype)))
    x, w = levels[-1]
    est = torch.where(w > 0, x / w.clamp_min(1e-12), torch.full_like(x, 0.5))
    for x, w in reversed(levels[:-1]):
        up = F.interpolate(est, scale_factor=2, mode="bilinear", align_corners=False)[..., : x.shape[-2], : x.shape[-1]]
        est = torch.where(w > 0, x / w.clamp_min(1e-12), up)
    return torch.where(known.bool(), image, est)
