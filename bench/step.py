"""Cell-steps per second of one baseline ViTCA step, against a matmul ceiling and an unfold reference.

For each size it times, in one run: (a) a plain fp32 matrix product with the FLOPs of one step (preallocated
output: the ceiling), (b) a straightforward unfold-based step (``vitca_cli.nca.reference``), (c) our eager step and
(d) our step with the fused (torch.compile) attention and bias kernels, ``use_compiled_kernels()``. It prints
throughput and the ratios the core issue targets
(64×64: ≥ 60% of the ceiling and ≥ 3× unfold; 256×256: ≥ 40% of the ceiling). The machine is shared and noisy:
compare ratios from one run, not absolute figures across runs.

Every step uses the baseline's asynchronous update mask (σ = 0.5). Our step computes the update only for the cells
the mask selects (the queries, attention, output projection, MLP and head of the other half would be discarded);
the ceiling and the unfold reference count and do the dense step's work. For comparison the last column
is our fused step with σ = 1 (every cell updates, so nothing is skipped).

    python bench/step.py [--sizes 28x28x32,64x64x8,256x256x1] [--repeats 5] [--no-compile]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vitca_cli.nca.attention import use_compiled_kernels  # noqa: E402
from vitca_cli.nca.config import preset  # noqa: E402
from vitca_cli.nca.model import CellularAutomaton  # noqa: E402
from vitca_cli.nca.reference import unfold_step  # noqa: E402
from vitca_cli.runtime import tune_allocator  # noqa: E402


def step_flops(cfg) -> int:
    """Multiply-adds ×2 of one step per cell: embedding, qkv, localised attention, output, MLP, head."""
    e, k = cfg.embed, cfg.neighbourhood[0] * cfg.neighbourhood[1]
    return 2 * (
        cfg.cell_channels * e + 3 * e * e + 2 * k * e + e * e + 2 * e * cfg.mlp + e * (cfg.pixel_channels + cfg.hidden)
    )


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="28x28x32,64x64x8,256x256x1", help="HxWxBATCH list")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    tune_allocator()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    header = (
        f"{'size':>12} {'ceiling':>10} {'unfold':>10} {'eager':>10} {'compiled':>10}"
        "  eager/ceil  best/ceil  best/unfold  compiled σ=1/ceil"
    )
    print(header)
    for spec in args.sizes.split(","):
        h, w, b = (int(v) for v in spec.split("x"))
        cfg = preset("fashion-mnist", image_size=(h, w), pos_encoding="vit")
        ca = CellularAutomaton(cfg).eval()
        with torch.no_grad():
            for p in ca.parameters():  # realistic non-zero weights (the head is zero-initialised)
                p.add_(torch.randn_like(p) * 0.05)
        z = ca.seed(torch.rand(b, 1, h, w))
        mask = ca.update_masks(z, 1)[0]
        cells = b * h * w
        flops = step_flops(cfg) * cells
        n = 4096  # ceiling: an (cells·k)×n @ n×n fp32 product, k chosen for the same FLOPs
        m = max(1, round(flops / (2 * n * n)))
        a, bm, out = torch.randn(m, n), torch.randn(n, n), torch.empty(m, n)
        rates = {"ceiling": 2 * m * n * n / flops / best_time(lambda: torch.mm(a, bm, out=out), args.repeats)}
        with torch.inference_mode():
            rates["unfold"] = 1 / best_time(lambda: unfold_step(ca, z, mask), args.repeats)
            rates["eager"] = 1 / best_time(lambda: ca.step(z, mask), args.repeats)
            if not args.no_compile:
                use_compiled_kernels(True)
                rates["compiled"] = 1 / best_time(lambda: ca.step(z, mask), args.repeats)
                every = torch.ones_like(mask)
                rates["dense"] = 1 / best_time(lambda: ca.step(z, every), args.repeats)
                use_compiled_kernels(False)
        cps = {k: v * cells for k, v in rates.items()}
        best = max(cps.get("compiled", 0), cps["eager"])
        cols = " ".join(f"{cps.get(k, float('nan')):10.3g}" for k in ("ceiling", "unfold", "eager", "compiled"))
        print(
            f"{spec:>12} {cols}  {cps['eager'] / cps['ceiling']:10.2f} {best / cps['ceiling']:10.2f}"
            f" {best / cps['unfold']:11.2f} {cps.get('dense', float('nan')) / cps['ceiling']:18.2f}"
        )
    print("(cell-steps/s; ceiling = matmul of the same FLOPs, preallocated output)")


if __name__ == "__main__":
    main()
