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
(keys ``vitca.*``), so a runtime needs no other file: :class:`vitca_cli.onnx.backend.OnnxBackend` rebuilds the
``CAConfig`` from them.

Exporters: the default is PyTorch's current (dynamo, torch.export-based) exporter, which needs ``onnxscript``;
the legacy TorchScript exporter is available as ``exporter="torchscript"``. Both give a correct graph with dynamic
H and W that runs at the same speed in ONNX Runtime (bench/onnx_step.py). The dynamo exporter is the default
because it is PyTorch's maintained path (the TorchScript one is deprecated and warns it will be removed) and its
file is ~10% smaller; the TorchScript exporter takes ~0.5 s instead of 7-20 s and needs no onnxscript, which
suits old torch versions (before 2.6) and quick experiments.

Speed: the model's eager attention loops over the NH·NW neighbours with strided views, which are free in torch
but each become a copying ``Slice`` plus ``Mul``/``ReduceSum``/``Add`` nodes in ONNX. The exported ViTCA step
instead runs on tiles of 2×6 cells (:class:`StepGraph`, ``EXPORT_TILE``): every per-cell layer runs in tile
order, q, k and v come out of head-major products, and the attention is :func:`tiled_local_attention`, the same
maths as dense attention of each tile's queries over its halo (two Gathers and two batched MatMuls, a constant
-inf mask outside each query's window). The default opset is 20, whose ``Gelu`` ONNX Runtime fuses with the bias
before it. :class:`vitca_cli.onnx.backend.OnnxBackend` runs the graph in sessions of fixed shape, in which ONNX
Runtime folds the position encoding and the halo indices into constants.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vitca_cli import __version__
from vitca_cli.nca.model import ViTCAUpdate, vit_position_encoding_at
from vitca_cli.io.weights import sha256_file
from vitca_cli.io.checkpoint import atomic_write_bytes
from vitca_cli.nca.config import CAConfig
from vitca_cli.errors import UsageError, VitcaError
from vitca_cli.log import log

FORMAT = "vitca-onnx-step"
FORMAT_VERSION = 1
DEFAULT_OPSET = 20  # Gelu is an ONNX op from opset 20 (onnxruntime >= 1.17 runs it); older opsets spell it out
MIN_OPSET = 18  # the dynamo exporter's own opset; LayerNormalization alone needs 17
INPUTS = ("cells", "update_mask")
HEAD_MASK = "head_mask"
OUTPUT = "next_cells"
DYNAMIC_AXES = ("batch", "height", "width")  # names of the cell grid's dynamic axes (B, H, W) in the graph
LAYOUT = "NHWC"
# Cells per tile of the exported ViTCA step: each tile's 2×6 queries attend to a 4×8 halo for a 3×3 window.
# ONNX has no strided views, so the overlapping halos are copies (2.7× the keys and values), and the logits
# outside each query's window are wasted work (32 per query for 9). Larger tiles copy less and waste more; with
# fixed-shape sessions and head-major products (bench/onnx_step.py, 2 threads) the ratio to torch eager at
# 64×64×8 / 256×256×1 / 28×28×32 was 1.08/1.03/1.06 with 2×4, 1.07/1.03/1.13 with 4×4, 1.12/1.09/1.15 with 2×6
# and 1.06/1.00/0.98 with 2×8.
EXPORT_TILE = (2, 6)
EXPORTERS = ("dynamo", "torchscript")
DEFAULT_EXPORTER = "dynamo"


