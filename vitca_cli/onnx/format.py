"""The vitca ONNX step format, shared by the exporter and the runtime (torch-free).

An exported step graph has the inputs ``cells`` ``(B, H, W, C)`` and ``update_mask`` ``(B, H, W, 1)`` (float32,
channels last; plus ``head_mask`` ``(heads,)`` when exported with one) and the output ``next_cells``. Batch,
height and width are the dynamic axes ``batch``, ``height``, ``width``. The model's config, the channel layout
and the source checkpoint's meta are ``metadata_props`` with keys ``vitca.*`` (:func:`build_metadata`), all that a
runtime needs to rebuild the ``CAConfig`` (:func:`parse_metadata`).
"""

from __future__ import annotations

import json

from vitca_cli import __version__
from vitca_cli.errors import WeightsError
from vitca_cli.nca.config import CAConfig

FORMAT = "vitca-onnx-step"
FORMAT_VERSION = 1
DEFAULT_OPSET = 20  # Gelu is an ONNX op from opset 20 (onnxruntime >= 1.17 runs it); older opsets spell it out
MIN_OPSET = 18  # the dynamo exporter's own opset; LayerNormalization alone needs 17
INPUTS = ("cells", "update_mask")
HEAD_MASK = "head_mask"
OUTPUT = "next_cells"
DYNAMIC_AXES = ("batch", "height", "width")  # names of the cell grid's dynamic axes (B, H, W) in the graph
LAYOUT = "NHWC"
EXPORTERS = ("dynamo", "torchscript")
DEFAULT_EXPORTER = "dynamo"


def channel_layout(cfg: CAConfig) -> dict:
    """Where each part of a cell lives along the channel axis, as ``[start, stop)`` pairs."""

    def span(s: slice) -> list[int]:
        return [s.start, s.stop]

    return {
        "memory": LAYOUT,
        "cell_channels": cfg.cell_channels,
        "static_channels": cfg.static_channels,
        "position": [0, cfg.pe_channels],
        "input": span(cfg.input_slice),
        "output": span(cfg.output_slice),
        "hidden": span(cfg.hidden_slice),
        "patch_size": cfg.patch_size,
    }


def build_metadata(cfg: CAConfig, with_head_mask: bool, meta: dict | None, source: dict | None) -> dict[str, str]:
    """The ``vitca.*`` metadata_props of an exported step (all values are strings; JSON where structured)."""
    return {
        "vitca.format": FORMAT,
        "vitca.format_version": str(FORMAT_VERSION),
        "vitca.version": __version__,
        "vitca.config": json.dumps(cfg.to_dict(), sort_keys=True),
        "vitca.layout": json.dumps(channel_layout(cfg), sort_keys=True),
        "vitca.inputs": ",".join(INPUTS + ((HEAD_MASK,) if with_head_mask else ())),
        "vitca.outputs": OUTPUT,
        "vitca.meta": json.dumps(meta or {}, sort_keys=True, default=str),
        "vitca.source": json.dumps(source or {}, sort_keys=True),
    }


def parse_metadata(props: dict[str, str], path) -> tuple[CAConfig, dict, dict]:
    """The config, the source checkpoint's meta and the source record (name, file, sha256) in the ``vitca.*``
    metadata ``props`` of the step graph at ``path``; ``WeightsError`` when they are missing, newer or damaged."""
    if props.get("vitca.format") != FORMAT:
        raise WeightsError(
            f"{path}: an ONNX model, but not a vitca step graph (no vitca metadata); export one with "
            f"`vitca export-onnx`"
        )
    version = int(props.get("vitca.format_version", "0") or 0)
    if version > FORMAT_VERSION:
        raise WeightsError(f"{path}: step graph format {version} is newer than this vitca reads; upgrade vitca")
    try:
        cfg = CAConfig.from_dict(json.loads(props["vitca.config"]))
        layout = json.loads(props["vitca.layout"])
        meta = json.loads(props.get("vitca.meta", "{}"))
    except (KeyError, ValueError, TypeError) as exc:
        raise WeightsError(f"{path}: damaged vitca metadata ({exc}); re-export it with `vitca export-onnx`") from None
    if layout.get("memory") != LAYOUT or layout.get("cell_channels") != cfg.cell_channels:
        raise WeightsError(f"{path}: unexpected cell layout {layout}; re-export it with `vitca export-onnx`")
    return cfg, meta, source_record(props)


def source_record(props: dict[str, str]) -> dict:
    """What the metadata ``props`` say about the checkpoint a graph was exported from (``{}`` if nothing)."""
    try:
        source = json.loads(props.get("vitca.source", "{}") or "{}")
    except ValueError:
        return {}
    return source if isinstance(source, dict) else {}


def check_signature(input_names: list[str], output_names: list[str], path) -> None:
    """``WeightsError`` unless a graph's inputs and outputs are a vitca step's."""
    if input_names[: len(INPUTS)] != list(INPUTS) or OUTPUT not in output_names:
        raise WeightsError(f"{path}: graph inputs {input_names} are not a vitca step's; re-export it")
