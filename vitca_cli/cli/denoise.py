"""``vitca denoise`` and ``vitca inpaint``: restore users' images from the shell or a batch script.

Parses the options (each declared once, in ``_options``, for both commands), calls
:func:`vitca_cli.restore.batch.run_batch` and turns its result into lines on stderr and an exit code: a batch goes on
past a bad file (one line each) and exits 1 at the end (``--fail-fast`` stops at once); usage errors exit 2 and
missing weights exit 3 before any file is touched.
"""

from __future__ import annotations

import inspect
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from vitca_cli.cli import options as opt
from vitca_cli.cli.options import Backend, MaskType, handle_errors
from vitca_cli.errors import EXIT_FAILED, VitcaError
from vitca_cli.log import log
from vitca_cli.progress import Progress
from vitca_cli.restore.batch import MAX_HOLE_ITERS, BatchSettings  # torch-free: --help stays fast
from vitca_cli.restore.defaults import DEFAULT_ITERS

PROGRESS_EVERY_S = 5.0  # a log line this often when stderr is not a terminal


class _FileProgress:
    """One progress display per file (``vitca_cli.progress``): opened at its first step, closed when its result
    arrives. A transient bar on a terminal; otherwise a log line every ``PROGRESS_EVERY_S`` seconds."""

    def __init__(self):
        self.job, self.display = None, None

    def __call__(self, job, done: int, total: int) -> None:
        if job is not self.job:
            self.close()
            self.job = job
            self.display = Progress(Path(job.source).name, total, unit="tile-steps", every_s=PROGRESS_EVERY_S)
        self.display.update(done, total)

    def close(self) -> None:
        if self.display is not None:
            self.display.close()
        self.job, self.display = None, None


def run(inputs: list[str], inpaint: bool, **settings) -> None:
    """Build the settings, run the batch, report each failed file as one line; exit 1 if any failed."""
    from vitca_cli.restore.batch import run_batch

    batch = BatchSettings(**settings)
    progress = _FileProgress()

    def on_result(result) -> None:
        progress.close()
        if result.status == "failed":
            exc = result.error
            opt.report(exc, prefix="" if isinstance(exc, VitcaError) else f"{result.job.source}: ")

    try:
        outcome = run_batch(inputs, batch, inpaint=inpaint, progress=progress, on_result=on_result)
    finally:
        progress.close()
    if outcome.failed and outcome.stopped:
        log.warning("stopping at the first failure (--fail-fast)")
    if outcome.failed:
        log.warning(f"{len(outcome.failed)} of {outcome.total} input(s) failed")
        raise typer.Exit(EXIT_FAILED)


# ---------------------------------------------------------------------------------------------------------------------
# The commands: every option declared once, in ``_options``; each command takes the ones its ``*_OPTIONS`` names
# ---------------------------------------------------------------------------------------------------------------------
INPUTS_HELP = "Image files, folders, quoted globs, or - for stdin."
OUTPUT_HELP = (
    "Output file (one input), folder (several; sub-folders mirrored), or - for stdout (default: beside "
    "each input as NAME.restored.EXT; stdin goes to stdout)."
)
ITERS_HELP = f"CA iterations (default: the weights' own, else {DEFAULT_ITERS})."
INPAINT_ITERS_HELP = (
    f"CA iterations. Default: the weights' own (else {DEFAULT_ITERS}), raised for deep holes to D ÷ (update rate × "
    "step radius) steps, D the largest distance in pixels from a missing pixel to a known one (content spreads one "
    "radius per update; fused steps count twice), up to the most steps the weights are known to improve with "
    f"(max_iters in their meta, else their default) and at most {MAX_HOLE_ITERS}."
)


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    auto = "auto"


