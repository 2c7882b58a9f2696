"""``vitca train``: pool-based training (the paper's Algorithm 1), every ablation knob a flag.

Thin: parses options, builds the model and training configurations, opens the datasets and calls
``training.train.train``. The loop, loss, checkpoints and validation live in ``training/train.py``.
"""

from __future__ import annotations

import sys
import time
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from vitca_cli.cli.options import MaskType, handle_errors
from vitca_cli.nca.config import ARCHES, CELL_INITS, POS_ENCODINGS
from vitca_cli.errors import UsageError

Arch = Enum("Arch", {n: n for n in ARCHES}, type=str)
CellInit = Enum("CellInit", {n: n for n in CELL_INITS}, type=str)
PosEncoding = Enum("PosEncoding", {n: n for n in POS_ENCODINGS}, type=str)

# Options that may change when resuming; everything else is fixed by the run's saved configuration.
RESUMABLE = {"iterations", "val_every", "save_every", "log_every", "compile", "precision"}
TRAIN_HELP = "Training (Algorithm 1)"
MODEL_HELP = "Model"
DATA_HELP = "Data"
RUN_HELP = "Run"


def _opt(default, *names, help: str, panel: str, **kw):
    return typer.Option(default, *names, help=help, rich_help_panel=panel, **kw)


