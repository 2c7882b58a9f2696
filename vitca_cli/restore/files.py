"""The files of a batch: listing inputs (files, folders, globs, stdin), choosing where outputs and extra files go,
the overwrite rules, and finding each input's inpainting mask. No image is decoded here except masks."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from vitca_cli.errors import SettingError, VitcaError
from vitca_cli.log import log

STDIO = "-"
RESTORED_TAG = "restored"  # NAME.restored.EXT: an output written beside its input
INPUT_TAG = "input"  # NAME.input.EXT: the corrupted or masked input written beside an output (save_input)
OUTPUT_TAGS = (RESTORED_TAG, INPUT_TAG)


@dataclass
class Job:
    """One input and where its results go."""

    source: str  # a path, or "-" for stdin
    rel: Path  # name relative to its input folder (mirrored under an output folder)
    output: str = ""  # a path, or "-" for stdout
    error: Optional[VitcaError] = None  # set when the input could not even be listed (e.g. a glob with no match)
    expanded: bool = False  # came from a folder or a glob: its output always goes into a folder


def is_own_output(path: Path) -> bool:
    """Whether vitca names files like this one as its outputs (``NAME.restored.EXT``, ``NAME.input.EXT``)."""
    return any(path.stem.endswith(f".{tag}") for tag in OUTPUT_TAGS)


def collect_inputs(specs: list[str], recursive: bool, skip_outputs: bool = False) -> list[Job]:
    """Expand files, folders (their images; sub-folders with ``recursive``), quoted globs and ``-``. With
    ``skip_outputs``, folders and globs leave out the files vitca names as its outputs (:func:`is_own_output`),
    so that a second run does not restore the first one's results; files named one by one are always taken."""
    from vitca_cli.io.images import IMAGE_SUFFIXES, ImageError

    jobs: list[Job] = []
    left_out: list[Path] = []

    def keep(p: Path) -> bool:
        if skip_outputs and is_own_output(p):
            left_out.append(p)
            return False
        return True

    for spec in specs:
        if spec == STDIO:
            jobs.append(Job(STDIO, Path("stdin")))
            continue
        path = Path(spec)
        if path.is_dir():
            walk = path.rglob("*") if recursive else path.glob("*")
            before = len(left_out)
            found = sorted(p for p in walk if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and keep(p))
            if not found:
                hint = "" if recursive else " (add {0} for sub-folders)"
                if len(left_out) > before:
                    hint = " but vitca's own outputs (add {1} to restore them)"
                error = ImageError(f"{spec}: no images in folder" + hint, settings=("recursive", "include_outputs"))
                jobs.append(Job(spec, Path(path.name), error=error))
            jobs.extend(Job(str(p), p.relative_to(path), expanded=True) for p in found)
        elif not path.exists() and glob.has_magic(spec):
            found = sorted(glob.glob(spec, recursive=recursive))
            if not found:
                jobs.append(Job(spec, Path(path.name), error=ImageError(f"{spec}: no files match")))
            jobs.extend(Job(p, Path(Path(p).name), expanded=True) for p in found if Path(p).is_file() and keep(Path(p)))
        else:  # a file, or a missing one (reported when it is read, so the batch goes on)
            jobs.append(Job(spec, Path(path.name)))
    if left_out:
        log.info(
            f"{len(left_out)} file(s) named as vitca's own outputs (*.{RESTORED_TAG}.*, *.{INPUT_TAG}.*) left out, "
            f"e.g. {left_out[0]}; add --include-outputs to restore them too"
        )
    return jobs


def assign_outputs(jobs: list[Job], output: Optional[str], ext: Optional[str]) -> None:
    """``output`` a file for one input file, a folder (mirroring sub-folders) for several or for a folder or glob,
    ``-`` for stdout; None: beside each input as ``NAME.restored.EXT`` (stdin to stdout)."""
    suffix = None
    if ext:
        suffix = ext if ext.startswith(".") else f".{ext}"
    if output is None:
        for job in jobs:
            src = Path(job.source)
            job.output = (
                STDIO if job.source == STDIO else str(src.with_name(f"{src.stem}.{RESTORED_TAG}{suffix or src.suffix}"))
            )
        return
    if output == STDIO:
        if len(jobs) != 1:
            raise SettingError("output", f"- writes one image to stdout, but {len(jobs)} inputs were given")
        jobs[0].output = STDIO
        return
    as_dir = len(jobs) > 1 or jobs[0].expanded or output.endswith(("/", os.sep)) or Path(output).is_dir()
    if not as_dir:
        out = Path(output)
        if suffix and out.suffix and out.suffix.lower() != suffix.lower():
            raise SettingError(
                "output",
                f"{output} and " + "{1} " + f"{ext} name different formats; drop " + "{1} or change {0}",
                "ext",
            )
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


def check_output(path: str, sources: list[str], settings) -> bool:
    """Refuse outputs that would overwrite an input, exist (without ``settings.overwrite``) or cannot be written.

    Returns False when the file should be skipped (``skip_existing``)."""
    from vitca_cli.io.images import ImageError

    if path == STDIO:
        return True
    for src in sources:
        if _same_file(path, src):
            raise ImageError(
                f"{src}: output {path} is the input itself; choose another " + "{0} (inputs are never overwritten)",
                settings=("output",),
            )
    if Path(path).is_dir():
        raise ImageError(f"{path}: output is a folder")
    if Path(path).exists():
        if settings.skip_existing:
            return False
        if not settings.overwrite:
            raise ImageError(
                f"{path}: output exists (add " + "{0}, or {1} to keep it)", settings=("overwrite", "skip_existing")
            )
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


def extra_outputs(job: Job, settings, many: bool) -> dict[str, str]:
    """The extra files of one input (corrupted input, animation, comparison) that ``settings`` (a ``BatchSettings``)
    asks for: name → path."""
    extras = {}
    if settings.save_input:
        extras["input"] = _beside(job.output, "input")
    if settings.animate:
        extras["animate"] = _extra_path(settings.animate, job, many, ".gif")
    if settings.compare:
        extras["compare"] = _extra_path(settings.compare, job, many, ".png")
    return extras


def read_job_mask(mask: str, job: Job, size: tuple[int, int], stretch: bool = False):
    """One mask for all inputs, or, when ``mask`` is a folder, the mask whose file stem matches the input's; one of
    another aspect ratio than the image's is a ``UsageError`` unless ``stretch``."""
    from vitca_cli.errors import UsageError
    from vitca_cli.io import images

    path = Path(mask)
    if path.is_dir():
        matches = sorted(
            p for p in path.iterdir() if p.stem == job.rel.stem and p.suffix.lower() in images.IMAGE_SUFFIXES
        )
        if not matches:
            raise images.ImageError(f"{job.source}: no mask named {job.rel.stem}.* in {mask}")
        path = matches[0]
    try:
        return images.read_mask(path, size, stretch)
    except images.ImageError as exc:
        raise images.ImageError(f"mask {exc}") from None
    except UsageError as exc:
        raise UsageError(f"{job.source}: {exc.template}", settings=exc.settings) from None
