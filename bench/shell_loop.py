"""What a shell loop pays per file: start-up beyond the step work, and threads on a core another program holds.

Builds a noisy photo-like image of ``--size`` (default 512×500: the held-out fruits sample upscaled bicubically,
Gaussian σ 0.05), then:
- ``process``: runs ``vitca denoise IN -o OUT --overwrite`` ``--runs`` times, each a fresh process, after one
  run that fills the compile cache (a shell loop's second and later files), and takes each run's wall time and
  the restore's own seconds that its last line reports;
- ``step work``: in one process, the same restore through the Python API twice, with the same settings; the
  second call (model loaded, step compiled) is the step work itself;
- ``import torch``: a fresh ``python -c 'import torch'``, the part of start-up no program that uses torch avoids.
It prints the median of each and what each file of a shell loop pays on top of the step work (interpreter, imports,
weights, compiling or loading the fast step, reading and writing the files): per run, its wall time less the
restore's own seconds, and the median process less the in-process second call (noisier: two processes' speeds).

``--contended``: then, with a busy loop (another Python process) holding a core, the same ``vitca denoise`` run
with the default threads (every usable core) and with ``--threads 1``, ``--runs`` fresh processes each,
alternating, and the ratio of their medians. ``--threads`` is left out of the first part's runs when 0.

    python bench/shell_loop.py [--runs 5] [--size 512x500] [--threads 0] [--contended]

The machine may be shared: compare figures within one run.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "fruits.png"
VITCA = [sys.executable, "-m", "vitca_cli"]

IN_PROCESS = """
import sys, time
from PIL import Image
from vitca_cli import denoise
img = Image.open(sys.argv[1])
kw = dict(seed=0, threads=int(sys.argv[2]) or None)
denoise(img, **kw)
t = time.perf_counter()
denoise(img, **kw)
print(time.perf_counter() - t)
"""


def noisy_photo(size: tuple[int, int]) -> Image.Image:
    img = Image.open(SAMPLE).convert("RGB").resize(size, Image.BICUBIC)
    x = np.asarray(img, np.float32) / 255 + np.random.default_rng(0).normal(0, 0.05, (size[1], size[0], 3))
    return Image.fromarray((np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8))


def wall(cmd: list[str]) -> tuple[float, str, str]:
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    return time.perf_counter() - t, done.stdout, done.stderr


def restore_seconds(log: str) -> float:
    """The restore's own seconds, from the line ``IN -> OUT (…, 12.34s)`` that ``vitca denoise`` ends with."""
    found = re.findall(r", ([0-9.]+)s\)\s*$", log.strip(), flags=re.M)
    if not found:
        raise SystemExit(f"no restore time in the log: {log.strip()[-200:]}")
    return float(found[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", default="512x500", help="W x H (default 512x500, 0.256 MP)")
    ap.add_argument("--threads", type=int, default=0, help="--threads for the start-up runs (0: the default)")
    ap.add_argument("--contended", action="store_true", help="also time runs beside a busy loop holding a core")
    a = ap.parse_args(argv)
    w, h = (int(v) for v in a.size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.png", Path(tmp) / "out.png"
        noisy_photo((w, h)).save(src)
        cli = [*VITCA, "denoise", str(src), "-o", str(out), "--overwrite", "--seed", "0"]
        threads = ["--threads", str(a.threads)] if a.threads else []
        first = wall(cli + threads)[0]
        runs = [wall(cli + threads) for _ in range(a.runs)]
        procs = [r[0] for r in runs]
        beyond = [r[0] - restore_seconds(r[2]) for r in runs]
        steps = [float(wall([sys.executable, "-c", IN_PROCESS, str(src), str(a.threads)])[1]) for _ in range(2)]
        torch_import = [wall([sys.executable, "-c", "import torch"])[0] for _ in range(3)]
        contended = busy_core(cli, a.runs) if a.contended else None
    proc, step = statistics.median(procs), min(steps)
    print(f"{w}×{h} ({w * h / 1e6:.3f} MP), --threads {a.threads or 'default'}, {a.runs} runs")
    print(f"first process (fills the compile cache): {first:.2f} s")
    print(f"process, later runs: median {proc:.2f} s  ({', '.join(f'{v:.2f}' for v in procs)})")
    print(f"step work (second call in one process): {step:.2f} s")
    print(f"import torch alone: median {statistics.median(torch_import):.2f} s")
    print(
        f"beyond the restore's own time, per run: median {statistics.median(beyond):.2f} s "
        f"({', '.join(f'{v:.2f}' for v in beyond)})"
    )
    print(f"process − in-process step work: {proc - step:.2f} s per file")
    if contended:
        default, one = contended
        print(
            f"a busy loop holding a core: default threads median {statistics.median(default):.2f} s "
            f"({', '.join(f'{v:.2f}' for v in default)}), --threads 1 median {statistics.median(one):.2f} s "
            f"({', '.join(f'{v:.2f}' for v in one)})"
        )
        print(f"default ÷ --threads 1: {statistics.median(default) / statistics.median(one):.2f}")


def busy_core(cli: list[str], runs: int) -> tuple[list[float], list[float]]:
    """Wall times of ``cli`` with the default threads and with ``--threads 1``, alternating, beside a busy loop."""
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        default, one = [], []
        for _ in range(runs):
            default.append(wall(cli)[0])
            one.append(wall(cli + ["--threads", "1"])[0])
        return default, one
    finally:
        spin.kill()
        spin.wait()


if __name__ == "__main__":
    main()