@handle_errors
def train(
    dataset: Optional[str] = _opt(
        None, "--dataset", help="fashion-mnist | mnist | mnist-5k | cifar10 | celeba | folder:PATH.", panel=DATA_HELP
    ),
    data_dir: Optional[Path] = _opt(
        None, "--data-dir", help="Dataset root (default: $VITCA_DATA, then the user cache).", panel=DATA_HELP
    ),
    download: bool = _opt(
        False, "--download", help="Download MNIST/FashionMNIST/CIFAR-10 if missing.", panel=DATA_HELP
    ),
    image_size: Optional[int] = _opt(
        None, "--image-size", help="Training size (resize; random crops for folder:).", panel=DATA_HELP
    ),
    run_dir: Optional[Path] = _opt(
        None, "--run-dir", "-o", help="Run folder (default runs/DATASET-TIME).", panel=RUN_HELP
    ),
    resume: Optional[Path] = _opt(None, "--resume", help="Continue the run in this folder exactly.", panel=RUN_HELP),
    iterations: Optional[int] = _opt(None, "--iterations", help="Total iterations I [100000].", panel=TRAIN_HELP),
    stop_at: Optional[int] = _opt(
        None, "--stop-at", help="End this session after iteration N (saving); resume later.", panel=RUN_HELP
    ),
    batch_size: Optional[int] = _opt(None, "--batch-size", "-b", help="Batch size b [32].", panel=TRAIN_HELP),
    pool_size: Optional[int] = _opt(None, "--pool-size", help="Pool size N_P [1024].", panel=TRAIN_HELP),
    pool_overwrite: Optional[bool] = _opt(
        None, "--pool-overwrite/--pool-append", help="Pool batches replace their entries [append].", panel=TRAIN_HELP
    ),
    t_min: Optional[int] = _opt(None, "--t-min", help="Fewest CA steps per iteration [8].", panel=TRAIN_HELP),
    t_max: Optional[int] = _opt(None, "--t-max", help="Most CA steps per iteration [32].", panel=TRAIN_HELP),
    alpha: Optional[float] = _opt(None, "--alpha", help="Reconstruction weight α [100].", panel=TRAIN_HELP),
    beta: Optional[float] = _opt(None, "--beta", help="Overflow weight β [100].", panel=TRAIN_HELP),
    lr: Optional[float] = _opt(None, "--lr", help="AdamW learning rate [1e-3].", panel=TRAIN_HELP),
    lr_min: Optional[float] = _opt(None, "--lr-min", help="Cosine schedule floor [0].", panel=TRAIN_HELP),
    warmup: Optional[int] = _opt(
        None, "--warmup", help="Linear lr warm-up over N iterations (for fine-tuning) [0].", panel=TRAIN_HELP
    ),
    weight_decay: Optional[float] = _opt(None, "--weight-decay", help="AdamW weight decay [0.01].", panel=TRAIN_HELP),
    grad_norm: Optional[bool] = _opt(
        None, "--grad-norm/--no-grad-norm", help="Per-tensor gradient normalisation [on].", panel=TRAIN_HELP
    ),
    checkpointing: Optional[bool] = _opt(
        None, "--checkpointing/--no-checkpointing", help="Gradient checkpointing, ⌊T/2⌋ segments.", panel=TRAIN_HELP
    ),
    fusion_mitosis: Optional[bool] = _opt(
        None, "--fusion-mitosis/--no-fusion-mitosis", help="Appendix A.1 fusion/mitosis schedule.", panel=TRAIN_HELP
    ),
    corruptions: Optional[str] = _opt(
        None, "--corruptions", help='Damage mixture, e.g. "gaussian=0.01-0.25:3, saltpepper:1, jpeg=10-60:1, '
        'strokes:2, rects:1, clean:1" (NAME[=LO-HI][:WEIGHT]; kinds: patch gaussian saltpepper jpeg strokes rects '
        'clean) [patch: the paper\'s masks].', panel=TRAIN_HELP,
    ),
    crop_sizes: Optional[str] = _opt(
        None, "--crop-sizes", help="Square crop sizes drawn per iteration for folder data, e.g. 32,64 (the batch "
        "shrinks with the area) [--image-size].", panel=DATA_HELP,
    ),
    mask_type: Optional[MaskType] = _opt(
        None, "--mask-type", help="How missing pixels look: noise | dropout [noise].", panel=TRAIN_HELP
    ),
    mask_start: Optional[int] = _opt(None, "--mask-start", help="Curriculum first threshold [500].", panel=TRAIN_HELP),
    mask_end: Optional[int] = _opt(
        None, "--mask-end", help="Curriculum: all combos after this [10000].", panel=TRAIN_HELP
    ),
    mask_max_prob: Optional[float] = _opt(
        None, "--mask-max-prob", help="Largest drop probability [0.75].", panel=TRAIN_HELP
    ),
    mask_prob_stages: Optional[int] = _opt(
        None, "--mask-prob-stages", help="Probability stages [3].", panel=TRAIN_HELP
    ),
    mask_max_patch: Optional[int] = _opt(None, "--mask-max-patch", help="Largest mask patch [4].", panel=TRAIN_HELP),
    mask_patch_stages: Optional[int] = _opt(
        None, "--mask-patch-stages", help="Patch-size stages [3].", panel=TRAIN_HELP
    ),
    val_every: Optional[int] = _opt(
        None, "--val-every", help="Validate every N iterations (0: never) [500].", panel=RUN_HELP
    ),
    val_size: Optional[int] = _opt(None, "--val-size", help="Validation images [256].", panel=RUN_HELP),
    val_steps: Optional[int] = _opt(None, "--val-steps", help="CA steps at validation [64].", panel=RUN_HELP),
    save_every: Optional[int] = _opt(
        None, "--save-every", help="Save last.pt every N iterations [= --val-every].", panel=RUN_HELP
    ),
    log_every: Optional[int] = _opt(
        None, "--log-every", help="metrics.jsonl line every N iterations [10].", panel=RUN_HELP
    ),
    seed: Optional[int] = _opt(None, "--seed", help="Random seed [0].", panel=RUN_HELP),
    device: str = _opt("auto", "--device", help="auto | cpu | cuda[:N].", panel=RUN_HELP),
    compile: Optional[bool] = _opt(
        None,
        "--compile/--no-compile",
        help="Fused (torch.compile) attention and bias kernels, ~2× faster on CPU [on].",
        panel=RUN_HELP,
    ),
    precision: Optional[str] = _opt(
        None,
        "--precision",
        help="fp32 | bf16: matrix products in bfloat16 (autocast; cells and weights stay fp32), ~1.3× faster on "
        "CPUs with AMX [fp32].",
        panel=RUN_HELP,
    ),
    nproc: Optional[int] = _opt(
        None, "--nproc", min=1, help="Run N local ranks data-parallel (torch's launcher, as `torchrun --standalone "
        "--nproc-per-node N -m vitca_cli train ...`); --batch-size is the global batch.", panel=RUN_HELP,
    ),
    threads: Optional[int] = _opt(
        None,
        "--threads",
        help="CPU threads (1 is fastest on a busy machine: no waiting at OpenMP barriers).",
        panel=RUN_HELP,
    ),
    arch: Optional[Arch] = _opt(None, "--arch", help="Update network [vitca].", panel=MODEL_HELP),
    hidden: Optional[int] = _opt(None, "--hidden", help="Hidden channels per cell [32].", panel=MODEL_HELP),
    patch_size: Optional[int] = _opt(None, "--patch-size", help="Cell patch size [1].", panel=MODEL_HELP),
    neighbourhood: Optional[int] = _opt(None, "--neighbourhood", help="Attention window N×N [3].", panel=MODEL_HELP),
    cell_init: Optional[CellInit] = _opt(
        None, "--cell-init", help="Cell initialisation; input: outputs start at the damaged image [constant].",
        panel=MODEL_HELP,
    ),
    mask_channel: Optional[bool] = _opt(
        None, "--mask-channel/--no-mask-channel", help="Mask-aware cells: one input channel, 1 = pixel known "
        "[off].", panel=MODEL_HELP,
    ),
    update_rate: Optional[float] = _opt(
        None, "--update-rate", help="σ: 0.5 asynchronous, 1.0 synchronous [0.5].", panel=MODEL_HELP
    ),
    embed: Optional[int] = _opt(None, "--embed", help="Embedding width E [128].", panel=MODEL_HELP),
    heads: Optional[int] = _opt(None, "--heads", help="Attention heads [4].", panel=MODEL_HELP),
    depth: Optional[int] = _opt(None, "--depth", help="Transformer blocks [1].", panel=MODEL_HELP),
    mlp: Optional[int] = _opt(None, "--mlp", help="MLP width [64].", panel=MODEL_HELP),
    pos_encoding: Optional[PosEncoding] = _opt(
        None, "--pos-encoding", help="Position encoding [vit].", panel=MODEL_HELP
    ),
    init_weights: Optional[str] = _opt(
        None,
        "--init-weights",
        help="Start from these weights (NAME or PATH; fine-tuning): the model and image size come from them.",
        panel=MODEL_HELP,
    ),
) -> None:
    """Train a ViTCA (or UNetCA) with the paper's pool-based Algorithm 1; resume a run exactly with --resume."""
    from training.data import dataset_channels, open_dataset
    from training.train import TrainConfig, read_run
    from training.train import train as run_training
    from vitca_cli import log as logmod
    from vitca_cli.nca.config import PRESETS, CAConfig
    from vitca_cli.runtime import cpu_has_native_bf16, resolve_device, tune_allocator

    def enum_value(v):
        return v.value if isinstance(v, Enum) else v

    train_opts = {
        "iterations": iterations, "batch_size": batch_size, "pool_size": pool_size, "pool_overwrite": pool_overwrite,
        "t_min": t_min, "t_max": t_max, "alpha": alpha, "beta": beta, "lr": lr, "lr_min": lr_min,
        "warmup": warmup, "weight_decay": weight_decay, "grad_norm": grad_norm, "checkpointing": checkpointing,
        "fusion_mitosis": fusion_mitosis, "mask_type": enum_value(mask_type), "mask_start": mask_start,
        "mask_end": mask_end, "mask_max_prob": mask_max_prob, "mask_prob_stages": mask_prob_stages,
        "mask_max_patch": mask_max_patch, "mask_patch_stages": mask_patch_stages, "val_every": val_every,
        "val_size": val_size, "val_steps": val_steps, "save_every": save_every, "log_every": log_every,
        "seed": seed, "compile": compile, "precision": precision, "corruptions": corruptions,
        "crop_sizes": _parse_sizes(crop_sizes),
    }  # fmt: skip
    model_opts = {
        "arch": enum_value(arch), "hidden": hidden, "patch_size": patch_size,
        "neighbourhood": (neighbourhood, neighbourhood) if neighbourhood else None,
        "cell_init": enum_value(cell_init), "update_rate": update_rate, "embed": embed, "heads": heads,
        "depth": depth, "mlp": mlp, "pos_encoding": enum_value(pos_encoding), "mask_channel": mask_channel,
    }  # fmt: skip
    train_opts = {k: v for k, v in train_opts.items() if v is not None}
    model_opts = {k: v for k, v in model_opts.items() if v is not None}
    if stop_at is not None and stop_at < 1:
        raise UsageError("--stop-at must be ≥ 1")

    from training import distributed

    if nproc is not None and nproc > 1 and not distributed.launched():
        raise typer.Exit(distributed.launch_local(nproc, _without_nproc(sys.argv[1:])))
    dev = resolve_device(device)
    world, dev = distributed.init(dev)
    if not world.main:
        logmod.setup(logmod.verbosity(), quiet=True)  # one rank speaks for the run
    tune_allocator()
    if threads is not None:
        if threads < 1:
            raise UsageError("--threads must be ≥ 1")
        import torch

        torch.set_num_threads(threads)
    resume_from = init_cfg = init_state = None
    if init_weights is not None:
        if resume is not None:
            raise UsageError("--init-weights starts a new run; --resume continues one (pick one)")
        if model_opts:
            given = ", ".join("--" + n.replace("_", "-") for n in sorted(model_opts))
            raise UsageError(f"--init-weights fixes the model; cannot also set {given}")
        init_cfg, init_state, init_name = _read_init(init_weights)
        train_opts["init_weights"] = init_name
    if resume is not None:
        fixed = sorted(set(train_opts) - RESUMABLE) + sorted(model_opts)
        fixed += [n for n, v in (("dataset", dataset), ("image_size", image_size), ("data_dir", data_dir)) if v]
        if fixed or run_dir is not None:
            extra = ", ".join("--" + n.replace("_", "-") for n in fixed + (["run_dir"] if run_dir else []))
            raise UsageError(
                f"--resume keeps the run's configuration; cannot change {extra} (allowed: "
                f"{', '.join('--' + n.replace('_', '-') for n in sorted(RESUMABLE))})"
            )
        cfg, tcfg, resume_from = read_run(resume)
        tcfg = tcfg.replace(**train_opts)
        if resume_from["iteration"] >= tcfg.iterations:
            raise UsageError(
                f"{resume}: already at iteration {resume_from['iteration']} of {tcfg.iterations}; "
                "pass a larger --iterations to continue"
            )
        out_dir = resume
        image_hw = cfg.image_size
    else:
        spec = dataset or "fashion-mnist"
        try:
            tcfg = TrainConfig(dataset=spec, data_dir=str(data_dir) if data_dir else None, **train_opts)
        except TypeError as exc:
            raise UsageError(str(exc)) from None
        image_hw = (image_size, image_size) if image_size else (init_cfg.image_size if init_cfg else None)
        if tcfg.crop_sizes and not image_size:
            image_hw = (tcfg.crop_sizes[0], tcfg.crop_sizes[0])
        out_dir = run_dir or Path("runs") / f"{_slug(spec)}-{time.strftime('%Y%m%d-%H%M%S')}"
        out_dir = distributed.same_on_all_ranks(world, out_dir)  # ranks may start a second apart
        if (out_dir / "last.pt").exists():
            raise UsageError(f"{out_dir} already holds a run; use --resume {out_dir} or another --run-dir")

    train_ds = open_dataset(tcfg.dataset, "train", tcfg.data_dir, image_hw, download=download)
    val_ds = open_dataset(tcfg.dataset, "val", tcfg.data_dir, train_ds.image_size) if tcfg.val_every else None
    if init_cfg is not None:
        cfg = init_cfg
        if dataset_channels(tcfg.dataset) != cfg.channels or tuple(train_ds.image_size) != tuple(cfg.image_size):
            if dataset_channels(tcfg.dataset) != cfg.channels or cfg.pos_encoding == "learned":
                raise UsageError(
                    f"--init-weights {init_weights}: a {cfg.channels}-channel {cfg.image_size[0]}×{cfg.image_size[1]} "
                    f"model ({cfg.pos_encoding} position encoding) cannot train on {train_ds.name} "
                    f"({dataset_channels(tcfg.dataset)} channels, {train_ds.image_size[0]}×{train_ds.image_size[1]})"
                )
            cfg = cfg.replace(image_size=train_ds.image_size)
    elif resume_from is None:
        base = PRESETS.get({"mnist-5k": "mnist"}.get(tcfg.dataset, tcfg.dataset), PRESETS["celeba"])
        try:
            cfg = base.replace(channels=dataset_channels(tcfg.dataset), image_size=train_ds.image_size, **model_opts)
            CAConfig.from_dict(cfg.to_dict())
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    h, w = cfg.image_size
    if any(c.kind == "patch" for c in tcfg.mixture):
        for p in {s for _, s in tcfg.schedule.combos}:
            for side in (h, w, *tcfg.crop_sizes):
                if side % p:
                    raise UsageError(f"mask patch {p} does not divide the image size {side}; change --mask-max-patch")
    if tcfg.crop_sizes and cfg.size_dependent:
        raise UsageError("--crop-sizes needs a size-agnostic model (--pos-encoding none)")
    if tcfg.precision == "bf16" and dev.type == "cpu" and cpu_has_native_bf16() is False:
        logmod.log.warning(
            "--precision bf16: this CPU has no bfloat16 instructions (avx512_bf16 or amx_bf16), so the products are "
            "emulated and run much slower than fp32; prefer --precision fp32"
        )
    logmod.log.info(
        f"training {cfg.arch} on {train_ds.name} ({len(train_ds)} images, {h}×{w}) for {tcfg.iterations} iterations "
        f"on {dev}, seed {tcfg.seed}; run folder {out_dir}"
    )
    if world.distributed:
        logmod.log.info(f"distributed: {world.size} ranks, backend {world.backend}, global batch {tcfg.batch_size} "
                        f"({tcfg.batch_size // world.size} per rank), one pool of {tcfg.pool_size // world.size} "
                        f"per rank")
    summary = run_training(
        cfg, tcfg, out_dir, train_ds=train_ds, val_ds=val_ds, device=dev, resume_from=resume_from,
        init_state=init_state, stop_at=stop_at, argv=["vitca", *sys.argv[1:]], world=world,
    )  # fmt: skip
    distributed.shutdown()
    best = summary["best_val_psnr"]
    logmod.log.info(
        f"{summary['status']} at iteration {summary['iteration']}"
        + (f"; best validation PSNR {best:.2f} dB" if best is not None else "")
        + f"; resume with: vitca train --resume {out_dir}"
    )
    if summary["status"] == "interrupted":
        raise typer.Exit(130)


