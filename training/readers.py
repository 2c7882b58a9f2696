"""Readers of the datasets' file formats: IDX (MNIST, FashionMNIST), gzip-compressed or raw, and CIFAR-10's python
batches (unpickled with only numpy arrays allowed). Corrupt or truncated files raise ``VitcaError``."""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from pathlib import Path

import numpy as np

from vitca_cli.errors import VitcaError

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (MNIST format), gzip-compressed or raw. Corrupt or truncated files raise ``VitcaError``."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise VitcaError(f"{path}: unreadable or corrupt gzip ({exc}); delete it and download it again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise VitcaError(f"{path}: not an IDX file (bad magic number); delete it and download it again")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise VitcaError(f"{path}: truncated IDX header; delete it and download it again")
    shape = tuple(int(v) for v in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise VitcaError(
            f"{path}: truncated or corrupt IDX file ({len(data) - header} data bytes, expected {expected} for "
            f"shape {shape}); delete it and download it again"
        )
    return np.frombuffer(data, dtype, offset=header).reshape(shape)


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles of numpy arrays and lists; refuse anything else (no arbitrary code)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden object {module}.{name}")


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)``."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
        data = np.asarray(obj[b"data"], dtype=np.uint8)
        labels = np.asarray(obj[b"labels"], dtype=np.int64)
        images = data.reshape(len(data), 3, 32, 32)
        if len(images) != len(labels):
            raise ValueError("image and label counts differ")
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing to the user
        raise VitcaError(
            f"{path}: corrupt or truncated CIFAR-10 batch ({type(exc).__name__}); delete it and download it again"
        ) from None
    return images, labels