# ---------------------------------------------------------------------------------------------------------------------
# The exported step: ViTCA on tiles of cells
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TileGrid:
    """An ``h``×``w`` grid of cells cut into ``tile`` = (th, tw) tiles, ``gh``×``gw`` of them (padded up to whole
    tiles). In tile order a grid is ``(B, GH, GW·th·tw, C)``: tiles in raster order, each tile's cells together."""

    h: int
    w: int
    tile: tuple[int, int] = EXPORT_TILE

    @property
    def gh(self) -> int:
        return (self.h + self.tile[0] - 1) // self.tile[0]

    @property
    def gw(self) -> int:
        return (self.w + self.tile[1] - 1) // self.tile[1]

    def raster_index(self, index: torch.Tensor) -> torch.Tensor:
        """Flat tile-order cell indices (into B·GH·GW·th·tw) -> flat raster indices (into B·H·W)."""
        th, tw = self.tile
        per_row, per_image = self.gw * th * tw, self.gh * self.gw * th * tw  # cells in a row of tiles, an image
        # a - (a // n)·n, not a % n: the exporter cannot take a remainder by a symbolic size
        image = index // per_image
        tile_row = (index - image * per_image) // per_row
        rest = index - image * per_image - tile_row * per_row
        tile_col, cell = rest // (th * tw), rest % (th * tw)
        return (image * self.h + tile_row * th + cell // tw) * self.w + tile_col * tw + cell % tw


def to_tiles(t: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B, GH, GW·th·tw, C)``, zero padded to whole tiles."""
    (th, tw), b, c = grid.tile, t.shape[0], t.shape[-1]
    t = F.pad(t, [0, 0, 0, grid.gw * tw - grid.w, 0, grid.gh * th - grid.h])
    t = t.reshape(b, grid.gh, th, grid.gw, tw, c).permute(0, 1, 3, 2, 4, 5)
    return t.reshape(b, grid.gh, grid.gw * th * tw, c)


def from_tiles(t: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """Inverse of :func:`to_tiles`, padding cropped."""
    (th, tw), b, c = grid.tile, t.shape[0], t.shape[-1]
    t = t.reshape(b, grid.gh, grid.gw, th, tw, c).permute(0, 1, 3, 2, 4, 5)
    return t.reshape(b, grid.gh * th, grid.gw * tw, c)[:, : grid.h, : grid.w]


def tiled_position_encoding(rule: ViTCAUpdate, grid: TileGrid) -> torch.Tensor | None:
    """The rule's position encoding in tile order ``(GH, GW·th·tw, E)``; the vit sinusoid is computed in that
    order directly (from row and column tables), not permuted."""
    kind, (th, tw), dim = rule.cfg.pos_encoding, grid.tile, rule.cfg.embed
    if kind == "learned":
        return to_tiles(rule.learned_pe[None], grid)[0]
    if kind != "vit":
        return None
    rows = (torch.arange(grid.gh)[:, None] * th + torch.arange(th)).float()  # gh th
    cols = (torch.arange(grid.gw)[:, None] * tw + torch.arange(tw)).float()  # gw tw
    pe = vit_position_encoding_at(rows[:, None, :, None], cols[None, :, None, :], grid.w, dim)  # gh gw th tw E
    return pe.reshape(grid.gh, grid.gw * th * tw, dim)


def _window_bias(tile: tuple[int, int], neighbourhood: tuple[int, int]) -> torch.Tensor:
    """``(th·tw, kh·kw)``: 0 where a halo cell lies in the query's NH×NW window, -inf elsewhere."""
    (th, tw), (nh, nw) = tile, neighbourhood
    kh, kw = th + nh - 1, tw + nw - 1
    dy = torch.arange(kh)[None, None, :, None] - torch.arange(th)[:, None, None, None]  # halo row - query row
    dx = torch.arange(kw)[None, None, None, :] - torch.arange(tw)[None, :, None, None]
    inside = (dy >= 0) & (dy < nh) & (dx >= 0) & (dx < nw)
    return torch.where(inside, 0.0, float("-inf")).reshape(th * tw, kh * kw)


def tiled_local_attention(q, k, v, neighbourhood: tuple[int, int], scale: float, grid: TileGrid):
    """:func:`vitca_cli.nca.attention.local_attention` (same maths) of tile-ordered, head-major q, k, v
    ``(B, heads, GH·GW·th·tw, d)``, in a form that exports to few ONNX nodes; ``(B, GH, GW·th·tw, heads, d)``.

    Each tile of queries attends densely to its halo, the (th+NH-1)×(tw+NW-1) cells around it, gathered (one
    ``Gather`` for k and one for v) from the tile-ordered keys. Halo cells outside the h×w grid are zero "ghost"
    neighbours, as in the model: their logit is 0 (they take softmax mass) and their value is zero. Halo
    cells outside a query's own window get -inf logits and thus exactly zero weight. Returns ``(out, None)``: the
    attention maps are not an output of the exported step.
    """
    (nh, nw), (th, tw) = neighbourhood, grid.tile
    b, heads, n, d = q.shape
    tiles, per_tile = grid.gh * grid.gw, th * tw
    kh, kw = th + nh - 1, tw + nw - 1

    # Halo of every tile as indices into the tile-ordered cells; ghosts (outside the grid) read cell 0 and are
    # then made zero neighbours by ``real``: their logit is set to 0 and their weight is dropped after the
    # softmax. (Appending a zero row to k and v instead costs two grid-sized copies per step.)
    r = (torch.arange(grid.gh) * th - nh // 2)[:, None, None, None] + torch.arange(kh)[None, None, :, None]
    c = (torch.arange(grid.gw) * tw - nw // 2)[None, :, None, None] + torch.arange(kw)[None, None, None, :]
    inside = (r >= 0) & (r < grid.h) & (c >= 0) & (c < grid.w)
    r, c = r.clamp(min=0), c.clamp(min=0)
    index = torch.where(inside, ((r // th) * grid.gw + c // tw) * per_tile + (r % th) * tw + c % tw, 0).reshape(-1)
    real = inside.reshape(tiles, 1, kh * kw).float()

    def halo(t):  # b heads n d -> b heads tiles (kh kw) d
        return t.index_select(2, index).reshape(b, heads, tiles, kh * kw, d)

    queries = q.reshape(b, heads, tiles, per_tile, d)
    logits = (queries @ halo(k).transpose(-1, -2)) * scale * real + _window_bias(grid.tile, neighbourhood)
    out = (logits.softmax(dim=-1) * real) @ halo(v)  # b heads tiles (th tw) d
    return out.reshape(b, heads, n, d).transpose(1, 2).reshape(b, grid.gh, n // grid.gh, heads, d), None


def tiled_attention(x, weights, heads: int, neighbourhood: tuple[int, int], scale: float, grid: TileGrid):
    """The export's :func:`vitca_cli.nca.attention.attend`, passed to the rule as its ``attention``: q, k and v of the tile-ordered cells ``x`` ``(B, GH, GW·th·tw,
    E)`` as head-major products (``(B, 1, N, E) @ (heads, E, d)``: no transposes, 1.4× faster in ONNX Runtime
    than a product and a transpose at 256×256), then :func:`tiled_local_attention`."""
    b, e = x.shape[0], x.shape[-1]
    cells = x.reshape(b, 1, -1, e)
    q, k, v = (cells @ w.reshape(heads, -1, e).transpose(1, 2) for w in weights)  # b heads n d
    return tiled_local_attention(q, k, v, neighbourhood, scale, grid)


class StepGraph(nn.Module):
    """One CA step on a channels-last grid: the module that is exported.

    A ViTCA step runs on tiles of cells (:class:`TileGrid`): the grid is put in tile order once, every per-cell
    layer runs in that order, and only the update is put back. The attention then reads each tile's queries in
    place and gathers its keys and values in one pass, with no per-step rearranging of the 128-wide embeddings
    (1.2× faster in ONNX Runtime than the same graph in raster order, bench/onnx_step.py). As in the torch step,
    the output projection, MLP and head run only for the cells whose mask is non-zero (``NonZero``, then
    Gathers and one ``ScatterND`` add into the grid). UNetCA steps export as they are.
    """

    def __init__(self, ca: nn.Module):
        super().__init__()
        self.ca = ca

    def forward(self, cells: torch.Tensor, update_mask: torch.Tensor, head_mask: torch.Tensor | None = None):
        rule = self.ca.rule
        if not isinstance(rule, ViTCAUpdate):  # dense: the graph has no data-dependent shapes
            return self.ca.apply_update(cells, update_mask, rule.update_cells(cells, head_mask))
        grid = TileGrid(cells.shape[1], cells.shape[2])
        mask = to_tiles(update_mask, grid).reshape(-1)  # 0 on the padding
        only = mask.nonzero().squeeze(1)  # the cells that update, in tile order
        attention = functools.partial(tiled_attention, grid=grid)
        position = tiled_position_encoding(rule, grid)
        delta = rule.update_cells(to_tiles(cells, grid), head_mask, position=position, only=only, attention=attention)
        return self.ca.apply_update_at(cells, grid.raster_index(only), delta * mask.index_select(0, only)[:, None])


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
    """The legacy TorchScript exporter (deprecated by PyTorch, but 20× faster to export); returns the ModelProto."""
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
    from vitca_cli.onnx.backend import create_session  # imports this module

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
