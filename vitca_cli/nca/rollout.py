"""The CA rollout: T steps of an update rule with update masks from an explicit source.

:func:`rollout` is the one loop every caller runs (``CellularAutomaton.forward``, fusion/mitosis, training,
evaluation, the analyses). Its masks come from a *mask source*, an object whose ``draw(z, steps)`` returns the
masks of ``steps`` steps for grid ``z`` as one tensor ``(T, B|1, 1, H, W)`` (1 = the cell updates; any dtype and
device: each step's mask is cast to the grid's when it is used, and a batch of 1 is shared by every grid):

- :class:`GivenMasks`: masks the caller already holds.
- :class:`GeneratorMasks`: Bernoulli(σ) per cell, step and grid, drawn up front from a ``torch.Generator``
  (training: every grid of a batch its own masks, on the training device).
- :class:`BlockMasks`: the masks of ``vitca denoise``, drawn per fixed ``MASK_BLOCK``×``MASK_BLOCK`` block of
  *global* cell coordinates, each block from its own generator seeded by (seed, block row, block column)
  (:class:`UpdateMasks`). A tile of an image sees the masks the whole image would, and every grid of a batch
  gets the masks of a grid at the origin: evaluating with a seed replays what ``vitca denoise`` does with it.

Masks are drawn before the first step, so a gradient-checkpointed backward pass replays the very same updates.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch.utils.checkpoint import checkpoint

from vitca_cli.nca.config import APPENDIX_A1, FusionSchedule
from vitca_cli.nca.masking import bernoulli

MASK_BLOCK = 64  # cells per side of one update-mask block


def draw_update_mask(
    batch: int, height: int, width: int, rate: float, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """A per-cell Bernoulli(rate) update mask ``(B, 1, H, W)`` shared by all channels (``floor(U + σ)``)."""
    return bernoulli((batch, 1, height, width), rate, generator, device)


# ---------------------------------------------------------------------------------------------------------------------
# Mask sources
# ---------------------------------------------------------------------------------------------------------------------
class MaskSource(Protocol):
    def draw(self, z: torch.Tensor, steps: int) -> torch.Tensor:
        """The update masks ``(T, B|1, 1, H, W)`` of ``steps`` steps on grid ``z`` ``(B, C, H, W)``."""


@dataclass
class GivenMasks:
    """Masks ``(T, B|1, 1, H, W)`` held by the caller; a rollout of ``steps`` uses the first ``steps``."""

    masks: torch.Tensor

    def draw(self, z: torch.Tensor, steps: int) -> torch.Tensor:
        if len(self.masks) < steps:
            raise ValueError(f"{len(self.masks)} update masks given for {steps} steps")
        return self.masks


@dataclass
class GeneratorMasks:
    """Bernoulli(``rate``) masks for every cell of every grid and step, drawn from ``generator`` on its device
    (the global generator on the grid's device when None)."""

    rate: float
    generator: torch.Generator | None = None

    def draw(self, z: torch.Tensor, steps: int) -> torch.Tensor:
        b, _, h, w = z.shape
        device = z.device if self.generator is None else self.generator.device
        masks = draw_update_mask(steps * b, h, w, self.rate, self.generator, device)
        return masks.view(steps, b, 1, h, w).to(z.device, z.dtype)


def _block_seed(seed: int, by: int, bx: int, level: int = 0) -> int:
    key = f"vitca:{seed}:{by}:{bx}" if level == 0 else f"vitca:{seed}:fused{level}:{by}:{bx}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class UpdateMasks:
    """Per-step update masks for any window of the global cell grid, reproducible for a seed. ``level`` 1 is the
    grid after fusion (half the resolution), whose masks are drawn apart from the full grid's."""

    def __init__(self, seed: int, steps: int, rate: float, cache_blocks: int = 256, level: int = 0):
        self.seed, self.steps, self.rate, self.level = seed, steps, rate, level
        self._block = functools.lru_cache(maxsize=cache_blocks)(self._draw_block)

    def _draw_block(self, by: int, bx: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(_block_seed(self.seed, by, bx, self.level))
        return draw_update_mask(self.steps, MASK_BLOCK, MASK_BLOCK, self.rate, gen).bool()  # (T, 1, S, S)

    def window(self, y0: int, x0: int, h: int, w: int, needed: torch.Tensor | None = None) -> torch.Tensor:
        """Masks ``(T, 1, h, w)`` (bool) for cells [y0, y0+h) × [x0, x0+w). ``needed`` ``(h, w)`` (bool): the
        blocks that hold none of these cells are not drawn and stay False (no update)."""
        out = (
            torch.empty(self.steps, 1, h, w, dtype=torch.bool)
            if needed is None
            else torch.zeros(self.steps, 1, h, w, dtype=torch.bool)
        )
        for by in range(y0 // MASK_BLOCK, (y0 + h - 1) // MASK_BLOCK + 1):
            for bx in range(x0 // MASK_BLOCK, (x0 + w - 1) // MASK_BLOCK + 1):
                top, left = by * MASK_BLOCK, bx * MASK_BLOCK
                ys, ye = max(y0, top), min(y0 + h, top + MASK_BLOCK)
                xs, xe = max(x0, left), min(x0 + w, left + MASK_BLOCK)
                if needed is not None and not bool(needed[ys - y0 : ye - y0, xs - x0 : xe - x0].any()):
                    continue
                out[..., ys - y0 : ye - y0, xs - x0 : xe - x0] = self._block(by, bx)[
                    ..., ys - top : ye - top, xs - left : xe - left
                ]
        return out


@dataclass
class BlockMasks:
    """The masks :class:`UpdateMasks` gives a grid whose top-left cell is ``origin`` of the global cell grid,
    shared by every grid of a batch: ``(T, 1, 1, H, W)`` bool."""

    seed: int
    rate: float
    origin: tuple[int, int] = (0, 0)

    def draw(self, z: torch.Tensor, steps: int) -> torch.Tensor:
        h, w = z.shape[-2:]
        return UpdateMasks(self.seed, steps, self.rate).window(*self.origin, h, w)[:, None]


# ---------------------------------------------------------------------------------------------------------------------
# The rollout
# ---------------------------------------------------------------------------------------------------------------------
Step = Callable[..., torch.Tensor]  # step(z, update_mask, head_mask, keep_attention) -> z


def _mask_for(mask: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """One step's mask ``(B|1, 1, H, W)`` as the grid's dtype and device, one per grid of ``z``."""
    return mask.to(device=z.device, dtype=z.dtype).expand(z.shape[0], -1, -1, -1)


def _segment(step: Step, z: torch.Tensor, masks: torch.Tensor, head_mask: torch.Tensor | None) -> torch.Tensor:
    for m in masks:
        z = step(z, _mask_for(m, z), head_mask)
    return z


def rollout(
    step: Step,
    z: torch.Tensor,
    steps: int,
    masks: MaskSource,
    head_mask: torch.Tensor | None = None,
    keep_attention: bool = False,
    checkpoint_segments: int = 0,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Apply ``steps`` CA steps ``z = step(z, mask, head_mask, keep_attention)`` with masks from ``masks``.

    ``checkpoint_segments`` > 1 (with gradients enabled) splits the rollout into that many segments whose
    activations are recomputed during the backward pass. ``keep_attention`` asks the last step for its attention
    maps. ``callback(t, z)`` is called after step t (1-based); not with checkpointing.
    """
    drawn = masks.draw(z, steps)
    if checkpoint_segments > 1 and torch.is_grad_enabled():
        if callback is not None:
            raise ValueError("a checkpointed rollout takes no per-step callback")
        bounds = torch.linspace(0, steps, checkpoint_segments + 1).round().long().tolist()
        for start, stop in zip(bounds[:-1], bounds[1:]):
            z = checkpoint(_segment, step, z, drawn[start:stop], head_mask, use_reentrant=False)
        return z
    for t in range(steps):
        z = step(z, _mask_for(drawn[t], z), head_mask, keep_attention and t == steps - 1)
        if callback is not None:
            callback(t + 1, z)
    return z


def fusion_rollout(
    ca, z: torch.Tensor, steps: int, masks: MaskSource, schedule: FusionSchedule = APPENDIX_A1
) -> torch.Tensor:
    """``steps`` steps of ``ca`` (a ``CellularAutomaton``) by ``schedule``: each fusion averages 2×2 groups of cells
    (:meth:`CellularAutomaton.fusion`); each division (mitosis) gives every cell of a group its fused cell's state
    and re-injects its own input channels (with ``schedule.detail``, adds back its detail). Each phase draws its
    masks from ``masks``. The grid's height and width must be multiples of ``2 ** levels``."""
    if isinstance(masks, GivenMasks):
        raise ValueError("fusion/mitosis changes the grid size: give it a mask source that draws, not masks")
    side = 1 << schedule.levels
    if z.shape[-2] % side or z.shape[-1] % side:
        raise ValueError(f"fusion over {schedule.levels} levels needs a grid whose sides are multiples of {side}")
    stashes = []
    for level, n in schedule.segments(steps):
        while level > len(stashes):
            z, stash = ca.fusion(z)
            stashes.append(stash)
        while level < len(stashes):
            z = ca.mitosis(z, stashes.pop(), schedule.detail)
        z = rollout(ca.step, z, n, masks)
    return z
