"""``vitca weights list|show|path``: the shipped models, the user cache, and what a ``--weights`` value resolves to."""

from __future__ import annotations

import json
from typing import Optional

import typer

from vitca_cli.cli.options import handle_errors

weights_app = typer.Typer(
    help="List, inspect and locate model weights (shipped, cached in $VITCA_HOME, or files).",
    no_args_is_help=True,
)


def _fmt(value, spec: str = "") -> str:
    if value is None or value == "":
        return "-"
    return format(value, spec) if spec else str(value)


WIDTH = 80  # the table fits a terminal of this many columns
NAME_WIDTH = 18
STATUS = {"ok": None, "downloadable": "to fetch"}  # the status column: where it is, or what is wrong
KINDS = {1: "grey", 3: "colour"}  # what the default models' channel counts are called in the list


def _default_label(name: str, channels: int) -> str:
    """``colour`` where ``name`` is the default for colour images, ``colour inpaint`` where only some command's
    (the commands it is the default of), else empty."""
    from vitca_cli.io.weights import COMMANDS, DEFAULT_FOR_CHANNELS, default_name

    if DEFAULT_FOR_CHANNELS[channels] == name:
        return KINDS[channels]
    commands = [c for c in COMMANDS if default_name(channels, c) == name]
    return f"{KINDS[channels]} {'/'.join(commands)}" if commands else ""


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


@weights_app.command("list")
@handle_errors
def list_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON (every field, dataset included).")) -> None:
    """List shipped and cached weights: channels, training size and iterations, default steps, validation quality,
    and which one denoise, inpaint and export-onnx use for grey and for colour images."""
    from vitca_cli.io.weights import cache_dir, list_weights
    from vitca_cli.restore.defaults import DEFAULT_ITERS

    rows = list_weights()
    for r in rows:
        r["default_for"] = [_default_label(r["name"], ch) for ch in KINDS if _default_label(r["name"], ch)]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from vitca_cli.tables import format_table

    header = ("name", "default", "ch", "size", "trained", "steps", "PSNR", "SSIM", "status")
    body = [
        (
            _short(r["name"], NAME_WIDTH),
            ", ".join(r["default_for"]) or "",
            _fmt(r.get("channels")),
            "×".join(str(s) for s in r.get("image_size", [])) or "-",
            _fmt(r.get("iterations")),
            _fmt(r.get("default_iters") or (DEFAULT_ITERS if r["source"] == "shipped" else None)),
            _fmt(r.get("val_psnr"), ".2f"),
            _fmt(r.get("val_ssim"), ".3f"),
            STATUS.get(r["status"], r["status"]) or ("shipped" if r["source"] == "shipped" else "cached"),
        )
        for r in rows
    ]
    table = format_table(header, body, align="llrrrrrrl", rule=False)
    if max(map(len, table.splitlines())) > WIDTH:
        table = format_table(header, body, align="llrrrrrrl", rule=False, sep=" ")
    print(table)
    if not rows:
        print(f"(no weights yet: train with `vitca train`, or put NAME.pt files in {cache_dir()})")
        return
    print(
        "default: what denoise, inpaint and export-onnx run without -w, by image colour;\n"
        "`colour inpaint`: inpaint's own default for colour images.\n"
        "trained: training iterations. steps: what a run takes unless --iters is given.\n"
        "Dataset and training of a model: vitca weights show NAME"
    )


@weights_app.command("show")
@handle_errors
def show_cmd(
    spec: str = typer.Argument(..., help="Weights NAME or PATH."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show one model: its manifest entry, config, parameter count, training meta and sha256."""
    from vitca_cli.io.weights import resolve, sha256_file

    ref = resolve(spec)
    info = {"name": ref.name, "source": ref.source, "path": str(ref.path), "sha256": sha256_file(ref.path)}
    if ref.entry:
        info["manifest"] = ref.entry
    if ref.path.suffix == ".pt":
        from vitca_cli.io.checkpoint import read_checkpoint
        from vitca_cli.nca.config import CAConfig
        from vitca_cli.nca.model import CellularAutomaton, count_parameters

        obj = read_checkpoint(ref.path)
        cfg = CAConfig.from_dict(obj["config"])
        info["config"] = cfg.to_dict()
        info["parameters"] = count_parameters(CellularAutomaton(cfg))
        info["meta"] = obj.get("meta", {})
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:>16}: {v}")
        else:
            print(f"{key:>8}: {value}")


@weights_app.command("path")
@handle_errors
def path_cmd(spec: Optional[str] = typer.Argument(None, help="Weights NAME or PATH; none: the cache folder.")) -> None:
    """Print the checked file a NAME resolves to (or the cache folder where user weights go)."""
    from vitca_cli.io.weights import cache_dir, resolve

    print(resolve(spec).path if spec else cache_dir())


def register(app: typer.Typer) -> None:
    app.add_typer(weights_app, name="weights")
