"""``vitca eval``, ``vitca analyze``, ``vitca profile`` and ``vitca probe``: measurements, as thin commands.

The work lives in ``training.evaluate``, ``training.analyses``, ``training.profiling`` and ``training.probe``.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from vitca_cli.cli import options as opt
from vitca_cli.cli.options import MaskType, handle_errors
from vitca_cli.errors import UsageError
from vitca_cli.log import log
from vitca_cli.tables import format_table


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


def _load(weights: str, device: str, threads: Optional[int] = None):
    """Resolve ``--weights``, load the CA on ``device``; returns (model, meta, path)."""
    import torch

    from vitca_cli.io.checkpoint import load_model
    from vitca_cli.io.weights import resolve
    from vitca_cli.runtime import resolve_device, tune_allocator

    if threads is not None:
        torch.set_num_threads(threads)
    tune_allocator()
    dev = resolve_device(device)
    ref = resolve(weights)
    if ref.path.suffix == ".onnx":
        raise UsageError(f"--weights {weights}: measurements need a PyTorch checkpoint (.pt), not an ONNX file")
    model, meta = load_model(ref.path, dev)
    log.info(
        f"weights {ref.path} ({model.cfg.arch}, {model.cfg.channels} channel(s), "
        f"trained at {model.cfg.image_size[0]}×{model.cfg.image_size[1]}); device {dev}"
    )
    return model, meta, ref.path


def _mask_type(option: Optional[MaskType], meta: dict) -> str:
    """The option, else the mask type the checkpoint was trained with, else the reference's ``noise``."""
    from types import SimpleNamespace

    from vitca_cli.restore.backends import backend_mask_type

    return option.value if option is not None else backend_mask_type(SimpleNamespace(meta=meta))


