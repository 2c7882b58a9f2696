"""Reading and writing the images users have: real Pillow files in every mode, and every broken file."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from vitca_cli.io import images
from vitca_cli.io.images import ImageError, read_image, read_mask, to_channels, write_image


def rgb_array(h=12, w=10, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgb_png_round_trip_is_lossless(tmp_path):
    arr = rgb_array()
    Image.fromarray(arr).save(tmp_path / "a.png")
    pic = read_image(tmp_path / "a.png")
    assert pic.pixels.shape == (12, 10, 3) and pic.pixels.dtype == np.float32
    assert pic.format == "PNG" and pic.bits == 8 and pic.alpha is None
    write_image(tmp_path / "b.png", pic.pixels, pic)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), arr)


def test_values_out_of_range_are_clipped_and_nan_is_black():
    """8-bit encoding (band by band) as ``round(clip(nan_to_num(x), 0, 1) · 255)``, halves to even."""
    rng = np.random.default_rng(3)
    pixels = rng.uniform(-0.2, 1.2, (150, 7, 3)).astype(np.float32)  # more rows than one band
    pixels[:4, 0, 0] = [np.nan, np.inf, -np.inf, 0.5 / 255]
    want = np.round(np.clip(np.nan_to_num(pixels), 0, 1) * 255).astype(np.uint8)
    assert want[0, 0, 0] == 0 and want[1, 0, 0] == 255 and want[2, 0, 0] == 0 and want[3, 0, 0] == 0
    encoded = Image.open(io.BytesIO(images.encode_image(pixels, "PNG")))
    assert np.array_equal(np.asarray(encoded), want)
    assert np.array_equal(images.to_uint8_rgb(pixels), want)


def test_grayscale_and_one_bit(tmp_path):
    g = rgb_array()[..., 0]
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    pic = read_image(tmp_path / "g.png")
    assert pic.channels == 1
    np.testing.assert_allclose(pic.pixels[..., 0] * 255, g, atol=1e-3)
    Image.fromarray(g > 128).save(tmp_path / "b.png")
    assert read_image(tmp_path / "b.png").channels == 1


def test_palette_with_and_without_transparency(tmp_path):
    img = Image.fromarray(rgb_array()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    img.save(tmp_path / "p.png")
    pic = read_image(tmp_path / "p.png")
    assert pic.channels == 3 and pic.alpha is None
    np.testing.assert_allclose(pic.pixels * 255, np.asarray(img.convert("RGB")), atol=1e-3)
    img.info["transparency"] = 0
    img.save(tmp_path / "pt.png", transparency=0)
    pic = read_image(tmp_path / "pt.png")
    assert pic.alpha is not None and (pic.alpha == 0).any()


def test_rgba_alpha_is_kept_exactly(tmp_path):
    arr = np.dstack([rgb_array(), np.arange(120, dtype=np.uint8).reshape(12, 10) * 2])
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    pic = read_image(tmp_path / "a.png")
    assert pic.channels == 3 and pic.alpha is not None
    write_image(tmp_path / "out.png", np.zeros((12, 10, 1), np.float32), pic)
    out = Image.open(tmp_path / "out.png")
    assert out.mode == "LA"
    assert np.array_equal(np.asarray(out)[..., 1], arr[..., 3])


def test_alpha_dropped_for_jpeg_output(tmp_path):
    Image.fromarray(np.dstack([rgb_array(), np.full((12, 10), 9, np.uint8)]), "RGBA").save(tmp_path / "a.png")
    pic = read_image(tmp_path / "a.png")
    write_image(tmp_path / "a.jpg", pic.pixels, pic)
    assert Image.open(tmp_path / "a.jpg").mode == "RGB"


def test_sixteen_bit_grayscale_keeps_sixteen_bits(tmp_path):
    g = np.random.default_rng(1).integers(0, 65536, (9, 7), dtype=np.uint16)
    Image.fromarray(g).save(tmp_path / "g16.png")
    pic = read_image(tmp_path / "g16.png")
    assert pic.bits == 16 and pic.channels == 1
    write_image(tmp_path / "o16.png", pic.pixels, pic)
    out = Image.open(tmp_path / "o16.png")
    assert out.mode.startswith("I")
    assert np.array_equal(np.asarray(out).astype(np.uint16), g)


def test_sixteen_bit_colour_keeps_sixteen_bits(tmp_path):
    cv2 = pytest.importorskip("cv2")
    arr = np.random.default_rng(2).integers(0, 65536, (6, 5, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "c16.png"), arr[..., ::-1])
    pic = read_image(tmp_path / "c16.png")
    assert pic.bits == 16 and pic.channels == 3
    np.testing.assert_allclose(pic.pixels * 65535, arr, atol=0.05)
    write_image(tmp_path / "o16.png", pic.pixels, pic)
    back = cv2.imread(str(tmp_path / "o16.png"), cv2.IMREAD_UNCHANGED)[..., ::-1]
    assert back.dtype == np.uint16 and np.array_equal(back, arr)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.fromarray(rgb_array(16, 16)).convert("CMYK").save(tmp_path / "c.jpg")
    pic = read_image(tmp_path / "c.jpg")
    assert pic.channels == 3 and pic.format == "JPEG"
    assert any("CMYK" in n for n in pic.notes)


def test_exif_rotated_jpeg_is_turned_upright(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: display rotated 90° clockwise
    Image.fromarray(arr).save(tmp_path / "r.jpg", exif=exif, quality=100)
    pic = read_image(tmp_path / "r.jpg")
    assert pic.size == (40, 20)
    assert pic.pixels[:15].mean() > 0.9 and pic.pixels[25:].mean() < 0.1  # white half now on top


def test_to_channels():
    rgb = np.random.default_rng(0).random((4, 5, 3), dtype=np.float32)
    grey = to_channels(rgb, 1)
    assert grey.shape == (4, 5, 1)
    np.testing.assert_allclose(grey[..., 0], rgb @ np.array([0.299, 0.587, 0.114]), rtol=1e-5)
    assert to_channels(grey, 3).shape == (4, 5, 3)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("text.png", b"hello, not an image", "not an image"),
        ("empty.png", b"", "empty file"),
    ],
)
def test_not_an_image_and_empty(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageError, match=message):
        read_image(tmp_path / name)


def test_truncated_png(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(rgb_array(64, 64)).save(buf, "PNG")
    (tmp_path / "t.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        read_image(tmp_path / "t.png")


def test_zero_size_image(tmp_path):
    """A PNG whose header says 0×0 (hand-built: Pillow refuses to write one)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 0, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    (tmp_path / "z.png").write_bytes(png)
    with pytest.raises(ImageError, match="zero-size|corrupt|not an image"):
        read_image(tmp_path / "z.png")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="folder"):
        read_image(tmp_path)


