"""The Python API (``from vitca_cli import denoise, inpaint``): arrays and PIL images in, the same out, the same
pixels as the CLI, known pixels exact, models kept between calls, the weights' own defaults."""

from __future__ import annotations

import doctest
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitca_cli.api as api
from vitca_cli import denoise, inpaint, log
from vitca_cli.cli import main
from vitca_cli.io.checkpoint import save_checkpoint
from vitca_cli.nca.config import CAConfig
from vitca_cli.nca.model import CellularAutomaton

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(embed=16, heads=2, mlp=16, hidden=4, pos_encoding="none")
FAST = dict(iters=2, threads=1)


def checkpoint(path: Path, channels: int, meta: dict | None = None) -> str:
    torch.manual_seed(channels)
    cfg = CAConfig(channels=channels, **TINY)
    ca = CellularAutomaton(cfg)
    with torch.no_grad():
        ca.rule.head[1].weight.normal_(0, 0.3)
    save_checkpoint(path, cfg, ca.state_dict(), {"mask_type": "dropout", **(meta or {})})
    return str(path)


@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory) -> str:
    return checkpoint(tmp_path_factory.mktemp("w") / "rgb.pt", 3)


@pytest.fixture(scope="module")
def grey_model(tmp_path_factory) -> str:
    return checkpoint(tmp_path_factory.mktemp("w") / "grey.pt", 1)


@pytest.fixture(autouse=True)
def fresh_cache():
    api.clear_cache()
    yield
    api.clear_cache()
    log.setup(0, False)


def rgb(h=12, w=10, channels=3, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


def cli(*args) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["-q", *map(str, args)])
    assert exit_info.value.code == 0


def test_uint8_rgb_array_gives_the_cli_pixels(tmp_path, rgb_model):
    img = rgb()
    Image.fromarray(img).save(tmp_path / "in.png")
    cli("denoise", tmp_path / "in.png", "-o", tmp_path / "out.png", "-w", rgb_model, "--iters", 2, "--seed", 5)
    out = denoise(img, weights=rgb_model, seed=5, **FAST)
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert np.array_equal(out, np.asarray(Image.open(tmp_path / "out.png")))
    assert not np.array_equal(out, denoise(img, weights=rgb_model, seed=6, **FAST))


def test_float_grey_arrays_keep_their_shape_and_dtype(grey_model):
    img = rgb(channels=1)[..., 0].astype(np.float64) / 255
    out = denoise(img, weights=grey_model, **FAST)
    assert out.dtype == np.float64 and out.shape == img.shape and 0 <= out.min() and out.max() <= 1
    single = denoise(img.astype(np.float32)[..., None], weights=grey_model, **FAST)
    assert single.dtype == np.float32 and single.shape == img.shape + (1,)
    assert np.allclose(single[..., 0], out, atol=1e-6)


def test_pil_images_keep_their_mode_and_alpha(rgb_model):
    img = rgb(channels=4)
    pil = denoise(Image.fromarray(img), weights=rgb_model, **FAST)
    assert isinstance(pil, Image.Image) and pil.mode == "RGBA" and pil.size == (10, 12)
    out = np.asarray(pil)
    assert np.array_equal(out[..., 3], img[..., 3])  # alpha untouched
    assert np.array_equal(out, denoise(img, weights=rgb_model, **FAST))  # the array path, the same pixels
    grey = denoise(Image.fromarray(img[..., 0]), weights=rgb_model, **FAST)  # a grey image through a colour model
    assert grey.mode == "L" and grey.size == (10, 12)
    assert denoise(Image.fromarray(img).convert("P"), weights=rgb_model, **FAST).mode == "P"


