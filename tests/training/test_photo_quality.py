"""``bench/photo_quality.py --native``: native-scale crops, damage, vitca (two models) and the classic baselines end to
end, on a tiny crop of one photo with tiny random models, and the JSON it writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("bm3d")
pytest.importorskip("pywt")
pytest.importorskip("skimage")
pytest.importorskip("cv2")

import photo_native  # noqa: E402  (bench/, on the path by conftest)
import photo_quality  # noqa: E402

from vitca_cli.io.checkpoint import save_checkpoint  # noqa: E402
from vitca_cli.nca.config import CAConfig  # noqa: E402
from vitca_cli.nca.model import CellularAutomaton  # noqa: E402

TINY = dict(embed=16, heads=2, mlp=16, hidden=4, pos_encoding="none")


def checkpoint(path, seed):
    torch.manual_seed(seed)
    cfg = CAConfig(channels=3, **TINY)
    ca = CellularAutomaton(cfg)
    with torch.no_grad():
        ca.rule.head[1].weight.normal_(0, 0.3)
    save_checkpoint(path, cfg, ca.state_dict(), {"mask_type": "dropout", "default_iters": 2})
    return str(path)


def photo(path, h=60, w=80):
    y, x = np.mgrid[0:h, 0:w]
    smooth = np.stack([x / w, y / h, 0.5 + 0.3 * np.sin(x / 7.0) * np.cos(y / 5.0)], -1)
    Image.fromarray(np.round(np.clip(smooth, 0, 1) * 255).astype(np.uint8)).save(path)


def test_native_mode_runs_end_to_end_and_writes_every_per_image_figure(tmp_path, weights_dirs):
    photos = tmp_path / "photos"
    photos.mkdir()
    photo(photos / "p.png")
    a, b = checkpoint(tmp_path / "a.pt", 0), checkpoint(tmp_path / "b.pt", 1)
    report, saved = tmp_path / "r" / "native.json", tmp_path / "png"
    argv = ["--native", "--photos", str(photos), "--crop", "32", "--kinds", "gaussian 0.03,squares", "--iters", "2"]
    argv += ["--weights", a, "--weights2", b, "--threads", "1", "--json", str(report), "--save", str(saved)]
    photo_quality.main(argv)

    r = json.loads(report.read_text())
    assert r["mode"] == "native" and r["complete"] and r["crop"] == 32 and r["size"] == "native 32" and r["seed"] == 0
    assert r["weights"] == "a" and r["weights2"] == "b" and r["iters"] == r["iters2"] == 2
    [name] = r["photos"]
    assert name.startswith("p.png@") and r["camera"] == {"s": 0.07, "read": 0.014, "jpeg": 90}
    assert list(r["kinds"]) == ["gaussian 0.03", "squares 3×20²"]
    noise, holes = r["kinds"]["gaussian 0.03"], r["kinds"]["squares 3×20²"]
    assert set(noise) == {"input", "vitca", "vitca2", "nl-means", "bm3d", "bm3d-true", "best_baseline"}
    assert set(holes) == {
        "input",
        "vitca",
        "vitca2",
        "biharmonic",
        "telea",
        "navier-stokes",
        "push-pull",
        "best_baseline",
    }
    assert holes["push-pull"]["psnr"] > holes["input"]["psnr"] + 10  # a smooth photo's holes filled smoothly
    for entry in (noise["bm3d"], holes["biharmonic"], noise["vitca2"]):
        for key in ("psnr", "ssim", "seconds", "psnr_per_photo", "ssim_per_photo", "seconds_per_photo"):
            assert key in entry
        assert len(entry["psnr_per_photo"]) == 1
    assert noise["bm3d-true"]["psnr"] > noise["input"]["psnr"]  # told σ, BM3D removes noise from a smooth image
    rows = r["per_image"]
    assert len(rows) == 6 + 7
    assert all({"photo", "kind", "method", "psnr", "ssim", "seconds"} <= set(row) for row in rows)
    # masked kinds are scored inside the holes; the whole image's PSNR is kept beside it
    hole_rows = [row for row in rows if row["kind"] == "squares 3×20²"]
    assert all("psnr_image" in row for row in hole_rows)
    assert set(r["paired_vitca2_minus_vitca"]) == {"gaussian 0.03", "squares 3×20²", "all kinds"}
    assert (saved / "p.gaussian_0.03.bm3d.png").is_file() and (saved / "p.original.png").is_file()


def test_native_crops_and_damage_are_fixed_by_the_seed(tmp_path):
    photo(tmp_path / "q.png", 70, 90)
    (c1, at1), (c2, at2) = (photo_native.native_crop(tmp_path / "q.png", 40, 0) for _ in range(2))
    assert at1 == at2 and np.array_equal(c1, c2) and c1.shape == (40, 40, 3)
    for kind in photo_quality.NATIVE_KINDS:
        d1, m1, s1 = photo_native.native_damage(kind, c1, torch.Generator().manual_seed(3))
        d2, m2, _ = photo_native.native_damage(kind, c1, torch.Generator().manual_seed(3))
        assert np.array_equal(d1, d2) and d1.shape == c1.shape
        assert np.allclose(d1 * 255, np.round(d1 * 255), atol=1e-4)  # 8-bit values, as a saved file
        assert (m1 is None) == (not photo_quality.NATIVE_KINDS[kind][2])
        assert s1 == (float(kind.split()[1]) if kind in ("gaussian 0.03", "gaussian 0.06") else None)
        if m1 is not None:
            assert np.array_equal(m1, m2) and m1.any() and np.all(d1[m1] == 0)


def test_bm3d_told_the_true_sigma_needs_it():
    from vitca_cli.errors import UsageError
    from vitca_cli.training.baselines import run_baseline

    with pytest.raises(UsageError, match="true noise level"):
        run_baseline("bm3d-true", torch.rand(1, 3, 16, 16), torch.ones(1, 1, 16, 16))
