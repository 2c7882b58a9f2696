"""Classic restorers a user would try instead of ViTCA, run on the same corrupted inputs as ``vitca eval``.

A median filter (the classic for impulse noise, which the patch noise of vitca's masking resembles),
scikit-image total-variation (Chambolle) and non-local-means denoising, scikit-image biharmonic inpainting, and
OpenCV's Telea inpainting. The inpainters are told which pixels are masked (they need it); the denoisers are not
(they cannot take it). All get the corrupted image clipped to [0, 1], as it would be after saving it to a file.
The libraries are an optional extra, imported only when a baseline runs.

``EXTRA_BASELINES`` are the slower or more specialised ones ``bench/photo_quality.py`` runs on photos and
``vitca eval --baselines`` does not: BM3D (the ``bm3d`` package) with the noise level estimated as a user would
(scikit-image's ``estimate_sigma``, which needs PyWavelets) and, as an upper bound, told the true level
(``sigma=``), and OpenCV's Navier–Stokes inpainting.
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
# run by name (bench/photo_quality.py), not by vitca eval --baselines
EXTRA_BASELINES: dict[str, tuple[str, bool]] = {
    "bm3d": ("bm3d package, bm3d_rgb (grey: bm3d), σ from scikit-image estimate_sigma (averaged over channels)", False),
    "bm3d-true": ("bm3d package, bm3d_rgb (grey: bm3d), told the true σ of the noise: an upper bound", False),
    "navier-stokes": ("OpenCV inpaint INPAINT_NS radius 3 (given the mask)", True),
    "push-pull": ("vitca's own push-pull fill, where a fill model's cells start (given the mask)", True),
}
TAKES_SIGMA = ("bm3d-true",)  # need run_baseline(..., sigma=the true noise level)


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


def _opencv_inpaint(image: np.ndarray, masked: np.ndarray, method: str) -> np.ndarray:
    cv2 = _require("cv2")
    if masked.all():
        return np.full_like(image, 0.5)
    img8 = np.round(image * 255).astype(np.uint8)
    out = cv2.inpaint(img8 if img8.shape[-1] == 3 else img8[..., 0], masked.astype(np.uint8), 3, getattr(cv2, method))
    return out.reshape(image.shape).astype(np.float32) / 255


def _telea(image: np.ndarray, masked: np.ndarray) -> np.ndarray:
    return _opencv_inpaint(image, masked, "INPAINT_TELEA")


def _navier_stokes(image: np.ndarray, masked: np.ndarray) -> np.ndarray:
    return _opencv_inpaint(image, masked, "INPAINT_NS")


def estimated_sigma(image: np.ndarray) -> float:
    """The noise level a user would estimate: scikit-image's wavelet ``estimate_sigma``, averaged over channels."""
    restoration = _require("skimage.restoration")
    _require("pywt")
    channel_axis = -1 if image.ndim == 3 and image.shape[-1] > 1 else None
    img = image[..., 0] if channel_axis is None and image.ndim == 3 else image
    return float(restoration.estimate_sigma(img, channel_axis=channel_axis, average_sigmas=True))


def _bm3d_with(image: np.ndarray, sigma: float) -> np.ndarray:
    bm3d = _require("bm3d")
    sigma = max(float(sigma), 1e-4)  # a clean image's estimate can be 0, which bm3d does not take
    if image.ndim == 3 and image.shape[-1] == 3:
        return np.asarray(bm3d.bm3d_rgb(image, sigma))
    return np.asarray(bm3d.bm3d(image.reshape(image.shape[:2]), sigma)).reshape(image.shape)


def _bm3d(image: np.ndarray, masked: np.ndarray) -> np.ndarray:
    return _bm3d_with(image, estimated_sigma(image))


def _push_pull(image: np.ndarray, masked: np.ndarray) -> np.ndarray:
    import torch

    from vitca_cli.nca.fill import push_pull_fill

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    known = torch.from_numpy(~masked).float()[None, None]
    return push_pull_fill(x * known, known)[0].permute(1, 2, 0).numpy()


def _bm3d_true(image: np.ndarray, masked: np.ndarray, sigma: float) -> np.ndarray:
    return _bm3d_with(image, sigma)


_FUNCS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "median": _median,
    "tv-chambolle": _tv,
    "nl-means": _nl_means,
    "biharmonic": _biharmonic,
    "telea": _telea,
    "bm3d": _bm3d,
    "navier-stokes": _navier_stokes,
    "push-pull": _push_pull,
}


def check_available() -> None:
    """Raise a ``UsageError`` naming the extra to install when scikit-image or OpenCV is missing."""
    _require("skimage.restoration")
    _require("cv2")


def run_baseline(name: str, corrupted, keep, sigma: float | None = None):
    """Restore a batch with baseline ``name`` (of ``BASELINES`` or ``EXTRA_BASELINES``).

    ``corrupted`` ``(B, C, H, W)`` torch tensor (any range; clipped to [0, 1] here) and ``keep`` ``(B, 1, H, W)``
    (1 = pixel kept, 0 = masked); ``sigma``, the true noise level (of values in [0, 1]), for those in
    ``TAKES_SIGMA``. Returns a float tensor like ``corrupted``.
    """
    import torch

    if name in TAKES_SIGMA:
        if sigma is None:
            raise UsageError(f"baseline {name!r} needs the true noise level (sigma)")
        fn = lambda img, m: _bm3d_true(img, m, sigma)  # noqa: E731
    elif name in _FUNCS:
        fn = _FUNCS[name]
    else:
        raise UsageError(f"unknown baseline {name!r}; choose from {', '.join([*_FUNCS, *TAKES_SIGMA])}")
    images = corrupted.detach().clamp(0, 1).permute(0, 2, 3, 1).cpu().double().numpy()  # b h w c
    masked = keep.detach()[:, 0].cpu().numpy() < 0.5  # b h w
    out = np.stack([np.asarray(fn(img, m), dtype=np.float32).reshape(img.shape) for img, m in zip(images, masked)])
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(corrupted.device, corrupted.dtype)
