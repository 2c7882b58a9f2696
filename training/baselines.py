"""Classic restorers a user would try instead of ViTCA, run on the same corrupted inputs as ``vitca eval``.

A median filter (the classic for impulse noise, which the patch noise of vitca's masking resembles),
scikit-image total-variation (Chambolle) and non-local-means denoising, scikit-image biharmonic inpainting, and
OpenCV's Telea inpainting. The inpainters are told which pixels are masked (they need it); the denoisers are not
(they cannot take it). All get the corrupted image clipped to [0, 1], as it would be after saving it to a file.
The libraries are an optional extra, imported only when a baseline runs.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from vitca_cli.errors import UsageError

INSTALL_HINT = "pip install vitca[baselines]"

# name -> (description, takes the mask)
BASELINES: dict[str, tuple[str, bool]] = {
    "median": ("SciPy median filter, 3×3 per channel, reflected borders", False),
    "tv-chambolle": ("scikit-image denoise_tv_chambolle (weight 0.1)", False),
    "nl-means": ("scikit-image denoise_nl_means (5×5 patches, h = 0.8σ̂, Immerkær noise estimate)", False),
    "biharmonic": ("scikit-image inpaint_biharmonic (given the mask)", True),
    "telea": ("OpenCV inpaint INPAINT_TELEA radius 3 (given the mask)", True),
}


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"the classic baselines need {module.split('.')[0]}: {INSTALL_HINT}") from None


def _median(image: np.ndarray, masked: np.ndarray) -> np.ndarray:
    ndimage = _require("scipy.ndimage")
    return ndimage.median_filter(image, size=(3, 3, 1), mode="reflect")


def _tv(image: np.ndarray, masked: np.ndarray) -> np.ndarray:
    restoration = _require("skimage.restoration")
    return restoration.denoise_tv_chambolle(image, weight=0.1, channel_axis=-1)


def _noise_sigma(image: np.ndarray) -> float:
    """Immerkær's fast noise estimate (mean |Laplacian-difference| response), averaged over channels.

    Used instead of scikit-image's ``estimate_sigma``, which needs PyWavelets for one number.
    """
    i = image
    resp = (
        i[:-2, :-2]
        - 2 * i[:-2, 1:-1]
        + i[:-2, 2:]
        - 2 * i[1:-1, :-2]
        + 4 * i[1:-1, 1:-1]
        - 2 * i[1:-1, 2:]
        + i[2:, :-2]
        - 2 * i[2:, 1:-1]
        + i[2:, 2:]
    )
    return float(np.sqrt(np.pi / 2) * np.abs(resp).mean() / 6)


def _nl_means(image: np.ndarray, masked: np.ndarray) -> np.ndarray:
    restoration = _require("skimage.restoration")
    sigma = _noise_sigma(image)
    h = max(0.8 * sigma, 1e-3)  # scikit-image's suggested h ≈ 0.8σ for fast mode
    return restoration.denoise_nl_means(
        image, h=h, sigma=sigma, patch_size=5, patch_distance=6, fast_mode=True, channel_axis=-1
    )


def _biharmonic(image: np.ndarray, masked: np.ndarray) -> np.ndarray:
    restoration = _require("skimage.restoration")
    if masked.all():  # nothing known to interpolate from
        return np.full_like(image, 0.5)
    if not masked.any():
        return image
    return restoration.inpaint_biharmonic(image, masked, channel_axis=-1)


def _telea(image: np.ndarray, masked: np.ndarray) -> np.ndarray:
    cv2 = _require("cv2")
    if masked.all():
        return np.full_like(image, 0.5)
    img8 = np.round(image * 255).astype(np.uint8)
    out = cv2.inpaint(img8 if img8.shape[-1] == 3 else img8[..., 0], masked.astype(np.uint8), 3, cv2.INPAINT_TELEA)
    return out.reshape(image.shape).astype(np.float32) / 255


_FUNCS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "median": _median,
    "tv-chambolle": _tv,
    "nl-means": _nl_means,
    "biharmonic": _biharmonic,
    "telea": _telea,
}


def check_available() -> None:
    """Raise a ``UsageError`` naming the extra to install when scikit-image or OpenCV is missing."""
    _require("skimage.restoration")
    _require("cv2")


def run_baseline(name: str, corrupted, keep):
    """Restore a batch with baseline ``name``.

    ``corrupted`` ``(B, C, H, W)`` torch tensor (any range; clipped to [0, 1] here) and ``keep`` ``(B, 1, H, W)``
    (1 = pixel kept, 0 = masked). Returns a float tensor like ``corrupted``.
    """
    import torch

    if name not in _FUNCS:
        raise UsageError(f"unknown baseline {name!r}; choose from {', '.join(_FUNCS)}")
    fn = _FUNCS[name]
    images = corrupted.detach().clamp(0, 1).permute(0, 2, 3, 1).cpu().double().numpy()  # b h w c
    masked = keep.detach()[:, 0].cpu().numpy() < 0.5  # b h w
    out = np.stack([np.asarray(fn(img, m), dtype=np.float32).reshape(img.shape) for img, m in zip(images, masked)])
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(corrupted.device, corrupted.dtype)
