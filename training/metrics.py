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


def hole_psnr(output: torch.Tensor, target: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) inside the holes of each image ``(B, C, H, W)`` that has any: over the pixels where ``known``
    ``(B, 1, H, W)`` is 0, all channels; outputs and targets clipped to [0, 1]. Images without holes (or a
    ``known`` of None) are left out."""
    if known is None:
        return output.new_zeros(0)
    missing = (known == 0).to(output.dtype)
    count = missing.flatten(1).sum(1) * output.shape[1]
    err = ((output.clamp(0, 1) - target.clamp(0, 1)).pow(2) * missing).flatten(1).sum(1)
    holed = count > 0
    mse = err[holed] / count[holed]
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


def ssim_per_image(output: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
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


# ---------------------------------------------------------------------------------------------------------------------
# Summaries: mean with a 95% confidence interval
# ---------------------------------------------------------------------------------------------------------------------
# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom; beyond 30 the normal 1.96 is within 2%.
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def mean_interval(values) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student's t; 0 for a single value).

    Non-finite values (e.g. PSNR of a perfect reconstruction) are kept in the mean, so the caller sees them.
    """
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = v.numel()
    if n == 0:
        return float("nan"), float("nan")
    mean = float(v.mean())
    if n == 1:
        return mean, 0.0
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return mean, float(t * v.std(unbiased=True) / n**0.5)


# ---------------------------------------------------------------------------------------------------------------------
# LPIPS (VGG variant, v0.1) — the paper's perceptual metric, computed only when its weights are on disk
# ---------------------------------------------------------------------------------------------------------------------
# VGG16 convolution widths ("M" = 2×2 max-pool); LPIPS taps the ReLU after the last conv of each of the 5 stages.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_LPIPS_WIDTHS = (64, 128, 256, 512, 512)
# LPIPS's fixed input scaling (it maps [-1, 1] images to the statistics VGG was trained on).
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


class LPIPS(torch.nn.Module):
    """Learned perceptual distance (Zhang et al. 2018), VGG16 backbone, linear-calibrated v0.1.

    Needs two files no package here can fetch offline: torchvision's ImageNet VGG16 state dict (keys
    ``features.N.weight``) and LPIPS's linear layers (keys ``linK.model.1.weight``, shape (1, C, 1, 1)).
    Inputs are images in [0, 1] (clipped); like the reference (torchmetrics, ``normalize=False`` on inputs mapped to
    [-1, 1]) grayscale is tiled to 3 channels. Returns one distance per image.
    """

    def __init__(self, vgg_state: dict, lin_state: dict):
        super().__init__()
        layers, cin = [], 3
        for spec in _VGG16:
            if spec == "M":
                layers.append(torch.nn.MaxPool2d(2, 2))
            else:
                layers += [torch.nn.Conv2d(cin, spec, 3, padding=1), torch.nn.ReLU()]
                cin = spec
        self.features = torch.nn.Sequential(*layers)
        self.features.load_state_dict(
            {k.removeprefix("features."): v for k, v in vgg_state.items() if k.startswith("features.")}
        )
        self.lins = torch.nn.ParameterList(
            [
                torch.nn.Parameter(lin_state[f"lin{k}.model.1.weight"].reshape(1, c, 1, 1), requires_grad=False)
                for k, c in enumerate(_LPIPS_WIDTHS)
            ]
        )
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = ((x * 2 - 1) - self.shift) / self.scale
        taps, seen = [], 0
        for layer in self.features:
            x = layer(x)
            if isinstance(layer, torch.nn.Conv2d):
                seen += 1
            # the ReLU after conv 2, 4, 7, 10 and 13 closes a stage
            if isinstance(layer, torch.nn.ReLU) and seen in (2, 4, 7, 10, 13):
                taps.append(x)
                if seen == 13:
                    break
        return taps

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x, y = output.clamp(0, 1), target.clamp(0, 1)
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        total = 0.0
        for lin, fx, fy in zip(self.lins, self._taps(x), self._taps(y)):
            fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + (lin * (fx - fy).pow(2)).sum(1).mean((1, 2))
        return total
