"""Wall time of ``vitca denoise`` (a real subprocess) against the model's own step throughput, in one run.

For a 28×28 grayscale image and a 512×512 RGB photo at 64 iterations it reports:
- the CLI's wall time (process start, imports, weights, reading, tiling, the loop, writing);
- the same restore in-process (``vitca_cli.restore.loop.restore``: no start-up or file I/O);
- the model's step throughput on the batch shapes the CLI runs (the same figure ``bench/step.py`` measures);
and the ratios. Cell-steps count the cells the loop actually computes (tiles with their overlaps) × iterations;
"image cell-steps/s" counts only the image's own cells. The machine is shared: compare ratios from one run (with
two threads on a busy 2-core machine OpenMP contention makes every op erratic; one thread gives stable ratios).

    OMP_NUM_THREADS=1 python bench/denoise.py [--iters 64] [--photo-size 512] [--device cpu] [--weights-grey W] [--weights-rgb W]

Without shipped weights (or --weights-*) it uses untrained models of the shipped presets (fashion-mnist; the
cifar10 preset standing in for photo): the speed is the same, only the pixels differ.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step import best_time  # noqa: E402  (the same timing helper as bench/step.py)

from vitca_cli.io import weights# noqa: E402
from vitca_cli.io.checkpoint import save_checkpoint  # noqa: E402
from vitca_cli.nca.config import preset  # noqa: E402
from vitca_cli.nca.model import CellularAutomaton, seed_cells  # noqa: E402
from vitca_cli.restore.loop import MAX_CELLS, TorchBackend, plan_tiles, restore  # noqa: E402
from vitca_cli.runtime import resolve_device, tune_allocator  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Best of ``repeats`` runs (the first includes any warm-up)."""
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def weights_file(given: str | None, channels: int, tmp: Path) -> tuple[str, str]:
    """The weights to time: given, shipped, or an untrained model of the matching preset."""
    if given:
        return given, given
    try:
        ref = weights.resolve(None, channels=channels)
        return str(ref.path), ref.name
    except Exception:  # noqa: BLE001 - not shipped yet: time an untrained model of the same shape
        cfg = preset("fashion-mnist" if channels == 1 else "cifar10")
        ca = CellularAutomaton(cfg)
        with torch.no_grad():
            for p in ca.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        path = tmp / f"untrained-{channels}.pt"
        save_checkpoint(path, cfg, ca.state_dict())
        return str(path), f"untrained {'fashion-mnist' if channels == 1 else 'cifar10'} preset"


def test_image(path: Path, size: int, channels: int) -> None:
    """A natural photo where scikit-image ships one, else smooth synthetic content."""
    try:
        from skimage import data

        img = Image.fromarray(data.astronaut() if channels == 3 else data.camera())
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    except ImportError:
        yy, xx = np.mgrid[0:size, 0:size] / size
        arr = np.stack([np.sin(6 * xx), np.cos(5 * yy), np.sin(4 * (xx + yy))], -1)[..., :channels]
        img = Image.fromarray(((arr * 0.5 + 0.5) * 255).astype(np.uint8).squeeze())
    img.convert("L" if channels == 1 else "RGB").save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=64)
    ap.add_argument("--photo-size", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--weights-grey")
    ap.add_argument("--weights-rgb")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tune_allocator()
    device = resolve_device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, {args.iters} iterations")
    header = (f"{'image':>16} {'weights':>28} {'tiles':>5} {'CLI s':>7} {'lib s':>7} {'img cs/s':>9} {'CLI cs/s':>9} "
              f"{'lib cs/s':>9} {'step cs/s':>9}  CLI/step  lib/step")
    print(header)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for label, size, channels, given in (("28x28 grey", 28, 1, args.weights_grey),
                                             (f"{args.photo_size}x{args.photo_size} RGB", args.photo_size, 3,
                                              args.weights_rgb)):
            path, name = weights_file(given, channels, tmp)
            src = tmp / f"in{channels}.png"
            test_image(src, size, channels)
            cmd = [sys.executable, "-m", "vitca_cli", "-q", "denoise", str(src), "-o", str(tmp / f"out{channels}.png"),
                   "--weights", path, "--iters", str(args.iters), "--device", args.device, "--overwrite"]
            t = time.perf_counter()
            subprocess.run(cmd, check=True)
            cli = time.perf_counter() - t

            backend = TorchBackend.from_file(path, device)
            cfg = backend.cfg
            pixels = np.asarray(Image.open(src), dtype=np.float32).reshape(size, size, channels) / 255
            # The large photo runs once (its first run is already warm: the CLI run above loaded the same code).
            lib = timed(lambda: restore(backend, pixels, args.iters), args.repeats if size <= 64 else 1)
            grid = (max(size, cfg.image_size[0]) // cfg.patch_size,) * 2 if cfg.size_dependent else (size,) * 2
            plan = plan_tiles(cfg, grid, args.iters, None, MAX_CELLS.get(device.type, MAX_CELLS["cpu"]))
            per_batch = max(1, MAX_CELLS.get(device.type, MAX_CELLS["cpu"]) // (plan.tile[0] * plan.tile[1]))
            batch = min(plan.count, per_batch)
            computed = plan.count * plan.tile[0] * plan.tile[1] * args.iters
            # The model's own step on the largest batch shape the loop runs (what bench/step.py times).
            z = seed_cells(cfg, torch.rand(batch, channels, plan.tile[0] * cfg.patch_size,
                                           plan.tile[1] * cfg.patch_size)).to(device)
            mask = torch.ones(batch, 1, *plan.tile, device=device)
            step = best_time(lambda: (backend.step(z, mask), torch.cuda.synchronize() if device.type == "cuda"
                                      else None), args.repeats)
            step_cps = batch * plan.tile[0] * plan.tile[1] / step
            print(f"{label:>16} {name[:28]:>28} {plan.count:>5} {cli:7.2f} {lib:7.2f} "
                  f"{size * size * args.iters / cli:9.3g} {computed / cli:9.3g} {computed / lib:9.3g} {step_cps:9.3g}"
                  f"  {computed / cli / step_cps:8.2f}  {computed / lib / step_cps:8.2f}")
    print("(cs/s = cell-steps per second; CLI includes process start-up and imports; lib = restore() in-process)")


if __name__ == "__main__":
    main()
