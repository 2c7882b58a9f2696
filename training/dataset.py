"""The dataset of images in [0, 1]: an in-memory array or image files read on demand, with the resizing, crops and
flips applied as batches are drawn."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vitca_cli.errors import VitcaError


class ImageDataset:
    """Images in [0, 1] at a fixed size. Either an in-memory uint8 array ``(N, C, H, W)`` (resized to ``image_size``
    if it differs), or image files read on demand: ``mode='crop'`` takes random crops (training) or centre crops,
    ``mode='resize'`` scales the short side to the size, then centre-crops. ``augment`` adds random crops and
    horizontal flips for files, flips for arrays."""

    def __init__(
        self,
        name: str,
        *,
        array: np.ndarray | None = None,
        files: list[Path] | None = None,
        labels: np.ndarray | None = None,
        channels: int = 1,
        image_size: tuple[int, int] | None = None,
        augment: bool = False,
        mode: str = "crop",
    ):
        self.name = name
        self.labels = labels
        self.augment = augment
        self.mode = mode
        self.files = files
        if array is not None:
            self.array = torch.from_numpy(np.require(array, requirements=["C", "W"]))
            self.channels = self.array.shape[1]
            self.native_size = tuple(self.array.shape[-2:])
            self.image_size = tuple(image_size) if image_size else self.native_size
        else:
            self.array = None
            self.channels = channels
            if not image_size:
                raise ValueError("image files need an image size")
            self.image_size = tuple(image_size)

    def __len__(self) -> int:
        return len(self.array) if self.array is not None else len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.batch([int(i)])[0]

    def batch(self, indices, generator: torch.Generator | None = None, size: tuple[int, int] | None = None):
        """Images ``(B, C, H, W)`` for ``indices``; random augmentation draws from ``generator`` (CPU). ``size``
        overrides ``image_size`` for image files (training on crops of several sizes)."""
        if self.array is not None:
            x = self.array[torch.as_tensor(indices, dtype=torch.long)].float() / 255.0
            if self.image_size != self.native_size:
                x = F.interpolate(x, size=self.image_size, mode="bilinear", antialias=True, align_corners=False)
                x = x.clamp_(0, 1)
            if self.augment:
                flip = torch.rand(len(x), generator=generator) < 0.5
                x[flip] = x[flip].flip(-1)
            return x
        return torch.stack([self._file_item(int(i), generator, size or self.image_size) for i in indices])

    def _file_item(self, i: int, generator, size: tuple[int, int]) -> torch.Tensor:
        img = _load_image(str(self.files[i]), self.channels)  # C H W uint8
        th, tw = size
        h, w = img.shape[-2:]
        if self.mode == "resize" or h < th or w < tw:
            scale = max(th / h, tw / w)
            size = (max(th, round(h * scale)), max(tw, round(w * scale)))
            img = F.interpolate(img[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]
            img = img.clamp(0, 255)
            h, w = size
        if self.augment and self.mode == "crop":
            top = int(torch.randint(h - th + 1, (1,), generator=generator))
            left = int(torch.randint(w - tw + 1, (1,), generator=generator))
        else:
            top, left = (h - th) // 2, (w - tw) // 2
        x = img[:, top : top + th, left : left + tw].float() / 255.0
        if self.augment and bool(torch.rand(1, generator=generator) < 0.5):
            x = x.flip(-1)
        return x


@functools.lru_cache(maxsize=512)
def _load_image(path: str, channels: int) -> torch.Tensor:
    """Decode an image file to uint8 ``(C, H, W)``; cached because training revisits the same photos."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise VitcaError(f"{path}: unreadable image ({exc})") from None
    if arr.ndim == 2:
        arr = arr[..., None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
