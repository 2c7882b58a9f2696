"""Reading and writing the images users have: any Pillow mode, 16-bit, CMYK, EXIF rotation, alpha, stdin/stdout.

Pixels travel as float32 arrays ``(H, W, C)`` in [0, 1] with C = 1 or 3; an alpha channel is carried beside them
untouched and put back on write. Writes go through a temporary file and a rename, so a crash leaves no half image.
No torch here: the model code converts arrays to tensors itself.
"""

from __future__ import annotations

import io
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vitca_cli.errors import VitcaError
from vitca_cli.io.files import atomic_write_bytes
from vitca_cli.log import log

STDIO = "-"

# Extensions we write, with the Pillow format name; anything else keeps the input's format.
FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".webp": "WEBP",
    ".gif": "GIF",
    ".ppm": "PPM",
    ".pgm": "PPM",
    ".pbm": "PPM",
    ".tga": "TGA",
}
ALPHA_FORMATS = {"PNG", "TIFF", "WEBP", "TGA"}  # formats that store an alpha channel
SIXTEEN_BIT_FORMATS = {"PNG", "TIFF"}
# Files a folder walk picks up.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm", ".tga"}


class ImageError(VitcaError):
    """An input image that cannot be read, or an output that cannot be written (exit 1: the batch goes on)."""


@dataclass
class Picture:
    """A decoded image: ``pixels`` float32 ``(H, W, C)`` in [0, 1] (C = 1 or 3), optional ``alpha`` (H, W) float32
    in [0, 1], the source ``format`` (PNG, JPEG, …) and ``bits`` per channel (8 or 16)."""

    pixels: np.ndarray
    alpha: np.ndarray | None = None
    format: str = "PNG"
    bits: int = 8
    source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return self.pixels.shape[2]

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return self.pixels.shape[0], self.pixels.shape[1]


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------
def check_readable(source: str | Path) -> None:
    """Raise the ``ImageError`` that reading ``source`` would, without reading it (stdin always passes)."""
    if str(source) == STDIO:
        return
    path = Path(source)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder (add " + "{0}, or give files)", settings=("recursive",))
    if not os.access(path, os.R_OK):
        raise ImageError(f"{path}: cannot read (permission denied)")


def _read_bytes(source: str | Path) -> bytes:
    if str(source) == STDIO:
        data = sys.stdin.buffer.read()
        if not data:
            raise ImageError("stdin: no data (pipe an image in, or give a file)")
        return data
    check_readable(source)
    path = Path(source)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not data:
        raise ImageError(f"{path}: empty file (0 bytes), not an image")
    return data


def _sixteen_bit_colour(data: bytes) -> np.ndarray | None:
    """Pillow decodes 16-bit colour PNG/TIFF to 8 bits; OpenCV (the optional extra) keeps all 16."""
    try:
        import cv2
    except ImportError:
        return None
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16 or arr.ndim != 3:
        return None
    return arr[..., [2, 1, 0, 3][: arr.shape[2]]]  # BGR(A) -> RGB(A)


