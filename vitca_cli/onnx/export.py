"""Export ONE CA step to ONNX, so the update rule runs without PyTorch (``vitca export-onnx``).

The graph is a pure function of its inputs; the caller owns the randomness:

- ``cells``        ``(B, H, W, C)`` float32: the cell grid, channels last (see below);
- ``update_mask``  ``(B, H, W, 1)`` float32: 1 = the cell updates this step;
- ``head_mask``    ``(heads,)`` float32, only with ``with_head_mask``: 1 = head silenced;
- output ``next_cells`` ``(B, H, W, C)``.

Batch, height and width are dynamic (height and width are fixed to the training grid for a learned position
encoding). The grid is channels-last because vitca's torch grids are channels-last in memory
(``seed_cells``): ``z.permute(0, 2, 3, 1)`` is then a zero-copy view that ONNX Runtime reads in place, and the
per-cell linear layers need no transposes inside the graph.

The model's config, the channel layout and the source checkpoint's meta go into the model's ``metadata_props``
(keys ``vitca.*``, :mod:`vitca_cli.onnx.format`), so a runtime needs no other file:
:class:`vitca_cli.onnx.backend.OnnxBackend` rebuilds the ``CAConfig`` from them.

Exporters: the default is PyTorch's current (dynamo, torch.export-based) exporter, which needs ``onnxscript``;
the legacy TorchScript exporter is available as ``exporter="torchscript"``. Both give a correct graph with dynamic
H and W that runs at the same speed in ONNX Runtime (bench/onnx_step.py). The dynamo exporter is the default
because it is PyTorch's maintained path (the TorchScript one is deprecated and warns it will be removed) and its
file is smaller; the TorchScript exporter is much quicker to run and needs no onnxscript, which suits old torch
versions (before 2.6) and quick experiments.

The exported module is :class:`vitca_cli.onnx.graph.StepGraph` (ViTCA on tiles of cells, with the tiled
attention passed to the rule). The default opset is 20, whose ``Gelu`` ONNX Runtime fuses with the bias before
it. :class:`vitca_cli.onnx.backend.OnnxBackend` runs the graph in sessions of fixed shape, in which ONNX
Runtime folds the position encoding and the halo indices into constants.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from vitca_cli import __version__
from vitca_cli.errors import UsageError, VitcaError
from vitca_cli.io.checkpoint import atomic_write_bytes
from vitca_cli.io.weights import sha256_file
from vitca_cli.log import log
from vitca_cli.nca.config import CAConfig
from vitca_cli.onnx.format import (
    DEFAULT_EXPORTER,
    DEFAULT_OPSET,
    DYNAMIC_AXES,
    EXPORTERS,
    HEAD_MASK,
    INPUTS,
    MIN_OPSET,
    OUTPUT,
    build_metadata,
)
from vitca_cli.onnx.graph import StepGraph
from vitca_cli.onnx.session import create_session


def _example_grid(cfg: CAConfig) -> tuple[int, int]:
    """Grid size to trace with. Distinct, not 0 or 1 (the exporter would specialise on those), and not a
    multiple of the attention block, so the padding path is traced with non-zero pads."""
    if cfg.pos_encoding == "learned":  # tied to the training grid
        return tuple(s // cfg.patch_size for s in cfg.image_size)
    return 7, 10


def export_step(
    ca: nn.Module,
    path: Path,
    opset: int = DEFAULT_OPSET,
    with_head_mask: bool = False,
    meta: dict | None = None,
    source: dict | None = None,
    exporter: str = DEFAULT_EXPORTER,
) -> dict:
    """Export ``ca.step`` as an ONNX graph at ``path`` (written atomically) and return a summary dict.

    The graph is checked with ``onnx.checker`` (full check, with shape inference) and, as a guard against
    exporter regressions, run once in ONNX Runtime against the torch step on a small random grid.
    """
    import onnx

    if opset < MIN_OPSET:
        raise UsageError(f"--opset {opset}: the exporter needs opset {MIN_OPSET} or newer")
    cfg: CAConfig = ca.cfg
    ca = ca.float().cpu().eval()
    gh, gw = _example_grid(cfg)
    gen = torch.Generator().manual_seed(0)
    cells = torch.rand(2, gh, gw, cfg.cell_channels, generator=gen)
    mask = (torch.rand(2, gh, gw, 1, generator=gen) < 0.5).float()
    args = (cells, mask) + ((torch.zeros(cfg.heads),) if with_head_mask else ())
    names = list(INPUTS) + ([HEAD_MASK] if with_head_mask else [])

    dynamic = DYNAMIC_AXES[:1] if cfg.pos_encoding == "learned" else DYNAMIC_AXES

    graph = StepGraph(ca)
    try:
        # The exporters print progress to stdout and warn about their internals: keep stdout clean, logs quiet.
        with torch.no_grad(), _quiet_exporter():
            if exporter == "dynamo":
                proto = _export_dynamo(graph, args, names, opset, dynamic)
            elif exporter == "torchscript":
                proto = _export_torchscript(graph, args, names, opset, dynamic)
            else:
                raise UsageError(f"--exporter {exporter!r}: expected {' or '.join(EXPORTERS)}")
    except ImportError as exc:
        raise VitcaError(f"ONNX export needs onnx and onnxscript ({exc}); pip install onnx onnxscript") from None
    except VitcaError:
        raise
    except Exception as exc:  # noqa: BLE001 - exporter failures are many and deep; name them in one line
        hint = "; try --exporter torchscript" if exporter == "dynamo" else ""
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise VitcaError(f"ONNX export failed for this model ({type(exc).__name__}: {reason}){hint}") from None

    _strip_debug_info(proto)
    proto.producer_name = "vitca"
    proto.producer_version = __version__
    del proto.metadata_props[:]
    for key, value in build_metadata(cfg, with_head_mask, meta, source).items():
        proto.metadata_props.add(key=key, value=value)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise VitcaError(f"the exported graph fails onnx.checker: {str(exc)[:300]}") from None
    data = proto.SerializeToString()
    error = _self_check(data, ca, with_head_mask)
    if error > 1e-4:
        raise VitcaError(f"the exported graph disagrees with the torch step (max error {error:.2e}); not written")
    path = Path(path)
    atomic_write_bytes(path, lambda f: f.write(data))
    summary = {
        "path": str(path),
        "bytes": len(data),
        "opset": opset,
        "inputs": names,
        "exporter": exporter,
        "dynamic": ", ".join(dynamic),
        "self_check_max_error": error,
    }
    log.debug(f"exported {path} ({len(data) / 1024:.0f} KB, opset {opset}, self-check error {error:.1e})")
    return summary


def _export_dynamo(graph: nn.Module, args: tuple, names: list[str], opset: int, dynamic: tuple[str, ...]):
    """torch.export-based exporter (needs onnxscript); returns the ModelProto."""
    # Dim.AUTO, not named Dims: with named Dims torch.export rejects UNetCA, whose ceil-mode pooling makes the
    # tracer guard H, W >= 5, although the exported graph is right for any size (tested down to 1×1).
    dims = {axis: torch.export.Dim.AUTO for axis, _ in enumerate(dynamic)}
    shapes = {name: (dims if name in INPUTS else None) for name in names}
    program = torch.onnx.export(
        graph,
        args,
        dynamo=True,
        input_names=names,
        output_names=[OUTPUT],
        dynamic_shapes=shapes,
        opset_version=opset,
        optimize=True,
        verbose=False,
        external_data=False,
    )
    proto = program.model_proto
    _name_dynamic_axes(proto, dynamic)
    return proto


def _name_dynamic_axes(proto, dynamic: tuple[str, ...]) -> None:
    """Rename the exporter's symbolic dims (``s40``...) of the cell grid to ``batch``, ``height``, ``width``."""
    first = proto.graph.input[0].type.tensor_type.shape.dim
    rename = {first[axis].dim_param: name for axis, name in enumerate(dynamic) if first[axis].dim_param}
    for info in list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info):
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


