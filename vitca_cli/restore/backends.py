"""The torch backend and the choice of backend for a restore (``make_backend``); the ONNX Runtime one is
``vitca_cli.onnx.backend.OnnxBackend``.

A *backend* is what the restore loop (``vitca_cli.restore.loop.restore``) steps: it has ``.cfg`` (CAConfig),
``.name``, ``.device`` (a description for the log), ``.tensor_device`` (where its tensors live; CPU for ONNX
Runtime) and ``.step(z, update_mask) -> z``; it may also have ``.step_rows(cells, only) -> rows``, the new values of
the updating cells only (the torch backend), ``.prepare(work, settle)``, which picks its step for a job, and
``.kept_keys(cells, max_rows)``, a step of chosen cells that keeps each cell's keys and values (or None).
"""

from __future__ import annotations

import torch

from vitca_cli.errors import SettingError
from vitca_cli.log import log
from vitca_cli.nca.config import CAConfig

PRECISIONS = ("fp32", "bf16", "auto")
COMPILE = ("off", "on", "auto")
FAST_WORK = 8_000_000  # cell-steps from which the auto settings take the fast step (about 0.25 MP at 32 steps)
HEAP_BELOW = 64 << 20  # buffers the allocator keeps for reuse: a call's activations, not a tile's cell grid


class TorchBackend:
    """A ``CellularAutomaton`` run under ``torch.inference_mode``, in one of two ways chosen per image by
    :meth:`prepare`: the *exact* step (eager, fp32) or the *fast* step (the rule's update compiled by
    ``torch.compile`` into fused kernels, with bfloat16 matrix products where the hardware has them; the cells
    carried from step to step stay float32).

    ``precision`` is ``fp32``, ``bf16`` or ``auto`` (bf16 for large jobs on hardware that multiplies bfloat16
    natively); ``compile`` is ``off``, ``on`` or ``auto`` (on for large jobs where a C++ compiler is present).
    A *large* job is one of at least ``FAST_WORK`` cell-steps, where the compiler's start-up (seconds, once per
    process) is repaid; smaller ones keep the exact step, so their bytes do not depend on the CPU.
    """

    def __init__(
        self, model, name: str = "model", meta: dict | None = None, precision: str = "fp32", compile: str = "off"
    ):
        if precision not in PRECISIONS:
            raise SettingError("precision", f"{precision!r}: expected one of {', '.join(PRECISIONS)}")
        if compile not in COMPILE:
            raise SettingError("compile", f"{compile!r}: expected one of {', '.join(COMPILE)}")
        from vitca_cli.runtime import tune_allocator

        tune_allocator(HEAP_BELOW)
        self.model = model.eval()
        self.cfg: CAConfig = model.cfg
        self.name = name
        self.meta = meta or {}
        self.tensor_device = next(model.parameters()).device
        self.precision, self.compile = precision, compile
        self._compiled = None  # the compiled update, made on first use; False once compiling has failed
        self._compiled_bf16 = self._in_process = False  # the precision it was made for; whether torch.compile made it
        if precision == "bf16" and self.tensor_device.type == "cpu":
            from vitca_cli.runtime import cpu_has_native_bf16

            if cpu_has_native_bf16() is False:
                log.warning(
                    "bf16 precision: this CPU has no bfloat16 instructions, so the products are emulated (slow)"
                )
        self.prepare(0)

    @classmethod
    def from_file(
        cls, path, device="cpu", name: str | None = None, precision: str = "fp32", compile: str = "off"
    ) -> "TorchBackend":
        from pathlib import Path

        from vitca_cli.io.checkpoint import load_model

        model, meta = load_model(Path(path), device)
        return cls(model, name or Path(path).stem, meta, precision, compile)

    @property
    def device(self) -> str:
        """The backend as the log describes it: device, and the fast step's parts when it runs."""
        parts = ["compiled"] if self.use_compiled else []
        parts += ["bf16 products"] if self.use_bf16 else []
        return f"torch {self.tensor_device}" + "".join(f", {p}" for p in parts)

    def prepare(self, work: int, settle: float = 0.0) -> None:
        """Choose the step for a job of ``work`` cell-steps (the ``auto`` settings take the fast one when the job is
        large). A job that settles cells (``settle`` > 0) runs float32 products: under bfloat16 a converged cell's
        update stays at the rounding floor of the products (about 10^-3) and never falls below the threshold."""
        from vitca_cli.runtime import cpu_has_native_bf16, has_cxx_compiler

        large = work >= FAST_WORK
        if self.precision == "auto":
            dev = self.tensor_device
            native = torch.cuda.is_bf16_supported() if dev.type == "cuda" else bool(cpu_has_native_bf16())
            self.use_bf16 = large and native
        else:
            self.use_bf16 = self.precision == "bf16"
        if settle > 0 and self.use_bf16:
            if self.precision == "bf16":
                log.info("--settle runs float32 products (bfloat16's rounding keeps settled cells moving)")
            self.use_bf16 = False
        compiler = self.tensor_device.type == "cuda" or has_cxx_compiler()
        wanted = self.compile == "on" or (self.compile == "auto" and large and compiler)
        self.use_compiled = wanted and self._compiled is not False

    def step(self, z: torch.Tensor, update_mask: torch.Tensor) -> torch.Tensor:
        update = self._guarded_update if self.use_compiled else None
        single = self.use_compiled and z.shape[0] == 1  # torch.compile specialises a batch of 1: recompiles
        if single:
            z, update_mask = torch.cat([z, z]), torch.cat([update_mask, torch.zeros_like(update_mask)])
        with torch.inference_mode(), torch.autocast(self.tensor_device.type, torch.bfloat16, enabled=self.use_bf16):
            out = self.model.step(z, update_mask, update=update)
        out = out[:1] if single else out
        return out.float() if self.use_bf16 else out

    def step_rows(self, cells: torch.Tensor, only: torch.Tensor) -> torch.Tensor:
        """One step of the cells at flat indices ``only`` of the grids ``cells`` ``(B, H, W, C)`` (channels last),
        each of them updated: their new values ``(len(only), C)``, float32 (``CellularAutomaton.update_rows``)."""
        update = self._guarded_update if self.use_compiled else None
        if self.use_compiled and cells.shape[0] == 1:  # torch.compile specialises a batch of 1: recompiles
            cells = torch.cat([cells, cells])
        with torch.inference_mode(), torch.autocast(self.tensor_device.type, torch.bfloat16, enabled=self.use_bf16):
            only = only.clone()  # an inference tensor whoever made it: the compiled update guards on which it is
            return self.model.update_rows(cells, only, update=update)

    def kept_keys(self, cells: int, max_rows: int):
        """A ``vitca_cli.nca.kept.KeptKeys`` for ``cells`` cells of a grid, where the exact step runs (not the fast
        one) and the rule keeps keys; else None."""
        from vitca_cli.nca.kept import KeptKeys, keeps_keys

        if self.use_compiled or self.use_bf16 or not keeps_keys(self.model.rule):
            return None
        return KeptKeys(self.model.rule, cells, max_rows, self.tensor_device)

    def _guarded_update(self, *args, **kwargs):
        """The rule's update, compiled on first use (again if the products' precision changes); if compiling
        fails (no C++ compiler, say), the exact step from then on, with a warning.

        In the process (``torch.compile``), the kernels are specialised to the shape of the cells (a run steps
        windows of one shape), and only the count of updating cells (``only``) is dynamic; a later shape that
        differs recompiles with those sizes dynamic (torch's automatic dynamic shapes). Ahead of time, every size
        is dynamic."""
        if self._compiled is None or self._compiled_bf16 != self.use_bf16:
            self._compiled, self._in_process = self._fast_update()
            self._compiled_bf16 = self.use_bf16
        if self._in_process and kwargs.get("only") is not None:
            torch._dynamo.mark_dynamic(kwargs["only"], 0)
        try:
            return self._compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the same maths, eager
            log.warning(f"compiled step unavailable ({type(exc).__name__}); running the exact step")
            self._compiled, self.use_compiled = False, False
            return self.model.rule.update_cells(*args, **kwargs)

    def _fast_update(self):
        """The fast step's update, compiled, and whether ``torch.compile`` compiled it in this process: the rule
        with its embedding folded into the first block's products (``vitca_cli.nca.folded``) where the rule allows
        it, else the rule's own. With ``compile="auto"`` on CPU the folded update comes compiled ahead of time
        (``vitca_cli.restore.aot``: built once per CPU and weights, loaded in milliseconds by later processes)."""
        from vitca_cli.nca.folded import FoldedUpdate, foldable

        rule = self.model.rule
        if not foldable(rule):
            return torch.compile(rule.update_cells), True
        folded = FoldedUpdate(rule)
        ahead = None
        if self.compile == "auto" and self.tensor_device.type == "cpu":
            from vitca_cli.restore import aot

            ahead = aot.fast_step(folded, self.use_bf16)
        folded.compile_with((lambda fn: ahead) if ahead else torch.compile)
        return folded.update_cells, ahead is None


