"""``vitca denoise`` and ``vitca inpaint``: restore users' images from the shell or a batch script.

This module parses, resolves paths and device, and calls :mod:`vitca_cli.restore.loop`; no maths here. A batch goes on
past a bad file (one line on stderr each) and exits 1 at the end (``--fail-fast`` stops at once); usage errors exit
2 and missing weights exit 3 before any file is touched.
"""

from __future__ import annotations

import glob
import os
import sys
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from vitca_cli import log as logmod
from vitca_cli.cli.options import MaskType, handle_errors
from vitca_cli.errors import EXIT_FAILED, UsageError, VitcaError, WeightsError
from vitca_cli.log import log

STDIO = "-"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    auto = "auto"


class Backend(str, Enum):
    torch = "torch"
    onnx = "onnx"


@dataclass
class Job:
    """One input and where its results go."""

    source: str  # a path, or "-" for stdin
    rel: Path  # name relative to its input folder (mirrored under an output folder)
    output: str = ""  # a path, or "-" for stdout
    error: str = ""  # set when the input could not even be listed (e.g. a glob with no match)
    expanded: bool = False  # came from a folder or a glob: its output always goes into a folder


@dataclass
class Settings:
    iters: Optional[int]  # None: the weights' default_iters (64 when they name none)
    update_rate: Optional[float]
    seed: int
    weights: Optional[str]
    device: str
    backend: str
    tile: Optional[int]
    corrupt: Optional[tuple]
    save_input: bool
    animate: Optional[str]
    frames: int
    compare: Optional[str]
    overwrite: bool
    skip_existing: bool
    fail_fast: bool
    ext: Optional[str]
    mask: Optional[str] = None
    mask_type: Optional[str] = None
    threads: Optional[int] = None
    settle: float = 0.0
    precision: str = "fp32"
    quantize: bool = False


# ---------------------------------------------------------------------------------------------------------------------
# Inputs and outputs
# ---------------------------------------------------------------------------------------------------------------------
def collect_inputs(specs: list[str], recursive: bool, skip_restored: bool = False) -> list[Job]:
    """Expand files, folders (their images; sub-folders with ``recursive``), quoted globs and ``-``. With
    ``skip_restored``, folders leave out earlier outputs written beside their inputs (``NAME.restored.EXT``)."""
    from vitca_cli.io.images import IMAGE_SUFFIXES

    jobs: list[Job] = []
    for spec in specs:
        if spec == STDIO:
            jobs.append(Job(STDIO, Path("stdin")))
            continue
        path = Path(spec)
        if path.is_dir():
            walk = path.rglob("*") if recursive else path.glob("*")
            found = sorted(p for p in walk if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                           and not (skip_restored and p.stem.endswith(f".{RESTORED_TAG}")))
            if not found:
                jobs.append(Job(spec, Path(path.name), error=f"{spec}: no images in folder"
                                + ("" if recursive else " (add --recursive for sub-folders)")))
            jobs.extend(Job(str(p), p.relative_to(path), expanded=True) for p in found)
        elif not path.exists() and glob.has_magic(spec):
            found = sorted(glob.glob(spec, recursive=recursive))
            if not found:
                jobs.append(Job(spec, Path(path.name), error=f"{spec}: no files match"))
            jobs.extend(Job(p, Path(Path(p).name), expanded=True) for p in found if Path(p).is_file())
        else:  # a file, or a missing one (reported when it is read, so the batch goes on)
            jobs.append(Job(spec, Path(path.name)))
    return jobs


RESTORED_TAG = "restored"


