"""Restoration quality on whole held-out photos: vitca against its input and the classic baselines, in one run.

Each held-out photo (``python -m vitca_cli.training.photos``'s test split: never trained on, nor validated on) is
scaled so
its short side is ``--size`` px (Lanczos, then quantised to 8 bits, as a saved file), damaged in each of these ways
and restored by vitca through ``vitca_cli.restore.loop.restore`` (the code ``vitca denoise`` / ``vitca inpaint`` run)
and by each classic baseline that applies:

    clean               no damage (vitca must leave the photo alone)
    gaussian 0.02 … 0.2 additive N(0, σ²), clipped, quantised
    saltpepper 10%      10% of pixels set to black or white
    jpeg q10            Pillow JPEG at quality 10
    scribbles           6 free-form strokes, the mask given (vitca inpaint --mask)
    holes               three 20×20 holes, the mask given

Denoisers (median, TV, NL-means) run on the noise kinds; inpainters (biharmonic, Telea) on the masked kinds, given
the mask, as vitca is. It prints per kind PSNR and SSIM (Gaussian 11×11, σ 1.5; means over the photos), wall
seconds per photo, and vitca minus the best baseline; ``--save DIR`` writes every input and output as PNG.

    python bench/photo_quality.py [--weights photo] [--iters 32] [--size 256] [--photos DIR] [--save DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitca_cli.nca.corruptions import Corruption, corrupt_one, stroke_mask  # noqa: E402
from vitca_cli.restore.backends import backend_mask_type, make_backend  # noqa: E402
from vitca_cli.restore.loop import mask_missing, restore  # noqa: E402
from vitca_cli.training.baselines import run_baseline  # noqa: E402
from vitca_cli.training.metrics import psnr_per_image, ssim_per_image  # noqa: E402

DENOISERS = ("median", "tv-chambolle", "nl-means")
INPAINTERS = ("biharmonic", "telea")
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


def quantise(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0, 1) * 255) / 255.0


def missing_mask(kind: str, h: int, w: int, gen: torch.Generator) -> np.ndarray:
    if kind == "scribbles":
        return stroke_mask(h, w, 6, gen)
    missing = np.zeros((h, w), dtype=bool)
    for _ in range(3):
        y, x = (int(torch.randint(0, s - 20, (), generator=gen)) for s in (h, w))
        missing[y : y + 20, x : x + 20] = True
    return missing


def to_t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None].float()


def score(out: np.ndarray, clean: np.ndarray) -> tuple[float, float]:
    o, c = to_t(np.clip(out, 0, 1)), to_t(clean)
    psnr = float(psnr_per_image(o, c)[0])
    return min(psnr, 99.0), float(ssim_per_image(o, c)[0])


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default=None, help="NAME or PATH (default: the shipped photo model)")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--iters", type=int, default=None, help="CA steps (default: the model's own default)")
    ap.add_argument("--size", type=int, default=256, help="short side of each photo, px")
    ap.add_argument("--photos", type=Path, default=None, help="folder of held-out photos")
    ap.add_argument("--limit", type=int, default=None, help="first N photos only")
    ap.add_argument("--kinds", default=None, help="comma-separated subset of: " + ", ".join(KINDS).replace("%", "%%"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", type=Path, default=None, help="write inputs and outputs here as PNG")
    ap.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--settle", type=float, default=0.0, help="vitca's --settle (0: every step on every cell)")
    ap.add_argument("--runs", type=int, default=1, help="vitca's --runs: the mean of this many runs")
    ap.add_argument("--precision", default="auto", help="vitca's --precision: fp32, bf16 or auto")
    ap.add_argument("--compile", default="auto", help="vitca's --compile: off, on or auto")
    ap.add_argument(
        "--fusion", choices=("on", "off", "auto"), default="auto", help="vitca's --fusion (auto: as trained)"
    )
    return ap.parse_args()


def damage_and_restore(
    backend,
    clean,
    spec,
    inpainting: bool,
    gen,
    mask_type: str,
    iters: int,
    seed: int,
    settle: float = 0.0,
    fusion: bool = False,
    runs: int = 1,
) -> dict:
    """One photo damaged by ``spec`` (or with the pixels it marks missing), restored by the CA and the classic
    methods: method → (image, seconds); ``input`` is the damaged photo itself."""
    h, w, _ = clean.shape
    known = None
    if inpainting:
        missing = missing_mask(spec, h, w, gen)
        damaged = np.where(missing[..., None], 0.0, clean).astype(np.float32)
        ca_input, known = mask_missing(clean, missing, mask_type, seed), ~missing
    else:
        damaged = quantise(corrupt_one(to_t(clean)[0], spec, gen)[0].permute(1, 2, 0).numpy())
        ca_input = damaged
    results = {"input": (damaged, 0.0)}
    start = time.perf_counter()
    out = restore(
        backend, ca_input.astype(np.float32), iters, seed=seed, known=known, settle=settle, fusion=fusion, runs=runs
    ).image
    results["vitca"] = (out, time.perf_counter() - start)
    keep = torch.from_numpy((known if known is not None else np.ones((h, w), bool)).astype(np.float32))
    for name in INPAINTERS if inpainting else DENOISERS:
        start = time.perf_counter()
        restored = run_baseline(name, to_t(damaged), keep[None, None])[0].permute(1, 2, 0).numpy()
        results[name] = (restored, time.perf_counter() - start)
    return results


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
        classic = {m: v for m, v in mean.items() if m not in ("input", "vitca")}
        best = max(classic, key=lambda m: classic[m][0]) if classic else None
        inp, ca = mean["input"], mean["vitca"]
        best_txt = f"{best} {classic[best][0]:.2f}/{classic[best][1]:.3f}" if best else "—"
        diff = f"{ca[0] - classic[best][0]:+.2f}" if best else "—"
        inp_txt = "∞" if kind == "clean" else f"{inp[0]:.2f}/{inp[1]:.3f}"
        print(f"{kind:<16}{inp_txt:>13}{ca[0]:>7.2f}/{ca[1]:.3f}{best_txt:>26}{diff:>14}{ca[2]:>9.2f}")
        table[kind] = {
            m: {
                "psnr": round(v[0], 3),
                "ssim": round(v[1], 4),
                "seconds": round(v[2], 3),
                "psnr_per_photo": [round(x[0], 3) for x in methods[m]],
            }
            for m, v in mean.items()
        }
    print("\nall baselines (PSNR / seconds):")
    for kind, methods in table.items():
        print(
            f"  {kind:<16}"
            + "  ".join(f"{m} {v['psnr']:.2f}/{v['seconds']:.2f}s" for m, v in methods.items() if m != "input")
        )
    return table


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    backend = make_backend(
        args.weights, args.backend, "cpu", channels=3, precision=args.precision, compile=args.compile
    )
    meta = getattr(backend, "meta", None) or {}
    iters = args.iters or int(meta.get("default_iters", 64))
    fusion = bool(meta.get("default_fusion")) if args.fusion == "auto" else args.fusion == "on"
    mask_type = backend_mask_type(backend)
    kinds = list(KINDS) if not args.kinds else [k.strip() for k in args.kinds.split(",")]
    photos = held_out_photos(args.photos)[: args.limit]
    rows: dict[str, dict[str, list]] = {k: {} for k in kinds}
    for n, path in enumerate(photos):
        clean = quantise(load(path, args.size))
        h, w, _ = clean.shape
        for kind in kinds:
            spec, inpainting = KINDS[kind]
            gen = torch.Generator().manual_seed(args.seed * 1000 + n * 31 + kinds.index(kind))
            results = damage_and_restore(
                backend, clean, spec, inpainting, gen, mask_type, iters, args.seed, args.settle, fusion, args.runs
            )
            for name, (image, seconds) in results.items():
                p, s = score(image, clean)
                rows[kind].setdefault(name, []).append((p, s, seconds))
                if args.save:
                    args.save.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(
                        args.save / f"{path.stem}.{kind.split()[0]}{kind.split()[1] if ' ' in kind else ''}.{name}.png"
                    )
        print(f"[{n + 1}/{len(photos)}] {path.name} {w}×{h}", file=sys.stderr, flush=True)

    table = print_table(rows, len(photos), args, backend, iters)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "iters": iters,
                    "size": args.size,
                    "photos": [p.name for p in photos],
                    "seed": args.seed,
                    "weights": backend.name,
                    "backend": backend.device,
                    "fusion": fusion,
                    "settle": args.settle,
                    "runs": args.runs,
                    "kinds": table,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
