"""Image-quality metrics on clipped images in [0, 1]: PSNR (per image and per batch) and SSIM.

SSIM uses the common paper setting: a Gaussian 11×11 window with σ = 1.5, K1 = 0.01, K2 = 0.03, data range 1,
'valid' filtering (no padding), averaged over channels and pixels — as torchmetrics and pytorch-msssim do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr_per_image(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of each image ``(B, C, H, W)``; outputs and targets are clipped to [0, 1] first."""
    mse = (output.clamp(0, 1) - target.clamp(0, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def psnr_batch(output: torch.Tensor, target: torch.Tensor) -> float:
    """The reference's PSNR: one MSE over the whole batch (not a per-image average)."""
    mse = (output.clamp(0, 1) - target.clamp(0, 1)).pow(2).mean()
    return float(10 * torch.log10(1.0 / mse.clamp_min(1e-10)))


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim_per_image(
    output: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """SSIM of each image ``(B, C, H, W)`` on clipped inputs (Gaussian window, 'valid' filtering)."""
    x, y = output.clamp(0, 1).double(), target.clamp(0, 1).double()
    c = x.shape[1]
    if min(x.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}×{window}, got {tuple(x.shape[-2:])}")
    w = _gaussian_window(window, sigma, c, x.device, x.dtype)

    def blur(t):
        return F.conv2d(t, w, groups=c)

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return ssim_map.flatten(1).mean(1).float()
