"""``vitca model``: print a configuration and its exact parameter count."""

from __future__ import annotations

import json
from enum import Enum
from typing import Optional

import typer

from vitca_cli.cli.options import handle_errors
from vitca_cli.errors import UsageError
from vitca_cli.nca.config import ARCHES, PRESETS

Preset = Enum("Preset", {name: name for name in PRESETS}, type=str)
Arch = Enum("Arch", {name: name for name in ARCHES}, type=str)


@handle_errors
def model(
    preset: Preset = typer.Option(Preset["fashion-mnist"].value, "--preset", help="Dataset preset."),
    patch_size: Optional[int] = typer.Option(None, "--patch-size", help="Cell patch size P (1, 2, 4, 8, 16)."),
    neighbourhood: Optional[int] = typer.Option(None, "--neighbourhood", help="Attention window N (N×N, odd)."),
    hidden: Optional[int] = typer.Option(None, "--hidden", help="Hidden channels per cell."),
    heads: Optional[int] = typer.Option(None, "--heads", help="Attention heads."),
    embed: Optional[int] = typer.Option(None, "--embed", help="Embedding width E."),
    arch: Optional[Arch] = typer.Option(None, "--arch", help="Update network."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Print a model configuration and its exact parameter count (appendix Table 4)."""
    from vitca_cli.nca.config import preset as make_preset
    from vitca_cli.nca.model import CellularAutomaton, count_parameters

    try:
        cfg = make_preset(
            preset.value,
            patch_size=patch_size,
            neighbourhood=(neighbourhood, neighbourhood) if neighbourhood else None,
            hidden=hidden,
            heads=heads,
            embed=embed,
            arch=arch.value if arch else None,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    params = count_parameters(CellularAutomaton(cfg))
    data = {"preset": preset.value, **cfg.to_dict(), "cell_channels": cfg.cell_channels, "parameters": params}
    if as_json:
        print(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        print(f"{key:>16}: {value}")


def register(app: typer.Typer) -> None:
    app.command("model")(model)
