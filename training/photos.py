"""Collect the natural photos that install on these machines into train/test folders for the `photo` model.

Sources: scikit-image's bundled samples (offline loaders only) and Debian's ``opencv-doc`` example images
(``apt-get install opencv-doc``). A fixed list of photos is held out for testing and never used in training.

    python -m vitca_cli.training.photos OUT_DIR      # writes OUT_DIR/train/*.png and OUT_DIR/test/*.png
                                           # and OUT_DIR/crops/test/*.png (16 random 32×32 crops per test photo)
    python -m vitca_cli.training.photos OUT_DIR --upscale 2,4   # and training photos enlarged 2× and 4×
    python -m vitca_cli.training.photos OUT_DIR --native        # and multi-megapixel photos at 1, 1/2 and 1/4

With ``--native``, real camera photos from Debian's wallpaper packages (``apt-get install plasma-workspace-wallpapers
lomiri-wallpapers-16.04 lomiri-wallpapers-20.04``; ``WALLPAPER_TRAIN``) are written at their own pixel scale and at
1/2 and 1/4 (``*-native.png``, ``*-d2.png``, ``*-d4.png``): at a camera's scale a photo is smooth from pixel to
pixel and its noise must be averaged over large areas, which the small photos never show. Two of them
(``WALLPAPER_VAL``) are held out for validation: 64×64 crops at native scale and at 1/2 go to ``OUT_DIR/val``.
Never used here: Debian's ``mate-backgrounds``, matplotlib's and scikit-learn's sample photos, kept for independent
checks (``bench/photo_quality.py --native`` tests on them).

Training photos are written at full size and, when their short side is at least 256 px, also at half size
(``*-half.png``), so random crops see both fine texture and coarser structure. With ``--upscale 2,4`` they are also
written enlarged (bicubic, ``*-x2.png``, ``*-x4.png``) and the validation crops are cut at those scales too: a
camera's photo is smooth at the pixel scale, and crops of enlarged photos teach the rule to smooth such content.

Licences: scikit-image's samples are public domain or CC0/CC-BY (see ``skimage/data/README.txt``); opencv-doc's
example data ships under OpenCV's Apache-2.0/BSD terms (Debian's ``/usr/share/doc/opencv-doc/copyright``).

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
WALLPAPERS = Path("/usr/share/wallpapers")  # plasma-workspace-wallpapers: NAME/contents/images/WxH.jpg
BACKGROUNDS = Path("/usr/share/backgrounds")  # lomiri-wallpapers-16.04 and -20.04: NAME.jpg
# The real camera photos among the wallpapers (the rest is artwork), 1.5 to 20 MP each.
WALLPAPER_TRAIN = [
    "plasma:BytheWater",
    "plasma:ColdRipple",
    "plasma:ColorfulCups",
    "plasma:DarkestHour",
    "plasma:EveningGlow",
    "plasma:Grey",
    "plasma:Kite",
    "plasma:OneStandsOut",
    "plasma:Path",
    "plasma:summer_1am",
    "lomiri:Dragonfly_by_Bolly",
    "lomiri:Infinite-Sea_by_Aury88",
    "lomiri:Kleiber_by_Lukas_Baubkus",
    "lomiri:Picture_0B_by_freespace",
    "lomiri:Picture_1A_by_freespace",
    "lomiri:Wine_by_Jakkub_Mede",
    "lomiri:aitzgorri_by_Aitzol_Berasategi",
    "lomiri:analogpattern_by_Peter_Nerlich",
    "lomiri:free_by_Peter_Nerlich",
    "lomiri:friends_by_Aitzol_Berasategi",
    "lomiri:greentock_by_Peter_Nerlich",
    "lomiri:life_by_Aitzol_Berasategi",
    "lomiri:picosdeeuropa_by_Aitzol_Berasategi",
    "lomiri:seeding_by_Clements_Engelhardt",
    "lomiri:sunset_by_Aitzol_Berasategi",
]
WALLPAPER_VAL = ["plasma:FallenLeaf", "lomiri:Bridge_by_Sander_Klootwijk"]
NATIVE_SCALES = (1, 2, 4)  # written at 1/f of the native size
SKIMAGE_TRAIN = ["astronaut", "coffee", "chelsea", "rocket", "camera", "brick", "grass", "gravel", "hubble_deep_field"]


def collect(out: Path, upscale: tuple[int, ...] = ()) -> dict[str, int]:
    """Write the photos as RGB PNGs into ``out/train`` and ``out/test`` (training photos also enlarged by each
    factor of ``upscale``); returns how many went where."""
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
                    Image.open(src).convert("RGB"),
                    out / split / f"opencv-{Path(name).stem}",
                    split == "train",
                    upscale if split == "train" else (),
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
        counts["train"] += _save(image, out / "train" / f"skimage-{name}", True, upscale)
    return counts


def wallpaper_path(entry: str) -> Path | None:
    """The file of a ``WALLPAPER_*`` entry (the largest size a plasma wallpaper ships), or None if not installed."""
    source, _, name = entry.partition(":")
    if source == "lomiri":
        path = BACKGROUNDS / f"{name}.jpg"
        return path if path.is_file() else None
    sizes = [p for p in (WALLPAPERS / name / "contents" / "images").glob("*") if p.suffix in (".jpg", ".png")]
    return max(sizes, key=_pixels, default=None)


def _pixels(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as im:
        return im.width * im.height


def collect_native(out: Path) -> dict[str, int]:
    """Write the wallpaper photos at 1/f of their size for f in ``NATIVE_SCALES``: training ones into
    ``out/train``, validation ones into ``out/val-native``; returns how many files went where (0 when the
    packages are missing)."""
    from PIL import Image

    counts = {"train": 0, "val-native": 0}
    for split, names in (("train", WALLPAPER_TRAIN), ("val-native", WALLPAPER_VAL)):
        (out / split).mkdir(parents=True, exist_ok=True)
        for entry in names:
            path = wallpaper_path(entry)
            if path is None:
                continue
            image = Image.open(path).convert("RGB")
            stem = entry.replace(":", "-")
            for f in NATIVE_SCALES:
                small = (
                    image if f == 1 else image.resize((image.width // f, image.height // f), Image.Resampling.LANCZOS)
                )
                small.save(out / split / f"{stem}-{'native' if f == 1 else f'd{f}'}.png")
                counts[split] += 1
    return counts


def _val_sources(out: Path, split: str) -> list[Path]:
    folder = {"val": "val-photos", "native": "val-native"}.get(split, split)
    return sorted((out / folder).glob("*.png"))


def _save(image, stem: Path, half: bool, upscale: tuple[int, ...] = ()) -> int:
    """Write ``image`` as STEM.png, with ``half`` and a short side ≥ 256 px also STEM-half.png, and enlarged by
    each factor f of ``upscale`` as STEM-xF.png; returns how many files."""
    from PIL import Image

    image.save(stem.with_name(stem.name + ".png"))
    for f in upscale:
        _enlarge(image, f).save(stem.with_name(f"{stem.name}-x{f}.png"))
    if not half or min(image.size) < 256:
        return 1 + len(upscale)
    small = image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)
    small.save(stem.with_name(stem.name + "-half.png"))
    return 2 + len(upscale)


def _enlarge(image, factor: int):
    from PIL import Image

    return (
        image if factor == 1 else image.resize((image.width * factor, image.height * factor), Image.Resampling.BICUBIC)
    )


def test_crops(
    out: Path,
    size: int = 32,
    per_image: int = 16,
    seed: int = 0,
    split: str = "test",
    dest: Path | None = None,
    scales: tuple[int, ...] = (1,),
) -> int:
    """Cut ``per_image`` random ``size``×``size`` crops from each photo of ``split``, enlarged by each factor of
    ``scales``, into ``dest`` (default ``out/crops/<split>``)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    dest = dest or out / "crops" / split
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    for photo in sorted(Path(p) for p in _val_sources(out, split)):
        for f in scales:
            image = np.asarray(_enlarge(Image.open(photo).convert("RGB"), f))
            h, w = image.shape[:2]
            tag = "" if f == 1 else f"-x{f}"
            for k in range(per_image):
                y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
                Image.fromarray(image[y : y + size, x : x + size]).save(dest / f"{photo.stem}{tag}-{k:02d}.png")
                count += 1
    return count


if __name__ == "__main__":
    args = sys.argv[1:]
    native = "--native" in args
    args = [a for a in args if a != "--native"]
    factors: tuple[int, ...] = ()
    if len(args) == 3 and args[1] == "--upscale" and all(f.isdigit() and int(f) > 1 for f in args[2].split(",")):
        factors = tuple(int(f) for f in args[2].split(","))
        args = args[:1]
    if len(args) != 1 or args[0].startswith("-"):
        sys.exit(__doc__)
    root = Path(args[0])
    per_val = 64 // (1 + len(factors))
    print(
        collect(root, factors),
        "test crops:",
        test_crops(root),
        "validation crops:",
        test_crops(root, per_image=per_val, seed=1, split="val", dest=root / "val", scales=(1, *factors)),
    )
    if native:
        counts = collect_native(root)
        if not counts["train"]:
            sys.exit(
                "no wallpaper photos found: apt-get install plasma-workspace-wallpapers lomiri-wallpapers-16.04 "
                "lomiri-wallpapers-20.04"
            )
        crops = test_crops(root, size=64, per_image=16, seed=2, split="native", dest=root / "val")
        print("native-scale photos:", counts, "native validation crops:", crops)
