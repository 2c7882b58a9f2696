"""How fast ``restore`` is on real photo sizes, and what each speed lever costs in quality, in one run.

For a 1 MP and a 4 MP photo (a real photograph, upscaled) with light Gaussian noise, and the 28×28 FashionMNIST
sample, it runs each mode and prints: wall time, cell-steps computed against the dense run's, speed-up over the
dense run, PSNR against the clean image and its difference from the dense run. Modes:
- ``dense``: the exact step (eager, fp32), every cell every step (windowed steps, no tile margins up to 4 M cells);
- ``former tiles``: the exact step on tiles as this tool planned them before windowed steps (264-cell tiles,
  64-cell margins): the dense fp32 run as it was before this bench existed;
- ``settle``: the exact step, settled cells skipped (``--settle``, the CLI's default unless given);
- ``bf16``: bfloat16 matrix products, eager (only where the CPU multiplies bf16 in hardware, unless --force-bf16);
- ``compiled``: the step compiled into fused kernels (``--compile on``), fp32;
- ``fast``: compiled with bf16 products where the CPU has them: what ``vitca denoise`` runs on a large image;
- ``onnx`` / ``onnx int8``: ONNX Runtime with the fp32 and the int8-quantised step graph;
- ``all``: ``fast`` and settling;
- ``fused``: ``fast`` with fusion and mitosis (``--fusion``: the middle steps on the half-resolution grid), with
  ``--fused-weights`` (default: the same weights; a model trained with fusion is what it is for).
Compiled modes first compile on one batch of windows (timed apart, ``compile s``: once per process).
It also times the model's own step on one batch of windows and prints ``dense cs/s ÷ step cs/s``: the share of the
step's throughput that the whole restore keeps (tiling, windows, masks, blending included).

    python bench/denoise.py [--iters 64] [--sizes 1,4] [--modes dense,settle,...] [--threads 2] [--settle S]

The machine may be shared: compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vitca_cli.io import weights  # noqa: E402
from vitca_cli.nca.model import seed_cells  # noqa: E402
from vitca_cli.restore.backends import TorchBackend  # noqa: E402
from vitca_cli.restore.batch import BatchSettings  # noqa: E402
from vitca_cli.restore.loop import MAX_CELLS, restore  # noqa: E402
from vitca_cli.restore.windows import WINDOW, window_plan  # noqa: E402
from vitca_cli.runtime import cpu_has_native_bf16  # noqa: E402

MODES = ("dense", "former tiles", "settle", "bf16", "compiled", "fast", "onnx", "onnx int8", "all", "fused")
FORMER_CALL_CELLS = 1 << 16  # cells per backend call then
FORMER_TILE = 264  # cells: the former automatic tile side at 64 iterations (256, grown to fit 2 × 64-cell margins)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / max(np.mean((np.clip(a, 0, 1) - b) ** 2), 1e-12)))


def photo(megapixels: float) -> np.ndarray:
    """A real photograph (the held-out fruits sample), upscaled to about ``megapixels``, as (H, W, 3) in [0, 1]."""
    img = Image.open(ROOT / "samples" / "fruits.png").convert("RGB")
    scale = (megapixels * 1e6 / (img.width * img.height)) ** 0.5
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255


def backends(name: str, modes: list[str], force_bf16: bool, fused_weights: str | None = None) -> dict:
    """The backend each mode runs (None where this machine cannot run it)."""
    from vitca_cli.onnx.backend import OnnxBackend

    ref = weights.resolve(name)
    onnx = ref.path.with_suffix(".onnx")
    bf16 = cpu_has_native_bf16() or force_bf16
    out = {
        "former tiles": TorchBackend.from_file(ref.path),
        "dense": TorchBackend.from_file(ref.path),
        "settle": TorchBackend.from_file(ref.path),
    }
    out["bf16"] = TorchBackend.from_file(ref.path, precision="bf16") if bf16 else None
    out["compiled"] = TorchBackend.from_file(ref.path, compile="on")
    out["fast"] = TorchBackend.from_file(ref.path, precision="bf16" if bf16 else "fp32", compile="on")
    fused = weights.resolve(fused_weights).path if fused_weights else ref.path
    out["fused"] = TorchBackend.from_file(fused, precision="bf16" if bf16 else "fp32", compile="on")
    if any(m.startswith("onnx") or m == "all" for m in modes):
        out["onnx"] = OnnxBackend.from_file(onnx if onnx.is_file() else ref.path, "cpu", torch.get_num_threads())
        out["onnx int8"] = OnnxBackend.from_file(
            onnx if onnx.is_file() else ref.path, "cpu", torch.get_num_threads(), quantize=True
        )
    return out


def step_rate(
    backend, image: np.ndarray, repeats: int = 3, call_cells: int | None = None, settle: float = 0.0
) -> float:
    """The model's own step on one full batch of windows of this image: cell-steps per second (best of
    ``repeats``)."""
    cfg = backend.cfg
    wys, wxs = window_plan(cfg, image.shape[:2], WINDOW)
    count = max(1, min(len(wys) * len(wxs), (call_cells or MAX_CELLS["cpu"]) // (wys[0].size * wxs[0].size)))
    x = torch.from_numpy(image[: wys[0].size, : wxs[0].size]).permute(2, 0, 1)[None].repeat(count, 1, 1, 1)
    z = seed_cells(cfg, x)
    mask = (torch.rand(count, 1, *z.shape[-2:]) < cfg.update_rate).float()
    best = float("inf")
    if hasattr(backend, "prepare"):
        backend.prepare(1 << 62, settle)
    for _ in range(repeats):
        t = time.perf_counter()
        backend.step(z, mask)
        best = min(best, time.perf_counter() - t)
    return z.shape[0] * z.shape[2] * z.shape[3] / best


def compile_time(backend, image: np.ndarray, settle: float = 0.0) -> float:
    """Seconds to compile ``backend``'s step (and run it once) on one batch of windows of ``image``."""
    t = time.perf_counter()
    step_rate(backend, image, repeats=1, settle=settle)
    return time.perf_counter() - t


