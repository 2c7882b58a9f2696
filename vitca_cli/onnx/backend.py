"""Run an exported CA step (``vitca export-onnx``) in ONNX Runtime: a backend for ``vitca_cli.restore.loop.restore``.

A backend has ``.cfg`` (rebuilt from the graph's ``vitca.*`` metadata, so no other file is needed), ``.name``,
``.device`` (a description for the log), ``.tensor_device`` (CPU: tensors cross into ONNX Runtime there),
``.meta`` (the source checkpoint's meta) and ``.step(z, update_mask) -> z``. The restore loop draws the update
masks from seeded CPU generators and passes them in, so the torch and ONNX backends replay the same run.

Sessions and their providers (``--device``) are :mod:`vitca_cli.onnx.session`'s; the provider used is logged.
The graph's names, layout and metadata are :mod:`vitca_cli.onnx.format`'s.

Weights: given a vitca checkpoint (``.pt``) instead of an ``.onnx`` file (``--backend onnx --weights NAME``
where only ``NAME.pt`` exists), :func:`onnx_for_checkpoint` uses ``NAME.onnx`` beside it when that file was
exported from exactly this checkpoint (its metadata records the checkpoint's sha256), else exports once into the
cache folder (``<VITCA_HOME>/onnx/NAME-<sha256 prefix>.onnx``) and reuses that file afterwards.
"""

from __future__ import annotations

import collections
import logging
import os
from pathlib import Path

import numpy as np
import torch

from vitca_cli.errors import UsageError, VitcaError, WeightsError
from vitca_cli.io.weights import home_dir, sha256_file
from vitca_cli.log import log
from vitca_cli.nca.config import CAConfig
from vitca_cli.onnx.export import export_checkpoint
from vitca_cli.onnx.format import (
    DEFAULT_EXPORTER,
    DYNAMIC_AXES,
    HEAD_MASK,
    INPUTS,
    OUTPUT,
    check_signature,
    parse_metadata,
    source_record,
)
from vitca_cli.onnx.session import CPU, CUDA, create_session

CHECKPOINT_SUFFIXES = (".pt", ".pth")
QUANTIZED_FROM = "vitca.quantized_from"  # metadata: the sha256 of the graph an int8 graph was made from
SHAPED_SESSIONS = 4  # grid shapes whose specialised sessions a backend keeps (a tiled run uses one or two)


def read_metadata(session, path) -> tuple[CAConfig, dict, dict]:
    """The config, the source checkpoint's meta and the source record of a step graph's session."""
    cfg, meta, source = parse_metadata(session.get_modelmeta().custom_metadata_map, path)
    check_signature([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()], path)
    return cfg, meta, source


