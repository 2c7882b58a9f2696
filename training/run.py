"""Run folders: where a new run goes, what a resumed run may change, fine-tuning's starting weights, and the model
configuration a run trains. The rules `vitca train` applies before the loop (``training.train.train``) starts.

A run folder holds ``config.json``, ``command.txt``, ``metrics.jsonl``, ``last.pt`` (the resumable state),
``best.pt`` and, with ``--ema``, ``ema.pt`` (the weight average); see ``training/train.py``.
"""

from __future__ import annotations

import time
from pathlib import Path

from vitca_cli.errors import SettingError, UsageError, WeightsError, placeholders
from vitca_cli.nca.config import PRESETS, CAConfig
from vitca_cli.training.config import TrainConfig, resumable

CONFIG_FILE, LAST, BEST, AVERAGE = "config.json", "last.pt", "best.pt", "ema.pt"


def read_run(run_dir: Path) -> tuple[CAConfig, TrainConfig, dict]:
    """The model and training configuration of a run folder, and its ``last.pt`` checkpoint (older layouts of the
    training configuration are migrated: ``TrainConfig.from_dict``)."""
    from vitca_cli.io.checkpoint import read_checkpoint

    run_dir = Path(run_dir)
    last = run_dir / LAST
    if not last.is_file():
        raise SettingError("resume", f"{run_dir}: no {LAST} there (not a vitca run folder, or it never saved)")
    ckpt = read_checkpoint(last)
    if "train" not in ckpt or "optimizer" not in ckpt:
        raise UsageError(f"{last}: holds weights only, not a resumable training state")
    return CAConfig.from_dict(ckpt["config"]), TrainConfig.from_dict(ckpt["train"]), ckpt


def resume_run(run_dir: Path, changes: dict, fixed: list[str]) -> tuple[CAConfig, TrainConfig, dict]:
    """Continue ``run_dir``: its saved configurations with ``changes`` (training settings given again), refused
    when ``changes`` touch a setting that is not resumable or ``fixed`` names settings given that the run fixes
    (the model, the data)."""
    allowed = resumable()
    bad = sorted(set(changes) - allowed) + list(fixed)
    if bad:
        given, ok = placeholders(len(bad)), placeholders(len(allowed), start=len(bad) + 1)
        raise SettingError(
            "resume", f"keeps the run's configuration; cannot change {given} (allowed: {ok})", *bad, *sorted(allowed)
        )
    cfg, tcfg, ckpt = read_run(run_dir)
    tcfg = tcfg.replace(**changes)
    if ckpt["iteration"] >= tcfg.iterations:
        raise SettingError(
            "iterations",
            f"{tcfg.iterations}: {run_dir} is already at iteration {ckpt['iteration']}; "
            "pass a larger number to continue",
        )
    return cfg, tcfg, ckpt


def new_run_dir(dataset: str, run_dir: Path | None = None) -> Path:
    """Where a new run goes: ``run_dir``, else ``runs/DATASET-TIME``."""
    return Path(run_dir) if run_dir else Path("runs") / f"{_slug(dataset)}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_new_run_dir(out_dir: Path) -> None:
    if (Path(out_dir) / LAST).exists():
        raise SettingError(
            "run_dir",
            f"{out_dir} already holds a run; resume it ({{1}} {out_dir}) or choose another folder",
            "resume",
        )


def _slug(spec: str) -> str:
    return spec.replace("folder:", "folder-").replace("/", "_").strip("_") or "run"


def read_init(spec: str):
    """Fine-tuning's starting point ``NAME|PATH``: the model configuration, its state dict, and a record of where
    it came from (for the run's configuration)."""
    from vitca_cli.io import weights
    from vitca_cli.io.checkpoint import read_checkpoint
    from vitca_cli.io.files import sha256_file

    ref = weights.resolve(spec)
    if ref.path.suffix == ".onnx":
        raise SettingError("init_weights", f"{spec}: an ONNX step cannot be trained; give a .pt checkpoint")
    ckpt = read_checkpoint(ref.path)
    try:
        cfg = CAConfig.from_dict(ckpt["config"])
        state = ckpt["model"]
    except (KeyError, ValueError) as exc:
        raise WeightsError(f"{ref.path}: not a model checkpoint ({exc})") from None
    return cfg, state, f"{ref.name} ({ref.path.name}, sha256 {sha256_file(ref.path)[:12]})"


RULE_FREE = ("cell_init", "update_rate")  # model options that change no weight: fine-tuning may set them


def model_config(
    tcfg: TrainConfig,
    channels: int,
    image_size: tuple[int, int],
    model_opts: dict,
    init_cfg: CAConfig | None = None,
    init_spec: str = "",
) -> CAConfig:
    """The model a run trains on data of ``channels`` × ``image_size``: the starting weights' (moved to the image
    size when its position encoding allows, with any ``RULE_FREE`` options of ``model_opts``), else the dataset's
    preset with ``model_opts``; checked against the masking and crop sizes."""
    if init_cfg is not None:
        cfg = init_cfg.replace(**{k: v for k, v in model_opts.items() if k in RULE_FREE})
        if channels != cfg.channels or tuple(image_size) != tuple(cfg.image_size):
            if channels != cfg.channels or cfg.pos_encoding == "learned":
                raise SettingError(
                    "init_weights",
                    f"{init_spec}: a {cfg.channels}-channel {cfg.image_size[0]}×{cfg.image_size[1]} "
                    f"model ({cfg.pos_encoding} position encoding) cannot train on {tcfg.dataset} ({channels} "
                    f"channels, {image_size[0]}×{image_size[1]})",
                )
            cfg = cfg.replace(image_size=tuple(image_size))
    else:
        base = PRESETS.get({"mnist-5k": "mnist"}.get(tcfg.dataset, tcfg.dataset), PRESETS["celeba"])
        try:
            cfg = base.replace(channels=channels, image_size=tuple(image_size), **model_opts)
            CAConfig.from_dict(cfg.to_dict())
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    check_sizes(cfg, tcfg)
    return cfg


def check_sizes(cfg: CAConfig, tcfg: TrainConfig) -> None:
    """Every mask patch size must divide the image and crop sizes; crops need a size-agnostic model."""
    h, w = cfg.image_size
    if any(c.kind == "patch" for c in tcfg.mixture):
        for p in {s for _, s in tcfg.schedule.combos}:
            for side in (h, w, *tcfg.crop_sizes):
                if side % p:
                    raise SettingError(
                        "mask_max_patch",
                        f"{tcfg.masking.max_patch}: mask patch {p} does not divide the image size {side}",
                    )
    if tcfg.crop_sizes and cfg.size_dependent:
        raise SettingError("crop_sizes", "needs a size-agnostic model ({1} none)", "pos_encoding")
