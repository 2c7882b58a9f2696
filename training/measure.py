"""The measurements' runs, from parsed options to a report: `vitca eval`, `vitca analyze`, `vitca probe` and
`vitca profile` (``vitca_cli/cli/evaluate.py`` parses, calls one function here and prints what it returns).

Each loads what it measures (the weights, on a device, with a thread count), opens the data at the model's size and
hands over to the work in ``training.evaluate``, ``training.analyses``, ``training.probe`` and
``training.profiling``; the report comes back headed by what was measured where.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from vitca_cli.errors import UsageError
from vitca_cli.log import log
from vitca_cli.progress import Progress


def load_weights(weights: str, device: str, threads: Optional[int] = None):
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


def mask_type_for(given: Optional[str], meta: dict) -> str:
    """``given``, else the mask type the checkpoint was trained with, else the reference's ``noise``."""
    from types import SimpleNamespace

    from vitca_cli.restore.backends import backend_mask_type

    return given if given is not None else backend_mask_type(SimpleNamespace(meta=meta))


def _progress(label: str, total: int, unit: str) -> Progress:
    """A bar on a terminal; in a log, a line about every 10% and at the end."""
    return Progress(label, total, unit=unit, every_s=0.0, every_fraction=0.1, final=True, transient=False)


def check_eval_options(
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


def evaluate_weights(
    weights: str,
    dataset: str,
    *,
    split: str = "test",
    data_dir: Optional[Path] = None,
    iters: int = 64,
    limit: Optional[int] = None,
    mask_type: Optional[str] = None,
    max_patch: Optional[int] = None,
    update_rate: Optional[float] = None,
    runs: int = 1,
    baselines: bool = False,
    batch_size: int = 32,
    protocol: str = "cycled",
    corruptions: Optional[str] = None,
    seed: int = 0,
    device: str = "auto",
    threads: Optional[int] = None,
    fast: bool = False,
) -> dict:
    """`vitca eval`: the report of ``weights`` on ``dataset``'s ``split`` (``training.evaluate.evaluate``), headed by
    the weights, data, batch size, device, threads, LPIPS and the step that ran."""
    from vitca_cli.training import evaluate as ev
    from vitca_cli.training.baselines import BASELINES

    check_eval_options(update_rate, baselines, corruptions, runs)
    model, meta, path = load_weights(weights, device, threads)
    ds = ev.open_eval_dataset(dataset, split, model.cfg, data_dir)
    schedule = ev.schedule_for(meta, max_patch)
    ev.check_patch_sizes(ds.image_size, schedule)
    n = len(ds) if limit is None else min(limit, len(ds))
    if protocol == "paper":
        batch_size = ev.PAPER_BATCH
        if n < batch_size:
            raise UsageError(f"--protocol paper needs at least {batch_size} images (one full batch), got {n}")
    mtype = mask_type_for(mask_type, meta)
    lpips, lpips_status = ev.load_lpips(next(model.parameters()).device)
    log.info(
        f"evaluating {n} {split} images of {dataset}: {iters} steps"
        + (f" × {runs} runs" if runs > 1 else "")
        + f", {mtype} masking, seed {seed}"
    )
    step, step_name = _step(model, fast)
    scored = n - n % batch_size if protocol == "paper" else n  # the paper's protocol drops a last partial batch
    with _progress("eval", scored, "images") as shown:
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
            progress=shown.advance,
            corruptions=corruptions,
            protocol=protocol,
            step=step,
            runs=runs,
        )
    report = _with_run(report, model, str(path), dataset, split, batch_size, lpips_status, baselines)
    report["step"] = step_name
    return report


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


def analyze(
    kind: str,
    weights: str,
    dataset: str,
    out: Path,
    *,
    split: str = "test",
    data_dir: Optional[Path] = None,
    iters: Optional[int] = None,
    limit: int = 8,
    mask_type: Optional[str] = None,
    corruption: Optional[str] = None,
    seed: int = 0,
    device: str = "auto",
    threads: Optional[int] = None,
) -> dict:
    """`vitca analyze`: the appendix analysis ``kind`` on the first ``limit`` images (``training.analyses``), its
    figure and table written to ``out``; the result headed by the data."""
    from vitca_cli.training.analyses import run_analysis
    from vitca_cli.training.evaluate import batches, open_eval_dataset

    model, meta, _ = load_weights(weights, device, threads)
    ds = open_eval_dataset(dataset, split, model.cfg, data_dir)
    n = min(limit, len(ds))
    clean = next(batches(ds, n, n))
    log.info(f"{kind}: {n} images of {dataset} {split}")
    result = run_analysis(
        kind,
        model,
        clean,
        out,
        iters=iters,
        seed=seed,
        mask_type=mask_type_for(mask_type, meta),
        corruption=corruption,
    )
    return {"dataset": dataset, "split": split, **result}


def probe(
    weights: str,
    dataset: str,
    *,
    data_dir: Optional[Path] = None,
    iters: int = 64,
    train_limit: int = 2000,
    test_limit: int = 1000,
    max_iter: int = 200,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "auto",
    threads: Optional[int] = None,
) -> dict:
    """`vitca probe`: the linear probe of ``weights`` on a labelled ``dataset`` (``training.probe``)."""
    from vitca_cli.training.evaluate import open_eval_dataset
    from vitca_cli.training.probe import linear_probe

    model, _, path = load_weights(weights, device, threads)
    train_set = open_eval_dataset(dataset, "train", model.cfg, data_dir)
    test_set = open_eval_dataset(dataset, "test", model.cfg, data_dir)
    for ds in (train_set, test_set):
        if getattr(ds, "labels", None) is None:
            raise UsageError(f"--dataset {dataset}: no class labels, so nothing to probe")
    total = min(train_limit, len(train_set)) + min(test_limit, len(test_set))
    with _progress("probe", total, "features") as shown:
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
            progress=shown.advance,
        )
    return {"weights": str(path), "dataset": dataset, **report}


def profile(
    modes: list[str],
    *,
    weights: Optional[str] = None,
    preset: str = "celeba",
    batch: int = 8,
    height: int = 32,
    width: int = 32,
    steps: int = 32,
    repeats: int = 3,
    compile: Optional[str] = None,
    device: str = "auto",
    threads: Optional[int] = None,
) -> list[dict]:
    """`vitca profile`: one training pass timed and measured per mode (``training.profiling``), for the
    configuration of ``weights`` or of ``preset``."""
    from vitca_cli.nca.config import preset as make_preset
    from vitca_cli.runtime import resolve_device
    from vitca_cli.training.profiling import MODES, profile_training

    bad = [m for m in modes if m not in MODES]
    if bad:
        raise UsageError(f"--mode {bad[0]!r}: choose from {', '.join(MODES)}")
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
                profile_training(cfg, batch, height, width, steps, mode, str(dev), repeats=repeats, compile=compile)
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return results
