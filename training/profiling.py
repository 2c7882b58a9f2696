"""Time and memory of one training iteration (appendix Table 8 and A.1), shared by ``bench/train.py`` and
``vitca profile``.

``profile_training(cfg, batch, height, width, steps, mode, device)`` runs the forward rollout of ``steps`` CA steps
plus the loss, then the backward pass, for ``mode`` in ``plain`` | ``checkpointing`` (⌊T/2⌋ segments) |
``fusion-mitosis``, and a no-grad forward rollout of the same T for comparison.

How peak memory is measured (``memory_method`` in the result):

- CUDA: ``torch.cuda.max_memory_allocated`` during the first forward+backward, minus what was allocated before it
  (model, optimizer-free inputs): the tensors autograd keeps alive and the temporaries of the pass.
- CPU (``rss``): each configuration runs in a fresh Python subprocess. Right before the first forward+backward the
  process resets its resident-set high-water mark (``/proc/self/clear_refs``); the peak is ``VmHWM`` afterwards
  minus ``VmRSS`` at the reset. A fresh process matters: the allocator keeps freed memory resident, so a second
  pass in the same process would reuse it and report almost nothing. This counts real resident pages (activations,
  temporaries, allocator slack), not just live tensors, so it slightly overstates what torch itself holds.
  Where ``clear_refs`` is unavailable (not Linux), ``ru_maxrss`` before/after the pass is used (``ru_maxrss``).

Timings are the median of ``repeats`` passes after that first (memory) pass.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("plain", "checkpointing", "fusion-mitosis")
MODE_LABELS = {
    "plain": "no checkpointing",
    "checkpointing": "checkpointing (T/2 segments)",
    "fusion-mitosis": "fusion + mitosis",
}


def _rss_reset() -> tuple[int, str]:
    """Reset the high-water mark and return (current RSS bytes, method)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status("VmRSS"), "rss"
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"


def _rss_peak(method: str) -> int:
    if method == "rss":
        return _proc_status("VmHWM")
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def _measure(cfg_dict: dict, batch: int, height: int, width: int, steps: int, mode: str, device: str,
             repeats: int, compile: str | None, seed: int, precision: str = "fp32") -> dict:  # fmt: skip
    """Run the measurement in this process (called in a fresh subprocess on CPU)."""
    import torch

    from vitca_cli.nca.attention import use_compiled_kernels
    from vitca_cli.nca.config import CAConfig
    from vitca_cli.nca.model import CellularAutomaton
    from vitca_cli.runtime import tune_allocator

    tune_allocator()
    torch.manual_seed(seed)
    dev = torch.device(device)
    cfg = CAConfig.from_dict(cfg_dict)
    ca = CellularAutomaton(cfg).to(dev)
    if cfg.arch == "vitca":  # a non-zero head, so the grid evolves as in a trained model
        torch.nn.init.normal_(ca.rule.head[1].weight, std=0.02)
    if compile == "step":
        ca.step = torch.compile(ca.step)
    elif compile == "attention":
        use_compiled_kernels(True)
    try:
        return _passes(ca, cfg, batch, height, width, steps, mode, dev, repeats, compile, seed, precision)
    finally:
        if compile == "attention":
            use_compiled_kernels(False)