def run_case(label: str, clean: np.ndarray, noisy: np.ndarray, name: str, args) -> None:
    bks = backends(name, args.modes, args.force_bf16, args.fused_weights if name == "photo" else None)
    rows, dense = [], None
    for mode in sorted(args.modes, key=lambda m: m != "dense"):  # dense first: the others are compared with it
        backend = bks.get("fast" if mode == "all" else mode)
        settle = args.settle if mode in ("settle", "all") else 0.0
        # A settling run compiles its own graph (the cells read in fp32): each is compiled once, untimed.
        warmed = getattr(backend, "warmed", set())
        if backend is not None and getattr(backend, "compile", "off") == "on" and (settle > 0) not in warmed:
            backend.warmed = warmed | {settle > 0}
            seconds = compile_time(backend, noisy, settle)
            print(f"{label:>14} {mode:>13}  compile s {seconds:.2f} (once per process; not in wall s)")
        if backend is None:
            rows.append(f"{label:>14} {mode:>13}  (not run: no bfloat16 instructions on this CPU; --force-bf16)")
            continue
        if mode == "fused" and backend.cfg.size_dependent:
            print(f"{label:>14} {mode:>13}  (not run: a position encoding tied to the grid size cannot fuse)")
            continue
        if mode == "former tiles" and backend.cfg.size_dependent:
            print(f"{label:>14} {mode:>13}  (the same plan as dense: a fixed-size model runs on its training size)")
            continue
        tile = FORMER_TILE if mode == "former tiles" else None
        cells = FORMER_CALL_CELLS if mode == "former tiles" else args.call_cells
        t = time.perf_counter()
        out = restore(backend, noisy, args.iters, tile=tile, settle=settle, max_cells=cells, fusion=mode == "fused")
        wall = time.perf_counter() - t
        quality = psnr(out.image, clean)
        if mode == "dense":
            dense = (wall, out.computed, quality, out.image)
        ref = dense or (wall, out.computed, quality, out.image)
        rows.append(
            f"{label:>14} {mode:>13} {wall:8.2f} "
            f"{out.computed / ref[1]:8.3f} {ref[0] / wall:8.2f} {quality:8.2f} {quality - ref[2]:+8.3f}"
        )
        print(rows[-1], flush=True)
    if dense is not None:
        rate = step_rate(bks["dense"], noisy, call_cells=args.call_cells)
        cells = noisy.shape[0] * noisy.shape[1] * args.iters / bks["dense"].cfg.patch_size ** 2
        print(
            f"{label:>14}  dense restore {cells / dense[0]:.3g} image cs/s, {dense[1] / dense[0]:.3g} computed "
            f"cs/s; the step alone {rate:.3g} cs/s: dense ÷ step = {dense[1] / dense[0] / rate:.2f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=64)
    ap.add_argument("--sizes", default="1,4", help="photo sizes in megapixels (comma-separated; 0 = none)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from: {', '.join(MODES)}")
    ap.add_argument("--settle", type=float, default=BatchSettings.settle or 1e-3)
    ap.add_argument("--sigma", type=float, default=0.05, help="Gaussian noise on the photos")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--call-cells", type=int, default=None, help="cells per backend call (default: the CLI's)")
    ap.add_argument("--force-bf16", action="store_true", help="run bf16 even where the CPU emulates it")
    ap.add_argument("--fused-weights", default=None, help="weights NAME or PATH for the fused mode on photos")
    args = ap.parse_args()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(args.modes) - set(MODES)
    if unknown:
        ap.error(f"unknown modes: {', '.join(sorted(unknown))}")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.iters} iterations, settle "
        f"{args.settle}, native bf16: {cpu_has_native_bf16()}, cells per call {args.call_cells or MAX_CELLS['cpu']}"
    )
    print(f"{'image':>14} {'mode':>13} {'wall s':>8} {'cells÷d':>8} {'speed-up':>8} {'PSNR':>8} {'Δ dense':>8}")
    rng = np.random.default_rng(0)
    for mp in (float(s) for s in args.sizes.split(",") if float(s) > 0):
        clean = photo(mp)
        noisy = np.clip(clean + rng.normal(0, args.sigma, clean.shape), 0, 1).astype(np.float32)
        run_case(f"{clean.shape[1]}×{clean.shape[0]}", clean, noisy, "photo", args)
    sample = np.asarray(Image.open(ROOT / "samples" / "pullover.png").convert("L"), np.float32)[..., None] / 255
    noisy = np.asarray(Image.open(ROOT / "samples" / "pullover-noisy.png").convert("L"), np.float32)[..., None] / 255
    run_case("28×28 fmnist", sample, noisy, "fashion-mnist", args)
    print("(cells÷d = cell-steps computed ÷ the dense run's; speed-up and Δ dense: against the dense run)")


if __name__ == "__main__":
    main()