def assign_outputs(jobs: list[Job], output: Optional[str], ext: Optional[str]) -> None:
    """``-o FILE`` for one input file, ``-o DIR`` (mirroring sub-folders) for several or for a folder or glob,
    ``-o -`` for stdout; without ``-o``, beside each input as ``NAME.restored.EXT`` (stdin to stdout)."""
    suffix = None
    if ext:
        suffix = ext if ext.startswith(".") else f".{ext}"
    if output is None:
        for job in jobs:
            src = Path(job.source)
            job.output = STDIO if job.source == STDIO else str(
                src.with_name(f"{src.stem}.{RESTORED_TAG}{suffix or src.suffix}"))
        return
    if output == STDIO:
        if len(jobs) != 1:
            raise UsageError(f"-o - writes one image to stdout, but {len(jobs)} inputs were given")
        jobs[0].output = STDIO
        return
    as_dir = len(jobs) > 1 or jobs[0].expanded or output.endswith(("/", os.sep)) or Path(output).is_dir()
    if not as_dir:
        out = Path(output)
        if suffix and out.suffix and out.suffix.lower() != suffix.lower():
            raise UsageError(f"-o {output} and --ext {ext} name different formats; drop --ext or change -o")
        jobs[0].output = str(out.with_suffix(suffix) if suffix else out)
        return
    for job in jobs:
        rel = job.rel
        if job.source == STDIO and not rel.suffix:
            rel = rel.with_suffix(".png")
        job.output = str(Path(output) / (rel.with_suffix(suffix) if suffix else rel))


def _same_file(a: str, b: str) -> bool:
    if STDIO in (a, b):
        return False
    pa, pb = Path(a), Path(b)
    try:
        return pa.resolve() == pb.resolve() or (pb.exists() and pa.exists() and os.path.samefile(pa, pb))
    except OSError:
        return False


def _unwritable(path: str) -> str | None:
    """Why ``path`` cannot be created (None when it can): its nearest existing ancestor must be a writable folder."""
    parent = Path(path).resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write in {parent} (permission denied)"
    return None


def check_output(path: str, sources: list[str], settings: Settings) -> bool:
    """Refuse outputs that would overwrite an input, exist (without ``--overwrite``) or cannot be written.

    Returns False when the file should be skipped (``--skip-existing``)."""
    from vitca_cli.io.images import ImageError

    if path == STDIO:
        return True
    for src in sources:
        if _same_file(path, src):
            raise ImageError(f"{src}: output {path} is the input itself; choose another -o (inputs are never "
                             f"overwritten)")
    if Path(path).is_dir():
        raise ImageError(f"{path}: output is a folder")
    if Path(path).exists():
        if settings.skip_existing:
            return False
        if not settings.overwrite:
            raise ImageError(f"{path}: output exists (add --overwrite, or --skip-existing to keep it)")
    reason = _unwritable(path)
    if reason:
        raise ImageError(f"{path}: {reason}")
    return True


def _extra_path(given: str, job: Job, many: bool, suffix: str) -> str:
    """Where an animation or comparison goes: the given file for one input, ``given/<name>`` for a batch."""
    return str(Path(given) / job.rel.with_suffix(suffix)) if many else given


def _beside(output: str, tag: str) -> str:
    out = Path(output)
    return str(out.with_name(f"{out.stem}.{tag}{out.suffix}"))


