"""Training speed and memory (appendix Table 8 and A.1 style), as ratios measured in one run.

    python bench/train.py                     # batch 32, 28×28, T = 32; fusion/mitosis at 64×64
    python bench/train.py --device cuda       # the same on a GPU
    python bench/train.py --compare-compile   # also: eager vs torch.compile'd step vs fused attention/bias kernels
    python bench/train.py --compare-precision --batch 16 --steps 12 --skip-fm   # also: bf16 autocast vs fp32
    python bench/train.py --ddp [--ddp-iterations 60]   # 1 process × 2 threads against 2 ranks × 1 thread

Targets (issue 3): gradient checkpointing cuts peak memory ≥ 4× for ≤ 2× the iteration time; one training
iteration (forward + backward) costs ≤ 3.5× a no-grad forward rollout of the same T. On CPU each configuration runs
in a fresh subprocess and its peak is the resident-set high-water mark (see training/profiling.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vitca_cli.nca.config import preset  # noqa: E402
from vitca_cli.training.profiling import profile_training  # noqa: E402


def row(name: str, r: dict) -> str:
    return (
        f"{name:<34} fwd {r['forward_ms']:9.1f} ms  bwd {r['backward_ms']:9.1f} ms  "
        f"iter {r['iteration_ms']:9.1f} ms  no-grad {r['nograd_rollout_ms']:8.1f} ms  "
        f"peak {r['peak_bytes'] / 2**20:8.1f} MiB"
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--channels", type=int, default=1, help="1 (FashionMNIST) or 3 (RGB, as appendix Table 8)")
    p.add_argument("--fm-size", type=int, default=64)
    p.add_argument(
        "--fm-batch", type=int, default=None, help="fusion/mitosis batch (default: --batch on GPU, 8 on CPU)"
    )
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--compile",
        choices=("none", "attention", "step"),
        default="attention",
        help="kernel for every configuration [attention: what vitca train uses by default]",
    )
    p.add_argument("--compare-compile", action="store_true", help="also time plain eager/step/attention")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="training precision [fp32]")
    p.add_argument("--compare-precision", action="store_true", help="also time the plain pass in the other precision")
    p.add_argument("--skip-fm", action="store_true")
    p.add_argument("--json", type=Path, help="also write all measurements here")
    p.add_argument(
        "--ddp",
        action="store_true",
        help="only: `vitca train` in 1 process × 2 threads against "
        "--nproc 2 × 1 thread, same global batch (FashionMNIST)",
    )
    p.add_argument("--ddp-iterations", type=int, default=60)
    return p.parse_args()


def main() -> None:
    a = parse_args()
    if a.ddp:
        compare_ddp(a)
        return

    results = {}
    cfg = preset("fashion-mnist", channels=a.channels, image_size=(a.size, a.size))
    compile = None if a.compile == "none" else a.compile
    common = dict(batch=a.batch, height=a.size, width=a.size, steps=a.steps, device=a.device, repeats=a.repeats,
                  compile=compile, precision=a.precision)  # fmt: skip
    print(f"batch {a.batch}, {a.channels}×{a.size}×{a.size}, T = {a.steps}, device {a.device}, "
          f"compile {a.compile}, precision {a.precision}", flush=True)  # fmt: skip
    for mode in ("plain", "checkpointing"):
        results[mode] = r = profile_training(cfg, mode=mode, **common)
        print(row(mode, r), flush=True)
    plain, ckpt = results["plain"], results["checkpointing"]
    print(f"memory method: {plain['memory_method']}, threads {plain['threads']}")
    mem_cut = plain["peak_bytes"] / max(ckpt["peak_bytes"], 1)
    t_ratio = ckpt["iteration_ms"] / plain["iteration_ms"]
    b_ratio = ckpt["backward_ms"] / plain["backward_ms"]
    it_ratio = plain["iteration_ms"] / plain["nograd_rollout_ms"]
    print(f"checkpointing memory cut        {mem_cut:6.2f}×   (target ≥ 4×; paper 6.8×)")
    print(f"checkpointing iteration time    {t_ratio:6.2f}×   (target ≤ 2×); backward {b_ratio:.2f}× (paper 1.6×)")
    print(f"iteration / no-grad rollout     {it_ratio:6.2f}×   (target ≤ 3.5×)")
    results["ratios"] = {"memory_cut": mem_cut, "checkpointing_time": t_ratio, "checkpointing_backward": b_ratio,
                         "iteration_over_nograd": it_ratio}  # fmt: skip

    if a.compare_compile:
        for kind in ("none", "step", "attention"):
            if kind == a.compile:
                continue
            r = profile_training(cfg, mode="plain", **dict(common, compile=None if kind == "none" else kind))
            results[f"compile-{kind}"] = r
            print(row(f"plain, compile {kind}", r), flush=True)
            print(f"  iteration time vs compile {a.compile}: {r['iteration_ms'] / plain['iteration_ms']:6.2f}×")

    if a.compare_precision:
        other = "bf16" if a.precision == "fp32" else "fp32"
        results[f"precision-{other}"] = r = profile_training(cfg, mode="plain", **dict(common, precision=other))
        print(row(f"plain, {other}", r), flush=True)
        fp32, bf16 = (plain, r) if other == "bf16" else (r, plain)
        print(f"bf16 speed-up (fp32 / bf16 iteration time) {fp32['iteration_ms'] / bf16['iteration_ms']:6.2f}×")

    if not a.skip_fm:
        fusion_mitosis(a, common, results)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


def fusion_mitosis(a: argparse.Namespace, common: dict, results: dict) -> None:
    """Plain, checkpointed and fusion/mitosis training at ``--fm-size`` (appendix A.1), added to ``results``."""
    fm_batch = a.fm_batch or (a.batch if a.device.startswith("cuda") else 8)
    fm_cfg = preset("celeba", channels=a.channels, image_size=(a.fm_size, a.fm_size))
    fm_common = dict(common, batch=fm_batch, height=a.fm_size, width=a.fm_size)
    print(f"\nbatch {fm_batch}, {a.channels}×{a.fm_size}×{a.fm_size}, T = {a.steps}", flush=True)
    for mode in ("plain", "checkpointing", "fusion-mitosis"):
        results[f"{mode}@{a.fm_size}"] = r = profile_training(fm_cfg, mode=mode, **fm_common)
        print(row(mode, r), flush=True)
    p64, fm = results[f"plain@{a.fm_size}"], results[f"fusion-mitosis@{a.fm_size}"]
    print(f"fusion/mitosis memory cut       {p64['peak_bytes'] / max(fm['peak_bytes'], 1):6.2f}×   "
          f"(appendix A.1: ~50% reduction, similar to checkpointing)")  # fmt: skip
    print(f"fusion/mitosis iteration time   {fm['iteration_ms'] / p64['iteration_ms']:6.2f}×")


def _rate(run: Path) -> tuple[float, int]:
    """Iterations per second between the first and the last logged iteration (compilation and start-up left out)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"time"' in line]
    first, last = rows[0], rows[-1]
    return (last["iteration"] - first["iteration"]) / (last["time"] - first["time"]), last["iteration"]