def make_backend(
    weights_spec: str | None,
    backend: str = "torch",
    device: str = "auto",
    channels: int | None = None,
    precision: str = "fp32",
    quantize: bool = False,
    compile: str = "off",
    command: str = "denoise",
):
    """Resolve ``--weights`` (or ``command``'s default for ``channels``) and build a backend on ``device``:
    ``precision`` and ``compile`` for the torch backend (see :class:`TorchBackend`), ``quantize`` (int8 products)
    for the ONNX one."""
    from vitca_cli.io import weights
    from vitca_cli.runtime import resolve_device

    if backend not in ("torch", "onnx"):
        raise SettingError("backend", f"{backend!r}: expected torch or onnx")
    ref = weights.resolve(weights_spec, channels, ".onnx", command) if backend == "onnx" else None
    if ref is None:
        ref = weights.resolve(weights_spec, channels, command=command)
        if ref.path.suffix == ".onnx":  # an ONNX step file runs in ONNX Runtime, whatever --backend said
            log.info(f"{ref.path}: an ONNX step graph, so the ONNX Runtime backend runs it")
            backend = "onnx"
    if quantize and backend != "onnx":
        raise SettingError("quantize", "is for the ONNX backend: add {1} onnx", "backend")
    if backend == "onnx":
        from vitca_cli.onnx import backend as onnx_backend

        if precision == "bf16":
            raise SettingError("precision", "bf16 is for the torch backend; the ONNX one has {1}", "quantize")
        if compile == "on":
            raise SettingError("compile", "on is for the torch backend")
        result = onnx_backend.OnnxBackend.from_file(ref.path, device, quantize=quantize)
    else:
        dev = resolve_device(device)
        result = TorchBackend.from_file(ref.path, dev, ref.name, precision, compile)
    result.name = ref.name
    log.info(f"weights: {ref.name} ({ref.source}: {ref.path}); backend {result.device}")
    return result


def backend_mask_type(backend) -> str:
    """How the model was trained to see missing pixels (``dropout`` or ``noise``), from its checkpoint meta."""
    meta = getattr(backend, "meta", None) or {}
    for value in (
        meta.get("mask_type"),
        (meta.get("masking") or {}).get("type") if isinstance(meta.get("masking"), dict) else None,
        (meta.get("args") or {}).get("mask_type") if isinstance(meta.get("args"), dict) else None,
    ):
        if value in ("dropout", "noise"):
            return value
    return "noise"
