"""Model configuration: one frozen dataclass, saved inside every checkpoint.

No torch here, so the CLI can parse and print configurations without importing it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ARCHES = ("vitca", "unetca")
POS_ENCODINGS = ("none", "vit", "nerf", "learned")
CELL_INITS = ("constant", "random", "input", "fill")


@dataclass(frozen=True)
class CAConfig:
    """Everything that defines a cellular automaton's cells and update rule.

    Cell state layout (channels of the grid ``z``, in this order):
    ``[nerf position channels (optional) | input Ci·P² | known P² (optional) | output Co·P² | hidden Ch]``.

    ``mask_channel`` adds the "known" channels: 1 where the pixel is given, 0 where it is missing (inpainting),
    so the rule need not guess which pixels to replace. ``cell_init="input"`` starts the output channels at the
    input image (0.5 where a pixel is missing): with the zero-initialised head, an untrained rule returns its input
    unchanged, and training learns a correction rather than the whole image. ``cell_init="fill"`` is ``input`` with
    the missing pixels' outputs starting at a smooth push-pull fill of the known ones
    (:func:`vitca_cli.nca.fill.push_pull_fill`) instead of 0.5. The paper's presets use none of these.
    """

    arch: str = "vitca"
    channels: int = 1  # Ci = Co: 1 (grayscale) or 3 (RGB)
    hidden: int = 32  # Ch
    patch_size: int = 1  # P: a cell holds a P×P patch of pixels (non-overlapping)
    image_size: tuple[int, int] = (28, 28)  # training size; what size-dependent encodings were built for
    cell_init: str = "constant"
    mask_channel: bool = False
    update_rate: float = 0.5  # σ: per-cell Bernoulli update probability
    # ViTCA update rule
    embed: int = 128  # E
    depth: int = 1
    heads: int = 4
    mlp: int = 64
    neighbourhood: tuple[int, int] = (3, 3)  # NH×NW localised attention window
    pos_encoding: str = "vit"
    nerf_freqs: int = 5  # L: nerf encoding has 4L channels
    zero_init_head: bool = True
    # UNetCA update network
    unet_features: int = 31  # 93,957 parameters for RGB, 92,519 for grayscale (near the 92.5K of ViTCA)
    unet_octaves: int = 2

    def __post_init__(self) -> None:
        # JSON round-trips turn tuples into lists; normalise so configs compare equal.
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        object.__setattr__(self, "neighbourhood", tuple(int(v) for v in self.neighbourhood))
        problems = []
        if self.arch not in ARCHES:
            problems.append(f"arch must be one of {ARCHES}, got {self.arch!r}")
        if self.channels not in (1, 3):
            problems.append(f"channels must be 1 or 3, got {self.channels}")
        if self.pos_encoding not in POS_ENCODINGS:
            problems.append(f"pos_encoding must be one of {POS_ENCODINGS}, got {self.pos_encoding!r}")
        if self.cell_init not in CELL_INITS:
            problems.append(f"cell_init must be one of {CELL_INITS}, got {self.cell_init!r}")
        if self.patch_size < 1:
            problems.append(f"patch_size must be >= 1, got {self.patch_size}")
        if any(n < 1 or n % 2 == 0 for n in self.neighbourhood):
            problems.append(f"neighbourhood sizes must be odd and positive, got {self.neighbourhood}")
        if self.heads < 1 or self.embed % self.heads:
            problems.append(f"embed ({self.embed}) must be divisible by heads ({self.heads})")
        if any(s % self.patch_size for s in self.image_size):
            problems.append(f"image size {self.image_size} must be divisible by the patch size {self.patch_size}")
        if not 0.0 < self.update_rate <= 1.0:
            problems.append(f"update_rate must be in (0, 1], got {self.update_rate}")
        if problems:
            raise ValueError("; ".join(problems))

    # -- derived channel layout -------------------------------------------------
    @property
    def pe_channels(self) -> int:
        return 4 * self.nerf_freqs if self.pos_encoding == "nerf" else 0

    @property
    def pixel_channels(self) -> int:
        """Input (= output) channels per cell: image channels times the patch area."""
        return self.channels * self.patch_size**2

    @property
    def known_channels(self) -> int:
        """The mask channels (one per pixel of a cell's patch), 0 without ``mask_channel``."""
        return self.patch_size**2 if self.mask_channel else 0

    @property
    def cell_channels(self) -> int:
        return self.static_channels + self.pixel_channels + self.hidden

    @property
    def input_slice(self) -> slice:
        return slice(self.pe_channels, self.pe_channels + self.pixel_channels)

    @property
    def known_slice(self) -> slice:
        start = self.pe_channels + self.pixel_channels
        return slice(start, start + self.known_channels)

    @property
    def output_slice(self) -> slice:
        return slice(self.static_channels, self.static_channels + self.pixel_channels)

    @property
    def hidden_slice(self) -> slice:
        return slice(self.static_channels + self.pixel_channels, self.cell_channels)

    @property
    def static_channels(self) -> int:
        """Channels the update rule never changes: position encoding, input and (optional) known mask."""
        return self.pe_channels + self.pixel_channels + self.known_channels

    @property
    def size_dependent(self) -> bool:
        """True when the encoding ties the model to the grid size it was trained at."""
        return self.pos_encoding != "none"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**data)

    def replace(self, **changes) -> "CAConfig":
        return dataclasses.replace(self, **changes)


