"""Restoration quality on photos: vitca against its input and the classic baselines, in one run. Two modes.

**256 px** (the default). Each held-out photo (``python -m vitca_cli.training.photos``'s test split: never trained on,
nor validated on) is scaled so its short side is ``--size`` px (Lanczos, then quantised to 8 bits, as a saved file),
damaged in each of these ways and restored by vitca through ``vitca_cli.restore.loop.restore`` (the code
``vitca denoise`` / ``vitca inpaint`` run) and by each classic baseline that applies:

    clean               no damage (vitca must leave the photo alone)
    gaussian 0.02 … 0.2 additive N(0, σ²), clipped, quantised
    saltpepper 10%      10% of pixels set to black or white
    jpeg q10            Pillow JPEG at quality 10
    scribbles           6 free-form strokes, the mask given (vitca inpaint --mask)
    holes               three 20×20 holes, the mask given

Denoisers (median, TV, NL-means) run on the noise kinds; inpainters (biharmonic, Telea, Navier–Stokes) on the
masked kinds, given the mask, as vitca is. It prints per kind PSNR and SSIM (Gaussian 11×11, σ 1.5; means over the
photos), wall seconds per photo, and vitca minus the best baseline; ``--save DIR`` writes every input and output
as PNG. The masked kinds' PSNR is over the whole image here (as it always was); the JSON adds the PSNR inside the
holes.

**Native scale** (``--native``): where users' photos live. A ``--crop``×``--crop`` px crop (512 by default) of each
multi-megapixel photo at its *own* pixel scale, never resized: such a photo is smooth from pixel to pixel, so noise
must be averaged over large areas. Each crop's position is drawn from ``--seed`` and the photo's file name: the same
crops on every run (recorded in the report as ``NAME@Y,X``). The photos: Debian's ``mate-backgrounds``
(``apt-get install mate-backgrounds``: ``/usr/share/backgrounds/mate/nature/*.jpg``, 12 camera photos of 1.3–4 MP),
or ``--photos DIR``. This is the project's independent check: **Debian's mate-backgrounds, matplotlib's sample
photos and scikit-learn's sample images must never be used for training, validation or tuning** (of weights,
recipes or settings), or the check stops being independent. Damage, named as in the table:

    clean                 no damage
    gaussian 0.03, 0.06   additive N(0, σ²), clipped, quantised to 8 bits
    camera+jpeg90         camera noise: shot (s = 0.07) and read (0.2·s) noise in linear light on an RGGB mosaic,
                          demosaicked, sRGB (``vitca_cli.nca.corruptions.camera_noise``; input about 28 dB on these
                          photos), then saved as a Pillow JPEG at quality 90, 4:2:0 (as a camera saves it)
    gaussian 0.05 jpeg90  Gaussian σ 0.05, then a JPEG at quality 90, 4:2:0: noise in a JPEG
    scribbles 6×5px       six free-form strokes 5 px wide, the mask given (as ``vitca inpaint --mask``)
    scribbles 3×15px      three strokes 15 px wide
    squares 3×20²         three 20×20 holes, the mask given

Baselines, from ``training.baselines``: on the noise kinds NL-means (its own noise estimate), BM3D with σ estimated
as a user would (scikit-image ``estimate_sigma``) and ``bm3d-true``, told the true σ (Gaussian kinds only: an upper
bound, never counted as the best baseline); on the masked kinds biharmonic, Telea and Navier–Stokes, given the mask,
and at native scale vitca's own push-pull fill (where a ``fill`` model's cells start). Masked kinds are scored by
the PSNR *inside the holes* (known pixels are exact for every method), SSIM over the whole image. Before timing,
each model restores one crop untimed (the compiled step's start-up, paid once per process, is not charged to the
first photo).

Both modes: ``--weights2 W`` restores every damaged image with a second model too (``vitca2``, its own default
steps and fusion unless ``--iters``/``--fusion`` say) and prints the paired difference vitca2 − vitca per kind with
its 95% interval: an A/B of two checkpoints on the same damage. ``--json FILE`` writes the means and every per-photo
figure (PSNR, SSIM, seconds, per method; native mode also a flat ``per_image`` list) for paired intervals later
(``python bench/compare_eval.py A.json B.json``). ``--save DIR`` writes inputs and outputs as PNG (100% zoom).

    python bench/photo_quality.py [--weights photo] [--weights2 W] [--iters 32] [--size 256] [--photos DIR] [--save DIR]
    python bench/photo_quality.py --native [--crop 512] [--photos DIR] [--weights photo] [--weights2 W] [--limit 4]
                                  [--kinds "gaussian 0.03,squares"] [--json FILE] [--save DIR] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from photo_common import (  # noqa: E402
    NATIVE_CROP,
    NATIVE_KINDS,
    Model,
    hole_psnr,
    is_classic,
    load_model,
    method_entry,
    models_meta,
    pick_kinds,
    print_paired,
    quantise,
    run_classic,
    run_vitca,
    save_png,
    score,
    to_t,
)
from photo_native import main_native  # noqa: E402

from vitca_cli.nca.corruptions import (  # noqa: E402
    Corruption,
    corrupt_one,
    stroke_mask,
)

DENOISERS = ("median", "tv-chambolle", "nl-means")
INPAINTERS = ("biharmonic", "telea", "navier-stokes")
KINDS = {  # name -> (corruption or mask maker, inpainting)
    "clean": (Corruption("clean", 0, 0), False),
    "gaussian 0.02": (Corruption("gaussian", 0.02, 0.02), False),
    "gaussian 0.05": (Corruption("gaussian", 0.05, 0.05), False),
    "gaussian 0.1": (Corruption("gaussian", 0.1, 0.1), False),
    "gaussian 0.2": (Corruption("gaussian", 0.2, 0.2), False),
    "saltpepper 10%": (Corruption("saltpepper", 0.1, 0.1), False),
    "jpeg q10": (Corruption("jpeg", 10, 10), False),
    "scribbles": ("scribbles", True),
    "holes 3×20²": ("holes", True),
}


def held_out_photos(folder: Path | None) -> list[Path]:
    if folder is None:
        from vitca_cli.training.photos import collect

        folder = Path(tempfile.mkdtemp(prefix="vitca-photos-"))
        collect(folder)
        folder = folder / "test"
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not photos:
        sys.exit(f"no photos in {folder}")
    return photos


def load(path: Path, short: int) -> np.ndarray:
    im = Image.open(path).convert("RGB")
    scale = short / min(im.size)
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.float32) / 255.0


def missing_mask(kind: str, h: int, w: int, gen: torch.Generator) -> np.ndarray:
    if kind == "scribbles":
        return stroke_mask(h, w, 6, gen)
    missing = np.zeros((h, w), dtype=bool)
    for _ in range(3):
        y, x = (int(torch.randint(0, s - 20, (), generator=gen)) for s in (h, w))
        missing[y : y + 20, x : x + 20] = True
    return missing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default=None, help="NAME or PATH (default: the shipped photo model)")
    ap.add_argument("--weights2", default=None, help="a second model (NAME or PATH), restoring the same damage")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--iters", type=int, default=None, help="CA steps (default: the model's own default)")
    ap.add_argument("--size", type=int, default=256, help="short side of each photo, px (256 px mode)")
    ap.add_argument("--native", action="store_true", help="crops of multi-megapixel photos at their own scale")
    ap.add_argument("--crop", type=int, default=None, help=f"native mode: crop side, px (default {NATIVE_CROP})")
    ap.add_argument("--photos", type=Path, default=None, help="folder of held-out photos")
    ap.add_argument("--limit", type=int, default=None, help="first N photos only")
    ap.add_argument(
        "--kinds",
        default=None,
        help="comma-separated subset (a unique prefix will do) of: "
        + ", ".join(KINDS).replace("%", "%%")
        + "; native: "
        + ", ".join(NATIVE_KINDS),
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", type=Path, default=None, help="write inputs and outputs here as PNG")
    ap.add_argument("--json", type=Path, default=None, help="also write the table and per-photo figures here")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--settle", type=float, default=0.0, help="vitca's --settle (0: every step on every cell)")
    ap.add_argument("--runs", type=int, default=1, help="vitca's --runs: the mean of this many runs")
    ap.add_argument("--precision", default="auto", help="vitca's --precision: fp32, bf16 or auto")
    ap.add_argument("--compile", default="auto", help="vitca's --compile: off, on or auto")
    ap.add_argument(
        "--fusion", choices=("on", "off", "auto"), default="auto", help="vitca's --fusion (auto: as trained)"
    )
    args = ap.parse_args(argv)
    if args.crop is not None and not args.native:
        ap.error("--crop is for --native")
    args.crop = args.crop or NATIVE_CROP
    return args


def damage_and_restore(clean, spec, inpainting: bool, gen, models: list[Model], args) -> tuple[dict, np.ndarray]:
    """One photo damaged by ``spec`` (or with the pixels it marks missing), restored by the CA and the classic
    methods: method → (image, seconds), ``input`` the damaged photo itself; and the missing pixels (or None)."""
    h, w, _ = clean.shape
    missing = None
    if inpainting:
        missing = missing_mask(spec, h, w, gen)
        damaged = np.where(missing[..., None], 0.0, clean).astype(np.float32)
    else:
        damaged = quantise(corrupt_one(to_t(clean)[0], spec, gen)[0].permute(1, 2, 0).numpy())
    results = {"input": (damaged, 0.0)}
    for model in models:
        results[model.label] = run_vitca(model, clean, damaged, missing, args)
    for name in INPAINTERS if inpainting else DENOISERS:
        results[name] = run_classic(name, damaged, missing)
    return results, missing


def print_table(rows: dict, n_photos: int, args: argparse.Namespace, backend, iters: int) -> dict:
    """The means per damage kind and method, printed; returned as the JSON table."""
    table = {}
    print(
        f"\n{n_photos} held-out photos, short side {args.size} px; vitca {backend.name} ({backend.device}), "
        f"{iters} steps, seed {args.seed}, settle {args.settle}, fusion {args.fusion}, runs {args.runs}. "
        "PSNR dB / SSIM, means over photos; seconds per photo."
    )
    header = f"{'damage':<16}{'input':>13}{'vitca':>13}{'best classic':>26}{'vitca − best':>14}{'vitca s':>9}"
    print(header)
    print("-" * len(header))
    for kind, methods in rows.items():
        mean = {m: tuple(float(np.mean([v[i] for v in vals])) for i in range(3)) for m, vals in methods.items()}
        classic = {m: v for m, v in mean.items() if is_classic(m)}
        best = max(classic, key=lambda m: classic[m][0]) if classic else None
        inp, ca = mean["input"], mean["vitca"]
        best_txt = f"{best} {classic[best][0]:.2f}/{classic[best][1]:.3f}" if best else "—"
        diff = f"{ca[0] - classic[best][0]:+.2f}" if best else "—"
        inp_txt = "∞" if kind == "clean" else f"{inp[0]:.2f}/{inp[1]:.3f}"
        print(f"{kind:<16}{inp_txt:>13}{ca[0]:>7.2f}/{ca[1]:.3f}{best_txt:>26}{diff:>14}{ca[2]:>9.2f}")
        table[kind] = {m: method_entry(v, methods[m]) for m, v in mean.items()}
    print("\nall baselines (PSNR / seconds):")
    for kind, methods in table.items():
        print(
            f"  {kind:<16}"
            + "  ".join(f"{m} {v['psnr']:.2f}/{v['seconds']:.2f}s" for m, v in methods.items() if m != "input")
        )
    holes = {k: t for k, t in table.items() if "psnr_hole" in t["vitca"]}
    if holes:
        print("\nmasked kinds, PSNR inside the holes only:")
        for kind, methods in holes.items():
            print(f"  {kind:<16}" + "  ".join(f"{m} {v['psnr_hole']:.2f}" for m, v in methods.items() if m != "input"))
    return table


def main_256(args: argparse.Namespace, models: list[Model]) -> None:
    backend, iters = models[0].backend, models[0].iters
    kinds = pick_kinds(args.kinds, KINDS)
    photos = held_out_photos(args.photos)[: args.limit]
    rows: dict[str, dict[str, list]] = {k: {} for k in kinds}
    for n, path in enumerate(photos):
        clean = quantise(load(path, args.size))
        h, w, _ = clean.shape
        for kind in kinds:
            spec, inpainting = KINDS[kind]
            gen = torch.Generator().manual_seed(args.seed * 1000 + n * 31 + kinds.index(kind))
            results, missing = damage_and_restore(clean, spec, inpainting, gen, models, args)
            for name, (image, seconds) in results.items():
                p, s = score(image, clean)
                figures = (p, s, seconds) if missing is None else (p, s, seconds, hole_psnr(image, clean, missing))
                rows[kind].setdefault(name, []).append(figures)
                if args.save:
                    save_png(
                        args.save,
                        f"{path.stem}.{kind.split()[0]}{kind.split()[1] if ' ' in kind else ''}.{name}.png",
                        image,
                    )
        print(f"[{n + 1}/{len(photos)}] {path.name} {w}×{h}", file=sys.stderr, flush=True)

    table = print_table(rows, len(photos), args, backend, iters)
    paired = print_paired(rows) if len(models) > 1 else None
    if args.json:
        report = {
            "iters": iters,
            "size": args.size,
            "photos": [p.name for p in photos],
            "seed": args.seed,
            "weights": backend.name,
            "backend": backend.device,
            "fusion": str(models[0].fusion or ""),
            "settle": args.settle,
            "runs": args.runs,
            "kinds": table,
        }
        if paired:
            report |= models_meta(models) | {"paired_vitca2_minus_vitca": paired}
        args.json.write_text(json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [load_model("vitca", args.weights, args)]
    if args.weights2:
        models.append(load_model("vitca2", args.weights2, args))
    if args.native:
        main_native(args, models)
    else:
        main_256(args, models)


if __name__ == "__main__":
    main()