def read_image(source: str | Path) -> Picture:
    """Decode any image Pillow reads (``-`` = stdin) into a :class:`Picture`; unreadable input raises ImageError."""
    name = "stdin" if str(source) == STDIO else str(source)
    data = _read_bytes(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()  # decode now, so truncated files fail here and not later
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (unknown format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{name}: corrupt or truncated image ({exc})") from None
    if img.width == 0 or img.height == 0:
        raise ImageError(f"{name}: zero-size image ({img.width}×{img.height})")
    fmt = img.format or "PNG"
    notes = []
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        notes.append(f"{frames} frames (animated {fmt}): only the first frame is restored and written")
    # A camera's rotation flag: the pixels a user sees are the rotated ones.
    orientation = img.getexif().get(0x0112, 1)
    if orientation not in (1, None):
        img = ImageOps.exif_transpose(img)
        notes.append(f"rotated per EXIF orientation {orientation}")

    mode = img.mode
    bits = 8
    alpha = None
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float32)
        bits = 16 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 8
        pixels = (arr / (65535.0 if bits == 16 else 255.0))[..., None]
    elif mode == "F":
        pixels = np.asarray(img, dtype=np.float32)[..., None]
        notes.append("floating-point image: values taken as they are (expected in [0, 1])")
    else:
        if mode == "CMYK":
            notes.append("CMYK converted to RGB")
        if mode == "P":
            mode_to = "RGBA" if "transparency" in img.info else "RGB"
        elif mode in ("1", "L"):
            mode_to = "L"
        elif mode in ("LA", "La", "PA"):
            mode_to = "LA"
        elif mode in ("RGBA", "RGBa"):
            mode_to = "RGBA"
        else:  # RGB, CMYK, YCbCr, LAB, HSV, RGBX …
            mode_to = "RGB"
        arr = np.asarray(img.convert(mode_to), dtype=np.float32)
        arr /= 255.0
        if arr.ndim == 2:
            arr = arr[..., None]
        if mode_to in ("LA", "RGBA"):
            pixels, alpha = arr[..., :-1], arr[..., -1]
        else:
            pixels = arr
        if fmt in SIXTEEN_BIT_FORMATS and mode in ("RGB", "RGBA") and _is_sixteen_bit_colour(data, fmt):
            full = _sixteen_bit_colour(data)
            if full is not None and full.shape[:2] == pixels.shape[:2]:
                full = full.astype(np.float32) / 65535.0
                pixels, alpha = full[..., :3], (full[..., 3] if full.shape[2] == 4 else alpha)
                bits = 16
            else:
                notes.append("16-bit colour read at 8 bits (install opencv-python-headless to keep 16)")
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    return Picture(pixels, None if alpha is None else np.ascontiguousarray(alpha), fmt, bits, name, notes)


def _is_sixteen_bit_colour(data: bytes, fmt: str) -> bool:
    """Whether a PNG/TIFF stores 16 bits per colour sample (Pillow reports such files as 8-bit RGB)."""
    img = Image.open(io.BytesIO(data))  # header only: tile is known before load()
    return bool(img.tile) and ";16" in str(img.tile[0].args)


def to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """Convert ``(H, W, C)`` pixels to 1 (ITU-R 601 luma) or 3 (replicated grey) channels."""
    have = pixels.shape[2]
    if have == channels:
        return pixels
    if channels == 1:
        return (pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    return np.repeat(pixels, 3, axis=2)


def read_mask(source: str | Path, size: tuple[int, int], stretch: bool = False) -> np.ndarray:
    """A boolean ``(H, W)`` array, True where the mask image is white (missing pixels), resized with nearest
    neighbour to ``size`` = (height, width) when it differs. A mask of another aspect ratio is almost surely the
    wrong mask: a ``UsageError`` unless ``stretch``."""
    from vitca_cli.errors import UsageError

    pic = read_image(source)
    grey = to_channels(pic.pixels, 1)[..., 0]
    if pic.size != tuple(size):
        (mh, mw), (h, w) = pic.size, size
        kept = abs((mw / mh) / (w / h) - 1) < 0.01
        if not kept and not stretch:
            raise UsageError(
                f"mask {pic.source} is {mw}×{mh}, a different aspect ratio from the image's {w}×{h}: give its own "
                "mask, or add {0} to stretch this one",
                settings=("stretch_mask",),
            )
        say = log.info if kept else log.warning
        say(
            f"mask {pic.source}: {mw}×{mh} resized to the image's {w}×{h} with nearest-neighbour sampling "
            f"({'same aspect ratio' if kept else 'stretched: aspect ratio NOT kept'})"
        )
        img = Image.fromarray(grey.astype(np.float32), mode="F")
        grey = np.asarray(img.resize((size[1], size[0]), Image.Resampling.NEAREST))
    return grey > 0.5


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------
def output_format(path: str | Path, fallback: str, ext: str | None = None) -> str:
    """The Pillow format for ``path``: ``ext`` if given, else the path's extension, else ``fallback``."""
    suffix = (ext if ext.startswith(".") else f".{ext}").lower() if ext else Path(str(path)).suffix.lower()
    if suffix and suffix in FORMATS:
        return FORMATS[suffix]
    if ext:
        raise ValueError(f"unknown image extension {ext!r}; choose from {', '.join(sorted(FORMATS))}")
    return "PNG" if fallback in ("MPO", "") else fallback


def encode_image(pixels: np.ndarray, fmt: str, alpha: np.ndarray | None = None, bits: int = 8) -> bytes:
    """Encode float pixels ``(H, W, C)`` (clipped to [0, 1]) as ``fmt`` bytes, with alpha and 16 bits where the
    format holds them."""
    grey = pixels.shape[2] == 1
    if alpha is not None and fmt not in ALPHA_FORMATS:
        log.info(f"{fmt} cannot store alpha: the alpha channel is dropped")
        alpha = None
    if bits == 16 and fmt in SIXTEEN_BIT_FORMATS:
        if grey and alpha is None:
            img = Image.fromarray(np.round(_unit(pixels[..., 0]) * 65535).astype(np.uint16))
            return _save(img, fmt)
        encoded = _encode_sixteen_bit_colour(_unit(pixels), alpha, fmt)
        if encoded is not None:
            return encoded
        log.info("16-bit colour written at 8 bits (install opencv-python-headless to keep 16)")
    arr = _eight_bits(pixels)
    img = Image.fromarray(arr[..., 0] if grey else arr, mode="L" if grey else "RGB")
    if alpha is not None:
        img.putalpha(Image.fromarray(np.round(np.clip(alpha, 0, 1) * 255).astype(np.uint8), mode="L"))
    return _save(img, fmt)


def _unit(pixels: np.ndarray) -> np.ndarray:
    """A new float array of ``pixels`` clipped to [0, 1], NaN as 0 (``np.clip(np.nan_to_num(pixels), 0, 1)``)."""
    out = np.fmax(pixels, 0.0)  # NaN -> 0: fmax and fmin return the number where one side is NaN
    return np.fmin(out, 1.0, out=out)


def _eight_bits(pixels: np.ndarray, band: int = 64) -> np.ndarray:
    """Float pixels (clipped to [0, 1], NaN as 0) as 8-bit values, rounded half to even: ``band`` rows at a time,
    whose float copy stays in cache, where a whole large image's would not."""
    out = np.empty(pixels.shape, np.uint8)
    for lo in range(0, len(pixels), band):
        unit = _unit(pixels[lo : lo + band])
        unit *= 255
        out[lo : lo + band] = np.rint(unit, out=unit)
    return out


def _encode_sixteen_bit_colour(pixels: np.ndarray, alpha: np.ndarray | None, fmt: str) -> bytes | None:
    try:
        import cv2
    except ImportError:
        return None
    planes = np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels
    planes = planes[..., ::-1]  # RGB -> BGR
    if alpha is not None:
        planes = np.concatenate([planes, alpha[..., None]], axis=2)
    ok, buf = cv2.imencode(".png" if fmt == "PNG" else ".tif", np.round(planes * 65535).astype(np.uint16))
    return buf.tobytes() if ok else None


def _save(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (``-`` = stdout)."""
    if str(path) == STDIO:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        atomic_write_bytes(Path(path), lambda f: f.write(data))
    except OSError as exc:
        raise ImageError(f"{path}: cannot write ({exc.strerror or exc})") from None


def write_image(path: str | Path, pixels: np.ndarray, like: Picture | None = None, fmt: str | None = None) -> None:
    """Write pixels like the input ``like`` (its format, alpha and bit depth) unless ``fmt`` says otherwise."""
    fmt = fmt or output_format(path, like.format if like else "PNG")
    alpha = like.alpha if like is not None else None
    if alpha is not None and alpha.shape != pixels.shape[:2]:
        alpha = None
    write_bytes(path, encode_image(pixels, fmt, alpha, like.bits if like else 8))


def to_uint8_rgb(pixels: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 for previews (animations, comparison strips)."""
    arr = _eight_bits(pixels)
    return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr


def encode_gif(frames: list[np.ndarray], duration_ms: int = 60, min_side: int = 128) -> bytes:
    """An animated GIF of float frames ``(H, W, C)``; tiny images are enlarged (nearest) to at least ``min_side``."""
    h, w = frames[0].shape[:2]
    scale = max(1, -(-min_side // min(h, w)))
    images = [Image.fromarray(to_uint8_rgb(f)).resize((w * scale, h * scale), Image.Resampling.NEAREST) for f in frames]
    durations = [duration_ms] * (len(images) - 1) + [max(1000, duration_ms)]  # linger on the result
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
    return buf.getvalue()


def side_by_side(panels: list[np.ndarray], gap: int = 2) -> np.ndarray:
    """Panels ``(H, W, C)`` of one height joined left to right with a white gap, as RGB float."""
    h = panels[0].shape[0]
    spacer = np.ones((h, gap, 3), np.float32)
    parts = []
    for i, p in enumerate(panels):
        if i:
            parts.append(spacer)
        parts.append(to_channels(np.clip(p, 0, 1).astype(np.float32), 3))
    return np.concatenate(parts, axis=1)
