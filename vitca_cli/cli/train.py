"""``vitca train``: pool-based training (the paper's Algorithm 1), every ablation knob a flag.

Thin: the training options come from the fields of ``training.config.TrainConfig`` (each default and help text is
stated there once), the model options from ``CAConfig``'s defaults; the run itself (planning, datasets, the model,
the loop) is ``training.launch.launch``, the run-folder and resume rules live in ``training/run.py``.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from vitca_cli.cli import options as opt
from vitca_cli.cli.options import MaskType, handle_errors
from vitca_cli.errors import SettingError
from vitca_cli.nca.config import ARCHES, CELL_INITS, POS_ENCODINGS, CAConfig
from vitca_cli.training.config import DATA, TrainConfig, default_text  # torch-free: --help stays fast

Arch = Enum("Arch", {n: n for n in ARCHES}, type=str)
CellInit = Enum("CellInit", {n: n for n in CELL_INITS}, type=str)
PosEncoding = Enum("PosEncoding", {n: n for n in POS_ENCODINGS}, type=str)

MODEL_HELP, RUN_HELP = "Model", "Run"
CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(CAConfig)}


def _opt(default, *names, help: str, panel: str, **kw):
    return typer.Option(default, *names, help=help, rich_help_panel=panel, **kw)


def _config(name: str, *names, **kw):
    """An option for a ``TrainConfig`` field that the command reads itself (help and default from the field)."""
    f = CONFIG_FIELDS[name]
    return _opt(None, *names, help=f"{f.metadata['help']} [{default_text(f)}]", panel=f.metadata["panel"], **kw)


def _model(name: str, *names, help: str, shown=None, **kw):
    """A model option: None unless given (the dataset's preset decides), its default shown from ``CAConfig``."""
    value = MODEL_DEFAULTS[name] if shown is None else shown
    return _opt(None, *names, help=f"{help} [{value}].", panel=MODEL_HELP, **kw)


def _command_options(
    dataset: Optional[str] = _config("dataset", "--dataset"),
    data_dir: Optional[Path] = _opt(None, "--data-dir", help=CONFIG_FIELDS["data_dir"].metadata["help"], panel=DATA),
    download: bool = _opt(False, "--download", help="Download MNIST/FashionMNIST/CIFAR-10 if missing.", panel=DATA),
    image_size: Optional[int] = _opt(
        None, "--image-size", help="Training size (resize; random crops for folder:).", panel=DATA
    ),
    crop_sizes: Optional[str] = _config("crop_sizes", "--crop-sizes"),
    run_dir: Optional[Path] = _opt(
        None, "--run-dir", "-o", help="Run folder (default runs/DATASET-TIME).", panel=RUN_HELP
    ),
    resume: Optional[Path] = _opt(None, "--resume", help="Continue the run in this folder exactly.", panel=RUN_HELP),
    stop_at: Optional[int] = _opt(
        None, "--stop-at", help="End this session after iteration N (saving); resume later.", panel=RUN_HELP
    ),
    device: str = opt.device_option("auto | cpu | cuda[:N].", panel=RUN_HELP),
    nproc: Optional[int] = _opt(
        None,
        "--nproc",
        min=1,
        help="Run N local ranks data-parallel (torch's launcher, as "
        "`torchrun --standalone --nproc-per-node N -m vitca_cli train ...`); --batch-size is "
        "the global batch.",
        panel=RUN_HELP,
    ),
    threads: Optional[int] = opt.threads_option(opt.SET_THREADS_HELP, panel=RUN_HELP),
    arch: Optional[Arch] = _model("arch", "--arch", help="Update network"),
    hidden: Optional[int] = _model("hidden", "--hidden", help="Hidden channels per cell"),
    patch_size: Optional[int] = _model("patch_size", "--patch-size", help="Cell patch size"),
    neighbourhood: Optional[int] = _model(
        "neighbourhood", "--neighbourhood", help="Attention window N×N", shown=MODEL_DEFAULTS["neighbourhood"][0]
    ),
    cell_init: Optional[CellInit] = _model(
        "cell_init", "--cell-init", help="Cell initialisation; input: outputs start at the damaged image"
    ),
    mask_channel: Optional[bool] = _model(
        "mask_channel",
        "--mask-channel/--no-mask-channel",
        help="Mask-aware cells: one input channel, 1 = pixel known",
        shown="off",
    ),
    update_rate: Optional[float] = _model("update_rate", "--update-rate", help="σ: 0.5 asynchronous, 1.0 synchronous"),
    embed: Optional[int] = _model("embed", "--embed", help="Embedding width E"),
    heads: Optional[int] = _model("heads", "--heads", help="Attention heads"),
    depth: Optional[int] = _model("depth", "--depth", help="Transformer blocks"),
    mlp: Optional[int] = _model("mlp", "--mlp", help="MLP width"),
    pos_encoding: Optional[PosEncoding] = _model("pos_encoding", "--pos-encoding", help="Position encoding"),
    init_weights: Optional[str] = _opt(
        None,
        "--init-weights",
        help="Start from these weights (NAME or PATH; fine-tuning): the model and image size come from them.",
        panel=MODEL_HELP,
    ),
):
    """The options that are not ``TrainConfig`` fields (their signature is the command's)."""


MODEL_OPTIONS = (
    "arch",
    "hidden",
    "patch_size",
    "neighbourhood",
    "cell_init",
    "mask_channel",
    "update_rate",
    "embed",
    "heads",
    "depth",
    "mlp",
    "pos_encoding",
)


def _config_parameters() -> list[inspect.Parameter]:
    """One option per ``TrainConfig`` field (masking fields as ``--mask-NAME``), None unless given."""
    from vitca_cli.training.config import options

    params = []
    for name, f in options():
        kind = type(f.default)
        dash = name.replace("_", "-")
        names = tuple(f.metadata["flags"])
        if not any(n.startswith("--") for n in names):
            names = (f"--{dash}/--no-{dash}" if kind is bool else f"--{dash}",) + names
        annotation = Optional[MaskType] if name == "mask_type" else Optional[kind]
        option = _opt(None, *names, help=f"{f.metadata['help']} [{default_text(f)}]", panel=f.metadata["panel"])
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return params


def _command(fn):
    """``fn(**options)`` with the signature typer reads: the command's own options, then the config's."""
    own = inspect.signature(_command_options).parameters.values()
    hints = typing.get_type_hints(_command_options)
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[p.name]) for p in own]
    params += _config_parameters()
    fn.__signature__ = inspect.Signature(params, return_annotation=None)
    fn.__annotations__ = {p.name: p.annotation for p in params}
    return fn


def _value(v):
    return v.value if isinstance(v, Enum) else v


def train(**given) -> None:
    """Train a ViTCA (or UNetCA) with the paper's pool-based Algorithm 1; resume a run exactly with --resume."""
    from vitca_cli.training.config import options
    from vitca_cli.training.launch import Launch, launch

    o = {k: _value(v) for k, v in given.items()}
    train_opts = {name: o[name] for name, _ in options() if o[name] is not None}
    if o["crop_sizes"] is not None:
        train_opts["crop_sizes"] = _parse_sizes(o["crop_sizes"])
    model_opts = {k: o[k] for k in MODEL_OPTIONS if o[k] is not None}
    if "neighbourhood" in model_opts:
        model_opts["neighbourhood"] = (model_opts["neighbourhood"],) * 2
    own = {f.name: o[f.name] for f in dataclasses.fields(Launch) if f.name in o}
    status = launch(Launch(train_opts, model_opts, **own), sys.argv[1:])
    if status:
        raise typer.Exit(status)


def _parse_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SettingError("crop_sizes", f"{text!r}: expected comma-separated integers, e.g. 32,64") from None


def register(app: typer.Typer) -> None:
    app.command("train")(handle_errors(_command(train)))