def compare_ddp(a) -> None:
    """The same training run as one process with two threads and as two ranks with one thread each."""
    import subprocess
    import tempfile

    common = [
        "train",
        "--dataset",
        "fashion-mnist",
        "--iterations",
        str(a.ddp_iterations),
        "--batch-size",
        str(a.batch),
        "--t-min",
        str(max(1, a.steps // 2)),
        "--t-max",
        str(a.steps),
        "--val-every",
        "0",
        "--log-every",
        "5",
        "--device",
        a.device,
    ]
    runs = {"1 process × 2 threads": ["--threads", "2"], "2 ranks × 1 thread": ["--nproc", "2", "--threads", "1"]}
    print(f"global batch {a.batch}, 28×28, T ~ U{{{max(1, a.steps // 2)}..{a.steps}}}, {a.ddp_iterations} iterations")
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in runs.items():
            out = Path(tmp) / name.split()[0]
            subprocess.run([sys.executable, "-m", "vitca_cli", *common, *extra, "-o", str(out), "-q"], check=True)
            rates[name], _ = _rate(out)
            print(f"{name:<24} {rates[name]:6.2f} it/s  {rates[name] * a.batch:7.1f} samples/s", flush=True)
    one, two = rates.values()
    print(f"2 ranks / 1 process: {two / one:.2f}× the iterations per second")


if __name__ == "__main__":
    main()
