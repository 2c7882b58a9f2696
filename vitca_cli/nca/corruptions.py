"""Real-world damage for training and evaluation, beside the paper's patch masks.

A *mixture* says which corruptions a batch draws from and how often, one per image:

    "gaussian=0.01-0.25:3, saltpepper=0.02-0.2:1, jpeg=10-60:1, strokes:2, rects:1, clean:1"

Each comma-separated entry is ``NAME[=LO-HI][:WEIGHT]``: the kind, the range its strength is drawn from uniformly
(defaults in ``RANGES``) and its relative weight (default 1). The kinds:

- ``gaussian``: additive N(0, σ²) noise, σ ~ U[LO, HI], clipped to [0, 1] (as a saved noisy photo is);
- ``saltpepper``: a share p ~ U[LO, HI] of pixels set to 0 or 1 (all channels), half each;
- ``jpeg``: re-encoded through Pillow at quality q ~ U{LO..HI};
- ``gaussjpeg``: ``gaussian`` noise of σ ~ U[LO, HI], then a JPEG at quality 70–95 with 4:2:0 chroma subsampling
  (a noisy photo saved as a JPEG: the chroma noise is averaged away, the luminance noise stays);
- ``camera``: a camera's noise (:func:`camera_noise`): in linear light, shot noise of variance s²·x and read noise
  on a Bayer mosaic, s ~ U[LO, HI], spread by bilinear demosaicking over neighbouring pixels and channels, then the
  sRGB curve, clipping and (three times in four) a JPEG at quality 70–95, 4:2:0;
- ``strokes``: LO..HI free-form brush strokes (random walks, 2–9 px wide) drawn as missing pixels;
- ``rects``: LO..HI rectangles (each side 6–30% of the image's) drawn as missing pixels;
- ``patch``: the paper's masking, p × patch combos from the curriculum (``vitca_cli.nca.masking``);
- ``clean``: no damage, so a model learns to leave a good image alone.

Noise kinds leave every pixel "known" (the damage is not located); the inpainting kinds (strokes, rects, patch)
return the mask of missing pixels, shown to the model as zeros (``dropout``) or N(0,1) values (``noise``), and, for
a mask-aware model, in its known channel.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch

from vitca_cli.nca.masking import apply_mask, random_mask

RANGES: dict[str, tuple[float, float]] = {
    "gaussian": (0.01, 0.25),
    "saltpepper": (0.02, 0.2),
    "jpeg": (10, 60),
    "gaussjpeg": (0.01, 0.15),
    "camera": (0.02, 0.2),
    "strokes": (1, 6),
    "rects": (1, 4),
    "scribbles": (1, 4),
    "blobs": (1, 3),
    "text": (1, 3),
    "patch": (0, 0),
    "clean": (0, 0),
}
KINDS = tuple(RANGES)
INPAINTING = ("strokes", "rects", "scribbles", "blobs", "text", "patch")
DRAWN = ("strokes", "rects", "scribbles", "blobs", "text")  # holes drawn by ``hole_mask``
PAPER_MIXTURE = "patch"


@dataclass(frozen=True)
class Corruption:
    """One entry of a mixture: a kind, its strength range and its weight."""

    kind: str
    lo: float
    hi: float
    weight: float = 1.0

    def __str__(self) -> str:
        ranged = "" if self.kind in ("patch", "clean") else f"={_num(self.lo)}-{_num(self.hi)}"
        return f"{self.kind}{ranged}:{_num(self.weight)}"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def parse_mixture(spec: str) -> tuple[Corruption, ...]:
    """Parse ``"NAME[=LO-HI][:WEIGHT], ..."`` (see the module docstring); raises ``ValueError`` with the reason."""
    out = []
    for part in filter(None, (s.strip() for s in spec.split(","))):
        head, _, weight = part.partition(":")
        kind, eq, rng = head.partition("=")
        kind = kind.strip()
        if kind not in RANGES:
            raise ValueError(f"unknown corruption {kind!r} in {spec!r}; choose from {', '.join(KINDS)}")
        lo, hi = RANGES[kind]
        try:
            if eq:
                a, dash, b = rng.strip().partition("-")
                lo = float(a)
                hi = float(b) if dash else lo
            w = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ValueError(f"bad corruption entry {part!r}: expected NAME[=LO-HI][:WEIGHT]") from None
        if eq and kind in ("patch", "clean"):
            raise ValueError(f"bad corruption entry {part!r}: {kind} takes no range")
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi) or not (math.isfinite(w) and w > 0):
            raise ValueError(f"bad corruption entry {part!r}: need 0 ≤ LO ≤ HI and WEIGHT > 0")
        if (
            kind in ("gaussian", "saltpepper", "gaussjpeg", "camera")
            and hi > 1
            or kind == "jpeg"
            and not 1 <= lo <= hi <= 95
        ):
            raise ValueError(f"bad corruption entry {part!r}: out of range for {kind}")
        out.append(Corruption(kind, lo, hi, w))
    if not out:
        raise ValueError("empty corruption mixture")
    return tuple(out)


def mixture_str(mixture: tuple[Corruption, ...]) -> str:
    """The canonical spelling of a mixture (what ``config.json`` and the manifest record)."""
    return ", ".join(str(c) for c in mixture)


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _randint(gen: torch.Generator, lo: int, hi: int) -> int:
    return int(torch.randint(int(lo), int(hi) + 1, (), generator=gen))


def stroke_mask(
    h: int, w: int, count: int, gen: torch.Generator, width: int | None = None, widest: int | None = None
) -> np.ndarray:
    """``count`` free-form strokes (random walks with a round brush) as a bool ``(H, W)`` missing-pixel map, each
    ``width`` px wide (default: drawn from 2–9 per stroke, or log-uniformly from 2 to ``widest``)."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    scale = max(h, w)
    for _ in range(count):
        x, y = _uniform(gen, 0, w), _uniform(gen, 0, h)
        brush = width or (
            _randint(gen, 2, 9) if widest is None else round(math.exp(_uniform(gen, 0.7, math.log(widest))))
        )
        angle = _uniform(gen, 0, 2 * math.pi)
        points = [(x, y)]
        for _ in range(_randint(gen, 2, 6)):
            angle += _uniform(gen, -1.2, 1.2)
            length = _uniform(gen, 0.05, 0.25) * scale
            x = min(max(x + length * math.cos(angle), 0), w - 1)
            y = min(max(y + length * math.sin(angle), 0), h - 1)
            points.append((x, y))
        draw.line(points, fill=255, width=brush, joint="curve")
        for px, py in points:  # round caps and joints
            r = brush / 2
            draw.ellipse((px - r, py - r, px + r, py + r), fill=255)
    return np.asarray(img) > 0


