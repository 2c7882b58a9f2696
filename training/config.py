"""The training configuration: every knob of Algorithm 1 and the appendix ablations that is not part of the model.

Each field states its default and its help text once, in its ``setting(...)``; `vitca train` builds its options
from them. No torch here (the CLI reads this module to build ``--help``).

Run folders store the configuration as ``TrainConfig.to_dict()`` (primitives only) in ``last.pt``, ``best.pt`` and
``config.json``. Before the masking settings were nested in :class:`MaskingConfig`, they were flat keys
(``mask_type``, ``mask_start``, …); :meth:`TrainConfig.from_dict` reads both layouts, so older runs still resume.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vitca_cli.errors import UsageError

PRECISIONS = ("fp32", "bf16")

TRAIN, RUN, DATA = "Training (Algorithm 1)", "Run", "Data"  # the --help sections


def setting(
    default,
    help: str,
    panel: str = TRAIN,
    *,
    resumable: bool = False,
    flags: tuple[str, ...] = (),
    shown: str | None = None,
    option: bool = True,
):
    """A configuration field: its ``default`` and ``help``, and how `vitca train` offers it. ``resumable``: may
    change when a run resumes. ``flags``: extra option names (``-b``) or a ``--on/--off`` pair. ``shown``: the
    default as --help shows it (default: the value). ``option``: False when the command sets it another way."""
    meta = {"help": help, "panel": panel, "resumable": resumable, "flags": flags, "shown": shown, "option": option}
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class MaskingConfig:
    """The paper's patch masking and its curriculum: how missing pixels look, and the nine (probability × patch
    size) combos unlocked at geometric thresholds between ``start`` and ``end``. `vitca train` offers each field as
    ``--mask-NAME``."""

    type: str = setting("noise", "How missing pixels look: noise | dropout.")
    start: int = setting(500, "Curriculum first threshold.")
    end: int = setting(10_000, "Curriculum: all combos after this.")
    max_prob: float = setting(0.75, "Largest drop probability.")
    prob_stages: int = setting(3, "Probability stages.")
    max_patch: int = setting(4, "Largest mask patch.")
    patch_stages: int = setting(3, "Patch-size stages.")

    def problems(self) -> list[str]:
        from vitca_cli.nca.masking import MASK_TYPES

        out = []
        if self.type not in MASK_TYPES:
            out.append(f"mask type must be one of {MASK_TYPES}")
        if not 0 < self.max_prob <= 1 or self.max_patch < 1 or self.start > self.end:
            out.append("bad masking schedule (need 0 < max prob ≤ 1, max patch ≥ 1, start ≤ end)")
        return out

    @property
    def schedule(self):
        """The curriculum as a ``vitca_cli.nca.masking.MaskingSchedule``."""
        from vitca_cli.nca.masking import MaskingSchedule

        return MaskingSchedule(
            start=self.start,
            end=self.end,
            prob_stages=self.prob_stages,
            max_prob=self.max_prob,
            patch_stages=self.patch_stages,
            max_patch=self.max_patch,
        )


MASKING_PREFIX = "mask_"  # flat names of the masking fields: in old run folders, and as --mask-* options
MASKING_FIELDS = tuple(f.name for f in dataclasses.fields(MaskingConfig))


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of Algorithm 1 and the appendix ablations that is not part of the model itself."""

    dataset: str = setting(
        "fashion-mnist", "fashion-mnist | mnist | mnist-5k | cifar10 | celeba | folder:PATH.", DATA, option=False
    )
    data_dir: str | None = setting(
        None, "Dataset root (default: $VITCA_DATA, then the user cache).", DATA, resumable=True, option=False
    )
    iterations: int = setting(100_000, "Total iterations I.", resumable=True)
    batch_size: int = setting(32, "Batch size b.", flags=("-b",))
    pool_size: int = setting(1024, "Pool size N_P.")
    pool_overwrite: bool = setting(
        False,
        "Pool batches replace their entries (the reference's sample_with_replacement).",
        flags=("--pool-overwrite/--pool-append",),
        shown="append",
    )
    t_min: int = setting(8, "Fewest CA steps per iteration.")
    t_max: int = setting(32, "Most CA steps per iteration.")
    alpha: float = setting(100.0, "Reconstruction weight α.")
    beta: float = setting(100.0, "Overflow weight β.")
    lr: float = setting(1e-3, "AdamW learning rate.")
    lr_min: float = setting(0.0, "Cosine schedule floor.")
    warmup: int = setting(
        0,
        "Linear lr warm-up over N iterations (for fine-tuning: spares trained weights the "
        "first, sign-like steps of fresh AdamW moments).",
    )
    weight_decay: float = setting(0.01, "AdamW weight decay.")
    grad_norm: bool = setting(True, "Per-tensor gradient normalisation.", shown="on")
    ema: float = setting(
        0.0,
        "Also keep an exponential moving average of the weights with this decay per iteration (e.g. 0.999; 0: "
        "none), from the weights at the start or at the resume that turns it on; validated beside the weights, "
        "saved as ema.pt, and written to best.pt when it validates better.",
        resumable=True,
        shown="none",
    )
    checkpointing: bool = setting(False, "Gradient checkpointing, ⌊T/2⌋ segments.", shown="off")
    fusion_mitosis: bool = setting(False, "Appendix A.1 fusion/mitosis schedule.", shown="off")
    fusion_schedule: str = setting(
        "",
        "Fusion over several levels, as steps down:steps up, e.g. 2,2:2,4: 2 steps, fuse 2x2, 2 steps, fuse "
        "again, the rest of the T steps at 1/4 resolution, divide, 2 steps, divide, 4 steps (implies "
        "--fusion-mitosis, which alone is 2:2). A +detail suffix (2,2:2,4+detail) makes each division add back "
        "the detail that fusion averaged away.",
        shown="2:2 with --fusion-mitosis",
    )
    masking: MaskingConfig = setting(MaskingConfig(), "The paper's masking curriculum.", option=False)
    val_every: int = setting(500, "Validate every N iterations (0: never).", RUN, resumable=True)
    val_size: int = setting(256, "Validation images.", RUN)
    val_steps: int = setting(64, "CA steps at validation.", RUN)
    save_every: int = setting(
        0, "Save last.pt every N iterations (0: at each validation and at the end).", RUN, resumable=True
    )
    log_every: int = setting(10, "metrics.jsonl line every N iterations.", RUN, resumable=True)
    seed: int = setting(0, "Random seed.", RUN)
    init_weights: str | None = setting(
        None, "Fine-tuned from these weights (recorded; the run's own state lives in last.pt).", option=False
    )
    compile: bool = setting(
        True,
        "Fused (torch.compile) attention and bias kernels (gradients within 1e-4 of eager).",
        RUN,
        resumable=True,
        shown="on",
    )
    precision: str = setting(
        "fp32",
        "fp32 | bf16: matrix products in bfloat16 (autocast; cells and weights stay "
        "fp32); fast only on CPUs with bfloat16 instructions (AMX, AVX512-BF16) and on GPUs.",
        RUN,
        resumable=True,
    )
    corruptions: str = setting(  # "patch": vitca_cli.nca.corruptions.PAPER_MIXTURE
        "patch",
        'Damage mixture, e.g. "gaussian=0.01-0.25:3, saltpepper:1, jpeg=10-60:1, strokes:2, rects:1, '
        'clean:1" (NAME[=LO-HI][:WEIGHT]; kinds: patch gaussian saltpepper jpeg gaussjpeg camera strokes rects '
        "scribbles blobs text clean).",
        shown="patch: the paper's masks",
    )
    crop_sizes: tuple[int, ...] = setting(
        (),
        "Square crop sizes drawn per iteration for folder data, e.g. 32,64 (the batch shrinks with the area).",
        DATA,
        shown="the image size",
        option=False,
    )

    def __post_init__(self) -> None:
        from vitca_cli.nca.corruptions import mixture_str, parse_mixture

        problems = []
        if self.iterations < 1 or self.batch_size < 1:
            problems.append("iterations and batch size must be ≥ 1")
        if self.pool_size < 0:
            problems.append("pool size must be ≥ 0")
        if not 1 <= self.t_min <= self.t_max:
            problems.append(f"need 1 ≤ t_min ≤ t_max, got {self.t_min}..{self.t_max}")
        if self.fusion_schedule:
            try:
                object.__setattr__(self, "fusion_schedule", str(self.fusion))
                object.__setattr__(self, "fusion_mitosis", True)
            except ValueError as exc:
                problems.append(str(exc))
        if self.fusion_mitosis and not problems and self.t_min < self.fusion.outer_steps:
            problems.append(f"fusion schedule {self.fusion} needs t_min ≥ {self.fusion.outer_steps}")
        side = 1 << self.fusion.levels if self.fusion_mitosis and not problems else 1
        if any(int(v) % side for v in self.crop_sizes):
            problems.append(f"fusion over {self.fusion.levels} levels needs crop sizes that are multiples of {side}")
        if self.fusion_mitosis and self.checkpointing:
            problems.append("checkpointing and fusion/mitosis exclude each other: choose one, not both")
        if isinstance(self.masking, dict):
            object.__setattr__(self, "masking", MaskingConfig(**self.masking))
        problems += self.masking.problems()
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {PRECISIONS}")
        if not 0.0 <= self.ema < 1.0:
            problems.append(f"the weight average's decay must be in [0, 1), got {self.ema}")
        if self.warmup < 0:
            problems.append("warm-up must be ≥ 0 iterations")
        if self.lr <= 0 or self.val_steps < 1 or self.val_every < 0 or self.log_every < 1:
            problems.append("lr, val steps and log interval must be positive")
        object.__setattr__(self, "crop_sizes", tuple(int(v) for v in self.crop_sizes))
        if any(v < 4 for v in self.crop_sizes):
            problems.append("crop sizes must be ≥ 4 pixels")
        try:
            object.__setattr__(self, "corruptions", mixture_str(parse_mixture(self.corruptions)))
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise UsageError("; ".join(problems))

    @property
    def fusion(self):
        """The fusion schedule (``vitca_cli.nca.config.FusionSchedule``) the rollouts run, or None."""
        from vitca_cli.nca.config import APPENDIX_A1, FusionSchedule

        if self.fusion_schedule:
            return FusionSchedule.parse(self.fusion_schedule)
        return APPENDIX_A1 if self.fusion_mitosis else None

    @property
    def mixture(self):
        from vitca_cli.nca.corruptions import parse_mixture

        return parse_mixture(self.corruptions)

    @property
    def paper_masking(self) -> bool:
        """Only the paper's patch masking: fresh batches are drawn exactly as the reference does."""
        from vitca_cli.nca.corruptions import PAPER_MIXTURE, mixture_str, parse_mixture

        return self.corruptions == mixture_str(parse_mixture(PAPER_MIXTURE))

    @property
    def mask_type(self) -> str:
        return self.masking.type

    @property
    def schedule(self):
        return self.masking.schedule

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """Read ``to_dict()`` output, also in the flat layout of older runs (``mask_start``, …: see
        :func:`migrate`); keys this version does not know are left out."""
        data = migrate(data)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes) -> "TrainConfig":
        """A copy with ``changes``, which may name masking fields flat (``mask_end=…``)."""
        return self.from_dict({**self.to_dict(), **changes})


