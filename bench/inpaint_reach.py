"""How fast ``vitca inpaint`` fills a few scribbles on a large photo when it computes only the holes' reach.

Builds a photo-like image (the held-out fruits sample, upscaled bicubically; or ``--image``) of ``--size``
(default 4000×3000, 12 MP) and a mask of three ``--width``-pixel scribbles (seeded random curves about a quarter
of the image's width long), runs ``vitca inpaint`` on them as a user would (a subprocess, ``-v``, the exact step
with ``--compile off --precision fp32`` unless ``--fast``) and prints its wall and CPU time and the share of the
image's cells and cell-steps it computed, read from its log. With ``--full-size S`` (e.g. 1000x750) it also runs the
reach-limited and the whole-grid computation (``--whole-grid``) on a crop of that size with the same scribbles
scaled down, checks that their outputs are the same bytes, and prints both times and their ratio.

    python bench/inpaint_reach.py [--size 4000x3000] [--width 6] [--threads 2] [--full-size 1000x750]

The machine may be shared: compare figures within one run.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "fruits.png"


def size_arg(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def photo(size: tuple[int, int], source: Path) -> Image.Image:
    """The source photo resized (bicubic) to ``size`` (width, height)."""
    return Image.open(source).convert("RGB").resize(size, Image.Resampling.BICUBIC)


def scribbles(size: tuple[int, int], width: int, count: int = 3, seed: int = 0) -> Image.Image:
    """A mask (white = missing) of ``count`` smooth random curves ``width`` pixels wide, each about a quarter of
    the image's width long, kept 5% away from the edges."""
    w, h = size
    rng = np.random.default_rng(seed)
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(count):
        x, y = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        heading = rng.uniform(0, 2 * np.pi)
        points = [(x, y)]
        length = 0.25 * w
        step = length / 64
        for _ in range(64):
            heading += rng.normal(0, 0.15)
            x = float(np.clip(x + step * np.cos(heading), 0.05 * w, 0.95 * w))
            y = float(np.clip(y + step * np.sin(heading), 0.05 * h, 0.95 * h))
            points.append((x, y))
        draw.line(points, fill=255, width=width, joint="curve")
    return mask


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def inpaint(image: Path, mask: Path, out: Path, threads: int, extra: list[str]) -> tuple[float, float, str]:
    """Run ``vitca inpaint`` as a subprocess: its wall time, its CPU time (all threads) and its log."""
    cmd = [sys.executable, "-m", "vitca_cli", "-v", "inpaint", str(image), "--mask", str(mask), "-o", str(out)]
    cmd += ["--threads", str(threads), "--overwrite", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start, cpu = time.perf_counter(), cpu_seconds()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    if done.returncode != 0:
        raise SystemExit(f"vitca inpaint failed ({done.returncode}):\n{done.stderr}")
    return wall, cpu, done.stderr


def load() -> str:
    return "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def shares(log: str) -> str:
    """The holes' reach line of the log, shortened, or why there is none."""
    line = re.search(r"holes' reach: (.*)", log)
    return line.group(1) if line else "whole grid (no holes' reach line in the log)"


def steps(log: str) -> str:
    found = re.search(r", (\d+) steps", log)
    return found.group(1) if found else "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=size_arg, default=(4000, 3000), help="WxH of the large photo")
    ap.add_argument("--width", type=int, default=6, help="scribble width in pixels")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--image", type=Path, default=SAMPLE, help="the photo to upscale (default: samples/fruits.png)")
    ap.add_argument("--weights", default=None, help="weights (default: vitca inpaint's own)")
    ap.add_argument("--fast", action="store_true", help="the CLI's automatic precision and compile settings")
    ap.add_argument("--full-size", type=size_arg, default=None, help="also time the whole grid at this size")
    args = ap.parse_args()

    extra = [] if args.fast else ["--compile", "off", "--precision", "fp32"]
    extra += ["--weights", args.weights] if args.weights else []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        w, h = args.size
        photo(args.size, args.image).save(d / "photo.png")
        mask = scribbles(args.size, args.width)
        mask.save(d / "mask.png")
        missing = np.asarray(mask) > 127
        print(
            f"{w}×{h} photo ({w * h / 1e6:.1f} MP) from {args.image.name}, three {args.width}-px scribbles: "
            f"{missing.mean():.3%} of the pixels missing; {args.threads} threads, "
            f"{'automatic settings' if args.fast else 'exact step (fp32, not compiled)'}"
        )
        print(f"  before: {load()}")
        wall, cpu, log = inpaint(d / "photo.png", d / "mask.png", d / "out.png", args.threads, extra)
        print(f"  holes only: {wall:6.1f} s wall, {cpu:6.1f} s CPU, {steps(log)} steps; {shares(log)}")
        if args.full_size is None:
            return
        fw, fh = args.full_size
        left, top = (w - fw) // 2, (h - fh) // 2
        Image.open(d / "photo.png").crop((left, top, left + fw, top + fh)).save(d / "small.png")
        small_mask = scribbles(args.full_size, args.width)
        small_mask.save(d / "small_mask.png")
        print(f"{fw}×{fh} crop ({fw * fh / 1e6:.2f} MP) with three {args.width}-px scribbles of its own:")
        reach, reach_cpu, log = inpaint(d / "small.png", d / "small_mask.png", d / "a.png", args.threads, extra)
        print(f"  holes only: {reach:6.1f} s wall, {reach_cpu:6.1f} s CPU, {steps(log)} steps; {shares(log)}")
        whole, whole_cpu, _ = inpaint(
            d / "small.png", d / "small_mask.png", d / "b.png", args.threads, [*extra, "--whole-grid"]
        )
        same = (d / "a.png").read_bytes() == (d / "b.png").read_bytes()
        print(
            f"  whole grid: {whole:6.1f} s wall, {whole_cpu:6.1f} s CPU; {whole / reach:.1f}× the holes-only wall "
            f"time, {whole_cpu / reach_cpu:.1f}× its CPU time; the same bytes: {same}"
        )
        print(f"  after: {load()}")


if __name__ == "__main__":
    main()