class CompileStep(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


SETTLE_HELP = (
    "Stop updating a cell once its output changed by less than this (pixel values 0-1) on 2 updates in a "
    "row; a run ends when every cell has settled. 0 = every step on every cell (exact)."
)
PRECISION_HELP = (
    "fp32, or bf16 matrix products (torch backend; fast on CPUs with AVX512-BF16 or AMX and on GPUs), "
    "or auto: bf16 for large images where the hardware has it, fp32 for small ones."
)
COMPILE_HELP = (
    "Torch backend: run the step compiled into fused kernels (torch.compile; needs a C++ compiler on CPU; "
    "seconds to start, once per process). auto: for large images only. off with --precision fp32: the exact "
    "step, the same bytes on every CPU."
)
FUSION_HELP = (
    "Run the middle steps on coarser grids (appendix A.1 fusion and mitosis: 2x2 cells fused into one, later "
    "divided again), by the schedule the weights were trained with (vitca train --fusion-schedule; A.1's 2:2 if "
    "they record none): fewer cell-steps and a longer reach, for weights trained with it. Default: as the "
    "weights say."
)
DENOISE_WEIGHTS_HELP = (
    "Weights NAME or PATH (default: the shipped model for the image's channels: fashion-mnist or photo)."
)
QUANTIZE_HELP = "ONNX backend: int8 matrix products (the step graph is quantised once, then cached)."
CORRUPT_HELP = (
    "Damage clean inputs first (to try the model): "
    'real-world damage, e.g. "gaussian=0.1", "saltpepper=0.1", "jpeg=10", '
    '"strokes=6", or the paper\'s masking, e.g. "p=0.5,patch=4,type=noise".'
)
STRETCH_MASK_HELP = (
    "Stretch a mask of another aspect ratio than the image's to fit (refused by default: it is almost "
    "surely the wrong mask). One of the same aspect ratio is resized either way."
)


def _options(inpaint: bool) -> dict:
    """Every option of ``vitca denoise`` and ``vitca inpaint`` as ``name: (type, typer option)``, each declared
    once; ``inpaint`` picks the wording where the two commands say it differently. The names are ``BatchSettings``
    fields, which the parsed values are passed to."""

    def said(denoise_text: str, inpaint_text: str) -> str:
        return inpaint_text if inpaint else denoise_text

    return {
        "inputs": (List[str], typer.Argument(..., help=INPUTS_HELP, show_default=False)),
        "mask": (
            str,
            typer.Option(
                ...,
                "--mask",
                "-m",
                help="Mask image (white = missing) for all inputs, or a folder of masks matched by file name.",
                show_default=False,
            ),
        ),
        "output": (Optional[str], typer.Option(None, "--output", "-o", help=OUTPUT_HELP, show_default=False)),
        "stretch_mask": (bool, typer.Option(False, "--stretch-mask", help=STRETCH_MASK_HELP)),
        "mask_type": (
            Optional[MaskType],
            typer.Option(
                None, "--mask-type", help="How missing pixels are shown to the model (default: as it was trained)."
            ),
        ),
        "iters": (Optional[int], opt.iters_option(None, said(ITERS_HELP, INPAINT_ITERS_HELP), show_default=False)),
        "update_rate": (Optional[float], opt.update_rate_option()),
        "runs": (int, opt.runs_option()),
        "seed": (
            int,
            opt.seed_option(
                said(
                    "Seed for update masks and corruption (same seed, same output).",
                    "Seed for update masks and noise (same seed, same output).",
                )
            ),
        ),
        "weights": (Optional[str], opt.weights_option(said(DENOISE_WEIGHTS_HELP, opt.WEIGHTS_HELP))),
        "device": (str, opt.device_option()),
        "backend": (Backend, opt.backend_option()),
        "tile": (Optional[int], opt.tile_option()),
        "recursive": (bool, typer.Option(False, "--recursive", "-r", help="Descend into sub-folders.")),
        "include_outputs": (
            bool,
            typer.Option(
                False,
                "--include-outputs",
                help="Folders and quoted globs: also restore files named like vitca's outputs (NAME.restored.EXT, "
                "NAME.input.EXT), which are left out by default.",
            ),
        ),
        "ext": (Optional[str], typer.Option(None, "--ext", help="Output format by extension (default: the input's).")),
        "overwrite": (bool, typer.Option(False, "--overwrite", help="Replace existing outputs.")),
        "skip_existing": (bool, typer.Option(False, "--skip-existing", help="Skip inputs whose output exists.")),
        "fail_fast": (bool, typer.Option(False, "--fail-fast", help="Stop at the first failed input.")),
        "corrupt": (Optional[str], typer.Option(None, "--corrupt", help=CORRUPT_HELP)),
        "save_input": (
            bool,
            typer.Option(
                False, "--save-input", help=f"Also write the {said('corrupted', 'masked')} input (NAME.input.EXT)."
            ),
        ),
        "animate": (
            Optional[str],
            typer.Option(
                None,
                "--animate",
                help=said(
                    "Write the iterations as a GIF (a folder for several inputs).", "Write the iterations as a GIF."
                ),
            ),
        ),
        "frames": (int, typer.Option(BatchSettings.frames, "--frames", help="Frames in the --animate GIF.")),
        "compare": (
            Optional[str],
            typer.Option(
                None,
                "--compare",
                help=said("Write input | output side by side as PNG.", "Write input | masked | output side by side."),
            ),
        ),
        "threads": (Optional[int], opt.threads_option()),
        "settle": (float, typer.Option(BatchSettings.settle, "--settle", min=0.0, help=SETTLE_HELP)),
        "fusion": (
            Optional[bool],
            typer.Option(None, "--fusion/--no-fusion", help=FUSION_HELP, show_default=False),
        ),
        "precision": (Precision, typer.Option(Precision.auto, "--precision", help=PRECISION_HELP)),
        "compile": (CompileStep, typer.Option(CompileStep.auto, "--compile", help=COMPILE_HELP)),
        "quantize": (bool, typer.Option(False, "--quantize", help=QUANTIZE_HELP)),
        "holes_only": (
            bool,
            typer.Option(
                True,
                "--holes-only/--whole-grid",
                hidden=True,
                help="Compute only the cells that can reach a missing pixel (the default), or every cell: the same "
                "output.",
            ),
        ),
    }


_BATCH = ("recursive", "include_outputs", "ext", "overwrite", "skip_existing", "fail_fast")
_RUN = ("threads", "settle", "fusion", "precision", "compile", "quantize")
_MODEL = ("update_rate", "runs", "seed", "weights", "device", "backend", "tile")
DENOISE_OPTIONS = ("inputs", "output", "iters", *_MODEL, *_BATCH, "corrupt", "save_input", "animate", "frames",
                   "compare", *_RUN)  # fmt: skip
INPAINT_OPTIONS = ("inputs", "mask", "output", "stretch_mask", "mask_type", "iters", *_MODEL, *_BATCH, "save_input",
                   "animate", "frames", "compare", *_RUN, "holes_only")  # fmt: skip


def _command(fn, inpaint: bool, names: tuple):
    """``fn(**options)`` as a typer command taking the options ``names`` lists (in that order), each declared once
    in ``_options``."""
    options = _options(inpaint)
    params = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=options[name][1], annotation=options[name][0])
        for name in names
    ]
    fn.__signature__ = inspect.Signature(params, return_annotation=None)
    fn.__annotations__ = {p.name: p.annotation for p in params}
    return handle_errors(fn)


def _value(v):
    return v.value if isinstance(v, Enum) else v


def denoise(inputs: list[str], **options) -> None:
    """Denoise images: the image is the cells' input; the output channels after the iterations are the result.

    Exit codes: 0 done; 1 some inputs failed (the rest were processed); 2 usage error; 3 weights missing.
    """
    run(inputs, False, **{k: _value(v) for k, v in options.items()})


def inpaint(inputs: list[str], **options) -> None:
    """Fill in the pixels a mask marks white, masked the way the model was trained (dropout or noise).

    Exit codes: 0 done; 1 some inputs failed (the rest were processed); 2 usage error; 3 weights missing.
    """
    run(inputs, True, **{k: _value(v) for k, v in options.items()})


def register(app: typer.Typer) -> None:
    app.command("denoise")(_command(denoise, False, DENOISE_OPTIONS))
    app.command("inpaint")(_command(inpaint, True, INPAINT_OPTIONS))
