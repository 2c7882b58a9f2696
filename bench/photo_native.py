"""The native-scale mode of ``bench/photo_quality.py`` (``--native``): crops of multi-megapixel photos at their own
pixel scale, the damage users' photos carry, and its report. Run it through ``python bench/photo_quality.py
--native``; the options and the shared machinery (models, vitca and classic runs, scores, paired differences) live
there. Debian's mate-backgrounds, matplotlib's and scikit-learn's sample photos are never used for training,
validation or tuning: this is the project's independent check."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from photo_common import (
    CAMERA_READ,
    CAMERA_S,
    NATIVE_DENOISERS,
    NATIVE_INPAINTERS,
    NATIVE_JPEG,
    NATIVE_KINDS,
    NATIVE_PHOTOS,
    Model,
    hole_psnr,
    is_classic,
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
from PIL import Image

from vitca_cli.nca.corruptions import Corruption, _randint, camera_noise, corrupt_one, jpeg, stroke_mask
from vitca_cli.training.baselines import TAKES_SIGMA


def native_photos(folder: Path | None) -> list[Path]:
    folder = folder or NATIVE_PHOTOS
    if not folder.is_dir():
        sys.exit(f"{folder}: no such folder (apt-get install mate-backgrounds, or give --photos DIR)")
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not photos:
        sys.exit(f"no photos in {folder}")
    return photos


def native_crop(path: Path, crop: int, seed: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A ``crop``×``crop`` crop of the photo at its own scale (the whole side where it is shorter), at a position
    drawn from ``seed`` and the file name; and that position (top, left)."""
    im = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    h, w, _ = im.shape
    rng = np.random.default_rng([seed, zlib.crc32(path.name.encode())])
    top, left = int(rng.integers(0, max(h - crop, 0) + 1)), int(rng.integers(0, max(w - crop, 0) + 1))
    return np.ascontiguousarray(im[top : top + crop, left : left + crop]), (top, left)


def squares(h: int, w: int, count: int, side: int, gen: torch.Generator) -> np.ndarray:
    missing = np.zeros((h, w), dtype=bool)
    for _ in range(count):
        y, x = (_randint(gen, 0, max(s - side, 0)) for s in (h, w))
        missing[y : y + side, x : x + side] = True
    return missing


def native_damage(kind: str, clean: np.ndarray, gen: torch.Generator):
    """``clean`` ``(H, W, 3)`` damaged as ``NATIVE_KINDS[kind]`` says: (damaged image in 8-bit steps, the missing
    pixels ``(H, W)`` or None, the true noise σ where there is one)."""
    what, level, _, count = NATIVE_KINDS[kind]
    h, w, _ = clean.shape
    x = to_t(clean)[0]
    hwc = lambda t: t.permute(1, 2, 0).numpy()  # noqa: E731
    if what == "clean":
        return clean, None, None
    if what in ("gaussian", "gaussjpeg"):
        noisy = torch.from_numpy(quantise(hwc(corrupt_one(x, Corruption("gaussian", level, level), gen)[0])))
        if what == "gaussian":
            return noisy.numpy(), None, level
        return hwc(jpeg(noisy.permute(2, 0, 1), NATIVE_JPEG)), None, None
    if what == "camera":
        return hwc(jpeg(camera_noise(x, level, 0.2 * level, gen), NATIVE_JPEG)), None, None
    if what == "scribbles":
        missing = stroke_mask(h, w, count, gen, width=int(level))
    else:
        missing = squares(h, w, count, int(level), gen)
    return np.where(missing[..., None], 0.0, clean).astype(np.float32), missing, None


def slug(kind: str) -> str:
    return "".join(c if (c.isascii() and c.isalnum()) or c in ".-" else "_" for c in kind)


