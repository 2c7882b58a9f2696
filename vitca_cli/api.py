"""The Python API: restore images held in memory, from scripts and notebooks.

``denoise(image)`` and ``inpaint(image, mask)`` take a numpy array, ``(H, W)`` or ``(H, W, C)`` with C = 1, 2 (grey
and alpha), 3 or 4 (RGBA), of uint8, uint16 or floats in [0, 1], or a PIL image, and give back the same type: an
array of the same shape and dtype, or a PIL image of the same mode (L, LA, RGB, RGBA, I;16 and F directly; other
modes go through RGB(A) or L and are converted back). Alpha is carried through untouched. The options are the
command line's, as keywords; left out, each is what ``vitca denoise`` / ``vitca inpaint`` would use, the number of
steps and fusion included (the weights' own). Both run the same code as the CLI (``restore_pixels`` in
``vitca_cli.restore.batch``), so the same image, weights and seed give the same pixels. A loaded model is kept for
the next call with the same weights, device and backend settings (``clear_cache()`` lets them go).

Example (run from the repository root)::

    >>> import numpy as np
    >>> from PIL import Image
    >>> from vitca_cli import denoise, inpaint
    >>> noisy = Image.open("samples/fruits-noisy.png").crop((0, 0, 64, 48))
    >>> clean = denoise(noisy, seed=0, threads=1)  # a PIL image in, one of the same mode and size out
    >>> clean.mode, clean.size
    ('RGB', (64, 48))
    >>> photo = np.asarray(Image.open("samples/fruits-scribbled.png"))[:48, :64]  # (48, 64, 3) uint8
    >>> mask = np.asarray(Image.open("samples/fruits-scribbles-mask.png"))[:48, :64]  # 0/255, 255 = missing
    >>> filled = inpaint(photo, mask, iters=8, threads=1)  # every pixel the mask keeps comes back unchanged
    >>> filled.dtype, filled.shape, bool((filled[mask == 0] == photo[mask == 0]).all())
    (dtype('uint8'), (48, 64, 3), True)

Importing this module asks OpenMP threads to sleep rather than spin while they wait
(``vitca_cli.runtime.passive_openmp``) if torch is not imported yet and no wait policy is set; and like the CLI, a
call sets torch's thread count (``threads``, else every usable core).
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, Union

import numpy as np
from PIL import Image

from vitca_cli.restore.batch import Backends, BatchSettings, restore_pixels

if "torch" not in sys.modules:
    from vitca_cli.runtime import passive_openmp, persistent_compile_cache

    passive_openmp()
    persistent_compile_cache()

ImageLike = Union[np.ndarray, Image.Image]
Progress = Optional[Callable[[int, int], None]]  # (steps done, total)

_BACKENDS: dict[tuple, Backends] = {}  # loaded models, by how they were built
DIRECT_MODES = ("L", "LA", "RGB", "RGBA", "I;16", "F")  # PIL modes whose arrays the array path takes as they are
SCALES = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def denoise(
    image: ImageLike,
    *,
    weights: Optional[str] = None,
    iters: Optional[int] = None,
    update_rate: Optional[float] = None,
    runs: int = 1,
    seed: int = 0,
    tile: Optional[int] = None,
    threads: Optional[int] = None,
    device: str = "auto",
    backend: str = "torch",
    settle: float = 0.0,
    fusion: Optional[bool] = None,
    precision: str = "auto",
    compile: str = "auto",
    quantize: bool = False,
    progress: Progress = None,
) -> ImageLike:
    """Denoise ``image`` (an array or a PIL image, see the module's notes) and return the result in the same form.

    ``weights``: a shipped or cached NAME or a file PATH (default: the shipped model for the image's channels);
    ``iters`` and ``fusion``: the weights' own by default; the rest as ``vitca denoise --help`` says.
    ``progress(done, total)`` follows the steps."""
    options = locals().copy()
    return _run(options.pop("image"), None, options)


def inpaint(
    image: ImageLike,
    mask: ImageLike,
    *,
    weights: Optional[str] = None,
    iters: Optional[int] = None,
    update_rate: Optional[float] = None,
    runs: int = 1,
    seed: int = 0,
    mask_type: Optional[str] = None,
    tile: Optional[int] = None,
    threads: Optional[int] = None,
    device: str = "auto",
    backend: str = "torch",
    settle: float = 0.0,
    fusion: Optional[bool] = None,
    precision: str = "auto",
    compile: str = "auto",
    quantize: bool = False,
    progress: Progress = None,
) -> ImageLike:
    """Fill in the pixels ``mask`` marks (booleans, True = missing; or 0/255 with 255 = missing; or a PIL image,
    white = missing), of ``image``'s height and width. Every other pixel comes back exactly as given. The options
    are :func:`denoise`'s, and ``mask_type`` (``noise`` or ``dropout``; default: as the model was trained)."""
    options = locals().copy()
    return _run(options.pop("image"), options.pop("mask"), options)


def clear_cache() -> None:
    """Let go of the models kept for later calls."""
    _BACKENDS.clear()


def _run(image: ImageLike, mask: Optional[ImageLike], options: dict) -> ImageLike:
    from vitca_cli.runtime import choose_threads

    progress = options.pop("progress")
    if options["weights"] is not None:
        options["weights"] = str(options["weights"])
    settings = BatchSettings(**options)
    pixels, pack = _unpack(image)
    missing = None if mask is None else _missing(mask, pixels.shape[:2])
    choose_threads(settings.threads)
    command = "denoise" if mask is None else "inpaint"
    done = restore_pixels(pixels, _backend(settings, pixels.shape[2], command), settings, missing, progress, "image")
    return pack(done.result.image, missing)


def _backend(settings: BatchSettings, channels: int, command: str):
    """The cached model for ``settings``' weights and backend options (and ``command``'s default), built on first
    use."""
    s = settings
    key = (s.weights, s.device, s.backend, s.precision, s.quantize, s.compile, command if s.weights is None else "")
    if key not in _BACKENDS:
        _BACKENDS[key] = Backends(settings, command)
    return _BACKENDS[key].get(channels)


# ---------------------------------------------------------------------------------------------------------------------
# The caller's image to float pixels and back
# ---------------------------------------------------------------------------------------------------------------------
def _unpack(image: ImageLike):
    """Float32 pixels ``(H, W, C)`` (C = 1 or 3) of ``image``, and ``pack(result, missing)``, which gives a result
    back in the caller's form: its type, shape, dtype or mode, and alpha; the pixels ``missing`` does not mark are
    the caller's own, exactly."""
    if isinstance(image, Image.Image):
        return _unpack_pil(image)
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image: expected a numpy array or a PIL image, got {type(image).__name__}")
    arr = image
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 2, 3, 4)) or 0 in arr.shape[:2]:
        raise ValueError(f"image: expected (H, W) or (H, W, C) with C = 1, 2, 3 or 4, got shape {arr.shape}")
    if arr.dtype not in SCALES and not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"image: expected uint8, uint16 or float values, got {arr.dtype}")
    scale = SCALES.get(arr.dtype)
    if scale is None and not np.isfinite(arr).all():
        raise ValueError("image: has NaN or infinite values")
    hwc = arr[..., None] if arr.ndim == 2 else arr
    colour = hwc.shape[2] - (hwc.shape[2] in (2, 4))  # the last of 2 or 4 channels is alpha
    pixels = hwc[..., :colour].astype(np.float32) / np.float32(scale or 1.0)

    def pack(result: np.ndarray, missing: Optional[np.ndarray]) -> np.ndarray:
        from vitca_cli.io.images import to_channels

        out = np.clip(np.nan_to_num(to_channels(result, colour)), 0.0, 1.0)
        out = np.round(out * scale).astype(arr.dtype) if scale else out.astype(arr.dtype)
        out = np.concatenate([out, hwc[..., colour:]], axis=2)  # alpha as given
        if missing is not None:
            out = np.where(missing[..., None], out, hwc)
        return out.reshape(arr.shape)

    return pixels, pack


