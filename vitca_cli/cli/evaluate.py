"""``vitca eval``, ``vitca analyze``, ``vitca profile`` and ``vitca probe``: measurements, as thin commands.

Each parses its options, calls one function of ``training.measure`` and prints the report it returns; the work lives
in ``training.evaluate``, ``training.analyses``, ``training.profiling`` and ``training.probe``.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from vitca_cli.cli import options as opt
from vitca_cli.cli.options import MaskType, handle_errors
from vitca_cli.training.profiling import MODES as PROFILE_MODES  # torch-free: --help stays fast


class Compile(str, Enum):
    none = "none"
    step = "step"
    attention = "attention"


class Kind(str, Enum):
    update_rate = "update-rate"
    unseen_noise = "unseen-noise"
    head_masking = "head-masking"
    stability = "stability"


WEIGHTS_HELP = "Checkpoint file (a training run's best.pt) or a shipped weights NAME."
DATASET_HELP = "fashion-mnist, mnist, mnist-5k, cifar10, celeba or folder:PATH."


@handle_errors
def eval_command(
    weights: str = opt.weights_option(WEIGHTS_HELP, required=True),
    dataset: str = typer.Option(..., "--dataset", "-d", help=DATASET_HELP),
    split: str = typer.Option("test", "--split", help="Dataset split."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Where datasets are (or are downloaded to)."),
    iters: int = opt.iters_option(64, "CA steps per image.", min=1),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate the first N images only."),
    mask_type: Optional[MaskType] = typer.Option(
        None, "--mask-type", help="Test corruption (default: as trained, else noise)."
    ),
    max_patch: Optional[int] = typer.Option(
        None, "--max-patch", min=1, help="Largest test mask patch: sizes 1, max/2, max (default: as trained, else 4)."
    ),
    update_rate: Optional[float] = opt.update_rate_option(),
    runs: int = opt.runs_option(),
    baselines: bool = typer.Option(
        False, "--baselines", help="Also run classic restorers (needs the 'baselines' extra)."
    ),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per batch (one mask combo per batch)."),
    protocol: str = typer.Option(
        "cycled",
        "--protocol",
        help="cycled: combo k mod 9 for batch k (equal shares, low variance); paper: the "
        "reference's (batches of 32 with drop_last, one random combo per batch, headline = batch PSNR).",
    ),
    corruptions: Optional[str] = typer.Option(
        None,
        "--corruptions",
        help="Real-world damage instead of the paper's masks: a mixture as for `vitca train "
        '--corruptions`, e.g. "gaussian=0.1" or "gaussian:1, jpeg=10-30:1, strokes:1" (one draw per image).',
    ),
    seed: int = opt.seed_option("Seed for the masks and the CA updates."),
    device: str = opt.device_option(),
    threads: Optional[int] = opt.threads_option(opt.SET_THREADS_HELP),
    fast: bool = typer.Option(
        False,
        "--fast",
        help="Run the step as vitca denoise does on large images: compiled, bf16 products where the hardware "
        "has them (figures shift by a few hundredths of a dB; the JSON says which step ran).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Score a model on a test split with the paper's test masking (PSNR, SSIM, LPIPS, 95% intervals).

    Runs in one process (not distributed, unlike `vitca train`).
    """
    from vitca_cli.training.evaluate import format_report
    from vitca_cli.training.measure import evaluate_weights

    report = evaluate_weights(
        weights,
        dataset,
        split=split,
        data_dir=data_dir,
        iters=iters,
        limit=limit,
        mask_type=_value(mask_type),
        max_patch=max_patch,
        update_rate=update_rate,
        runs=runs,
        baselines=baselines,
        batch_size=batch_size,
        protocol=protocol,
        corruptions=corruptions,
        seed=seed,
        device=device,
        threads=threads,
        fast=fast,
    )
    print(json.dumps(report, indent=2) if as_json else format_report(report))


def _value(option: Optional[Enum]) -> Optional[str]:
    return None if option is None else option.value