def warm_up(models: list[Model], clean: np.ndarray, inpainting: bool, args) -> None:
    """One untimed restoration per model (and one with a mask if masked kinds run), so the compiled step's
    start-up is not charged to the first photo."""
    for model in models:
        start = time.perf_counter()
        run_vitca(model, clean, clean, None, args)
        if inpainting:
            missing = np.zeros(clean.shape[:2], bool)
            missing[: clean.shape[0] // 8, : clean.shape[1] // 8] = True
            run_vitca(model, clean, np.where(missing[..., None], 0.0, clean), missing, args)
        print(f"warm-up {model.label}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def main_native(args: argparse.Namespace, models: list[Model]) -> None:
    kinds = pick_kinds(args.kinds, NATIVE_KINDS)
    paths = native_photos(args.photos)[: args.limit]
    rows: dict[str, dict[str, list]] = {k: {} for k in kinds}
    per_image, names = [], []
    for n, path in enumerate(paths):
        clean, (top, left) = native_crop(path, args.crop, args.seed)
        h, w, _ = clean.shape
        names.append(f"{path.name}@{top},{left}")
        if n == 0:
            warm_up(models, clean, any(NATIVE_KINDS[k][2] for k in kinds), args)
        if args.save:
            save_png(args.save, f"{path.stem}.original.png", clean)
        for kind in kinds:
            gen = torch.Generator().manual_seed(zlib.crc32(f"{args.seed}/{path.name}/{kind}".encode()))
            damaged, missing, sigma = native_damage(kind, clean, gen)
            results = {"input": (damaged, 0.0)}
            for model in models:
                results[model.label] = run_vitca(model, clean, damaged, missing, args)
            for name in NATIVE_INPAINTERS if missing is not None else NATIVE_DENOISERS:
                if name in TAKES_SIGMA and sigma is None:
                    continue
                results[name] = run_classic(name, damaged, missing, sigma)
            for name, (image, seconds) in results.items():
                p_image, s = score(image, clean)
                p = p_image if missing is None else hole_psnr(image, clean, missing)
                rows[kind].setdefault(name, []).append((p, s, seconds))
                row = {"photo": names[-1], "kind": kind, "method": name, "psnr": round(p, 3), "ssim": round(s, 4)}
                row |= {"seconds": round(seconds, 3)} | (
                    {"psnr_image": round(p_image, 3)} if missing is not None else {}
                )
                per_image.append(row)
                if args.save:
                    save_png(args.save, f"{path.stem}.{slug(kind)}.{name}.png", image)
            print(
                f"  {path.name} {kind}: "
                + "  ".join(f"{m} {rows[kind][m][-1][0]:.2f}/{rows[kind][m][-1][2]:.1f}s" for m in results),
                file=sys.stderr,
                flush=True,
            )
        print(f"[{n + 1}/{len(paths)}] {path.name} crop {w}×{h} at ({top}, {left})", file=sys.stderr, flush=True)
        if args.json and n + 1 < len(paths):  # so far: a run cut short keeps the photos it finished
            with contextlib.redirect_stdout(io.StringIO()):
                write_native_report(args, models, names, rows, per_image, complete=False)

    write_native_report(args, models, names, rows, per_image, complete=True)


def write_native_report(args, models: list[Model], names, rows, per_image, complete: bool) -> None:
    """Print the native table (and the A/B differences) and write ``--json``; ``complete`` False while photos are
    still to come."""
    table = print_native_table(rows, names, args, models)
    paired = print_paired(rows) if len(models) > 1 else None
    if not args.json:
        return
    report = {
        "mode": "native",
        "complete": complete,
        "size": f"native {args.crop}",
        "crop": args.crop,
        "photo_dir": str(args.photos or NATIVE_PHOTOS),
        "photos": names,
        "seed": args.seed,
        "weights": models[0].backend.name,
        "backend": models[0].backend.device,
        "iters": models[0].iters,
        "fusion": str(models[0].fusion or ""),
        "settle": args.settle,
        "runs": args.runs,
        "precision": args.precision,
        "compile": args.compile,
        "threads": torch.get_num_threads(),
        "camera": {"s": CAMERA_S, "read": CAMERA_READ, "jpeg": NATIVE_JPEG},
        "scores": "PSNR over the whole image for noise kinds, inside the holes for masked kinds; SSIM whole",
        **models_meta(models),
        "kinds": table,
        "per_image": per_image,
    }
    if paired:
        report["paired_vitca2_minus_vitca"] = paired
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))


def print_native_table(rows: dict, names: list[str], args, models: list[Model]) -> dict:
    """The native-scale table: per kind the input, each vitca model and the best baseline a user can run (the
    σ-told ``bm3d-true`` is an upper bound, listed with every method below but never "best"), PSNR / SSIM / seconds,
    and vitca minus that baseline; then every method. Returns the JSON table."""
    runs = "; ".join(f"{m.label} {m.backend.name} {m.iters} steps, fusion {m.fusion}" for m in models)
    print(
        f"\n{len(names)} photos at native scale, {args.crop}×{args.crop} crops ({', '.join(names)}); {runs}; "
        f"seed {args.seed}, settle {args.settle}, runs {args.runs}, {torch.get_num_threads()} threads. "
        "PSNR dB (masked kinds: inside the holes) / SSIM, means over photos; seconds per photo."
    )
    labels = [m.label for m in models]
    header = (
        f"{'damage':<22}{'input':>14}"
        + "".join(f"{lab:>21}" for lab in labels)
        + f"{'best baseline':>32}"
        + "".join(f"{lab + ' − best':>15}" for lab in labels)
    )
    print(header)
    print("-" * len(header))
    table = {}
    for kind, methods in rows.items():
        mean = {m: tuple(float(np.mean([v[i] for v in vals])) for i in range(3)) for m, vals in methods.items()}
        classic = {m: v for m, v in mean.items() if is_classic(m) and m not in TAKES_SIGMA}  # as a user runs them
        best = max(classic, key=lambda m: classic[m][0]) if classic else None
        inp = mean["input"]
        inp_txt = "∞" if kind == "clean" else f"{inp[0]:.2f}/{inp[1]:.3f}"
        line = f"{kind:<22}{inp_txt:>14}"
        line += "".join(f"{f'{mean[lab][0]:.2f}/{mean[lab][1]:.3f} {mean[lab][2]:.1f}s':>21}" for lab in labels)
        b = classic.get(best)
        line += f"{f'{best} {b[0]:.2f}/{b[1]:.3f} {b[2]:.1f}s' if best else '—':>32}"
        line += "".join(f"{f'{mean[lab][0] - b[0]:+.2f}' if best else '—':>15}" for lab in labels)
        print(line)
        table[kind] = {m: method_entry(v, methods[m]) for m, v in mean.items()}
        if best:
            table[kind]["best_baseline"] = best
    print("\nevery method (PSNR / SSIM / seconds per photo):")
    for kind, methods in table.items():
        print(
            f"  {kind:<22}"
            + "  ".join(
                f"{m} {v['psnr']:.2f}/{v['ssim']:.3f}/{v['seconds']:.1f}s"
                for m, v in methods.items()
                if m != "input" and isinstance(v, dict)
            )
        )
    return table
