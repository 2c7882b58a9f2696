"""`vitca train`'s run, from its parsed options to the loop: local ranks launched, this rank's device set up, the
run planned (a new folder, a resumed run or fine-tuning's starting weights), the datasets opened at the image size
the run trains at, the model configured, and the loop (``training.train.train``) run.

The command (``vitca_cli/cli/train.py``) parses the options into a ``Launch`` and calls ``launch``; the run-folder
and resume rules live in ``training/run.py``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from vitca_cli.errors import SettingError, placeholders
from vitca_cli.training.config import TrainConfig

INTERRUPTED = 130  # the exit status of a run stopped by Ctrl-C (it saved first)


@dataclasses.dataclass
class Launch:
    """What `vitca train` was asked: the ``TrainConfig`` fields given (``train_opts``), the model options given
    (``model_opts``, ``CAConfig`` fields) and the options that are neither; None where not given."""

    train_opts: dict
    model_opts: dict
    dataset: Optional[str] = None
    data_dir: Optional[Path] = None
    download: bool = False
    image_size: Optional[int] = None
    run_dir: Optional[Path] = None
    resume: Optional[Path] = None
    stop_at: Optional[int] = None
    device: str = "auto"
    nproc: Optional[int] = None
    threads: Optional[int] = None
    init_weights: Optional[str] = None

    def __post_init__(self):
        if self.stop_at is not None and self.stop_at < 1:
            raise SettingError("stop_at", "must be ≥ 1")


def launch(req: Launch, argv: list[str]) -> int:
    """Run the training ``req`` asks for; ``argv`` is the command's arguments (after ``vitca``), recorded in the
    run folder and passed on to the local ranks. Returns the exit status: 0, ``INTERRUPTED``, or the launcher's."""
    from vitca_cli.training import distributed

    if req.nproc is not None and req.nproc > 1 and not distributed.launched():
        return distributed.launch_local(req.nproc, without_nproc(argv))
    world, dev = _start(req.device, req.threads)
    return _run(req, world, dev, argv)


def _start(device: str, threads: Optional[int]):
    """This rank's world and device; the allocator and thread count set."""
    from vitca_cli import log as logmod
    from vitca_cli.runtime import resolve_device, tune_allocator
    from vitca_cli.training import distributed

    world, dev = distributed.init(resolve_device(device))
    if not world.main:
        logmod.setup(logmod.verbosity(), quiet=True)  # one rank speaks for the run
    tune_allocator()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return world, dev


def _plan(req: Launch, world):
    """The run's training configuration, folder, saved state (resuming) and starting weights (fine-tuning)."""
    from vitca_cli.training import distributed, run

    train_opts, model_opts = dict(req.train_opts), req.model_opts
    init = None
    if req.init_weights is not None:
        if req.resume is not None:
            raise SettingError("init_weights", "starts a new run; {1} continues one (pick one)", "resume")
        fixed = sorted(set(model_opts) - set(run.RULE_FREE))
        if fixed:
            given = placeholders(len(fixed))
            raise SettingError("init_weights", f"fixes the model's weights; cannot also set {given}", *fixed)
        init = run.read_init(req.init_weights)
        train_opts["init_weights"] = init[2]
    if req.resume is not None:
        fixed = sorted(model_opts) + [n for n in ("dataset", "image_size", "run_dir") if getattr(req, n)]
        moved = {"data_dir": str(req.data_dir)} if req.data_dir else {}  # the same data, found elsewhere
        cfg, tcfg, ckpt = run.resume_run(req.resume, {**train_opts, **moved}, fixed)
        return cfg, tcfg, req.resume, ckpt, None
    spec = req.dataset or TrainConfig.dataset
    data_dir = str(req.data_dir) if req.data_dir else None
    tcfg = TrainConfig.from_dict({"dataset": spec, "data_dir": data_dir, **train_opts})
    out_dir = distributed.same_on_all_ranks(world, run.new_run_dir(spec, req.run_dir))  # ranks may start apart
    run.check_new_run_dir(out_dir)
    return None, tcfg, out_dir, None, init


def _run(req: Launch, world, dev, argv: list[str]) -> int:
    from vitca_cli.log import log
    from vitca_cli.training import distributed, run
    from vitca_cli.training.data import dataset_channels, open_dataset
    from vitca_cli.training.train import train as run_training

    cfg, tcfg, out_dir, resume_from, init = _plan(req, world)
    if cfg is not None:
        image_hw = cfg.image_size
    else:
        image_hw = (req.image_size,) * 2 if req.image_size else (init[0].image_size if init else None)
        if tcfg.crop_sizes and not req.image_size:
            image_hw = (tcfg.crop_sizes[0],) * 2
    train_ds = open_dataset(tcfg.dataset, "train", tcfg.data_dir, image_hw, download=req.download)
    val_ds = open_dataset(tcfg.dataset, "val", tcfg.data_dir, train_ds.image_size) if tcfg.val_every else None
    if cfg is None:
        cfg = run.model_config(
            tcfg,
            dataset_channels(tcfg.dataset),
            train_ds.image_size,
            req.model_opts,
            init[0] if init else None,
            req.init_weights or "",
        )
    else:
        run.check_sizes(cfg, tcfg)
    _warn_precision(tcfg, dev)
    h, w = cfg.image_size
    log.info(
        f"training {cfg.arch} on {train_ds.name} ({len(train_ds)} images, {h}×{w}) for {tcfg.iterations} "
        f"iterations on {dev}, seed {tcfg.seed}; run folder {out_dir}"
    )
    if world.distributed:
        log.info(
            f"distributed: {world.size} ranks, backend {world.backend}, global batch {tcfg.batch_size} "
            f"({tcfg.batch_size // world.size} per rank), one pool of {tcfg.pool_size // world.size} per rank"
        )
    summary = run_training(
        cfg, tcfg, out_dir, train_ds=train_ds, val_ds=val_ds, device=dev, resume_from=resume_from,
        init_state=init[1] if init else None, stop_at=req.stop_at, argv=["vitca", *argv], world=world,
    )  # fmt: skip
    distributed.shutdown()
    best = summary["best_val_psnr"]
    log.info(
        f"{summary['status']} at iteration {summary['iteration']}"
        + (f"; best validation PSNR {best:.2f} dB" if best is not None else "")
        + f"; resume with: vitca train --resume {out_dir}"
    )
    return INTERRUPTED if summary["status"] == "interrupted" else 0


def _warn_precision(tcfg, dev) -> None:
    from vitca_cli import runtime
    from vitca_cli.log import log

    if tcfg.precision == "bf16" and dev.type == "cpu" and runtime.cpu_has_native_bf16() is False:
        log.warning(
            "--precision bf16: this CPU has no bfloat16 instructions (avx512_bf16 or amx_bf16), so the "
            "products are emulated and run much slower than fp32; prefer --precision fp32"
        )


def without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less its ``--nproc N`` (the local ranks run the command without it)."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--nproc":
            skip = True
        elif not token.startswith("--nproc="):
            out.append(token)
    return out