def _export_torchscript(graph: nn.Module, args: tuple, names: list[str], opset: int, dynamic: tuple[str, ...]):
    """The legacy TorchScript exporter (deprecated by PyTorch, but much quicker to export); returns the ModelProto."""
    import io

    import onnx

    axes = dict(enumerate(dynamic))
    buffer = io.BytesIO()
    torch.onnx.export(
        graph,
        args,
        buffer,
        dynamo=False,
        input_names=names,
        output_names=[OUTPUT],
        dynamic_axes={name: axes for name in list(INPUTS) + [OUTPUT]},
        opset_version=opset,
    )
    return onnx.load_from_string(buffer.getvalue())


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporters' stdout progress, warnings and torch's own log lines (e.g. about torchvision)."""
    import logging

    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _strip_debug_info(proto) -> None:
    """Drop the exporter's per-node debug metadata (stack traces, FX node text): a third of the file otherwise."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del proto.graph.metadata_props[:]
    proto.graph.doc_string = ""


def _self_check(data: bytes, ca: nn.Module, with_head_mask: bool) -> float:
    """Max |ORT - torch| of one step on a small random grid of a size other than the traced one, relative to the
    largest state value when that exceeds 1."""

    cfg: CAConfig = ca.cfg
    gh, gw = _example_grid(cfg)
    if cfg.pos_encoding != "learned":
        gh, gw = 5, 12
    gen = torch.Generator().manual_seed(1)
    z = torch.rand(3, cfg.cell_channels, gh, gw, generator=gen)
    m = (torch.rand(3, 1, gh, gw, generator=gen) < 0.5).float()
    head = (torch.arange(cfg.heads) % 2).float() if with_head_mask and cfg.heads > 1 else None
    feeds = {"cells": z.permute(0, 2, 3, 1).numpy().copy(), "update_mask": m.permute(0, 2, 3, 1).numpy().copy()}
    if with_head_mask:
        feeds[HEAD_MASK] = (head if head is not None else torch.zeros(cfg.heads)).numpy()
    session, _ = create_session(data, "cpu", threads=1)
    (out,) = session.run([OUTPUT], feeds)
    with torch.no_grad():
        ref = ca.step(z, m, head).permute(0, 2, 3, 1)
    # Relative to the state's scale: a model with large activations legitimately differs by more float rounding.
    return float((torch.from_numpy(out) - ref).abs().max() / max(1.0, float(ref.abs().max())))


# ---------------------------------------------------------------------------------------------------------------------
# From a checkpoint file
# ---------------------------------------------------------------------------------------------------------------------
def export_checkpoint(
    checkpoint: Path,
    path: Path,
    opset: int = DEFAULT_OPSET,
    with_head_mask: bool = False,
    name: str | None = None,
    exporter: str = DEFAULT_EXPORTER,
) -> dict:
    """Export the step of a vitca checkpoint (``.pt``) to ``path``; the metadata records the checkpoint's sha256,
    so a cached export can be matched to the exact weights it came from."""
    from vitca_cli.io.checkpoint import load_model

    checkpoint = Path(checkpoint)
    ca, meta = load_model(checkpoint, "cpu")
    source = {"name": name or checkpoint.stem, "file": checkpoint.name, "sha256": sha256_file(checkpoint)}
    return export_step(ca, path, opset, with_head_mask, meta=meta, source=source, exporter=exporter)