# Per-dataset presets: the paper's baseline ViTCA (E 128, 4 heads, MLP 64, 32 hidden, 3×3, patch 1).
PRESETS: dict[str, CAConfig] = {
    "mnist": CAConfig(channels=1, image_size=(28, 28)),
    "fashion-mnist": CAConfig(channels=1, image_size=(28, 28)),
    "cifar10": CAConfig(channels=3, image_size=(32, 32)),
    "celeba": CAConfig(channels=3, image_size=(64, 64)),
}


def preset(name: str, **overrides) -> CAConfig:
    """The named preset with ``overrides`` applied (None values are ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(PRESETS[name], **changes)


@dataclass(frozen=True)
class FusionSchedule:
    """Fusion and mitosis over several levels (appendix A.1, generalised): ``down[l]`` steps on level ``l`` before
    its cells are fused 2×2 into level ``l + 1``; the rest of the steps on the coarsest level ``len(down)``; then,
    for each division back up, ``up[k]`` steps on the level reached (``up[0]`` on level ``len(down) - 1``, the last
    on full resolution). Spelled ``"2,2:2,4"`` (down:up); appendix A.1 is ``"2:2"``.

    ``detail`` (spelled ``"2,2:2,4+detail"``): each division also adds to every cell's output its *detail*, its own
    input minus the mean input of its 2×2 group (known pixels only), which fusion averaged away. A clean image
    restored at the coarse level comes back whole at full resolution, and the finer levels are left with only the
    fine-scale part of the noise. Appendix A.1's mitosis copies the fused cell (``detail`` off)."""

    down: tuple[int, ...]
    up: tuple[int, ...]
    detail: bool = False

    @classmethod
    def parse(cls, spec: str) -> FusionSchedule:
        spec, plus, mode = spec.partition("+")
        if plus and mode != "detail":
            raise ValueError(f"bad fusion schedule {spec}+{mode}: the one mitosis mode is +detail, e.g. 2,2:2,4+detail")
        down, sep, up = spec.partition(":")
        try:
            schedule = cls(tuple(int(v) for v in down.split(",")), tuple(int(v) for v in up.split(",")), bool(plus))
        except ValueError:
            raise ValueError(f"bad fusion schedule {spec!r}: expected steps down:steps up, e.g. 2,2:2,4") from None
        if not sep or len(schedule.down) != len(schedule.up) or min(schedule.down + schedule.up) < 0:
            raise ValueError(f"bad fusion schedule {spec!r}: as many down as up levels, e.g. 2,2:2,4 (two levels)")
        return schedule

    def __str__(self) -> str:
        steps = f"{','.join(map(str, self.down))}:{','.join(map(str, self.up))}"
        return steps + "+detail" if self.detail else steps

    @property
    def levels(self) -> int:
        return len(self.down)

    @property
    def outer_steps(self) -> int:
        """Steps outside the coarsest level: a rollout needs at least these."""
        return sum(self.down) + sum(self.up)

    def coarse_steps(self, steps: int) -> int:
        if steps < self.outer_steps:
            raise ValueError(f"fusion schedule {self} needs at least {self.outer_steps} steps, got {steps}")
        return steps - self.outer_steps

    def level_steps(self, steps: int) -> list[int]:
        """Steps run on each level, full resolution first."""
        counts = [0] * (self.levels + 1)
        for level, n in self.segments(steps):
            counts[level] += n
        return counts

    def segments(self, steps: int) -> list[tuple[int, int]]:
        """(level, steps) in the order they run."""
        down = list(enumerate(self.down))
        up = [(self.levels - 1 - k, n) for k, n in enumerate(self.up)]
        return [*down, (self.levels, self.coarse_steps(steps)), *up]

    def reach(self, steps: int) -> int:
        """How many full-resolution cells away a cell's state can come from after ``steps`` steps: a step on level
        ``l`` reaches 2^l cells, and each fusion or division shifts by up to one group."""
        shifts = 2 * sum(1 << level for level in range(self.levels))
        return sum(n << level for level, n in self.segments(steps)) + shifts


APPENDIX_A1 = FusionSchedule((2,), (2,))