# ---------------------------------------------------------------------------------------------------------------------
# The batch
# ---------------------------------------------------------------------------------------------------------------------
class Backends:
    """Backends by weights name, built on first use (the default depends on each image's channels)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._by_key: dict = {}

    def get(self, channels: int):
        from vitca_cli.restore.loop import make_backend

        key = self.settings.weights or channels
        if key not in self._by_key:
            s = self.settings
            self._by_key[key] = make_backend(s.weights, s.backend, s.device, channels, s.precision, s.quantize)
        return self._by_key[key]


def run_batch(inputs: list[str], output: Optional[str], recursive: bool, settings: Settings, inpaint: bool) -> None:
    """Process every input; raise ``typer.Exit(1)`` at the end if any failed."""
    from vitca_cli.io.images import ImageError

    from vitca_cli.runtime import choose_threads, resolve_device

    if settings.backend == "torch":  # an impossible device is a usage error before any file is read
        resolve_device(settings.device)
    choose_threads(settings.threads)
    backends = Backends(settings)
    if settings.weights is not None:
        backends.get(0)  # missing or unknown weights: exit 3 now, not once per file
    jobs = collect_inputs(inputs, recursive, skip_restored=output is None)
    listed = [j for j in jobs if not j.error]
    if not listed and not any(j.error for j in jobs):
        raise UsageError("no inputs given")
    assign_outputs(jobs, output, settings.ext)
    many = len(jobs) > 1
    if (settings.animate == STDIO or settings.compare == STDIO) and output == STDIO:
        raise UsageError("only one of -o, --animate and --compare can be - (stdout)")
    rate = "as trained" if settings.update_rate is None else settings.update_rate
    steps = "the model's default" if settings.iters is None else settings.iters
    log.info(f"seed {settings.seed}, {steps} iterations, update rate {rate}")

    failed = 0
    seen: dict[str, str] = {}
    for job in jobs:
        try:
            if job.error:
                raise ImageError(job.error)
            if job.output != STDIO and job.output in seen:
                raise ImageError(f"{job.source}: output {job.output} is also the output of {seen[job.output]}")
            seen[job.output] = job.source
            process(job, settings, backends, inpaint, many)
        except (WeightsError, UsageError):
            raise
        except VitcaError as exc:
            failed += 1
            logmod.error_line(str(exc))
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
            failed += 1
            if logmod.verbosity() >= 2:
                import traceback

                traceback.print_exc()
            logmod.error_line(f"{job.source}: {type(exc).__name__}: {exc} (run with -vv for the traceback)")
        if failed and settings.fail_fast:
            log.warning("stopping at the first failure (--fail-fast)")
            break
    if failed:
        log.warning(f"{failed} of {len(jobs)} input(s) failed")
        raise typer.Exit(EXIT_FAILED)


def process(job: Job, settings: Settings, backends: Backends, inpaint: bool, many: bool) -> None:
    """Restore one image and write its outputs (all through temporary files)."""
    from vitca_cli.io import images
    from vitca_cli.restore.loop import backend_mask_type, corrupt, damage, mask_missing, restore

    sources = [job.source] + ([settings.mask] if settings.mask else [])
    images.check_readable(job.source)  # an unreadable input is reported as such, not as an output problem
    if not check_output(job.output, sources, settings):
        log.info(f"{job.output}: exists, skipped (--skip-existing)")
        return
    extras = {}
    if settings.save_input:
        extras["input"] = _beside(job.output, "input")
    if settings.animate:
        extras["animate"] = _extra_path(settings.animate, job, many, ".gif")
    if settings.compare:
        extras["compare"] = _extra_path(settings.compare, job, many, ".png")
    for path in extras.values():
        check_output(path, sources, settings)

    start = time.perf_counter()
    pic = images.read_image(job.source)
    for note in pic.notes:
        log.info(f"{pic.source}: {note}")
    backend = backends.get(pic.channels)
    cfg = backend.cfg
    pixels = pic.pixels
    if pic.channels != cfg.channels:
        log.info(f"{pic.source}: {pic.channels}-channel image converted to the model's {cfg.channels} channel(s)")
        pixels = images.to_channels(pixels, cfg.channels)
    clean = pixels
    known = None
    if inpaint:
        missing = _read_mask(settings.mask, job, pic.size)
        kind = settings.mask_type or backend_mask_type(backend)
        pixels = mask_missing(pixels, missing, kind, settings.seed)
        known = ~missing
        log.debug(f"{pic.source}: {int(missing.sum())} missing pixels, masked as {kind}")
    if settings.corrupt and isinstance(settings.corrupt[0], float):
        prob, patch, kind = settings.corrupt
        pixels = corrupt(pixels, prob, patch, kind, settings.seed)
    elif settings.corrupt:
        pixels = damage(pixels, settings.corrupt, settings.seed, backend_mask_type(backend))

    iters = settings.iters or int((getattr(backend, "meta", None) or {}).get("default_iters") or DEFAULT_ITERS)
    progress, finish = _progress_bar(job.source)
    try:
        result = restore(backend, pixels, iters, settings.update_rate, settings.seed, settings.tile,
                         frames=settings.frames if settings.animate else 0, progress=progress, known=known,
                         settle=settings.settle)
    finally:
        finish()
    fmt = images.output_format(job.output, pic.format, settings.ext)
    images.write_image(job.output, result.image, pic, fmt)
    if "input" in extras:
        images.write_image(extras["input"], pixels, pic, fmt)
    if "animate" in extras:
        frames = [pixels] + result.frames
        images.write_bytes(extras["animate"], images.encode_gif(frames))
    if "compare" in extras:
        panels = ([clean] if settings.corrupt or inpaint else []) + [pixels, result.image]
        images.write_bytes(extras["compare"], images.encode_image(images.side_by_side(panels), "PNG"))
    h, w = pic.size
    tiles = f", {result.plan.count} tiles" if result.plan.count > 1 else ""
    if settings.settle > 0:
        share = result.skipped / max(1, result.computed + result.skipped)
        tiles += f", {share:.0%} of {result.computed + result.skipped:,} cell-steps skipped as settled"
    dest = "stdout" if job.output == STDIO else job.output
    log.info(f"{pic.source} -> {dest} ({w}×{h}, {backend.name}, {iters} steps{tiles}, "
             f"{time.perf_counter() - start:.2f}s)")


def _read_mask(mask: str, job: Job, size: tuple[int, int]):
    """One mask for all inputs, or, when ``--mask`` is a folder, the mask whose file stem matches the input's."""
    from vitca_cli.io import images

    path = Path(mask)
    if path.is_dir():
        matches = sorted(p for p in path.iterdir() if p.stem == job.rel.stem and p.suffix.lower()
                         in images.IMAGE_SUFFIXES)
        if not matches:
            raise images.ImageError(f"{job.source}: no mask named {job.rel.stem}.* in {mask}")
        path = matches[0]
    try:
        return images.read_mask(path, size)
    except images.ImageError as exc:
        raise images.ImageError(f"mask {exc}") from None


