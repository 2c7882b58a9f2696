"""Restore a batch of image files, one result per file; the inputs, where outputs go and the overwrite rules are in
``vitca_cli/restore/files.py``. No command-line parsing and no printing: progress and results go to callbacks.

A batch goes on past a bad file (its :class:`FileResult` holds the error) unless ``fail_fast``; a usage error or
missing weights raise before any file is touched. Messages name settings as ``{k}`` (see ``vitca_cli.errors``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from vitca_cli.errors import SettingError, UsageError, WeightsError
from vitca_cli.log import log
from vitca_cli.restore.defaults import default_iters, fusion_schedule
from vitca_cli.restore.files import (
    STDIO,
    Job,
    assign_outputs,
    check_output,
    collect_inputs,
    extra_outputs,
    read_job_mask,
)

if TYPE_CHECKING:
    import numpy as np

LARGE_PIXELS = 4_000_000  # an image from this size on gets the hint of a faster shipped model, if there is one
MAX_ITERS = 10_000
MAX_HOLE_ITERS = 256  # the most steps the depth of the holes may ask for (--iters goes further)
MAX_RUNS = 64


@dataclass
class BatchSettings:
    """How to restore a batch; checked on creation (a bad value is a ``SettingError``)."""

    output: Optional[str] = None  # a file, a folder, "-" (stdout); None: beside each input
    recursive: bool = False
    iters: Optional[int] = None  # None: the weights' own (``vitca_cli.restore.defaults``)
    update_rate: Optional[float] = None  # None: as the model was trained
    runs: int = 1  # the mean of this many runs, seeds seed, seed+1, …
    seed: int = 0
    weights: Optional[str] = None  # None: the shipped default for each image's channels
    device: str = "auto"
    backend: str = "torch"
    tile: Optional[int] = None  # None: automatic; 0: no tiling
    corrupt: Optional[str] = None  # damage clean inputs first: a mixture or the paper's masking spec
    save_input: bool = False
    animate: Optional[str] = None
    frames: int = 32
    compare: Optional[str] = None
    overwrite: bool = False
    skip_existing: bool = False
    fail_fast: bool = False
    ext: Optional[str] = None
    mask: Optional[str] = None  # inpainting: one mask, or a folder of masks matched by file stem
    mask_type: Optional[str] = None  # None: as the model was trained
    stretch_mask: bool = False  # a mask of another aspect ratio than the image's: stretched, not refused
    include_outputs: bool = False  # folders and globs: also the files vitca names as its outputs
    threads: Optional[int] = None
    settle: float = 0.0  # skip cells whose output changed less than this on 2 updates in a row; 0: dense
    fusion: Optional[bool] = None  # the middle steps on coarser grids, by the weights' schedule; None: as they say
    precision: str = (
        "auto"  # torch backend: fp32, bf16 products, or auto (bf16 for large jobs where the hardware has it)
    )
    compile: str = "auto"  # torch backend: the compiled step on, off, or auto (for large jobs)
    holes_only: bool = True  # inpainting: compute only the cells that can reach a missing pixel (same output)
    quantize: bool = False  # ONNX backend: the int8-quantised step graph
    damage: Optional[tuple] = field(default=None, init=False)  # ``corrupt`` parsed

    def __post_init__(self) -> None:
        from vitca_cli.io.images import FORMATS

        if self.iters is not None and self.iters > MAX_ITERS:
            raise SettingError("iters", f"{self.iters}: at most {MAX_ITERS:,} steps")
        if self.iters is not None and self.iters < 1:
            raise SettingError("iters", f"must be at least 1, got {self.iters}")
        if self.update_rate is not None and not 0.0 < self.update_rate <= 1.0:
            raise SettingError("update_rate", f"must be in (0, 1], got {self.update_rate}")
        if self.tile is not None and self.tile < 0:
            raise SettingError("tile", f"must be 0 (off) or a positive size in pixels, got {self.tile}")
        if self.settle < 0:
            raise SettingError("settle", f"must be at least 0, got {self.settle}")
        if not 1 <= self.runs <= MAX_RUNS:
            raise SettingError("runs", f"{self.runs}: choose from 1 to {MAX_RUNS}")
        if self.frames < 1:
            raise SettingError("frames", f"must be at least 1, got {self.frames}")
        if self.overwrite and self.skip_existing:
            raise SettingError("overwrite", "and {1} contradict each other; pick one", "skip_existing")
        if self.ext and self.suffix.lower() not in FORMATS:
            raise SettingError("ext", f"{self.ext}: unknown image extension; choose from {', '.join(sorted(FORMATS))}")
        if self.save_input and self.output == STDIO:
            raise SettingError("save_input", "writes beside the output file; it cannot be used with {1} -", "output")
        if self.corrupt:
            self.damage = parse_damage(self.corrupt)
        if self.mask_type not in (None, "noise", "dropout"):
            raise SettingError("mask_type", f"{self.mask_type!r}: expected noise or dropout")
        if self.mask is not None and not Path(self.mask).exists():
            raise SettingError("mask", f"{self.mask}: no such file or folder")

    @property
    def suffix(self) -> Optional[str]:
        """``ext`` as a file suffix (``.png``), or None."""
        if not self.ext:
            return None
        return self.ext if self.ext.startswith(".") else f".{self.ext}"


def parse_damage(spec: str) -> tuple:
    """A ``corrupt`` spec: a real-world damage mixture (``gaussian=0.1``) or the paper's masking
    (``p=0.5,patch=4,type=noise``), parsed."""
    from vitca_cli.nca.corruptions import KINDS, parse_mixture
    from vitca_cli.nca.masking import parse_corruption

    try:
        if spec.strip().split("=")[0].split(":")[0].strip() in KINDS:
            return parse_mixture(spec)
        return parse_corruption(spec)
    except ValueError as exc:
        raise SettingError("corrupt", f": {exc}") from None


@dataclass
class FileResult:
    """What became of one input: ``done``, ``skipped`` (its output exists) or ``failed`` (``error`` says why)."""

    job: Job
    status: str
    error: Optional[BaseException] = None


@dataclass
class BatchResult:
    results: list[FileResult]
    stopped: bool = False  # fail_fast stopped the batch at its first failure

    @property
    def failed(self) -> list[FileResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def total(self) -> int:
        return len(self.results)


Progress = Callable[[Job, int, int], None]  # (job, tile-steps done, total)


# ---------------------------------------------------------------------------------------------------------------------
# The batch
# ---------------------------------------------------------------------------------------------------------------------
class Backends:
    """Backends by weights name, built on first use (the default depends on the command and each image's
    channels)."""

    def __init__(self, settings: BatchSettings, command: str = "denoise"):
        self.settings, self.command = settings, command
        self._by_key: dict = {}
        self._suggested = False

    def get(self, channels: int):
        from vitca_cli.restore.backends import make_backend

        key = self.settings.weights or channels
        if key not in self._by_key:
            s = self.settings
            self._by_key[key] = make_backend(
                s.weights, s.backend, s.device, channels, s.precision, s.quantize, s.compile, self.command
            )
        return self._by_key[key]

    def suggest_faster(self, name: str) -> None:
        """Once per batch: name the shipped model that runs a large image of default model ``name`` faster."""
        from vitca_cli.io.weights import FASTER_FOR_LARGE

        if name in FASTER_FOR_LARGE and not self._suggested:
            self._suggested = True
            log.info(
                f"large image: -w {FASTER_FOR_LARGE[name]} restores it about 3.5x faster, at a cost in fine detail "
                "(best for photos smooth at the pixel scale; see the README)"
            )


def _prepare(inputs: list[str], settings: BatchSettings, command: str) -> tuple[list[Job], Backends]:
    """Device, threads and weights checked (usage errors and missing weights before any file), jobs listed."""
    from vitca_cli.runtime import choose_threads, resolve_device

    if settings.backend == "torch":  # an impossible device is a usage error before any file is read
        resolve_device(settings.device)
    choose_threads(settings.threads)
    backends = Backends(settings, command)
    if settings.weights is not None:
        backends.get(0)  # missing or unknown weights: raise now, not once per file
    jobs = collect_inputs(inputs, settings.recursive, skip_outputs=not settings.include_outputs)
    if not jobs:
        raise UsageError("no inputs given")
    assign_outputs(jobs, settings.output, settings.ext)
    if (settings.animate == STDIO or settings.compare == STDIO) and settings.output == STDIO:
        raise SettingError("output", ", {1} and {2}: only one can be - (stdout)", "animate", "compare")
    return jobs, backends


def run_batch(
    inputs: list[str],
    settings: BatchSettings,
    inpaint: bool = False,
    progress: Optional[Progress] = None,
    on_result: Optional[Callable[[FileResult], None]] = None,
) -> BatchResult:
    """Restore every input (inpainting the pixels ``settings.mask`` marks, with ``inpaint``). ``progress(job, done,
    total)`` follows each image's steps; ``on_result`` hears of each file as it finishes. A usage error or missing
    weights raise; any other error fails its file only (and, with ``fail_fast``, ends the batch)."""
    jobs, backends = _prepare(inputs, settings, "inpaint" if inpaint else "denoise")
    rate = "as trained" if settings.update_rate is None else settings.update_rate
    steps = "the model's default" if settings.iters is None else settings.iters
    log.info(f"seed {settings.seed}, {steps} iterations, update rate {rate}")
    many = len(jobs) > 1
    result = BatchResult([])
    seen: dict[str, str] = {}
    for job in jobs:
        try:
            done = _process_listed(job, seen, settings, backends, inpaint, many, progress)
            outcome = FileResult(job, "done" if done else "skipped")
        except (WeightsError, UsageError):
            raise
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
            outcome = FileResult(job, "failed", exc)
        result.results.append(outcome)
        if on_result is not None:
            on_result(outcome)
        if outcome.status == "failed" and settings.fail_fast:
            result.stopped = True
            break
    return result


def _process_listed(
    job: Job,
    seen: dict,
    settings: BatchSettings,
    backends: Backends,
    inpaint: bool,
    many: bool,
    progress: Optional[Progress],
) -> bool:
    from vitca_cli.io.images import ImageError

    if job.error is not None:
        raise job.error
    if job.output != STDIO and job.output in seen:
        raise ImageError(f"{job.source}: output {job.output} is also the output of {seen[job.output]}")
    seen[job.output] = job.source
    return process(job, settings, backends, inpaint, many, progress)


def process(
    job: Job,
    settings: BatchSettings,
    backends: Backends,
    inpaint: bool,
    many: bool,
    progress: Optional[Progress] = None,
) -> bool:
    """Restore one image and write its outputs (all through temporary files); False when skipped."""
    from vitca_cli.io import images

    sources = [job.source] + ([settings.mask] if settings.mask else [])
    images.check_readable(job.source)  # an unreadable input is reported as such, not as an output problem
    if not check_output(job.output, sources, settings):
        log.info(f"{job.output}: exists, skipped")
        return False
    extras = extra_outputs(job, settings, many)
    for path in extras.values():
        check_output(path, sources, settings)

    start = time.perf_counter()
    pic = images.read_image(job.source)
    for note in pic.notes:
        log.info(f"{pic.source}: {note}")
    backend = backends.get(pic.channels)
    missing = read_job_mask(settings.mask, job, pic.size, settings.stretch_mask) if inpaint else None
    step = None if progress is None else (lambda done, total: progress(job, done, total))
    done = restore_pixels(pic.pixels, backend, settings, missing, step, pic.source, large_hint=backends.suggest_faster)
    clean, pixels, result, iters, fusion = done.clean, done.shown, done.result, done.iters, done.fusion
    fmt = images.output_format(job.output, pic.format, settings.ext)
    images.write_image(job.output, result.image, pic, fmt)
    if "input" in extras:
        images.write_image(extras["input"], pixels, pic, fmt)
    if "animate" in extras:
        images.write_bytes(extras["animate"], images.encode_gif([pixels] + result.frames))
    if "compare" in extras:
        panels = ([clean] if settings.corrupt or inpaint else []) + [pixels, result.image]
        images.write_bytes(extras["compare"], images.encode_image(images.side_by_side(panels), "PNG"))
    h, w = pic.size
    tiles = (f" × {settings.runs} runs" if settings.runs > 1 else "") + (f", fused {fusion}" if fusion else "")
    tiles += f", {result.plan.count} tiles" if result.plan is not None and result.plan.count > 1 else ""
    if settings.settle > 0:
        share = result.skipped / max(1, result.computed + result.skipped)
        tiles += f", {share:.0%} of {result.computed + result.skipped:,} cell-steps skipped as settled"
    dest = "stdout" if job.output == STDIO else job.output
    log.info(
        f"{pic.source} -> {dest} ({w}×{h}, {backend.name}, {iters} steps{tiles}, {backend.device}, "
        f"{time.perf_counter() - start:.2f}s)"
    )
    return True


@dataclass
class Restoration:
    """One image restored: its pixels in the model's channels (``clean``), what the cells were shown (``shown``:
    masked or corrupted), the ``result`` (a ``vitca_cli.restore.loop.Restored``) and the steps and fusion it ran."""

    clean: np.ndarray
    shown: np.ndarray
    result: object
    iters: int
    fusion: object  # a ``FusionSchedule``, or None


def restore_pixels(
    pixels: np.ndarray,
    backend,
    settings: BatchSettings,
    missing: Optional[np.ndarray] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    source: str = "image",
    large_hint: Optional[Callable[[str], None]] = None,
) -> Restoration:
    """Restore float pixels ``(H, W, C)`` in [0, 1] with ``backend`` as ``settings`` say: the one path of both the
    CLI and the Python API (``vitca_cli.api``). The pixels are converted to the model's channels; those ``missing``
    ``(H, W)`` marks (inpainting; True = missing) are masked the way the model was trained and every other pixel
    comes back exactly as given; ``settings.corrupt`` damages the input first; the steps and fusion are the weights'
    own unless ``settings`` names them. ``large_hint(name)`` hears of a large image run by a default model."""
    from vitca_cli.io import images
    from vitca_cli.restore.backends import backend_mask_type
    from vitca_cli.restore.loop import corrupt, damage, mask_missing, restore

    cfg = backend.cfg
    if pixels.shape[2] != cfg.channels:
        log.info(f"{source}: {pixels.shape[2]}-channel image converted to the model's {cfg.channels} channel(s)")
        pixels = images.to_channels(pixels, cfg.channels)
    clean = pixels
    known = None
    if missing is not None:
        kind = settings.mask_type or backend_mask_type(backend)
        pixels = mask_missing(pixels, missing, kind, settings.seed)
        known = ~missing
        log.debug(f"{source}: {int(missing.sum())} missing pixels, masked as {kind}")
    if settings.damage and isinstance(settings.damage[0], float):
        prob, patch, kind = settings.damage
        pixels = corrupt(pixels, prob, patch, kind, settings.seed)
    elif settings.damage:
        pixels = damage(pixels, settings.damage, settings.seed, backend_mask_type(backend))
    iters = settings.iters or default_iters(backend)
    fusion = fusion_schedule(backend, settings.fusion)
    if known is not None and settings.iters is None:
        iters = _hole_iters(source, missing, iters, backend, settings, fusion)
    h, w = pixels.shape[:2]
    if large_hint is not None and settings.weights is None and not fusion and h * w >= LARGE_PIXELS:
        large_hint(backend.name)
    result = restore(
        backend,
        pixels,
        iters,
        settings.update_rate,
        settings.seed,
        settings.tile,
        frames=settings.frames if settings.animate else 0,
        progress=progress,
        known=known,
        settle=settings.settle,
        fusion=fusion or False,
        runs=settings.runs,
        holes_only=settings.holes_only,
    )
    return Restoration(clean, pixels, result, iters, fusion)


def _hole_iters(source: str, missing, default: int, backend, settings: BatchSettings, fusion) -> int:
    """The steps for the holes ``missing`` to fill from their borders (``vitca_cli.restore.holes.hole_steps``, by
    the ``fusion`` schedule or None), at least the weights' ``default`` and at most the most steps they are known
    to improve with: their meta's ``max_iters`` (without one, their default: a model trained on short rollouts can
    degrade on longer ones) and ``MAX_HOLE_ITERS``."""
    from vitca_cli.restore.holes import hole_depth, hole_steps

    meta = getattr(backend, "meta", None) or {}
    depth = hole_depth(missing)
    rate = backend.cfg.update_rate if settings.update_rate is None else settings.update_rate
    wanted = hole_steps(depth, default, backend.cfg, rate, fusion, MAX_ITERS)
    ceiling = min(MAX_HOLE_ITERS, max(default, int(meta.get("max_iters") or default)))
    iters = min(wanted, ceiling)
    deep = "no pixel known" if depth is None else f"holes up to {depth:.1f} px deep"
    if wanted > iters:
        held = "its max_iters" if meta.get("max_iters") else "its default; no max_iters in its meta"
        log.info(
            f"{source}: {deep} would take {wanted} steps to fill from their borders; {backend.name} is known to "
            f"improve up to {ceiling} steps ({held}): {iters} steps (--iters runs more)"
        )
    else:
        (log.info if iters != default else log.debug)(
            f"{source}: {deep}: {iters} steps (the weights' default {default})"
        )
    return iters