def test_inpaint_keeps_known_pixels_exact_and_takes_boolean_0_255_and_pil_masks(tmp_path, rgb_model):
    img = rgb(seed=1)
    missing = np.zeros(img.shape[:2], bool)
    missing[3:8, 2:6] = True
    out = inpaint(img, missing, weights=rgb_model, **FAST)
    assert out.dtype == np.uint8 and np.array_equal(out[~missing], img[~missing])
    assert not np.array_equal(out[missing], img[missing])
    as_255 = (missing * 255).astype(np.uint8)
    assert np.array_equal(inpaint(img, as_255, weights=rgb_model, **FAST), out)
    assert np.array_equal(inpaint(img, Image.fromarray(as_255), weights=rgb_model, **FAST), out)
    floats = img.astype(np.float64) / 255  # float64 in: known values come back as given, not through float32
    filled = inpaint(floats, missing, weights=rgb_model, **FAST)
    assert filled.dtype == np.float64 and np.array_equal(filled[~missing], floats[~missing])

    Image.fromarray(img).save(tmp_path / "in.png")
    Image.fromarray(as_255).save(tmp_path / "mask.png")
    cli(
        "inpaint",
        tmp_path / "in.png",
        "-m",
        tmp_path / "mask.png",
        "-o",
        tmp_path / "o.png",
        "-w",
        rgb_model,
        "--iters",
        2,
    )
    assert np.array_equal(out, np.asarray(Image.open(tmp_path / "o.png")))


@pytest.mark.parametrize(
    "image, mask, error",
    [
        ([[0.5]], None, TypeError),
        (np.zeros((4, 4), np.int32), None, TypeError),
        (np.zeros((4, 4, 5), np.uint8), None, ValueError),
        (np.full((4, 4), np.nan), None, ValueError),
        (np.zeros((4, 4), np.uint8), np.zeros((4, 5), bool), ValueError),
        (np.zeros((4, 4), np.uint8), np.full((4, 4), 3, np.uint8), ValueError),
    ],
)
def test_bad_images_and_masks_are_refused(grey_model, image, mask, error):
    with pytest.raises(error):
        (denoise(image, weights=grey_model) if mask is None else inpaint(image, mask, weights=grey_model))


def test_bad_options_are_setting_errors_named_as_keywords(grey_model):
    from vitca_cli.errors import SettingError

    with pytest.raises(SettingError, match="update_rate"):
        denoise(np.zeros((4, 4)), weights=grey_model, update_rate=2.0)
    with pytest.raises(SettingError, match="mask_type"):
        inpaint(np.zeros((4, 4)), np.zeros((4, 4), bool), weights=grey_model, mask_type="blur")


def test_a_loaded_model_is_reused(rgb_model, monkeypatch):
    import vitca_cli.restore.backends as backends

    built = []
    make = backends.make_backend
    monkeypatch.setattr(backends, "make_backend", lambda *a, **k: built.append(a) or make(*a, **k))
    for seed in (0, 1):
        denoise(rgb(), weights=rgb_model, seed=seed, **FAST)
    inpaint(rgb(), np.eye(12, 10, dtype=bool), weights=rgb_model, **FAST)
    assert len(built) == 1
    denoise(rgb(), weights=rgb_model, backend="torch", precision="fp32", **FAST)  # another build setting
    assert len(built) == 2


def test_the_weights_own_step_count_is_the_default_of_the_api_and_restore(tmp_path):
    """Neither the API nor ``restore()`` falls back on a fixed count when the weights name theirs."""
    from vitca_cli.restore.backends import TorchBackend
    from vitca_cli.restore.loop import restore

    path = checkpoint(tmp_path / "three.pt", 1, {"default_iters": 3})
    totals = []
    denoise(rgb(channels=1), weights=path, threads=1, progress=lambda done, total: totals.append(total))
    assert set(totals) == {3}
    backend = TorchBackend.from_file(path)
    assert restore(backend, rgb(channels=1).astype(np.float32) / 255).dense == 12 * 10 * 3


def test_import_is_cheap_and_the_docstring_example_runs():
    code = "import sys, vitca_cli; from vitca_cli import denoise; print(sorted(m for m in ('torch', 'onnxruntime') if m in sys.modules))"  # noqa: E501
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        result = doctest.testmod(api, raise_on_error=False)
    finally:
        os.chdir(cwd)
    assert result.attempted > 0 and result.failed == 0


def test_a_training_checkpoint_runs_the_steps_it_was_validated_with(tmp_path):
    from vitca_cli.restore.defaults import DEFAULT_ITERS, default_iters

    class Backend:  # only the meta matters here
        def __init__(self, meta):
            self.meta = meta

    assert default_iters(Backend({"val_steps": 32})) == 32
    assert default_iters(Backend({"val_steps": 32, "default_iters": 24})) == 24
    assert default_iters(Backend({})) == DEFAULT_ITERS
