"""Figures and tables of the appendix analyses (``training/analyses.py``): line charts and labelled image grids
drawn with Pillow (already a core dependency, so the analyses need no plotting extra), and the PNG, CSV and JSON
files, written atomically. Figure text stays ASCII because Pillow's built-in font has no Greek letters or ×.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from vitca_cli import tables
from vitca_cli.io.files import atomic_write_bytes

# ---------------------------------------------------------------------------------------------------------------------
# Figures with Pillow
# ---------------------------------------------------------------------------------------------------------------------
PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
]


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def line_chart(series: dict[str, tuple], title: str, xlabel: str, ylabel: str, size=(720, 420)) -> Image.Image:
    """A line chart: ``series`` maps a legend label to ``(xs, ys)``; non-finite points are skipped."""
    w, h = size
    left, right, top, bottom = 64, 200, 34, 48
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font, small = _font(14), _font(11)
    xs_all = [x for xs, _ in series.values() for x in xs]
    ys_all = [y for _, ys in series.values() for y in ys if math.isfinite(y)]
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = (min(ys_all), max(ys_all)) if ys_all else (0.0, 1.0)
    pad = 0.05 * (y1 - y0 or 1.0)
    y0, y1 = y0 - pad, y1 + pad
    x1 = x1 if x1 > x0 else x0 + 1

    def px(x, y):
        return (
            left + (x - x0) / (x1 - x0) * (w - left - right),
            h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom),
        )

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for t in _nice_ticks(y0, y1):
        _, py = px(x0, t)
        d.line([left - 4, py, left, py], fill="black")
        d.line([left + 1, py, w - right - 1, py], fill=(235, 235, 235))
        d.text((left - 6, py), f"{t:g}", fill="black", font=small, anchor="rm")
    for t in _nice_ticks(x0, x1, 6):
        qx, _ = px(t, y0)
        d.line([qx, h - bottom, qx, h - bottom + 4], fill="black")
        d.text((qx, h - bottom + 6), f"{t:g}", fill="black", font=small, anchor="mt")
    for i, (label, (xs, ys)) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        pts = [px(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        elif pts:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
        ly = top + 8 + 18 * i
        d.line([w - right + 10, ly, w - right + 30, ly], fill=colour, width=3)
        d.text((w - right + 36, ly), label, fill="black", font=small, anchor="lm")
    d.text((left + (w - left - right) / 2, 8), title, fill="black", font=font, anchor="mt")
    d.text((left + (w - left - right) / 2, h - 6), xlabel, fill="black", font=small, anchor="mb")
    d.text((6, top - 20), ylabel, fill="black", font=small)
    return img


def _to_pil(image: torch.Tensor, cell: int) -> Image.Image:
    """A ``(C, H, W)`` image (clipped to [0, 1]) or ``(H, W)`` map as a ``cell``-pixel-high tile, nearest-upscaled."""
    a = image.detach().float().clamp(0, 1).cpu().numpy()
    a = a if a.ndim == 2 else (a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
    tile = Image.fromarray(np.round(a * 255).astype(np.uint8))
    scale = max(1, cell // max(tile.size))
    return tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)


def image_grid(rows: list[list], row_labels: list[str], col_labels: list[str], cell: int = 96) -> Image.Image:
    """A labelled grid of image tiles; ``None`` leaves a cell empty."""
    font = _font(11)
    label_w, head_h, gap = 170, 20, 4
    ncols = max(len(r) for r in rows)
    tiles = [[_to_pil(t, cell) if t is not None else None for t in r] for r in rows]
    tw = max(t.width for r in tiles for t in r if t is not None)
    th = max(t.height for r in tiles for t in r if t is not None)
    img = Image.new("RGB", (label_w + ncols * (tw + gap), head_h + len(rows) * (th + gap)), "white")
    d = ImageDraw.Draw(img)
    for j, label in enumerate(col_labels):
        d.text((label_w + j * (tw + gap) + tw / 2, head_h / 2), label, fill="black", font=font, anchor="mm")
    for i, (label, r) in enumerate(zip(row_labels, tiles)):
        y = head_h + i * (th + gap)
        d.text((4, y + th / 2), label, fill="black", font=font, anchor="lm")
        for j, t in enumerate(r):
            if t is not None:
                img.paste(t, (label_w + j * (tw + gap), y))
    return img


def stack_vertically(images: list[Image.Image]) -> Image.Image:
    out = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    y = 0
    for i in images:
        out.paste(i, (0, y))
        y += i.height
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Outputs: figure, CSV, JSON (atomic writes)
# ---------------------------------------------------------------------------------------------------------------------
def save_png(path: Path, image: Image.Image) -> None:
    atomic_write_bytes(path, lambda f: image.save(f, format="PNG"))


def save_table(out_dir: Path, name: str, rows: list[dict], extra: dict) -> list[Path]:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    csv_path, json_path = out_dir / f"{name}.csv", out_dir / f"{name}.json"
    atomic_write_bytes(csv_path, lambda f: f.write(buf.getvalue().encode()))
    payload = json.dumps({**extra, "table": rows}, indent=2, default=float)
    atomic_write_bytes(json_path, lambda f: f.write(payload.encode()))
    return [csv_path, json_path]


def format_table(rows: list[dict]) -> str:
    """Rows of equal keys as an aligned plain-text table."""

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    keys = list(rows[0])
    return tables.format_table(keys, [[cell(r[k]) for k in keys] for r in rows], align="r" * len(keys))
