"""How much more training would a target take? A log-linear fit of the README's FashionMNIST 32×32 learning curve.

Reads the learning-curve table in README.md (test-split batch PSNR against images drawn), fits
``PSNR = a + b · log10(images)`` by least squares, over all its measured rows and over the rows of one recipe (those
whose "after" cell names batch 32, or follow one that does), and prints for each target the images, iterations (of
``--batch`` images) and hours (at ``--rate`` iterations per second) the fit asks for. An extrapolation, not a
promise: the fit's residual spread is printed beside it.

    python bench/learning_curve.py [--rate 0.42] [--batch 32] [--target 23.80 --target 25.11]
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
HEADER = "| after | iterations | images drawn"


def read_curve(text: str) -> list[tuple[str, float, float]]:
    """(label, images drawn, batch PSNR) for each measured row of the learning-curve table."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith(HEADER))
    except StopIteration:
        raise SystemExit(f"{README}: no learning-curve table (a row starting {HEADER!r})") from None
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        images, psnr = cells[2].replace(",", ""), cells[3]
        if re.fullmatch(r"\d+", images) and re.fullmatch(r"\d+(\.\d+)?", psnr):
            rows.append((cells[0], float(images), float(psnr)))
    return rows


def fit(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Intercept, slope (dB per tenfold images) and residual standard deviation of the least-squares line."""
    xs = [math.log10(x) for x, _ in points]
    ys = [y for _, y in points]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    intercept = my - slope * mx
    resid = [y - intercept - slope * x for x, y in zip(xs, ys)]
    return intercept, slope, math.sqrt(sum(r * r for r in resid) / max(n - 2, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=0.42, help="training iterations per second (default 0.42)")
    ap.add_argument("--batch", type=int, default=32, help="images per iteration from here on (default 32)")
    ap.add_argument("--target", type=float, action="append", help="batch PSNR targets (default 23.80 and 25.11)")
    args = ap.parse_args()
    rows = read_curve(README.read_text(encoding="utf-8"))
    first32 = next((i for i, (label, _, _) in enumerate(rows) if "batch 32" in label), len(rows))
    for name, subset in (("all rows", rows), ("batch-32 rows", rows[first32:])):
        if len(subset) < 3:
            continue
        a, b, sd = fit([(x, y) for _, x, y in subset])
        drawn = subset[-1][1]
        print(f"{name} ({len(subset)}): {b:.2f} dB per tenfold images, residual sd {sd:.2f} dB")
        for target in args.target or [23.80, 25.11]:
            images = 10 ** ((target - a) / b)
            iters = (images - drawn) / args.batch
            hours = iters / args.rate / 3600
            print(f"  {target:.2f} dB: {images:.3g} images, {iters:.3g} more iterations, ", end="")
            print(f"{hours:,.0f} h at {args.rate} it/s")


if __name__ == "__main__":
    main()