PROGRESS_EVERY_S = 5.0  # a log line this often when stderr is not a terminal


def _progress_bar(name: str):
    """Progress on stderr: a transient rich bar on a terminal (shown from the first step, when the total is known);
    otherwise a log line every ``PROGRESS_EVERY_S`` seconds, so batch logs show a long image is alive."""
    if logmod.log.level > 20:
        return None, lambda: None
    label = Path(name).name
    start = time.perf_counter()
    if not sys.stderr.isatty():
        last = [start]

        def log_line(done: int, total: int) -> None:
            now = time.perf_counter()
            if now - last[0] >= PROGRESS_EVERY_S and done < total:
                eta = (now - start) / done * (total - done)
                logmod.log.info(f"{label}: {done}/{total} tile-steps ({100 * done / total:.0f}%), ETA {eta:.0f}s")
                last[0] = now

        return log_line, lambda: None
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TimeRemainingColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(), "{task.completed}/{task.total} steps",
                   TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    task: list = []

    def update(done: int, total: int) -> None:
        if not task:
            bar.start()
            task.append(bar.add_task(label, total=total))
        bar.update(task[0], completed=done, total=total)

    return update, bar.stop


# ---------------------------------------------------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------------------------------------------------
def _settings(iters, update_rate, seed, weights, device, backend, tile, corrupt_spec, save_input, animate, frames,
              compare, overwrite, skip_existing, fail_fast, ext, output) -> Settings:
    """Validate the options shared by both commands (bad ones are usage errors, exit 2)."""
    from vitca_cli.io.images import FORMATS

    if iters is not None and iters > MAX_ITERS:
        raise UsageError(f"--iters {iters}: at most {MAX_ITERS:,} steps")
    if iters is not None and iters < 1:
        raise UsageError(f"--iters must be at least 1, got {iters}")
    if update_rate is not None and not 0.0 < update_rate <= 1.0:
        raise UsageError(f"--update-rate must be in (0, 1], got {update_rate}")
    if tile is not None and tile < 0:
        raise UsageError(f"--tile must be 0 (off) or a positive size in pixels, got {tile}")
    if frames < 1:
        raise UsageError(f"--frames must be at least 1, got {frames}")
    if overwrite and skip_existing:
        raise UsageError("--overwrite and --skip-existing contradict each other; pick one")
    if ext and (ext if ext.startswith(".") else f".{ext}").lower() not in FORMATS:
        raise UsageError(f"--ext {ext}: unknown image extension; choose from {', '.join(sorted(FORMATS))}")
    if save_input and output == STDIO:
        raise UsageError("--save-input writes beside the output file; it cannot be used with -o -")
    corrupt = None
    if corrupt_spec:
        from vitca_cli.nca.corruptions import KINDS, parse_mixture
        from vitca_cli.nca.masking import parse_corruption

        try:
            if corrupt_spec.strip().split("=")[0].split(":")[0].strip() in KINDS:
                corrupt = parse_mixture(corrupt_spec)
            else:
                corrupt = parse_corruption(corrupt_spec)
        except ValueError as exc:
            raise UsageError(f"--corrupt: {exc}") from None
    return Settings(iters, update_rate, seed, weights, device, backend.value, tile, corrupt, save_input, animate,
                    frames, compare, overwrite, skip_existing, fail_fast, ext)