class _Progress:
    """Logs progress to stderr about every 10%."""

    def __init__(self, total: int, what: str):
        self.total, self.done, self.next, self.what = total, 0, max(1, total // 10), what

    def __call__(self, n: int) -> None:
        self.done += n
        if self.done >= self.next or self.done == self.total:
            log.info(f"{self.what}: {self.done}/{self.total}")
            self.next = self.done + max(1, self.total // 10)


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
    from vitca_cli.training import evaluate as ev
    from vitca_cli.training.baselines import BASELINES

    _check_eval_options(update_rate, baselines, corruptions, runs)
    model, meta, path = _load(weights, device, threads)
    ds = ev.open_eval_dataset(dataset, split, model.cfg, data_dir)
    schedule = ev.schedule_for(meta, max_patch)
    ev.check_patch_sizes(ds.image_size, schedule)
    n = len(ds) if limit is None else min(limit, len(ds))
    if protocol == "paper":
        batch_size = ev.PAPER_BATCH
        if n < batch_size:
            raise UsageError(f"--protocol paper needs at least {batch_size} images (one full batch), got {n}")
    mtype = _mask_type(mask_type, meta)
    lpips, lpips_status = ev.load_lpips(next(model.parameters()).device)
    log.info(
        f"evaluating {n} {split} images of {dataset}: {iters} steps"
        + (f" × {runs} runs" if runs > 1 else "")
        + f", {mtype} masking, seed {seed}"
    )
    step, step_name = _step(model, fast)
    report = ev.evaluate(
        model,
        ev.batches(ds, batch_size, n, drop_last=protocol == "paper"),
        iters=iters,
        mask_type=mtype,
        seed=seed,
        schedule=schedule,
        update_rate=update_rate,
        baselines=list(BASELINES) if baselines else [],
        lpips=lpips,
        progress=_Progress(n, "images"),
        corruptions=corruptions,
        protocol=protocol,
        step=step,
        runs=runs,
    )
    report = _with_run(report, model, str(path), dataset, split, batch_size, lpips_status, baselines)
    report["step"] = step_name
    print(json.dumps(report, indent=2) if as_json else ev.format_report(report))


def _step(model, fast: bool):
    """The CA step eval runs and its description: the model's exact step, or the fast step of a restore backend
    (compiled; bf16 products where native)."""
    if not fast:
        return None, "exact (eager, fp32)"
    from vitca_cli.restore.backends import TorchBackend

    backend = TorchBackend(model, precision="auto", compile="auto")
    backend.prepare(1 << 62)
    return (lambda z, mask, *_: backend.step(z, mask)), backend.device


def _with_run(report: dict, model, path: str, dataset, split, batch_size, lpips_status, baselines: bool) -> dict:
    """``report`` headed by what was evaluated where: the weights, data, batch size, device, threads, LPIPS."""
    import torch

    from vitca_cli.training.baselines import BASELINES

    report = {
        "weights": path,
        "dataset": dataset,
        "split": split,
        "batch_size": batch_size,
        "device": str(next(model.parameters()).device),
        "threads": torch.get_num_threads(),
        "lpips": lpips_status,
        **report,
    }
    if baselines:
        report["baselines"] = {k: v[0] for k, v in BASELINES.items()}
    return report


def _check_eval_options(
    update_rate: Optional[float], baselines: bool, corruptions: Optional[str], runs: int = 1
) -> None:
    """``vitca eval``'s checks before the model is loaded: the update rate, the runs, the baselines' libraries and
    the mixture."""
    from vitca_cli.restore.batch import MAX_RUNS
    from vitca_cli.training.baselines import check_available

    if not 1 <= runs <= MAX_RUNS:
        raise UsageError(f"--runs {runs}: choose from 1 to {MAX_RUNS}")
    if update_rate is not None and not 0 < update_rate <= 1:
        raise UsageError(f"--update-rate must be in (0, 1], got {update_rate}")
    if baselines:
        check_available()
    if corruptions is not None:
        from vitca_cli.nca.corruptions import parse_mixture

        try:
            parse_mixture(corruptions)
        except ValueError as exc:
            raise UsageError(f"--corruptions: {exc}") from None


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
    from vitca_cli.training.analyses import run_analysis
    from vitca_cli.training.evaluate import batches, open_eval_dataset
    from vitca_cli.training.figures import format_table

    model, meta, _ = _load(weights, device, threads)
    ds = open_eval_dataset(dataset, split, model.cfg, data_dir)
    n = min(limit, len(ds))
    clean = next(batches(ds, n, n))
    log.info(f"{kind.value}: {n} images of {dataset} {split}")
    result = run_analysis(
        kind.value,
        model,
        clean,
        out,
        iters=iters,
        seed=seed,
        mask_type=_mask_type(mask_type, meta),
        corruption=corruption,
    )
    result = {"dataset": dataset, "split": split, **result}
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
    from vitca_cli.training.evaluate import open_eval_dataset
    from vitca_cli.training.probe import format_probe, linear_probe

    model, _, path = _load(weights, device, threads)
    train_set = open_eval_dataset(dataset, "train", model.cfg, data_dir)
    test_set = open_eval_dataset(dataset, "test", model.cfg, data_dir)
    for ds in (train_set, test_set):
        if getattr(ds, "labels", None) is None:
            raise UsageError(f"--dataset {dataset}: no class labels, so nothing to probe")
    total = min(train_limit, len(train_set)) + min(test_limit, len(test_set))
    report = linear_probe(
        model,
        train_set,
        test_set,
        iters=iters,
        train_limit=train_limit,
        test_limit=test_limit,
        max_iter=max_iter,
        batch_size=batch_size,
        seed=seed,
        progress=_Progress(total, "features"),
    )
    report = {"weights": str(path), "dataset": dataset, **report}
    print(json.dumps(report, indent=2) if as_json else format_probe(report))


PROFILE_MODES = ("plain", "checkpointing", "fusion-mitosis")
MODE_LABELS = {
    "plain": "no checkpointing",
    "checkpointing": "checkpointing (T/2 segments)",
    "fusion-mitosis": "fusion + mitosis",
}


def _format_profile(results: list[dict]) -> str:
    """Appendix Table 8's layout: one row per training mode, plus the ratios against the plain rollout."""
    r0 = results[0]
    header = ("mode", "forward ms", "backward ms", "iteration ms", "no-grad ms", "peak memory")
    rows = [
        (
            MODE_LABELS[r["mode"]],
            f"{r['forward_ms']:.0f}",
            f"{r['backward_ms']:.0f}",
            f"{r['iteration_ms']:.0f}",
            f"{r['nograd_rollout_ms']:.0f}",
            f"{r['peak_bytes'] / 2**20:.0f} MiB",
        )
        for r in results
    ]
    lines = [
        f"one training pass: batch {r0['batch']} × {r0['height']}×{r0['width']}, T = {r0['steps']} steps, "
        f"device {r0['device']} ({r0['threads']} threads), compile {r0['compile']}, "
        f"memory via {r0['memory_method']}"
    ]
    lines.append(format_table(header, rows))
    plain = next((r for r in results if r["mode"] == "plain"), None)
    if plain:
        for r in results:
            if r is not plain and plain["peak_bytes"] > 0 and plain["backward_ms"] > 0:
                lines.append(
                    f"{MODE_LABELS[r['mode']]}: memory ×{r['peak_bytes'] / plain['peak_bytes']:.2f}, "
                    f"backward ×{r['backward_ms'] / plain['backward_ms']:.2f} vs no checkpointing"
                )
    return "\n".join(lines)


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
    from vitca_cli.nca.config import preset as make_preset
    from vitca_cli.runtime import resolve_device
    from vitca_cli.training.profiling import profile_training

    bad = [m for m in modes if m not in PROFILE_MODES]
    if bad:
        raise UsageError(f"--mode {bad[0]!r}: choose from {', '.join(PROFILE_MODES)}")
    if weights:
        from vitca_cli.io.checkpoint import read_checkpoint
        from vitca_cli.io.weights import resolve
        from vitca_cli.nca.config import CAConfig

        cfg = CAConfig.from_dict(read_checkpoint(resolve(weights).path)["config"])
    else:
        try:
            cfg = make_preset(preset)
        except ValueError as exc:
            raise UsageError(f"--preset: {exc}") from None
    if height % cfg.patch_size or width % cfg.patch_size:
        raise UsageError(f"--height/--width must be multiples of the patch size {cfg.patch_size}")
    if cfg.pos_encoding == "learned":  # the learned encoding is tied to the training size
        cfg = cfg.replace(image_size=(height, width))
    dev = resolve_device(device)
    if threads is not None:  # CPU runs measure in fresh subprocesses, which read the thread count from the env
        import os

        import torch

        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    results = []
    for mode in modes:
        log.info(f"profiling {mode}: batch {batch} × {cfg.channels}×{height}×{width}, T={steps} on {dev}")
        try:
            results.append(
                profile_training(
                    cfg,
                    batch,
                    height,
                    width,
                    steps,
                    mode,
                    str(dev),
                    repeats=repeats,
                    compile=None if compile is Compile.none else compile.value,
                )
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    print(json.dumps(results, indent=2) if as_json else _format_profile(results))


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.command("analyze")(analyze_command)
    app.command("profile")(profile_command)
    app.command("probe")(probe_command)
