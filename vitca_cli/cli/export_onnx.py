"""``vitca export-onnx``: write one CA step as an ONNX graph that runs without PyTorch."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from vitca_cli.cli import options as opt
from vitca_cli.cli.options import handle_errors
from vitca_cli.errors import UsageError
from vitca_cli.onnx.format import DEFAULT_OPSET, MIN_OPSET  # torch-free

Exporter = Enum("Exporter", {"dynamo": "dynamo", "torchscript": "torchscript"}, type=str)


@handle_errors
def export_onnx(
    output: Path = typer.Option(..., "--output", "-o", help="The .onnx file to write."),
    weights: Optional[str] = opt.weights_option(
        "Weights NAME or checkpoint PATH (default: the shipped model for --channels)."
    ),
    channels: int = typer.Option(1, "--channels", help="Without --weights: the shipped model for 1 or 3 channels."),
    opset: int = typer.Option(
        DEFAULT_OPSET, "--opset", help="ONNX opset (18 or newer; 20 has a Gelu op that ONNX Runtime fuses)."
    ),
    with_head_mask: bool = typer.Option(
        False, "--with-head-mask", help="Add a 'head_mask' input (heads,): 1 silences an attention head."
    ),
    exporter: Exporter = typer.Option(
        Exporter.dynamo.value, "--exporter", help="dynamo (default; needs onnxscript) or the legacy torchscript."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
) -> None:
    """Export ONE CA step: inputs 'cells' (B,H,W,C) and 'update_mask' (B,H,W,1), output 'next_cells'.

    Batch, height and width are dynamic; the config and channel layout are stored in the model's metadata, so
    `vitca denoise --backend onnx --weights OUTPUT` needs nothing else. The graph is checked with onnx.checker
    and against the torch step before it is written.
    """
    from vitca_cli.io import weights as registry
    from vitca_cli.log import log
    from vitca_cli.onnx.export import export_checkpoint

    if output.suffix.lower() != ".onnx":
        raise UsageError(f"-o {output}: the output should end in .onnx")
    if output.is_dir():
        raise UsageError(f"-o {output}: is a folder; give a file name ending in .onnx")
    if output.exists() and not overwrite:
        raise UsageError(f"-o {output}: exists; add --overwrite to replace it")
    if opset < MIN_OPSET:
        raise UsageError(f"--opset {opset}: the exporter needs opset {MIN_OPSET} or newer")
    if channels not in (1, 3):
        raise UsageError(f"--channels {channels}: expected 1 or 3")
    ref = registry.resolve(weights, channels)
    if ref.path.suffix.lower() == ".onnx":
        raise UsageError(f"--weights {ref.path}: already an ONNX file; export takes a checkpoint (.pt)")
    if output.resolve() == ref.path.resolve():
        raise UsageError(f"-o {output}: is the weights file itself")
    log.info(f"exporting {ref.name} ({ref.path}) with the {exporter.value} exporter, opset {opset}")
    info = export_checkpoint(ref.path, output, opset, with_head_mask, name=ref.name, exporter=exporter.value)
    log.info(
        f"wrote {output} ({info['bytes'] / 1024:.0f} KB; inputs {', '.join(info['inputs'])}; dynamic "
        f"{info['dynamic']}; max error vs torch {info['self_check_max_error']:.1e})"
    )


def register(app: typer.Typer) -> None:
    app.command("export-onnx")(export_onnx)
