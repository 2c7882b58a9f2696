"""Cell-steps per second of the exported step in ONNX Runtime (CPU) against the torch eager step, in one run.

The baseline ViTCA (fashion-mnist preset, 3×3 window) is exported with ``vitca_cli.onnx.export`` and run through
``OnnxBackend.step`` (the path ``vitca denoise --backend onnx`` takes, IO binding included), with one intra-op
thread per core; torch runs ``CellularAutomaton.step`` under ``inference_mode`` with the same thread count. Each
size runs ``--repeats`` rounds; in a round each backend runs a burst of consecutive steps, as in a denoising
loop, after a pause that lets the other backend's threads go idle, and the best step time of each is kept (the
machine is shared and noisy: compare the ratios of one run, not absolute figures across runs). Alternating
single steps instead would be unfair: ONNX Runtime's worker threads keep spinning for a while after a run and
slow down a torch step that follows at once. Target: ratio ≥ 1 at both sizes.

Thread counts: one per core (the target) and one (a per-core comparison that is less sensitive to other jobs
on a shared machine; torch's OpenMP threads slow down more than ONNX Runtime's when cores are oversubscribed).

``--profile`` adds ONNX Runtime's per-operator profile of the largest size (where the time goes in the graph);
``--exporters dynamo,torchscript`` compares the graphs of both exporters.

    python bench/onnx_step.py [--sizes 64x64x8,256x256x1] [--repeats 5] [--exporters dynamo] [--profile]
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import torch

from vitca_cli.nca.config import preset
from vitca_cli.nca.model import CellularAutomaton, seed_cells
from vitca_cli.onnx.backend import OnnxBackend
from vitca_cli.onnx.export import export_step
from vitca_cli.onnx.format import DYNAMIC_AXES, OUTPUT
from vitca_cli.onnx.session import cpu_threads, session_options
from vitca_cli.runtime import tune_allocator

BURST = 3  # consecutive steps per backend and round
PAUSE_S = 0.5  # idle time before each burst: the other backend's spinning threads go quiet


def realistic_model(seed: int = 0) -> CellularAutomaton:
    """Default initialisation with a small random head (a trained model's head is not zero)."""
    torch.manual_seed(seed)
    ca = CellularAutomaton(preset("fashion-mnist")).eval()
    with torch.no_grad():
        ca.rule.head[1].weight.normal_(0, 0.005)
    return ca


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]


def profile(path: Path, z: torch.Tensor, mask: torch.Tensor, threads: int, runs: int = 3) -> None:
    """Print the share of ONNX Runtime kernel time per operator type and the top nodes."""
    import onnxruntime as ort

    options = session_options(threads, dict(zip(DYNAMIC_AXES, (z.shape[0], *z.shape[2:]))))
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {"cells": z.permute(0, 2, 3, 1).contiguous().numpy(), "update_mask": mask.permute(0, 2, 3, 1).numpy()}
    for _ in range(runs):
        session.run([OUTPUT], feeds)
    trace = Path(session.end_profiling())
    by_type, by_node = collections.Counter(), collections.Counter()
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_type[event["args"]["op_name"]] += event["dur"]
            by_node[event["name"][: -len("_kernel_time")]] += event["dur"]
    trace.unlink()
    total = sum(by_type.values()) or 1
    print(f"  ORT profile ({total / runs / 1000:.0f} ms of kernels per step):")
    print("   ", ", ".join(f"{op} {t / total:.0%}" for op, t in by_type.most_common(10)))
    print("    top nodes:", ", ".join(f"{n} {t / total:.0%}" for n, t in by_node.most_common(14)))


def time_size(ca: CellularAutomaton, backends: dict, h: int, w: int, b: int, repeats: int) -> None:
    """Best-of-``repeats`` step time of torch eager and each ONNX backend on an ``h×w×b`` grid, alternating."""
    cfg = ca.cfg
    gen = torch.Generator().manual_seed(0)
    z = seed_cells(cfg, torch.rand(b, cfg.channels, h * cfg.patch_size, w * cfg.patch_size, generator=gen))
    mask = ca.update_masks(z, 1, generator=gen)[0]
    runners = {"torch eager": lambda: ca.step(z, mask)}
    runners.update({f"onnx {name}": (lambda be=be: be.step(z, mask)) for name, be in backends.items()})
    best = {name: float("inf") for name in runners}
    with torch.inference_mode():
        for fn in runners.values():  # warm-up
            fn()
        for _ in range(repeats):
            for name, fn in runners.items():
                time.sleep(PAUSE_S)
                for _ in range(BURST):
                    t0 = time.perf_counter()
                    fn()
                    best[name] = min(best[name], time.perf_counter() - t0)
    base = best["torch eager"]
    print(f"  {h}×{w}×{b}:")
    for name, t in best.items():
        ratio = "" if name == "torch eager" else f"  ratio vs torch eager {base / t:.2f}"
        print(f"    {name:18s} {t * 1000:8.1f} ms/step  {b * h * w / t / 1e6:6.3f} M cell-steps/s{ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64x64x8,256x256x1", help="HxWxB grids (cells)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", default="0,1", help="comma-separated intra-op thread counts; 0 = one per core")
    parser.add_argument("--exporters", default="dynamo", help="comma-separated: dynamo, torchscript")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    tune_allocator()
    thread_counts = [int(t) or cpu_threads() for t in args.threads.split(",")]
    ca = realistic_model()
    cfg = ca.cfg
    tmp = Path(tempfile.mkdtemp(prefix="vitca-bench-onnx-"))
    for exporter in args.exporters.split(","):
        t0 = time.perf_counter()
        info = export_step(ca, tmp / f"step-{exporter}.onnx", exporter=exporter)
        print(f"export ({exporter}): {info['bytes'] / 1024:.0f} KB in {time.perf_counter() - t0:.1f} s")

    for threads in thread_counts:
        torch.set_num_threads(threads)
        backends = {
            exporter: OnnxBackend.from_file(tmp / f"step-{exporter}.onnx", "cpu", threads)
            for exporter in args.exporters.split(",")
        }
        print(
            f"torch {torch.__version__} and onnxruntime, {threads} thread(s); "
            f"best of {args.repeats} rounds of {BURST}-step bursts"
        )
        for h, w, b in parse_sizes(args.sizes):
            time_size(ca, backends, h, w, b, args.repeats)
    if args.profile:
        h, w, b = parse_sizes(args.sizes)[-1]
        z = seed_cells(cfg, torch.rand(b, cfg.channels, h * cfg.patch_size, w * cfg.patch_size))
        for exporter in args.exporters.split(","):
            print(f"{exporter} graph at {h}×{w}×{b}:")
            profile(tmp / f"step-{exporter}.onnx", z, torch.ones(b, 1, h, w), thread_counts[0])
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()


if __name__ == "__main__":
    main()