def _read_init(spec: str):
    """``--init-weights NAME|PATH``: the model configuration, its state dict, and a record of where it came from."""
    from vitca_cli.io import weights
    from vitca_cli.io.checkpoint import read_checkpoint
    from vitca_cli.nca.config import CAConfig
    from vitca_cli.errors import WeightsError

    ref = weights.resolve(spec)
    if ref.path.suffix == ".onnx":
        raise UsageError(f"--init-weights {spec}: an ONNX step cannot be trained; give a .pt checkpoint")
    ckpt = read_checkpoint(ref.path)
    try:
        cfg = CAConfig.from_dict(ckpt["config"])
        state = ckpt["model"]
    except (KeyError, ValueError) as exc:
        raise WeightsError(f"{ref.path}: not a model checkpoint ({exc})") from None
    return cfg, state, f"{ref.name} ({ref.path.name}, sha256 {weights.sha256_file(ref.path)[:12]})"


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--nproc":
            skip = True
        elif not token.startswith("--nproc="):
            out.append(token)
    return out


def _parse_sizes(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--crop-sizes {text!r}: expected comma-separated integers, e.g. 32,64") from None


def _slug(spec: str) -> str:
    return spec.replace("folder:", "folder-").replace("/", "_").strip("_") or "run"


def register(app: typer.Typer) -> None:
    app.command("train")(train)
