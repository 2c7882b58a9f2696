"""How much more training would a target take? A log-linear fit of the FashionMNIST 32×32 learning curve.

Reads the learning curve from ``bench/reports/fashion-mnist-32-learning-curve.json`` (test-split batch PSNR against
images drawn, one row per shipped run or checkpoint), fits ``PSNR = a + b · log10(images)`` by least squares, over
all its measured rows and over the rows of one recipe (those of batch 32), and prints for each target the images,
iterations (of ``--batch`` images) and hours (at ``--rate`` iterations per second) the fit asks for. An
extrapolation, not a promise: the fit's residual spread is printed beside it. ``--markdown`` prints the table as
``docs/fashion-mnist-32-runs.md`` shows it (paste it there after adding a row to the data file).

    python bench/learning_curve.py [--rate 0.42] [--batch 32] [--target 23.80 --target 25.11] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

CURVE = Path(__file__).resolve().parent / "reports" / "fashion-mnist-32-learning-curve.json"
HEADER = "| after | iterations | images drawn (iterations × batch) | batch PSNR (dB) |"


def load_rows(path: Path = CURVE) -> list[dict]:
    """Every row of the learning-curve data file, in order (the paper's row, with unknown images, included)."""
    return json.loads(path.read_text(encoding="utf-8"))["rows"]


def read_curve(rows: list[dict]) -> list[tuple[str, float, float]]:
    """(label, images drawn, batch PSNR) for each measured row (one whose images drawn are known)."""
    return [(r["after"], float(r["images"]), float(r["batch_psnr"])) for r in rows if r.get("images") is not None]


def markdown(rows: list[dict]) -> str:
    """The learning-curve table in Markdown, as the docs show it (the shipped row's PSNR in bold)."""

    def number(x: float | None) -> str:
        return "unknown" if x is None else f"{x:,}"

    lines = [HEADER, "|---|---|---|---|"]
    for r in rows:
        psnr = f"{r['batch_psnr']:.2f}"
        if r.get("shipped"):
            psnr = f"**{psnr}**"
        lines.append(f"| {r['after']} | {number(r['iterations'])} | {number(r['images'])} | {psnr} |")
    return "\n".join(lines)


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
    ap.add_argument("--markdown", action="store_true", help="print the table as the docs show it, and stop")
    args = ap.parse_args()
    data = load_rows()
    if args.markdown:
        print(markdown(data))
        return
    rows = read_curve(data)
    batch32 = read_curve([r for r in data if r.get("batch") == 32])
    for name, subset in (("all rows", rows), ("batch-32 rows", batch32)):
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
