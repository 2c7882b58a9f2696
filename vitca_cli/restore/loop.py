"""Restoring images with a trained CA: backends, padding, tiling with seamless blending, the rollout loop.

The loop is backend-agnostic: a *backend* has ``.cfg`` (CAConfig), ``.name``, ``.device`` (a description for the
log), ``.tensor_device`` (where its tensors live; CPU for ONNX Runtime) and ``.step(z, update_mask) -> z``.
Everything random is drawn here, on the CPU, from seeded ``torch.Generator``s, so every backend and device replays
the same run for the same seed.

Update masks are drawn per fixed 64×64 block of *global* cell coordinates, each block from its own generator
seeded by (seed, block row, block column). A tile therefore sees the same masks as the whole image would, which is
what makes tiled output equal untiled output for a size-agnostic model.

Tiling (all sizes in cells; a cell holds P×P pixels):
- Size-dependent models (a position encoding tied to ``cfg.image_size``) run on tiles of exactly the training size;
  neighbouring tiles overlap by a quarter tile and are blended with linear ramps, so there are no seams.
- Size-agnostic models run untiled when the grid fits ``max_cells``; larger grids use tiles with a *margin* of
  ``iters · (NH//2)`` cells on every side that borders another tile. A cell's state after T steps depends only on
  cells within T·(NH//2) of it, so the zero-padded "ghost" neighbours at a tile's artificial edge never reach the
  blended part: tiled output equals untiled output up to float rounding (tested at 1e-5). The margin is capped at
  ``MAX_MARGIN`` cells (beyond ~128 iterations), where tiling becomes a close approximation; the log says so.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from vitca_cli.nca.config import CAConfig
from vitca_cli.errors import UsageError
from vitca_cli.log import log
from vitca_cli.nca.masking import apply_mask, patch_keep_mask
from vitca_cli.nca.model import draw_update_mask, output_image, seed_cells

MASK_BLOCK = 64  # cells per side of one update-mask block
MAX_MARGIN = 128  # cells; beyond this the exact tiling margin costs more than it is worth
BLEND_BAND = 8  # cells over which size-agnostic tiles cross-fade (beyond the margin)
AUTO_TILE = 256  # cells: tile side for size-agnostic models on large images (grown to fit the margin)
MAX_CELLS = {"cpu": 1 << 16, "cuda": 1 << 20}  # cells per batch of tiles: bounds memory (~8 KB per cell)
MAX_FRAME_BYTES = 512 << 20  # animation frames held in memory


# ---------------------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------------------
class TorchBackend:
    """A ``CellularAutomaton`` run eagerly under ``torch.inference_mode``."""

    def __init__(self, model, name: str = "model", meta: dict | None = None):
        from vitca_cli.runtime import tune_allocator

        tune_allocator()  # the rollout reallocates the same large activations every step
        self.model = model.eval()
        self.cfg: CAConfig = model.cfg
        self.name = name
        self.meta = meta or {}
        self.tensor_device = next(model.parameters()).device
        self.device = f"torch {self.tensor_device}"

    @classmethod
    def from_file(cls, path, device="cpu", name: str | None = None) -> "TorchBackend":
        from pathlib import Path

        from vitca_cli.io.checkpoint import load_model

        model, meta = load_model(Path(path), device)
        return cls(model, name or Path(path).stem, meta)

    def step(self, z: torch.Tensor, update_mask: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.step(z, update_mask)


def make_backend(weights_spec: str | None, backend: str = "torch", device: str = "auto", channels: int | None = None):
    """Resolve ``--weights`` (or the default for ``channels``) and build a backend on ``device``."""
    from vitca_cli.io import weights
    from vitca_cli.runtime import resolve_device

    if backend not in ("torch", "onnx"):
        raise UsageError(f"--backend {backend!r}: expected torch or onnx")
    ref = weights.resolve(weights_spec, channels, suffix=".onnx") if backend == "onnx" else None
    if ref is None:
        ref = weights.resolve(weights_spec, channels)
        if ref.path.suffix == ".onnx":  # an ONNX step file runs in ONNX Runtime, whatever --backend said
            log.info(f"{ref.path}: an ONNX step graph, so the ONNX Runtime backend runs it")
            backend = "onnx"
    if backend == "onnx":
        from vitca_cli.onnx import backend as onnx_backend

        result = onnx_backend.OnnxBackend.from_file(ref.path, device)
    else:
        dev = resolve_device(device)
        result = TorchBackend.from_file(ref.path, dev, ref.name)
    result.name = ref.name
    log.info(f"weights: {ref.name} ({ref.source}: {ref.path}); backend {result.device}")
    return result


def backend_mask_type(backend) -> str:
    """How the model was trained to see missing pixels (``dropout`` or ``noise``), from its checkpoint meta."""
    meta = getattr(backend, "meta", None) or {}
    for value in (meta.get("mask_type"), (meta.get("masking") or {}).get("type") if isinstance(
            meta.get("masking"), dict) else None, (meta.get("args") or {}).get("mask_type") if isinstance(
            meta.get("args"), dict) else None):
        if value in ("dropout", "noise"):
            return value
    return "noise"


# ---------------------------------------------------------------------------------------------------------------------
# Randomness: update masks by global block, corruption
# ---------------------------------------------------------------------------------------------------------------------
def _block_seed(seed: int, by: int, bx: int) -> int:
    digest = hashlib.blake2b(f"vitca:{seed}:{by}:{bx}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class UpdateMasks:
    """Per-step update masks for any window of the global cell grid, reproducible for a seed."""

    def __init__(self, seed: int, steps: int, rate: float, cache_blocks: int = 256):
        self.seed, self.steps, self.rate = seed, steps, rate
        self._block = functools.lru_cache(maxsize=cache_blocks)(self._draw_block)

    def _draw_block(self, by: int, bx: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(_block_seed(self.seed, by, bx))
        return draw_update_mask(self.steps, MASK_BLOCK, MASK_BLOCK, self.rate, gen).bool()  # (T, 1, S, S)

    def window(self, y0: int, x0: int, h: int, w: int) -> torch.Tensor:
        """Masks ``(T, 1, h, w)`` (bool) for cells [y0, y0+h) × [x0, x0+w)."""
        out = torch.empty(self.steps, 1, h, w, dtype=torch.bool)
        for by in range(y0 // MASK_BLOCK, (y0 + h - 1) // MASK_BLOCK + 1):
            for bx in range(x0 // MASK_BLOCK, (x0 + w - 1) // MASK_BLOCK + 1):
                top, left = by * MASK_BLOCK, bx * MASK_BLOCK
                ys, ye = max(y0, top), min(y0 + h, top + MASK_BLOCK)
                xs, xe = max(x0, left), min(x0 + w, left + MASK_BLOCK)
                out[..., ys - y0 : ye - y0, xs - x0 : xe - x0] = self._block(by, bx)[
                    ..., ys - top : ye - top, xs - left : xe - left
                ]
        return out


def _hwc_to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]


def _tensor_to_hwc(x: torch.Tensor) -> np.ndarray:
    return x[0].permute(1, 2, 0).contiguous().numpy()


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
# Tiling
# ---------------------------------------------------------------------------------------------------------------------
def step_radius(cfg: CAConfig) -> int:
    """How many cells one step's information can travel: NH//2 for ViTCA; for UNetCA its pooling reach
    (an approximation: max-pooling windows also depend on the tile's alignment)."""
    if cfg.arch == "vitca":
        return max(cfg.neighbourhood) // 2
    return 2 ** (cfg.unet_octaves + 1)


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles go on a cell grid of ``grid`` = (gh, gw) cells: tile size ``tile``, origins ``ys`` × ``xs``,
    and per axis the ``margin`` (weight 0) and ``band`` (linear ramp) at edges that border another tile."""

    grid: tuple[int, int]
    tile: tuple[int, int]
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    margin: int = 0
    band: int = 0
    exact: bool = True

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def origins(self) -> list[tuple[int, int]]:
        return [(y, x) for y in self.ys for x in self.xs]

    def weights(self, y0: int, x0: int) -> torch.Tensor:
        """Blending weights ``(th, tw)`` of the tile at (y0, x0)."""
        wy = _axis_weights(self.tile[0], self.margin, self.band, y0 > 0, y0 + self.tile[0] < self.grid[0])
        wx = _axis_weights(self.tile[1], self.margin, self.band, x0 > 0, x0 + self.tile[1] < self.grid[1])
        return wy[:, None] * wx[None, :]


def _axis_weights(size: int, margin: int, band: int, ramp_start: bool, ramp_end: bool) -> torch.Tensor:
    i = torch.arange(size, dtype=torch.float32)
    ramp = ((i - margin + 1) / (band + 1)).clamp(0, 1)  # 0 inside the margin, then rising to 1 over the band
    w = torch.ones(size)
    if ramp_start:
        w = torch.minimum(w, ramp)
    if ramp_end:
        w = torch.minimum(w, ramp.flip(0))
    return w


def _axis_origins(length: int, tile: int, stride: int) -> tuple[int, ...]:
    if length <= tile:
        return (0,)
    origins = list(range(0, length - tile, stride))
    return tuple(origins + [length - tile])  # the last tile sits flush with the far edge


def plan_tiles(
    cfg: CAConfig, grid: tuple[int, int], iters: int, tile: int | None = None, max_cells: int = MAX_CELLS["cpu"]
) -> TilePlan:
    """Choose tiles for a grid of ``grid`` cells (already padded to at least the training size for a
    size-dependent model). ``tile``: None = automatic, 0 = never tile, N = tile side in cells."""
    gh, gw = grid
    if cfg.size_dependent:
        th, tw = (s // cfg.patch_size for s in cfg.image_size)
        band_y, band_x = max(1, th // 4), max(1, tw // 4)
        band = min(band_y, band_x)
        ys = _axis_origins(gh, th, th - band)
        xs = _axis_origins(gw, tw, tw - band)
        return TilePlan(grid, (th, tw), ys, xs, 0, band, exact=False)
    if tile == 0 or (tile is None and gh * gw <= max_cells):
        return TilePlan(grid, (gh, gw), (0,), (0,))
    want = iters * step_radius(cfg)
    margin = min(want, MAX_MARGIN)
    side = tile if tile is not None else max(AUTO_TILE, 2 * margin + BLEND_BAND + AUTO_TILE // 2)
    side = max(side, 2 * margin + BLEND_BAND + 1)  # room for at least one blended cell per tile
    th, tw = min(side, gh), min(side, gw)
    stride = side - 2 * margin - BLEND_BAND
    exact = margin >= want and cfg.arch == "vitca"
    return TilePlan(grid, (th, tw), _axis_origins(gh, th, stride), _axis_origins(gw, tw, stride), margin,
                    BLEND_BAND, exact)


# ---------------------------------------------------------------------------------------------------------------------
# The rollout
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Restored:
    """The restored image ``(H, W, C)`` (not clipped), animation frames (output after each recorded step),
    the steps they were taken at, and the tile plan used."""

    image: np.ndarray
    frames: list[np.ndarray] = field(default_factory=list)
    frame_steps: list[int] = field(default_factory=list)
    plan: TilePlan | None = None


def frame_schedule(iters: int, frames: int) -> list[int]:
    """The steps (1..iters) at which to record ``frames`` evenly spaced frames; the last is always ``iters``."""
    if frames <= 0:
        return []
    frames = min(frames, iters)
    return sorted({max(1, round(iters * (k + 1) / frames)) for k in range(frames)})


def restore(
    backend,
    image: np.ndarray,
    iters: int = 64,
    update_rate: float | None = None,
    seed: int = 0,
    tile: int | None = None,
    frames: int = 0,
    max_cells: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    known: np.ndarray | None = None,
) -> Restored:
    """Run the CA on ``image`` ``(H, W, C)`` (C = the model's channels, values as the model expects: masked
    image in [0, 1] plus any noise) for ``iters`` steps and return the output channels.

    Padding: H and W are padded (edge replicate) to a multiple of the patch size, and for a size-dependent model
    to at least its training size; the result is cropped back. ``tile`` is in pixels (None = automatic, 0 = off).
    ``frames`` > 0 records that many outputs along the way (for animations). ``progress(done, total)`` is called
    after every step of every batch of tiles.

    ``known`` ``(H, W)`` (True = the pixel is given; inpainting) is shown to a mask-aware model, and every known
    pixel of the result (and of each frame) is the input's own value: only missing pixels come from the cells.
    """
    cfg: CAConfig = backend.cfg
    if iters < 1:
        raise UsageError(f"--iters must be at least 1, got {iters}")
    h, w, c = image.shape
    if c != cfg.channels:
        raise ValueError(f"image has {c} channels, the model expects {cfg.channels}")
    device = getattr(backend, "tensor_device", torch.device("cpu"))
    device_type = torch.device(device).type
    max_cells = max_cells or MAX_CELLS.get(device_type, MAX_CELLS["cpu"])
    rate = cfg.update_rate if update_rate is None else update_rate
    p = cfg.patch_size
    if tile is not None and tile > 0:
        if cfg.size_dependent and tile != cfg.image_size[0]:
            raise UsageError(
                f"--tile {tile}: this model's position encoding ties it to {cfg.image_size[0]}×{cfg.image_size[1]} "
                f"tiles; leave --tile out"
            )
        tile = max(1, tile // p)
    elif tile == 0 and cfg.size_dependent:
        raise UsageError(
            f"--tile 0: this model's position encoding ties it to {cfg.image_size[0]}×{cfg.image_size[1]} tiles"
        )

    # Pad: to the patch grid, and up to the training size for size-dependent models.
    ph, pw = -(-h // p) * p, -(-w // p) * p
    if cfg.size_dependent:
        ph, pw = max(ph, cfg.image_size[0]), max(pw, cfg.image_size[1])
    x = _hwc_to_tensor(image)
    k = None if known is None else torch.from_numpy(np.asarray(known, dtype=np.float32))[None, None]
    if k is not None and k.shape[-2:] != (h, w):
        raise ValueError(f"known mask is {tuple(k.shape[-2:])}, the image {h}×{w}")
    if (ph, pw) != (h, w):
        x = F.pad(x, (0, pw - w, 0, ph - h), mode="replicate")
        k = None if k is None else F.pad(k, (0, pw - w, 0, ph - h), mode="replicate")
    plan = plan_tiles(cfg, (ph // p, pw // p), iters, tile, max_cells)
    if plan.count > 1:
        note = "" if plan.exact else ", blended" if cfg.size_dependent else ", approximate beyond the margin cap"
        log.debug(f"tiling {ph}×{pw} px into {plan.count} tiles of {plan.tile[0] * p}×{plan.tile[1] * p} px{note}")

    masks = UpdateMasks(seed, iters, rate)
    record = frame_schedule(iters, frames)
    frame_bytes = ph * pw * c * 4
    if record and len(record) * frame_bytes > MAX_FRAME_BYTES:
        record = frame_schedule(iters, max(1, MAX_FRAME_BYTES // frame_bytes))
        log.info(f"large image: animation limited to {len(record)} frames")
    acc = torch.zeros(len(record) + 1, c, ph, pw)  # running blend for each frame, the final output last
    weight_sum = torch.zeros(1, 1, ph, pw)

    th, tw = plan.tile
    per_batch = max(1, max_cells // (th * tw))
    origins = plan.origins
    batches = [origins[i : i + per_batch] for i in range(0, len(origins), per_batch)]
    done, total = 0, len(batches) * iters
    for batch in batches:
        windows = [(..., slice(y * p, (y + th) * p), slice(xx * p, (xx + tw) * p)) for y, xx in batch]
        tiles = torch.cat([x[win] for win in windows])
        tile_known = None if k is None else torch.cat([k[win] for win in windows])
        tile_masks = torch.stack([masks.window(y, xx, th, tw) for y, xx in batch], dim=1)  # T b 1 th tw
        z = seed_cells(cfg, tiles, known=tile_known).to(device)
        outputs = []
        for t in range(iters):
            z = backend.step(z, tile_masks[t].to(device=device, dtype=z.dtype))
            if t + 1 in record:
                outputs.append(output_image(cfg, z).float().cpu())
            done += 1
            if progress is not None:
                progress(done, total)
        outputs.append(output_image(cfg, z).float().cpu() if not record or record[-1] != iters else outputs[-1])
        for i, (y, xx) in enumerate(batch):
            wgt = plan.weights(y, xx).repeat_interleave(p, 0).repeat_interleave(p, 1)
            region = (..., slice(y * p, (y + th) * p), slice(xx * p, (xx + tw) * p))
            weight_sum[region] += wgt
            for f, out in enumerate(outputs):
                acc[f][region] += out[i] * wgt
    if not bool((weight_sum > 0).all()):  # a bug in the plan, never a user error
        raise AssertionError("tile plan leaves cells uncovered")
    blended = acc / weight_sum[0]
    if k is not None:  # known pixels exactly as given
        blended = torch.where(k[0].bool(), x[0], blended)
    result = [b[:, :h, :w].permute(1, 2, 0).contiguous().numpy() for b in blended]
    return Restored(result[-1], result[:-1], record, plan)


def tiles_memory_cells(plan: TilePlan, max_cells: int) -> int:
    """Cells held at once while running ``plan`` (one batch of tiles): what bounds memory."""
    per_tile = plan.tile[0] * plan.tile[1]
    return per_tile * min(plan.count, max(1, max_cells // per_tile))


__all__ = [
    "TorchBackend", "make_backend", "backend_mask_type", "UpdateMasks", "corrupt", "damage", "mask_missing",
    "step_radius",
    "TilePlan", "plan_tiles", "Restored", "frame_schedule", "restore", "tiles_memory_cells",
    "MASK_BLOCK",
]