def test_atomic_write_leaves_no_temporary_and_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "o.png"
    target.write_bytes(b"old")
    images.write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png"]
    fresh = tmp_path / "fresh"
    fresh.write_bytes(b"")  # what open() gives under the current umask
    assert target.stat().st_mode & 0o777 == fresh.stat().st_mode & 0o777  # not mkstemp's 0600
    fresh.unlink()

    def failing(_):
        raise RuntimeError("disk full")

    from vitca_cli.io.checkpoint import atomic_write_bytes

    with pytest.raises(RuntimeError):
        atomic_write_bytes(target, failing)
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png"]


def test_unwritable_output_is_an_image_error(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ImageError, match="cannot write"):
        images.write_bytes(tmp_path / "file" / "o.png", b"x")  # a file where a folder should be
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that ignores permissions")
        with pytest.raises(ImageError, match="cannot write"):
            images.write_bytes(locked / "o.png", b"x")
    finally:
        locked.chmod(0o700)


def test_mask_white_is_missing_and_other_sizes_are_resized_nearest(tmp_path):
    m = np.zeros((4, 6), np.uint8)
    m[:, 3:] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    same = read_mask(tmp_path / "m.png", (4, 6))
    assert same.dtype == bool and same[:, 3:].all() and not same[:, :3].any()
    big = read_mask(tmp_path / "m.png", (8, 12))
    assert big.shape == (8, 12) and big[:, 6:].all() and not big[:, :6].any()


def test_output_format_follows_extension_then_input():
    assert images.output_format("x.jpg", "PNG") == "JPEG"
    assert images.output_format("x", "TIFF") == "TIFF"
    assert images.output_format("x.png", "PNG", ext="webp") == "WEBP"
    with pytest.raises(ValueError):
        images.output_format("x.png", "PNG", ext="xyz")


def test_gif_and_side_by_side():
    frames = [np.full((5, 4, 1), v, np.float32) for v in (0.0, 0.5, 1.0)]
    gif = Image.open(io.BytesIO(images.encode_gif(frames)))
    assert gif.n_frames == 3 and min(gif.size) >= 128
    strip = images.side_by_side([np.zeros((5, 4, 1)), np.ones((5, 4, 3))])
    assert strip.shape == (5, 10, 3)
