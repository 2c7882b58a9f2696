"""Collect the natural photos that install on these machines into train/test folders for the `photo` model.

Sources: scikit-image's bundled samples (offline loaders only) and Debian's ``opencv-doc`` example images
(``apt-get install opencv-doc``). A fixed list of photos is held out for testing and never used in training.

    python -m training.photos OUT_DIR      # writes OUT_DIR/train/*.png and OUT_DIR/test/*.png
                                           # and OUT_DIR/crops/test/*.png (16 random 32×32 crops per test photo)

Training photos are written at full size and, when their short side is at least 256 px, also at half size
(``*-half.png``), so random crops see both fine texture and coarser structure. Licences: scikit-image's samples are
public domain or CC0/CC-BY (see ``skimage/data/README.txt``); opencv-doc's example data ships under OpenCV's
Apache-2.0/BSD terms (Debian's ``/usr/share/doc/opencv-doc/copyright``).

Evaluate the photo model on the held-out crops with ``vitca eval --dataset folder:OUT_DIR/crops``.
"""

from __future__ import annotations

import sys
from pathlib import Path

OPENCV_DIR = Path("/usr/share/doc/opencv-doc/examples/data")
# Natural photographs and textures; logos, charts, text and calibration boards are left out.
OPENCV_TRAIN = [
    "aero1.jpg",
    "aero3.jpg",
    "aloeL.jpg",
    "apple.jpg",
    "basketball1.png",
    "blox.jpg",
    "board.jpg",
    "chicky_512.png",
    "ela_original.jpg",
    "graf1.png",
    "HappyFish.jpg",
    "home.jpg",
    "leuvenA.jpg",
    "rubberwhale1.png",
    "stuff.jpg",
    "Blender_Suzanne1.jpg",
    "box_in_scene.png",
    "licenseplate_motion.jpg",
    "basketball2.png",
    "leuvenB.jpg",
    "starry_night.jpg",
]
OPENCV_VAL = ["butterfly.jpg", "messi5.jpg"]  # validation during training: random crops, never trained on
OPENCV_TEST = ["baboon.jpg", "fruits.jpg", "building.jpg", "smarties.png", "squirrel_cls.jpg", "orange.jpg"]
SKIMAGE_TRAIN = ["astronaut", "coffee", "chelsea", "rocket", "camera", "brick", "grass", "gravel", "hubble_deep_field"]


def collect(out: Path) -> dict[str, int]:
    """Write the photos as RGB PNGs into ``out/train`` and ``out/test``; returns how many went where."""
    from PIL import Image

    counts = {"train": 0, "test": 0}
    (out / "val-photos").mkdir(parents=True, exist_ok=True)
    for name in OPENCV_VAL:
        if (OPENCV_DIR / name).is_file():
            Image.open(OPENCV_DIR / name).convert("RGB").save(out / "val-photos" / f"opencv-{Path(name).stem}.png")
    for split, names in (("train", OPENCV_TRAIN), ("test", OPENCV_TEST)):
        (out / split).mkdir(parents=True, exist_ok=True)
        for name in names:
            src = OPENCV_DIR / name
            if src.is_file():
                counts[split] += _save(
                    Image.open(src).convert("RGB"), out / split / f"opencv-{Path(name).stem}", split == "train"
                )
    try:
        from skimage import data
    except ImportError:
        data = None
    for name in SKIMAGE_TRAIN if data else []:
        try:
            image = Image.fromarray(getattr(data, name)()).convert("RGB")
        except Exception:  # noqa: BLE001 - loaders that need a download fail offline; skip them
            continue
        counts["train"] += _save(image, out / "train" / f"skimage-{name}", True)
    return counts


def _val_sources(out: Path, split: str) -> list[Path]:
    return sorted((out / ("val-photos" if split == "val" else split)).glob("*.png"))


def _save(image, stem: Path, half: bool) -> int:
    """Write ``image`` as STEM.png and, with ``half`` and a short side ≥ 256 px, STEM-half.png; returns files."""
    from PIL import Image

    image.save(stem.with_name(stem.name + ".png"))
    if not half or min(image.size) < 256:
        return 1
    small = image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)
    small.save(stem.with_name(stem.name + "-half.png"))
    return 2


def test_crops(
    out: Path, size: int = 32, per_image: int = 16, seed: int = 0, split: str = "test", dest: Path | None = None
) -> int:
    """Cut ``per_image`` random ``size``×``size`` crops from each photo of ``split`` into ``dest``
    (default ``out/crops/<split>``)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    dest = dest or out / "crops" / split
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    for photo in sorted(Path(p) for p in _val_sources(out, split)):
        image = np.asarray(Image.open(photo).convert("RGB"))
        h, w = image.shape[:2]
        for k in range(per_image):
            y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
            Image.fromarray(image[y : y + size, x : x + size]).save(dest / f"{photo.stem}-{k:02d}.png")
            count += 1
    return count


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    root = Path(sys.argv[1])
    print(
        collect(root),
        "test crops:",
        test_crops(root),
        "validation crops:",
        test_crops(root, per_image=64, seed=1, split="val", dest=root / "val"),
    )