def migrate(data: dict) -> dict:
    """A stored configuration in today's layout: flat ``mask_NAME`` keys (runs saved before the masking settings
    were nested) go into ``masking``; flat keys override nested ones, so ``replace(mask_end=…)`` works too."""
    data = dict(data)
    masking = dict(data.get("masking") or {})
    for name in MASKING_FIELDS:
        flat = MASKING_PREFIX + name
        if flat in data:
            masking[name] = data.pop(flat)
    if masking:
        data["masking"] = masking
    return data


def default_text(f: dataclasses.Field) -> str:
    """A field's default as --help shows it."""
    if f.metadata.get("shown") is not None:
        return f.metadata["shown"]
    value = f.default
    if isinstance(value, float) and value == int(value) and abs(value) >= 1:
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def options() -> list[tuple[str, dataclasses.Field]]:
    """The fields `vitca train` offers as options, by their flat names (masking fields as ``mask_NAME``)."""
    out = []
    for f in dataclasses.fields(TrainConfig):
        if f.name == "masking":
            out += [(MASKING_PREFIX + m.name, m) for m in dataclasses.fields(MaskingConfig)]
        elif f.metadata.get("option", True):
            out.append((f.name, f))
    return out


def resumable() -> set[str]:
    """Settings that may change when a run resumes; everything else is fixed by the run's saved configuration."""
    return {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("resumable")}
