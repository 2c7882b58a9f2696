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


@weights_app.command("list")
@handle_errors
def list_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List shipped and cached weights with their dataset, size and validation quality."""
    from vitca_cli.io.weights import cache_dir, list_weights

    rows = list_weights()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from vitca_cli.tables import format_table

    header = ("name", "source", "status", "dataset", "ch", "size", "iters", "PSNR", "SSIM")
    body = [
        (
            r["name"],
            r["source"],
            r["status"],
            _fmt(r.get("dataset")),
            _fmt(r.get("channels")),
            "×".join(str(s) for s in r.get("image_size", [])) or "-",
            _fmt(r.get("iterations")),
            _fmt(r.get("val_psnr"), ".2f"),
            _fmt(r.get("val_ssim"), ".3f"),
        )
        for r in rows
    ]
    # long descriptions wrap in their column
    print(format_table(header, body, align="llllrrrrr", rule=False, wrap={3: 24}, sep=" "))
    if not rows:
        print(f"(no weights yet: train with `vitca train`, or put NAME.pt files in {cache_dir()})")


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