class OnnxBackend:
    """One CA step in an ONNX Runtime session, on CPU torch tensors.

    ``session`` is the graph as exported (any batch and grid size). Steps run in a session specialised to the
    grid's shape (:meth:`session_for`), created on first use of a shape; the most recent few are kept. Fixed
    shapes let ONNX Runtime fold the position encoding and the halo indices into constants instead of
    recomputing them every step (bench/onnx_step.py compares). The results are the same.
    """

    fixed_shapes = True  # sessions are specialised to each (B, H, W): callers keep to a few shapes

    def __init__(self, session, provider: str, cfg: CAConfig, meta: dict, name: str, path: Path | None = None):
        self.session = session
        self.provider = provider
        self._source = str(path) if path is not None else None
        self._shaped: collections.OrderedDict[tuple[int, ...], object] = collections.OrderedDict()
        self.cfg = cfg
        self.meta = meta
        self.name = name
        self.path = path
        self.tensor_device = torch.device("cpu")
        self.has_head_mask = HEAD_MASK in [i.name for i in session.get_inputs()]
        threads = session.get_session_options().intra_op_num_threads
        self.device = f"onnxruntime {provider}" + (f" ({threads} threads)" if provider == CPU else "")

    @classmethod
    def from_file(cls, path, device: str = "auto", threads: int | None = None, quantize: bool = False) -> "OnnxBackend":
        """Load a step graph (or a vitca checkpoint, exported on first use, see :func:`onnx_for_checkpoint`).

        A missing, corrupt or foreign file raises ``WeightsError``; an unusable ``--device`` a ``UsageError``.
        """
        path = Path(path)
        if not path.is_file():
            raise WeightsError(f"{path}: weights file not found")
        if _is_checkpoint(path):
            path = onnx_for_checkpoint(path)
        if quantize:
            path = quantized(path)
        try:
            session, provider = create_session(str(path), device, threads)
        except VitcaError:
            raise
        except Exception as exc:  # noqa: BLE001 - ORT raises several types for unreadable models
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise WeightsError(
                f"{path}: not a readable ONNX model ({reason}); re-export it with `vitca export-onnx`"
            ) from None
        cfg, meta, source = read_metadata(session, path)
        backend = cls(session, provider, cfg, meta, source.get("name") or path.stem, path)
        log.debug(f"onnxruntime: {backend.device} for {path}")  # make_backend logs the provider at info level
        return backend

    def step(self, z: torch.Tensor, update_mask: torch.Tensor, head_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One CA step on a CPU grid ``(B, C, H, W)`` with an update mask ``(B, 1, H, W)`` (1 = update).

        The graph is channels-last: a channels-last ``z`` (as ``seed_cells`` makes them) and a contiguous mask
        are read in place, and the result is written by ONNX Runtime straight into a new channels-last tensor.
        """
        if z.device.type != "cpu" or update_mask.device.type != "cpu":
            raise ValueError("the ONNX backend steps CPU tensors")
        cfg = self.cfg
        if z.dim() != 4 or z.shape[1] != cfg.cell_channels:
            raise ValueError(f"expected a cell grid (B, {cfg.cell_channels}, H, W), got {tuple(z.shape)}")
        if cfg.pos_encoding == "learned":  # exported with a static grid: ORT's own error would be cryptic
            grid = tuple(s // cfg.patch_size for s in cfg.image_size)
            if tuple(z.shape[-2:]) != grid:
                got = tuple(z.shape[-2:])
                raise ValueError(f"this model's learned position encoding needs a {grid} grid, got {got}")
        cells = _nhwc_array(z)
        mask = _nhwc_array(update_mask)
        out = torch.empty(cells.shape, dtype=torch.float32)
        session = self.session_for(cells.shape[:3])
        binding = session.io_binding()
        binding.bind_cpu_input(INPUTS[0], cells)
        binding.bind_cpu_input(INPUTS[1], mask)
        if self.has_head_mask:
            heads = head_mask if head_mask is not None else torch.zeros(cfg.heads)
            binding.bind_cpu_input(HEAD_MASK, np.ascontiguousarray(heads.detach().numpy(), dtype=np.float32))
        elif head_mask is not None:
            raise UsageError("this step graph was exported without --with-head-mask")
        binding.bind_output(OUTPUT, "cpu", 0, np.float32, list(out.shape), out.data_ptr())
        session.run_with_iobinding(binding)
        return out.permute(0, 3, 1, 2)  # b c h w, channels-last in memory

    def session_for(self, shape: tuple[int, ...]):
        """The session specialised to a ``(B, H, W)`` grid (the exported session when there is no file)."""
        shape = tuple(int(s) for s in shape)
        session = self._shaped.pop(shape, None)
        if session is None:
            if self._source is None:
                return self.session
            threads = self.session.get_session_options().intra_op_num_threads
            device = "cpu" if self.provider == CPU else self.provider.replace(CUDA, "cuda")
            session, _ = create_session(self._source, device, threads, dims=dict(zip(DYNAMIC_AXES, shape)))
        self._shaped[shape] = session  # most recently used last
        while len(self._shaped) > SHAPED_SESSIONS:
            self._shaped.popitem(last=False)
        return session


def _nhwc_array(t: torch.Tensor) -> np.ndarray:
    """``(B, C, H, W)`` → a C-contiguous float32 ``(B, H, W, C)`` array; a view when ``t`` is channels-last."""
    t = t.detach().permute(0, 2, 3, 1)
    if t.dtype != torch.float32:
        t = t.float()
    return np.ascontiguousarray(t.numpy())


def _is_checkpoint(path: Path) -> bool:
    if path.suffix.lower() in CHECKPOINT_SUFFIXES:
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"  # torch.save's zip container; ONNX files are protobuf


def _source_sha(path: Path) -> str | None:
    """The checkpoint sha256 recorded in a step graph's metadata (None when unreadable or foreign)."""
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        return source_record({p.key: p.value for p in model.metadata_props}).get("sha256")
    except Exception:  # noqa: BLE001 - any unreadable candidate is simply not a match
        return None


def onnx_for_checkpoint(checkpoint: Path, exporter: str | None = None) -> Path:
    """The step graph of a vitca checkpoint: ``<stem>.onnx`` beside it if exported from this very file, else a
    cached export (made now, once, if missing) in ``<VITCA_HOME>/onnx/``."""
    sha = sha256_file(checkpoint)
    sibling = checkpoint.with_suffix(".onnx")
    if sibling.is_file() and _source_sha(sibling) == sha:
        return sibling
    cached = home_dir() / "onnx" / f"{checkpoint.stem}-{sha[:16]}.onnx"
    if cached.is_file() and _source_sha(cached) == sha:
        return cached
    log.info(f"exporting {checkpoint.name} to ONNX once (cached as {cached})")
    export_checkpoint(checkpoint, cached, exporter=exporter or DEFAULT_EXPORTER)
    return cached


def quantized(path: Path) -> Path:
    """The int8 version of a step graph (dynamic quantisation of its weight matrix products: int8 weights, int8
    activations scaled per call): ``<stem>.int8.onnx`` beside it when that was made from this very file, else a
    cached one (made now, once) in ``<VITCA_HOME>/onnx/``. Its metadata is the source graph's."""
    if path.name.endswith(".int8.onnx"):
        return path
    sha = sha256_file(path)
    target = home_dir() / "onnx" / f"{path.stem}-{sha[:16]}.int8.onnx"
    for candidate in (path.with_name(path.stem + ".int8.onnx"), target):
        if candidate.is_file() and _quantized_from(candidate) == sha:
            return candidate
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target.parent.mkdir(parents=True, exist_ok=True)
    log.info(f"quantising {path.name} to int8 once (cached as {target})")
    model = onnx.load(str(path))
    del model.graph.value_info[:]  # the exporter's shape annotations trip the quantiser's own shape inference
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        plain, out = Path(tmp) / "plain.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, str(plain))
        logging.disable(logging.WARNING)  # the quantiser's advice goes to the root logger
        try:
            quantize_dynamic(str(plain), str(out), weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
        q = onnx.load(str(out))
        del q.metadata_props[:]
        for prop in model.metadata_props:
            q.metadata_props.add(key=prop.key, value=prop.value)
        q.metadata_props.add(key=QUANTIZED_FROM, value=sha)
        onnx.save(q, str(out))
        os.replace(out, target)
    return target


def _quantized_from(path: Path) -> str | None:
    try:
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return props.get(QUANTIZED_FROM)
    except Exception:  # noqa: BLE001 - an unreadable candidate is simply not a match
        return None