def rect_mask(h: int, w: int, count: int, gen: torch.Generator) -> np.ndarray:
    """``count`` axis-aligned rectangles (sides 6–30% of the image's) as a bool ``(H, W)`` missing-pixel map."""
    missing = np.zeros((h, w), dtype=bool)
    for _ in range(count):
        rh, rw = max(1, round(_uniform(gen, 0.06, 0.3) * h)), max(1, round(_uniform(gen, 0.06, 0.3) * w))
        top, left = _randint(gen, 0, h - rh), _randint(gen, 0, w - rw)
        missing[top : top + rh, left : left + rw] = True
    return missing


def blob_mask(h: int, w: int, count: int, gen: torch.Generator) -> np.ndarray:
    """``count`` blobs (each a cluster of 3–6 overlapping discs, 3–20% of the image's short side across)."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    side = min(h, w)
    for _ in range(count):
        x, y = _uniform(gen, 0, w), _uniform(gen, 0, h)
        for _ in range(_randint(gen, 3, 6)):
            r = _uniform(gen, 0.015, 0.1) * side + 1
            cx, cy = x + _uniform(gen, -r, r), y + _uniform(gen, -r, r)
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    return np.asarray(img) > 0


def text_mask(h: int, w: int, count: int, gen: torch.Generator) -> np.ndarray:
    """``count`` lines of random capitals and digits, each in a size from 8 px to a third of the image's short side
    (Pillow's own font), as captions and watermarks are laid over photos."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "
    for _ in range(count):
        size = _randint(gen, 8, max(8, min(h, w) // 3))
        try:
            font = ImageFont.load_default(size=size)
        except (TypeError, OSError):  # a Pillow without FreeType: its one bitmap font
            font = ImageFont.load_default()
        text = "".join(letters[_randint(gen, 0, len(letters) - 1)] for _ in range(_randint(gen, 3, 12)))
        draw.text((_uniform(gen, -0.2 * w, w), _uniform(gen, -0.1 * h, h)), text, fill=255, font=font)
    return np.asarray(img) > 0


def hole_mask(kind: str, h: int, w: int, count: int, gen: torch.Generator) -> np.ndarray:
    """The missing pixels ``(H, W)`` of a ``DRAWN`` kind: ``scribbles`` are strokes 2–30 px wide (at most a third
    of the short side), ``rects`` squares and oblongs."""
    if kind == "scribbles":
        return stroke_mask(h, w, count, gen, widest=max(3, min(30, min(h, w) // 3)))
    draw = {"strokes": stroke_mask, "rects": rect_mask, "blobs": blob_mask, "text": text_mask}[kind]
    return draw(h, w, count, gen)


def jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    """``image`` ``(C, H, W)`` in [0, 1] through a Pillow JPEG encode/decode at ``quality`` (4:2:0, as cameras)."""
    from PIL import Image

    arr = np.round(image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    pic = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    buf = io.BytesIO()
    pic.save(buf, "JPEG", quality=int(quality))
    out = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255.0
    return torch.from_numpy(out.reshape(arr.shape).copy()).permute(2, 0, 1)


SAVED_JPEG = (70, 95)  # the qualities a camera or phone saves at


def srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1 / 2.4) - 0.055)


_DEMOSAIC = {  # bilinear interpolation of a Bayer plane: green from 4 neighbours, red and blue from 2 or 4
    "g": torch.tensor([[0, 1, 0], [1, 4, 1], [0, 1, 0]], dtype=torch.float32) / 4,
    "rb": torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=torch.float32) / 4,
}


def bayer_sites(h: int, w: int, dy: int = 0, dx: int = 0) -> torch.Tensor:
    """The RGGB Bayer pattern shifted by (dy, dx) as one-hot channel sites ``(3, H, W)``."""
    yy = (torch.arange(h)[:, None] + dy) % 2
    xx = (torch.arange(w)[None, :] + dx) % 2
    red, blue = (yy == 0) & (xx == 0), (yy == 1) & (xx == 1)
    return torch.stack([red, ~(red | blue), blue]).float()


def _interpolate(plane: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    return F.conv2d(F.pad(plane[None], (1, 1, 1, 1), mode="reflect"), kernel[None, None])[0]


def camera_noise(x: torch.Tensor, s: float, read: float, gen: torch.Generator) -> torch.Tensor:
    """Noise as a camera makes it, for an sRGB image ``x`` ``(3, H, W)`` in [0, 1]: each pixel of an RGGB mosaic
    records one channel, with shot noise of variance ``s²·x`` and read noise of std ``read`` in linear light;
    demosaicking (bilinear green, then red and blue by colour difference) spreads that noise over neighbouring
    pixels and channels (the signal is kept, so only the noise is interpolated); the result goes back through the
    sRGB curve, clipped. Returns the noisy sRGB image."""
    _, h, w = x.shape
    lin = srgb_to_linear(x)
    sites = bayer_sites(h, w, _randint(gen, 0, 1), _randint(gen, 0, 1))
    sampled = (lin * sites).sum(0, keepdim=True)  # the one channel each pixel records
    noise = torch.randn(1, h, w, generator=gen) * (s * s * sampled + read * read).sqrt()
    green = _interpolate(noise * sites[1], _DEMOSAIC["g"])
    # red and blue as green plus their interpolated difference from it (colour-difference demosaicking), which
    # carries green's noise into them, as cameras' demosaickers do
    red, blue = (green + _interpolate((noise - green) * sites[c], _DEMOSAIC["rb"]) for c in (0, 2))
    spread = torch.cat([red, green, blue])
    return linear_to_srgb(lin + spread)


def corrupt_one(
    x: torch.Tensor,
    c: Corruption,
    gen: torch.Generator,
    mask_type: str = "dropout",
    combo: tuple[float, int] = (0.5, 1),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt one clean image ``x`` ``(C, H, W)`` (CPU) with ``c``; returns (damaged image, known ``(1, H, W)``).

    ``combo`` is the (probability, patch size) of a ``patch`` corruption (drawn by the caller's curriculum)."""
    ch, h, w = x.shape
    known = torch.ones(1, h, w, dtype=x.dtype)
    kind = c.kind
    if kind == "clean":
        return x.clone(), known
    if kind == "gaussian":
        sigma = _uniform(gen, c.lo, c.hi)
        return (x + sigma * torch.randn(x.shape, generator=gen)).clamp_(0, 1), known
    if kind == "saltpepper":
        p = _uniform(gen, c.lo, c.hi)
        u = torch.rand(1, h, w, generator=gen)
        out = x.clone()
        out = torch.where(u < p / 2, torch.zeros_like(out), out)
        return torch.where((u >= p / 2) & (u < p), torch.ones_like(out), out), known
    if kind == "jpeg":
        return jpeg(x, _randint(gen, c.lo, c.hi)), known
    if kind == "gaussjpeg":
        noisy = (x + _uniform(gen, c.lo, c.hi) * torch.randn(x.shape, generator=gen)).clamp_(0, 1)
        return jpeg(noisy, _randint(gen, *SAVED_JPEG)), known
    if kind == "camera":
        s = _uniform(gen, c.lo, c.hi)
        noisy = camera_noise(x if ch == 3 else x.expand(3, h, w), s, s * _uniform(gen, 0.05, 0.5), gen)
        noisy = noisy if ch == 3 else noisy.mean(0, keepdim=True)
        return (jpeg(noisy, _randint(gen, *SAVED_JPEG)) if _uniform(gen, 0, 1) < 0.75 else noisy), known
    if kind == "patch":
        damaged, keep = random_mask(x[None], *combo, mask_type, gen)
        return damaged[0], keep[0].to(x.dtype)
    count = _randint(gen, c.lo, c.hi)
    missing = hole_mask(kind, h, w, count, gen)
    keep = torch.from_numpy(~missing).to(x.dtype)[None]
    return apply_mask(x[None], keep[None], mask_type, 1, gen)[0], keep


def corrupt_batch(
    x: torch.Tensor,
    mixture: tuple[Corruption, ...],
    gen: torch.Generator,
    mask_type: str = "dropout",
    combo: tuple[float, int] = (0.5, 1),
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Corrupt each image of ``x`` ``(B, C, H, W)`` with a kind drawn from ``mixture`` by weight; returns the
    damaged batch, the known masks ``(B, 1, H, W)`` and the kinds drawn. All randomness comes from ``gen`` (CPU)."""
    weights = torch.tensor([c.weight for c in mixture], dtype=torch.float64)
    picks = torch.multinomial(weights, len(x), replacement=True, generator=gen).tolist()
    device = x.device
    pairs = [corrupt_one(img, mixture[k], gen, mask_type, combo) for img, k in zip(x.cpu(), picks)]
    damaged = torch.stack([p[0] for p in pairs]).to(device)
    known = torch.stack([p[1] for p in pairs]).to(device)
    return damaged, known, [mixture[k].kind for k in picks]
