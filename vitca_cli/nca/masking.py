"""The paper's corruption: patch masking with a curriculum over training iterations (reference §3).

``masking_schedule(i)`` picks a (drop probability, patch size) combination for iteration ``i``; ``random_mask``
(the one home of this masking, for training, evaluation and ``vitca denoise --corrupt``) applies it as ``dropout``
(masked patches set to 0) or ``noise`` (one N(0,1) scalar per masked patch, shared by its pixels and channels, not
clipped). ``apply_mask`` applies a given mask, e.g. one read from a mask image.
``bernoulli`` is the one 0/1 mask draw (``floor(U + p)``) behind these patch masks and the CA's update masks.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np
import torch

MASK_TYPES = ("dropout", "noise")


@dataclass(frozen=True)
class MaskingSchedule:
    """Curriculum of 9 (probability × patch size) combos, unlocked at geometric iteration thresholds."""

    start: int = 500
    end: int = 10000
    prob_stages: int = 3
    max_prob: float = 0.75
    patch_stages: int = 3
    max_patch: int = 4

    @property
    def combos(self) -> list[tuple[float, int]]:
        probs = np.linspace(0.25, self.max_prob, self.prob_stages)
        sizes = np.linspace(1, self.max_patch, self.patch_stages).astype(int)
        return [(float(p), int(s)) for p, s in itertools.product(probs, sizes)]

    @property
    def thresholds(self) -> list[int]:
        return np.geomspace(self.start, self.end, len(self.combos)).astype(int).tolist()

    def allowed(self, iteration: int) -> list[tuple[float, int]]:
        """The combos allowed at ``iteration``: those up to the first threshold ≥ iteration; -1 means all."""
        combos = self.combos
        if iteration == -1:
            return combos
        for idx, threshold in enumerate(self.thresholds):
            if threshold >= iteration:
                return combos[: idx + 1]
        return combos

    def __call__(self, iteration: int, rng: random.Random | None = None) -> tuple[float, int]:
        """Draw one combo uniformly among those allowed at ``iteration``."""
        return (rng or random).choice(self.allowed(iteration))


def bernoulli(shape, p: float, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """A float 0/1 tensor of ``shape``, each entry 1 with probability ``p``: ``floor(U + p)`` with U ~ U[0, 1) drawn
    from ``generator`` (the reference's formula; p = 1 gives all ones)."""
    u = torch.rand(shape, generator=generator, device=device)
    return torch.floor(u + p).clamp_(max=1.0)


def patch_keep_mask(
    batch: int, height: int, width: int, prob: float, patch: int, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Per-image, per-patch keep mask ``(B, 1, H, W)``: 1 = kept, 0 = masked with probability ``prob``."""
    if height % patch or width % patch:
        raise ValueError(f"mask patch size {patch} must divide the image size {height}×{width}")
    keep = bernoulli((batch, 1, height // patch, width // patch), 1.0 - prob, generator, device)
    return keep.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)


def apply_mask(
    x: torch.Tensor,
    keep: torch.Tensor,
    mask_type: str = "noise",
    patch: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Corrupt ``x`` ``(B, C, H, W)`` where ``keep`` ``(B|1, 1, H, W)`` is 0: zeros (``dropout``) or one N(0,1)
    value per ``patch``×``patch`` block, shared across its pixels and channels (``noise``)."""
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask type must be one of {MASK_TYPES}, got {mask_type!r}")
    keep = keep.to(x.dtype)
    if mask_type == "dropout":
        return x * keep
    b, _, h, w = x.shape
    ph, pw = -(-h // patch), -(-w // patch)
    noise = torch.randn(b, 1, ph, pw, generator=generator, device=x.device).to(x.dtype)
    noise = noise.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)[..., :h, :w]
    return x * keep + noise * (1 - keep)


def random_mask(
    x: torch.Tensor,
    prob: float,
    patch: int,
    mask_type: str = "noise",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's patch masking of a batch ``(B, C, H, W)`` (the reference's ``random_mask``): each
    ``patch``×``patch`` block is dropped with probability ``prob``. Returns ``(corrupted, keep)``, ``keep``
    ``(B, 1, H, W)`` with 1 = kept. Sizes not divisible by ``patch`` are covered by a patch grid cropped at the right
    and bottom edges.

    The one home of this masking: training, ``vitca eval``, the analyses and ``vitca denoise --corrupt`` all draw it
    here, so for one generator state they draw the same masks and noise (first the keep mask, then the noise)."""
    b, _, h, w = x.shape
    ph, pw = -(-h // patch) * patch, -(-w // patch) * patch
    keep = patch_keep_mask(b, ph, pw, prob, patch, generator, x.device)[..., :h, :w]
    return apply_mask(x, keep, mask_type, patch, generator), keep


def parse_corruption(spec: str) -> tuple[float, int, str]:
    """Parse ``"p=0.5,patch=4,type=noise"`` into (prob, patch, type); missing keys default to 0.5, 1, noise."""
    values = {"p": "0.5", "patch": "1", "type": "noise"}
    for part in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in values:
            raise ValueError(f"bad corruption {spec!r}: expected comma-separated p=…, patch=…, type=…")
        values[key.strip()] = value.strip()
    try:
        prob, patch = float(values["p"]), int(values["patch"])
    except ValueError:
        raise ValueError(f"bad corruption {spec!r}: p must be a number and patch an integer") from None
    if not 0.0 <= prob <= 1.0 or patch < 1 or values["type"] not in MASK_TYPES:
        raise ValueError(f"bad corruption {spec!r}: need 0 ≤ p ≤ 1, patch ≥ 1, type in {MASK_TYPES}")
    return prob, patch, values["type"]