def _passes(ca, cfg, batch, height, width, steps, mode, dev, repeats, compile, seed, precision) -> dict:
    import torch

    from vitca_cli.training.config import TrainConfig
    from vitca_cli.training.step import ca_loss, rollout

    tcfg = TrainConfig(checkpointing=mode == "checkpointing", fusion_mitosis=mode == "fusion-mitosis",
                       t_min=steps, t_max=steps, precision=precision)  # fmt: skip
    x = torch.rand(batch, cfg.channels, height, width, device=dev)
    z0 = ca.seed(x)
    gen = torch.Generator(dev).manual_seed(seed)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def one_pass():
        ca.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        z = rollout(ca, z0, steps, tcfg, gen)
        loss = ca_loss(ca, z, x, 100.0, 100.0)[0]
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        del z, loss
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3

    # Initialise every code path (autograd engine, checkpoint machinery, kernels) on a batch of one and two steps,
    # so the memory pass below counts the pass itself, not one-time set-up; compile outside the measured passes.
    # With compile, two small batch sizes let torch.compile generalise to a dynamic batch before the memory pass
    # (a compile inside it would count the compiler's memory); a recompile for the full batch may still happen.
    for b in (1, 2) if compile else (1,):
        ca.zero_grad(set_to_none=True)
        ca_loss(ca, rollout(ca, z0[:b], max(4, steps // 8), tcfg, gen), x[:b], 1.0, 1.0)[0].backward()
        if compile:
            with torch.no_grad():
                ca(z0[:b], 2, generator=gen)
    # First pass: memory.
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base, method = torch.cuda.memory_allocated(dev), "cuda_max_memory_allocated"
        one_pass()
        peak = torch.cuda.max_memory_allocated(dev) - base
    else:
        base, method = _rss_reset()
        one_pass()
        peak = _rss_peak(method) - base
    fwd, bwd = zip(*(one_pass() for _ in range(repeats)))
    with torch.no_grad():
        nograd = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            ca(z0, steps, generator=gen)
            sync()
            nograd.append((time.perf_counter() - t0) * 1e3)
    return {
        "mode": mode, "batch": batch, "height": height, "width": width, "steps": steps, "device": str(dev),
        "compile": compile or "none", "precision": precision,
        "forward_ms": statistics.median(fwd), "backward_ms": statistics.median(bwd),
        "iteration_ms": statistics.median(f + b for f, b in zip(fwd, bwd)),
        "nograd_rollout_ms": statistics.median(nograd),
        "peak_bytes": int(peak), "memory_method": method, "threads": torch.get_num_threads(),
    }  # fmt: skip


def profile_training(
    cfg,
    batch: int = 32,
    height: int = 28,
    width: int = 28,
    steps: int = 32,
    mode: str = "plain",
    device: str = "cpu",
    repeats: int = 3,
    compile: str | None = None,
    seed: int = 0,
    isolate: bool | None = None,
    precision: str = "fp32",
) -> dict:
    """Forward ms, backward ms, iteration (forward + backward) ms, peak memory bytes of one training pass, and the
    no-grad forward rollout ms for the same T. ``cfg`` is a ``CAConfig``; ``compile`` is None, ``"step"``
    (torch.compile of the CA step) or ``"attention"`` (the fused attention and bias kernels); ``precision`` is the
    training precision (``fp32`` | ``bf16``, see ``training.step.rollout``). On CPU each call runs in a fresh
    subprocess (``isolate``, default on for CPU) so its memory peak is honest; see the module docstring."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "fusion-mitosis" and (height % 2 or width % 2 or steps < 4):
        raise ValueError("fusion-mitosis needs an even height and width and at least 4 steps")
    args = dict(cfg_dict=cfg.to_dict(), batch=batch, height=height, width=width, steps=steps, mode=mode,
                device=str(device), repeats=repeats, compile=compile, seed=seed, precision=precision)  # fmt: skip
    if isolate is None:
        isolate = str(device).startswith("cpu")
    if not isolate:
        return _measure(**args)
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "vitca_cli.training.profiling", json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"profiling subprocess failed ({mode}, {batch}×{height}×{width}, T={steps}): {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_profile(results: list[dict]) -> str:
    """Appendix Table 8's layout: one row per training mode, plus the ratios against the plain rollout."""
    from vitca_cli.tables import format_table

    r0 = results[0]
    header = ("mode", "forward ms", "backward ms", "iteration ms", "no-grad ms", "peak memory")
    rows = [
        (
            MODE_LABELS[r["mode"]],
            f"{r['forward_ms']:.0f}",
            f"{r['backward_ms']:.0f}",
            f"{r['iteration_ms']:.0f}",
            f"{r['nograd_rollout_ms']:.0f}",
            f"{r['peak_bytes'] / 2**20:.0f} MiB",
        )
        for r in results
    ]
    lines = [
        f"one training pass: batch {r0['batch']} × {r0['height']}×{r0['width']}, T = {r0['steps']} steps, "
        f"device {r0['device']} ({r0['threads']} threads), compile {r0['compile']}, "
        f"memory via {r0['memory_method']}"
    ]
    lines.append(format_table(header, rows))
    plain = next((r for r in results if r["mode"] == "plain"), None)
    if plain:
        for r in results:
            if r is not plain and plain["peak_bytes"] > 0 and plain["backward_ms"] > 0:
                lines.append(
                    f"{MODE_LABELS[r['mode']]}: memory ×{r['peak_bytes'] / plain['peak_bytes']:.2f}, "
                    f"backward ×{r['backward_ms'] / plain['backward_ms']:.2f} vs no checkpointing"
                )
    return "\n".join(lines)


if __name__ == "__main__":  # the subprocess side of profile_training
    print(json.dumps(_measure(**json.loads(sys.argv[1]))))