@handle_errors
def analyze_command(
    kind: Kind = typer.Argument(..., help="update-rate, unseen-noise, head-masking or stability."),
    weights: str = opt.weights_option(WEIGHTS_HELP, required=True),
    dataset: str = typer.Option(..., "--dataset", "-d", help=DATASET_HELP),
    out: Path = typer.Option(..., "--output", "-o", help="Folder for the figure (PNG) and table (CSV, JSON)."),
    split: str = typer.Option("test", "--split", help="Dataset split."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Where datasets are."),
    iters: Optional[int] = opt.iters_option(None, "CA steps (default: 64; stability: 1000).", min=1),
    limit: int = typer.Option(8, "--limit", min=1, help="Number of test images."),
    mask_type: Optional[MaskType] = typer.Option(None, "--mask-type", help="Corruption type (default: as trained)."),
    corruption: Optional[str] = typer.Option(
        None, "--corruption", help="'p=0.5,patch=2,type=noise' or 'none' (default: that; head-masking: none)."
    ),
    seed: int = opt.seed_option("Seed for the corruption and the CA updates."),
    device: str = opt.device_option(),
    threads: Optional[int] = opt.threads_option(opt.SET_THREADS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Appendix analyses: update rate, unseen noise, head masking, stability. Writes a PNG figure and a table."""
    from vitca_cli.training.figures import format_table
    from vitca_cli.training.measure import analyze

    result = analyze(
        kind.value,
        weights,
        dataset,
        out,
        split=split,
        data_dir=data_dir,
        iters=iters,
        limit=limit,
        mask_type=_value(mask_type),
        corruption=corruption,
        seed=seed,
        device=device,
        threads=threads,
    )
    if as_json:
        print(json.dumps(result, indent=2, default=float))
        return
    print(format_table(result["table"]))
    extras = {k: v for k, v in result.items() if k in ("max_abs_state", "diverged", "corruption")}
    if extras:
        print(", ".join(f"{k}: {v}" for k, v in extras.items()))
    print("wrote " + ", ".join(result["files"]))


@handle_errors
def probe_command(
    weights: str = opt.weights_option(WEIGHTS_HELP, required=True),
    dataset: str = typer.Option(..., "--dataset", "-d", help="A labelled dataset: fashion-mnist, mnist, mnist-5k, …"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Where datasets are."),
    iters: int = opt.iters_option(64, "CA steps on each unmasked image.", min=1),
    train_limit: int = typer.Option(2000, "--train-limit", min=2, help="Training images for the probe."),
    test_limit: int = typer.Option(1000, "--test-limit", min=1, help="Test images."),
    max_iter: int = typer.Option(200, "--max-iter", min=1, help="L-BFGS iterations for each classifier."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="CA batch size for feature extraction."),
    seed: int = opt.seed_option("Seed for the CA updates, the split and the classifier."),
    device: str = opt.device_option(),
    threads: Optional[int] = opt.threads_option(opt.SET_THREADS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Linear probe: classify from the frozen CA's averaged hidden channels vs from raw pixels."""
    from vitca_cli.training.measure import probe
    from vitca_cli.training.probe import format_probe

    report = probe(
        weights,
        dataset,
        data_dir=data_dir,
        iters=iters,
        train_limit=train_limit,
        test_limit=test_limit,
        max_iter=max_iter,
        batch_size=batch_size,
        seed=seed,
        device=device,
        threads=threads,
    )
    print(json.dumps(report, indent=2) if as_json else format_probe(report))


@handle_errors
def profile_command(
    weights: Optional[str] = opt.weights_option("Profile this checkpoint's config."),
    preset: str = typer.Option("celeba", "--preset", help="Config preset when no --weights (celeba: RGB, as Table 8)."),
    batch: int = typer.Option(8, "--batch", "-b", min=1, help="Random images per batch (Table 8: 32)."),
    height: int = typer.Option(32, "--height", min=1, help="Image height."),
    width: int = typer.Option(32, "--width", min=1, help="Image width."),
    steps: int = typer.Option(32, "--steps", "-T", min=1, help="CA steps T (Table 8: 32)."),
    modes: list[str] = typer.Option(list(PROFILE_MODES), "--mode", help="plain, checkpointing, fusion-mitosis."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Timed passes per mode (median)."),
    compile: Compile = typer.Option(Compile.none, "--compile", help="torch.compile the step or the attention."),
    device: str = opt.device_option(),
    threads: Optional[int] = opt.threads_option(opt.SET_THREADS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Appendix Table 8: forward/backward ms and peak memory of a training pass, with and without checkpointing."""
    from vitca_cli.training.measure import profile
    from vitca_cli.training.profiling import format_profile

    results = profile(
        modes,
        weights=weights,
        preset=preset,
        batch=batch,
        height=height,
        width=width,
        steps=steps,
        repeats=repeats,
        compile=None if compile is Compile.none else compile.value,
        device=device,
        threads=threads,
    )
    print(json.dumps(results, indent=2) if as_json else format_profile(results))


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.command("analyze")(analyze_command)
    app.command("profile")(profile_command)
    app.command("probe")(probe_command)
