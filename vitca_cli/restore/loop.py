"""Restoring images with a trained CA: backends, masks, padding, and the restore loop over tiles.

The loop is backend-agnostic: a *backend* has ``.cfg`` (CAConfig), ``.name``, ``.device`` (a description for the
log), ``.tensor_device`` (where its tensors live; CPU for ONNX Runtime) and ``.step(z, update_mask) -> z``; it
may also have ``.step_rows(cells, only) -> rows``, the new values of the updating cells only (the torch backend).
Everything random is drawn here, on the CPU, from seeded ``torch.Generator``s, so every backend and device replays
the same run for the same seed.

Update masks are drawn per fixed 64×64 block of *global* cell coordinates, each block from its own generator
seeded by (seed, block row, block column). A tile therefore sees the same masks as the whole image would, which is
what makes tiled output equal untiled output for a size-agnostic model (``vitca_cli.restore.tiles``). Each tile's
rollout runs window by window and may skip settled cells (``vitca_cli.restore.windows``). With fusion (appendix
A.1) the middle steps run on the half-resolution grid, whose masks are drawn alike at its own coordinates; tiles
then start at even cells, so that they fuse as the whole grid does.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from vitca_cli.errors import SettingError
from vitca_cli.log import log
from vitca_cli.nca.config import APPENDIX_A1, CAConfig, FusionSchedule
from vitca_cli.nca.masking import apply_mask, patch_keep_mask
from vitca_cli.nca.rollout import MASK_BLOCK, UpdateMasks
from vitca_cli.restore.defaults import default_iters, fusion_schedule
from vitca_cli.restore.grid import (
    Restored,
    Stepping,
    blended_images,
    draw_phases,
    frame_schedule,
    level_masks,
    padded,
    recorded_steps,
    run_rects,
)
from vitca_cli.restore.grid import hwc_to_tensor as _hwc_to_tensor
from vitca_cli.restore.grid import tensor_to_hwc as _tensor_to_hwc
from vitca_cli.restore.holes import restore_holes
from vitca_cli.restore.tiles import TilePlan, plan_tiles

PRECISIONS = ("fp32", "bf16", "auto")
COMPILE = ("off", "on", "auto")
FAST_WORK = 8_000_000  # cell-steps from which the auto settings take the fast step (about 0.25 MP at 32 steps)
# Cells per backend call: bounds a step's activations; on CPU, two 64×64 windows, whose activations stay in cache
# (bench/denoise.py --call-cells compares).
MAX_CELLS = {"cpu": 1 << 13, "cuda": 1 << 20}
HEAP_BELOW = 64 << 20  # buffers the allocator keeps for reuse: a call's activations, not a tile's cell grid


# ---------------------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------------------
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

    def _guarded_update(self, *args, **kwargs):
        """The rule's update, compiled on first use; if compiling fails (no C++ compiler, say), the exact step
        from then on, with a warning.

        The kernels are specialised to the shape of the cells (a run steps windows of one shape), and only the
        count of updating cells (``only``) is dynamic; a later shape that differs recompiles with those sizes
        dynamic (torch's automatic dynamic shapes). Kernels for fixed sizes run the step 1.1× as fast as kernels
        for any size (``bench/denoise.py``)."""
        if self._compiled is None:
            self._compiled = self._fast_update()
        if kwargs.get("only") is not None:
            torch._dynamo.mark_dynamic(kwargs["only"], 0)
        try:
            return self._compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the same maths, eager
            log.warning(f"compiled step unavailable ({type(exc).__name__}); running the exact step")
            self._compiled, self.use_compiled = False, False
            return self.model.rule.update_cells(*args, **kwargs)

    def _fast_update(self):
        """The fast step's update, compiled: the rule with its embedding folded into the first block's products
        (``vitca_cli.nca.folded``) where the rule allows it, else the rule's own."""
        from vitca_cli.nca.folded import FoldedUpdate, foldable

        rule = self.model.rule
        return FoldedUpdate(rule, torch.compile).update_cells if foldable(rule) else torch.compile(rule.update_cells)


def make_backend(
    weights_spec: str | None,
    backend: str = "torch",
    device: str = "auto",
    channels: int | None = None,
    precision: str = "fp32",
    quantize: bool = False,
    compile: str = "off",
):
    """Resolve ``--weights`` (or the default for ``channels``) and build a backend on ``device``: ``precision`` and
    ``compile`` for the torch backend (see :class:`TorchBackend`), ``quantize`` (int8 products) for the ONNX one."""
    from vitca_cli.io import weights
    from vitca_cli.runtime import resolve_device

    if backend not in ("torch", "onnx"):
        raise SettingError("backend", f"{backend!r}: expected torch or onnx")
    ref = weights.resolve(weights_spec, channels, suffix=".onnx") if backend == "onnx" else None
    if ref is None:
        ref = weights.resolve(weights_spec, channels)
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


# ---------------------------------------------------------------------------------------------------------------------
# Randomness: update masks by global block, corruption
# ---------------------------------------------------------------------------------------------------------------------
def corrupt(image: np.ndarray, prob: float, patch: int, mask_type: str = "noise", seed: int = 0) -> np.ndarray:
    """The paper's masking on a clean ``(H, W, C)`` image: each ``patch``×``patch`` block is dropped with
    probability ``prob`` (zeros, or one N(0,1) value per block). Sizes not divisible by ``patch`` are covered by
    a patch grid cropped at the right and bottom edges."""
    h, w = image.shape[:2]
    gen = torch.Generator().manual_seed(seed)
    keep = patch_keep_mask(1, -(-h // patch) * patch, -(-w // patch) * patch, prob, patch, gen)[..., :h, :w]
    return _tensor_to_hwc(apply_mask(_hwc_to_tensor(image), keep, mask_type, patch, gen))


def damage(image: np.ndarray, mixture, seed: int = 0, mask_type: str = "dropout") -> np.ndarray:
    """Real-world damage (a ``vitca_cli.nca.corruptions`` mixture; one kind drawn) on a clean ``(H, W, C)`` image."""
    from vitca_cli.nca.corruptions import corrupt_batch

    gen = torch.Generator().manual_seed(seed)
    damaged, _, _ = corrupt_batch(_hwc_to_tensor(image), tuple(mixture), gen, mask_type)
    return _tensor_to_hwc(damaged)


def mask_missing(image: np.ndarray, missing: np.ndarray, mask_type: str = "noise", seed: int = 0) -> np.ndarray:
    """Mask the pixels where ``missing`` ``(H, W)`` is True, the way a model was trained (zeros or N(0,1) noise)."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.from_numpy(~np.asarray(missing, dtype=bool)).float()[None, None]
    return _tensor_to_hwc(apply_mask(_hwc_to_tensor(image), keep, mask_type, 1, gen))


# ---------------------------------------------------------------------------------------------------------------------
# The rollout
# ---------------------------------------------------------------------------------------------------------------------
def _check_tile(cfg: CAConfig, tile: int | None) -> int | None:
    """The tile side in pixels → cells (None = automatic, 0 = off), refused where the model's encoding forbids it."""
    if tile is not None and tile > 0:
        if cfg.size_dependent and tile != cfg.image_size[0]:
            raise SettingError(
                "tile",
                f"{tile}: this model's position encoding ties it to "
                f"{cfg.image_size[0]}×{cfg.image_size[1]} tiles; leave {{0}} out",
            )
        return max(1, tile // cfg.patch_size)
    if tile == 0 and cfg.size_dependent:
        raise SettingError(
            "tile", f"0: this model's position encoding ties it to {cfg.image_size[0]}×{cfg.image_size[1]} tiles"
        )
    return tile


def restore(
    backend,
    image: np.ndarray,
    iters: int | None = None,
    update_rate: float | None = None,
    seed: int = 0,
    tile: int | None = None,
    frames: int = 0,
    max_cells: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    known: np.ndarray | None = None,
    settle: float = 0.0,
    fusion: FusionSchedule | bool | None = None,
    runs: int = 1,
    holes_only: bool = True,
) -> Restored:
    """Run the CA on ``image`` ``(H, W, C)`` (C = the model's channels, values as the model expects: masked
    image in [0, 1] plus any noise) for ``iters`` steps and return the output channels. ``iters`` and ``fusion``
    left None are the weights' own (``vitca_cli.restore.defaults``).

    Padding: H and W are padded (edge replicate) to a multiple of the patch size, and for a size-dependent model
    to at least its training size; the result is cropped back. ``tile`` is in pixels (None = automatic, 0 = off).
    ``frames`` > 0 records that many outputs along the way (for animations). ``progress(done, total)`` counts
    tile-steps. ``max_cells`` bounds the cells of one backend call. ``settle`` > 0 stops updating cells whose
    output has settled (see ``vitca_cli.restore.windows``); 0 runs every step on every cell.

    ``known`` ``(H, W)`` (True = the pixel is given; inpainting) is shown to a mask-aware model, and every known
    pixel of the result (and of each frame) is the input's own value: only missing pixels come from the cells.
    With ``holes_only`` (and a ViTCA model free of position encodings) only the cells that can reach a missing
    pixel are computed, crop by crop (``vitca_cli.restore.holes``; ``tile`` does not apply): the same missing
    pixels as the whole grid's computation, at a fraction of the work for a few holes.

    ``fusion`` (a ``FusionSchedule``, or True for appendix A.1's) runs the steps on several levels: e.g. A.1's
    2 steps, the grid fused 2×2, ``iters - 4`` steps at half resolution, mitosis (the input re-injected), 2 steps:
    about a quarter of the cell-steps, for models trained with it. The grid is padded to a multiple of
    2^levels cells for it.

    ``runs`` > 1 averages that many runs, run ``r`` with the update masks of seed ``seed + r`` (so ``runs=2`` at
    seed 0 is the mean of seeds 0 and 1): each run's asynchronous updates leave their own error, and the mean
    cancels part of it, at ``runs`` times the work.
    """
    cfg: CAConfig = backend.cfg
    iters = default_iters(backend) if iters is None else iters
    fusion = fusion_schedule(backend) if fusion is None else APPENDIX_A1 if fusion is True else fusion or None
    if iters < 1:
        raise SettingError("iters", f"must be at least 1, got {iters}")
    if settle < 0:
        raise SettingError("settle", f"must be at least 0, got {settle}")
    if runs < 1:
        raise SettingError("runs", f"must be at least 1, got {runs}")
    if fusion and iters < fusion.outer_steps:
        raise SettingError("iters", f"{iters}: fusion schedule {fusion} needs at least {fusion.outer_steps} steps")
    if fusion and (cfg.size_dependent or cfg.arch != "vitca"):
        raise SettingError("fusion", "needs a ViTCA model without a position encoding tied to its training size")
    h, w, c = image.shape
    if c != cfg.channels:
        raise ValueError(f"image has {c} channels, the model expects {cfg.channels}")
    device = getattr(backend, "tensor_device", torch.device("cpu"))
    max_cells = max_cells or MAX_CELLS.get(torch.device(device).type, MAX_CELLS["cpu"])
    rate = cfg.update_rate if update_rate is None else update_rate
    p = cfg.patch_size
    tile = _check_tile(cfg, tile)
    align = 1 << fusion.levels if fusion else 1
    x, k, (ph, pw) = padded(cfg, image, known, align)
    record = recorded_steps(iters, frames, ph * pw * c * 4)
    stepping = Stepping(settle, tuple(record), max_cells)
    if known is not None and holes_only and cfg.arch == "vitca" and not cfg.size_dependent:
        args = (iters, rate, seed, runs, fusion, stepping, progress)
        result = restore_holes(backend, x, k, (h, w), *args)
        if result is not None:
            return result
    reach = fusion.reach(iters) if fusion else iters  # full-resolution cells a cell's state can come from
    plan = plan_tiles(cfg, (ph // p, pw // p), reach, tile, align=align)
    if plan.count > 1:
        note = "" if plan.exact else ", blended" if cfg.size_dependent else ", approximate beyond the margin cap"
        log.debug(f"tiling {ph}×{pw} px into {plan.count} tiles of {plan.tile[0] * p}×{plan.tile[1] * p} px{note}")

    if hasattr(backend, "prepare"):
        backend.prepare((ph // p) * (pw // p) * iters, settle)
    acc = torch.zeros(len(record) + 1, c, ph, pw)  # running blend for each frame, the final output last
    weight_sum = torch.zeros(1, 1, ph, pw)  # every run adds its weights: the blend is the mean over runs

    th, tw = plan.tile
    # Tiles run together when several fit one call (small size-dependent tiles); large ones one at a time.
    per_batch = max(1, max_cells // (th * tw))
    origins = plan.origins
    batches = [origins[i : i + per_batch] for i in range(0, len(origins), per_batch)]
    done, total, computed, skipped = 0, runs * len(batches) * iters, 0, 0
    for r in range(runs):
        masks = level_masks(seed + r, iters, rate, fusion)
        for batch in batches:
            start = done

            def on_step(t: int, start: int = start) -> None:
                if progress is not None:
                    progress(start + t, total)

            phases = draw_phases(masks, fusion, batch, plan.tile)
            run, outputs = run_rects(backend, x, k, batch, plan.tile, phases, stepping, on_step)
            computed, skipped = computed + run.computed, skipped + run.skipped
            done = start + iters
            if progress is not None and run.steps_run < iters:
                progress(done, total)
            _blend(acc, weight_sum, plan, batch, outputs, p)
    result = blended_images(acc, weight_sum, x, k, (h, w))
    dense = (ph // p) * (pw // p) * iters * runs
    return Restored(result[-1], result[:-1], record, plan, computed, skipped, dense)


def _blend(acc: torch.Tensor, weight_sum: torch.Tensor, plan: TilePlan, batch, outputs, p: int) -> None:
    """Add each tile's outputs, weighted by the plan, into the running blends ``acc`` and their ``weight_sum``."""
    th, tw = plan.tile
    for i, (y, xx) in enumerate(batch):
        wgt = plan.weights(y, xx).repeat_interleave(p, 0).repeat_interleave(p, 1)
        region = (..., slice(y * p, (y + th) * p), slice(xx * p, (xx + tw) * p))
        weight_sum[region] += wgt
        for f, out in enumerate(outputs):
            acc[f][region] += out[i] * wgt


__all__ = [
    "TorchBackend",
    "make_backend",
    "backend_mask_type",
    "UpdateMasks",
    "corrupt",
    "damage",
    "mask_missing",
    "Restored",
    "frame_schedule",
    "restore",
    "MASK_BLOCK",
    "MAX_CELLS",
    "PRECISIONS",
    "COMPILE",
    "FAST_WORK",
]