DEFAULT_ITERS = 64
MAX_ITERS = 10_000
INPUTS_HELP = "Image files, folders, quoted globs, or - for stdin."
OUTPUT_HELP = ("Output file (one input), folder (several; sub-folders mirrored), or - for stdout (default: beside "
               "each input as NAME.restored.EXT; stdin goes to stdout).")
DEFAULT_SETTLE = 0.0
SETTLE_HELP = ("Stop updating a cell once its output changed by less than this (pixel values 0-1) on 2 updates in a "
               "row; a run ends when every cell has settled. 0 = every step on every cell (exact).")
PRECISION_HELP = ("fp32, or bf16 matrix products (torch backend; fast on CPUs with AVX512-BF16/AMX and on GPUs), or "
                  "auto: bf16 where the hardware has it.")
QUANTIZE_HELP = "ONNX backend: int8 matrix products (the step graph quantised once, then cached)."
THREADS_HELP = "CPU threads (default: the cores not already busy; 1 is fastest on a loaded machine)."


@handle_errors
def denoise(
    inputs: List[str] = typer.Argument(..., help=INPUTS_HELP, show_default=False),
    output: Optional[str] = typer.Option(None, "--output", "-o", help=OUTPUT_HELP, show_default=False),
    iters: Optional[int] = typer.Option(
        None, "--iters", help=f"CA iterations (default: the weights' own, else {DEFAULT_ITERS}).", show_default=False
    ),
    update_rate: Optional[float] = typer.Option(
        None, "--update-rate", help="Per-cell update probability σ (default: as the model was trained)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for update masks and corruption (same seed, same output)."),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Weights NAME or PATH (default: the shipped "
                                          "model for the image's channels: fashion-mnist or photo)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    backend: Backend = typer.Option(Backend.torch, "--backend", help="Run the CA with torch or ONNX Runtime."),
    tile: Optional[int] = typer.Option(None, "--tile", help="Tile side in pixels (default: automatic; 0 = no tiling)."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Descend into sub-folders."),
    ext: Optional[str] = typer.Option(None, "--ext", help="Output format by extension (default: the input's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    skip_existing: bool = typer.Option(False, "--skip-existing", help="Skip inputs whose output exists."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop at the first failed input."),
    corrupt: Optional[str] = typer.Option(None, "--corrupt", help='Damage clean inputs first (to try the model): '
                                          'real-world damage, e.g. "gaussian=0.1", "saltpepper=0.1", "jpeg=10", '
                                          '"strokes=6", or the paper\'s masking, e.g. "p=0.5,patch=4,type=noise".'),
    save_input: bool = typer.Option(False, "--save-input", help="Also write the corrupted input (NAME.input.EXT)."),
    animate: Optional[str] = typer.Option(None, "--animate", help="Write the iterations as a GIF (a folder for "
                                          "several inputs)."),
    frames: int = typer.Option(32, "--frames", help="Frames in the --animate GIF."),
    compare: Optional[str] = typer.Option(None, "--compare", help="Write input | output side by side as PNG."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
    settle: float = typer.Option(DEFAULT_SETTLE, "--settle", min=0.0, help=SETTLE_HELP),
    precision: Precision = typer.Option(Precision.fp32, "--precision", help=PRECISION_HELP),
    quantize: bool = typer.Option(False, "--quantize", help=QUANTIZE_HELP),
) -> None:
    """Denoise images: the image is the cells' input; the output channels after the iterations are the result.

    Exit codes: 0 done; 1 some inputs failed (the rest were processed); 2 usage error; 3 weights missing.
    """
    settings = _settings(iters, update_rate, seed, weights, device, backend, tile, corrupt, save_input, animate,
                         frames, compare, overwrite, skip_existing, fail_fast, ext, output)
    settings.threads, settings.settle, settings.precision, settings.quantize = threads, settle, precision.value, quantize
    run_batch(inputs, output, recursive, settings, inpaint=False)


@handle_errors
def inpaint(
    inputs: List[str] = typer.Argument(..., help=INPUTS_HELP, show_default=False),
    mask: str = typer.Option(..., "--mask", "-m", help="Mask image (white = missing) for all inputs, or a folder of "
                             "masks matched by file name.", show_default=False),
    output: Optional[str] = typer.Option(None, "--output", "-o", help=OUTPUT_HELP, show_default=False),
    mask_type: Optional[MaskType] = typer.Option(None, "--mask-type", help="How missing pixels are shown to the "
                                                 "model (default: as it was trained)."),
    iters: Optional[int] = typer.Option(
        None, "--iters", help=f"CA iterations (default: the weights' own, else {DEFAULT_ITERS}).", show_default=False
    ),
    update_rate: Optional[float] = typer.Option(
        None, "--update-rate", help="Per-cell update probability σ (default: as the model was trained)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for update masks and noise (same seed, same output)."),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Weights NAME or PATH."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    backend: Backend = typer.Option(Backend.torch, "--backend", help="Run the CA with torch or ONNX Runtime."),
    tile: Optional[int] = typer.Option(None, "--tile", help="Tile side in pixels (default: automatic; 0 = no tiling)."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Descend into sub-folders."),
    ext: Optional[str] = typer.Option(None, "--ext", help="Output format by extension (default: the input's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    skip_existing: bool = typer.Option(False, "--skip-existing", help="Skip inputs whose output exists."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop at the first failed input."),
    save_input: bool = typer.Option(False, "--save-input", help="Also write the masked input (NAME.input.EXT)."),
    animate: Optional[str] = typer.Option(None, "--animate", help="Write the iterations as a GIF."),
    frames: int = typer.Option(32, "--frames", help="Frames in the --animate GIF."),
    compare: Optional[str] = typer.Option(None, "--compare", help="Write input | masked | output side by side."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
    settle: float = typer.Option(DEFAULT_SETTLE, "--settle", min=0.0, help=SETTLE_HELP),
    precision: Precision = typer.Option(Precision.fp32, "--precision", help=PRECISION_HELP),
    quantize: bool = typer.Option(False, "--quantize", help=QUANTIZE_HELP),
) -> None:
    """Fill in the pixels a mask marks white, masked the way the model was trained (dropout or noise).

    Exit codes: 0 done; 1 some inputs failed (the rest were processed); 2 usage error; 3 weights missing.
    """
    settings = _settings(iters, update_rate, seed, weights, device, backend, tile, None, save_input, animate, frames,
                         compare, overwrite, skip_existing, fail_fast, ext, output)
    settings.threads, settings.settle, settings.precision, settings.quantize = threads, settle, precision.value, quantize
    if not Path(mask).exists():
        raise UsageError(f"--mask {mask}: no such file or folder")
    settings.mask = mask
    settings.mask_type = mask_type.value if mask_type else None
    run_batch(inputs, output, recursive, settings, inpaint=True)


def register(app: typer.Typer) -> None:
    app.command("denoise")(denoise)
    app.command("inpaint")(inpaint)
