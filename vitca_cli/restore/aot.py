"""The fast step compiled ahead of time: built once per CPU, torch version and weights, loaded in milliseconds.

``torch.compile`` pays its start-up in every process, even with its kernels cached on disk: importing the compiler
and tracing the step take seconds, which a shell loop (``for f in *.jpg; do vitca denoise "$f"; done``) pays per
file. AOTInductor instead exports the folded update (:meth:`vitca_cli.nca.folded.FoldedUpdate.folded`) with
dynamic sizes (images in a call, window height and width, updating cells) and compiles it into a shared library,
packaged under vitca's cache folder (``<home>/aot/``); a later process loads that library through torch's C++
loader without importing the compiler. The package is keyed by what its code depends on: the torch version, the
CPU (model name and instruction-set flags), the products' precision, and the folded weights themselves.

Building takes about a minute (once); if it fails for any reason, the caller compiles in the process as before,
and a ``.failed`` file beside the package's place keeps later processes from trying again (delete it to retry).
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path
from typing import Callable

import torch

from vitca_cli.log import log

FORMAT = 1  # bump when the exported computation changes, so older packages are not loaded
CPU_FLAGS = (
    "sse4_2 avx avx2 fma f16c avx512f avx512bw avx512dq avx512vl avx512_vnni avx512_bf16 avx512_fp16 "
    "avx_vnni amx_tile amx_bf16 amx_int8 asimd sve"
).split()


def cpu_identity() -> str:
    """The CPU as the generated code depends on it: machine, model name and the vector instruction flags."""
    name, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not name:
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return f"{platform.machine()}|{name}|{' '.join(f for f in CPU_FLAGS if f in flags)}"


def package_path(module: torch.nn.Module, bf16: bool) -> Path:
    """Where the package for ``module`` (a ``FoldedUpdate``) at this precision lives in vitca's cache folder."""
    from vitca_cli.io.weights import home_dir

    digest = hashlib.sha256(f"{FORMAT}|{torch.__version__}|{cpu_identity()}|bf16={bf16}".encode())
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return home_dir() / "aot" / f"step-{digest.hexdigest()[:24]}.pt2"


def fast_step(module: torch.nn.Module, bf16: bool) -> Callable | None:
    """``module.folded`` (cells, only, neighbours) -> updates, from this CPU's package (built now if missing), or
    None where packages cannot be built or loaded here."""
    if not hasattr(torch._C, "_aoti"):
        return None
    path = package_path(module, bf16)
    failed = path.with_suffix(".failed")  # a build that failed here once is not tried again in every process
    if failed.exists():
        log.debug(f"fast step: {failed} says building failed here; compiling in the process")
        return None
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _build(module, bf16, path)
        except Exception as exc:  # noqa: BLE001 - any export or compiler failure: the in-process compiler instead
            log.warning(f"ahead-of-time step unavailable ({type(exc).__name__}); compiling in the process")
            try:
                failed.write_text(f"{type(exc).__name__}: {exc}\n")
            except OSError:
                pass
            return None
    try:
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign package: drop it, build again next time
        log.warning(f"{path}: unreadable ahead-of-time step ({type(exc).__name__}); compiling in process")
        path.unlink(missing_ok=True)
        return None
    log.debug(f"fast step: {path}")

    def run(cells: torch.Tensor, only: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        return loader.run([cells.contiguous(), only.contiguous(), neighbours.contiguous()])[0]

    return run


class _Exported(torch.nn.Module):
    def __init__(self, module: torch.nn.Module, bf16: bool):
        super().__init__()
        self.module, self.bf16 = module, bf16

    def forward(self, cells, only, neighbours):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self.module.folded(cells, only, neighbours)


def _build(module: torch.nn.Module, bf16: bool, path: Path) -> None:
    """Export ``module.folded`` with dynamic sizes, compile it with AOTInductor and write the package atomically."""
    import torch._inductor
    from torch.export import Dim

    from vitca_cli.nca.folded import neighbour_table

    log.info("compiling the fast step for this CPU (once for these weights; about a minute)")
    cfg = module.rule.cfg
    b, h, w = 2, 9, 11
    cells = torch.rand(b, h, w, cfg.cell_channels)
    only = torch.arange(0, b * h * w, 3)
    neighbours = neighbour_table(b, h, w, cfg.neighbourhood)
    sizes = {
        "cells": {0: Dim("images", min=1, max=1 << 16), 1: Dim("height", min=1), 2: Dim("width", min=1)},
        "only": {0: Dim("rows", min=1)},
        "neighbours": {0: Dim.AUTO},
    }
    with torch.no_grad():
        exported = torch.export.export(_Exported(module, bf16).eval(), (cells, only, neighbours), dynamic_shapes=sizes)
        partial = path.with_name(f".partial-{os.getpid()}-{path.name}")
        try:
            torch._inductor.aoti_compile_and_package(exported, package_path=str(partial))
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