def _unpack_pil(image: Image.Image):
    """:func:`_unpack` for a PIL image: its array, in a mode the array path takes, and back to its own mode."""
    mode = image.mode
    if mode in DIRECT_MODES:
        base = image
    else:
        alpha = "A" in mode or "a" in mode or "transparency" in image.info
        base = image.convert("RGBA" if alpha else "L" if mode in ("1", "I") else "RGB")
    pixels, pack_array = _unpack(np.asarray(base))

    def pack(result: np.ndarray, missing: Optional[np.ndarray]) -> Image.Image:
        out = Image.fromarray(pack_array(result, missing))
        return out if out.mode == mode else out.convert(mode)

    return pixels, pack


def _missing(mask: ImageLike, size: tuple[int, int]) -> np.ndarray:
    """The boolean ``(H, W)`` mask of missing pixels: booleans, 0/255 or 0/1 integers, floats (> 0.5), or a PIL
    image (white = missing); its size must be the image's."""
    if isinstance(mask, Image.Image):
        arr = np.asarray(mask.convert("L")) >= 128
    elif isinstance(mask, np.ndarray):
        arr = mask[..., 0] if mask.ndim == 3 and mask.shape[2] == 1 else mask
    else:
        raise TypeError(f"mask: expected a numpy array or a PIL image, got {type(mask).__name__}")
    if arr.ndim != 2 or arr.shape != tuple(size):
        raise ValueError(f"mask: shape {_mask_shape(mask)} is not the image's {size[0]}×{size[1]} (height × width)")
    if arr.dtype == bool:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        return arr > 0.5
    if np.issubdtype(arr.dtype, np.integer):
        values = set(np.unique(arr).tolist())
        if values <= {0, 255}:
            return arr == 255
        if values <= {0, 1}:
            return arr == 1
    raise ValueError(f"mask: expected booleans or 0/255 values (True/255 = missing), got {arr.dtype} values")


def _mask_shape(mask: ImageLike) -> str:
    if isinstance(mask, Image.Image):
        return f"{mask.height}×{mask.width}"
    return "×".join(str(n) for n in mask.shape)


__all__ = ["denoise", "inpaint", "clear_cache"]
