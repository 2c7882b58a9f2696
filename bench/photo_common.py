"""What both modes of ``bench/photo_quality.py`` share: the native mode's photos, damage kinds and baselines, the
models under test, scoring and the paired tables. See ``bench/photo_quality.py`` for the protocol."""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitca_cli.restore.backends import backend_mask_type, make_backend  # noqa: E402
from vitca_cli.restore.defaults import default_iters, fusion_schedule  # noqa: E402
from vitca_cli.restore.loop import mask_missing, restore  # noqa: E402
from vitca_cli.training.baselines import run_baseline  # noqa: E402
from vitca_cli.training.metrics import mean_interval, psnr_per_image, ssim_per_image  # noqa: E402

NATIVE_PHOTOS = Path("/usr/share/backgrounds/mate/nature")  # Debian mate-backgrounds: never train or tune on it
NATIVE_CROP = 512
CAMERA_S, CAMERA_READ = 0.07, 0.014  # camera_noise's shot and read levels (read = 0.2·s): input ≈ 28 dB
NATIVE_JPEG = 90
NATIVE_DENOISERS = ("nl-means", "bm3d", "bm3d-true")
NATIVE_INPAINTERS = ("biharmonic", "telea", "navier-stokes", "push-pull")
NATIVE_KINDS = {  # name -> (damage, its level, inpainting, how many holes)
    "clean": ("clean", 0.0, False, 0),
    "gaussian 0.03": ("gaussian", 0.03, False, 0),
    "gaussian 0.06": ("gaussian", 0.06, False, 0),
    "camera+jpeg90": ("camera", CAMERA_S, False, 0),
    "gaussian 0.05 jpeg90": ("gaussjpeg", 0.05, False, 0),
    "scribbles 6×5px": ("scribbles", 5, True, 6),
    "scribbles 3×15px": ("scribbles", 15, True, 3),
    "squares 3×20²": ("squares", 20, True, 3),
}


@dataclass
class Model:
    """One model restoring every damaged image: its label in the tables (vitca, vitca2) and how it runs."""

    label: str
    backend: object
    iters: int
    fusion: object  # a FusionSchedule or None
    mask_type: str


def quantise(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0, 1) * 255) / 255.0


def to_t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None].float()


def score(out: np.ndarray, clean: np.ndarray) -> tuple[float, float]:
    o, c = to_t(np.clip(out, 0, 1)), to_t(clean)
    psnr = float(psnr_per_image(o, c)[0])
    return min(psnr, 99.0), float(ssim_per_image(o, c)[0])


def hole_psnr(out: np.ndarray, clean: np.ndarray, missing: np.ndarray) -> float:
    """PSNR over the missing pixels only (all channels), capped at 99 dB like ``score``."""
    d = (np.clip(out, 0, 1) - np.clip(clean, 0, 1))[missing].astype(np.float64)
    mse = float((d**2).mean()) if d.size else 0.0
    return min(10 * math.log10(1.0 / max(mse, 1e-10)), 99.0)


def pick_kinds(spec: str | None, names) -> list[str]:
    """The kinds ``--kinds`` names (exact names or unique prefixes), in the order given; all when None."""
    names = list(names)
    if not spec:
        return names
    picked = []
    for want in (k.strip() for k in spec.split(",")):
        hits = [want] if want in names else [n for n in names if n.startswith(want)]
        if len(hits) != 1:
            sys.exit(f"--kinds: {want!r} names {'no' if not hits else 'more than one'} kind of: {', '.join(names)}")
        picked.append(hits[0])
    return picked


def load_model(label: str, weights: str | None, args: argparse.Namespace) -> Model:
    backend = make_backend(weights, args.backend, "cpu", channels=3, precision=args.precision, compile=args.compile)
    iters = args.iters or default_iters(backend)
    fusion = fusion_schedule(backend, None if args.fusion == "auto" else args.fusion == "on")
    return Model(label, backend, iters, fusion, backend_mask_type(backend))


def run_vitca(model: Model, clean, damaged, missing, args) -> tuple[np.ndarray, float]:
    """Restore as ``vitca denoise`` (``missing`` None) or ``vitca inpaint --mask`` would: (image, seconds)."""
    known = None
    ca_input = damaged
    if missing is not None:
        ca_input, known = mask_missing(clean, missing, model.mask_type, args.seed), ~missing
    start = time.perf_counter()
    out = restore(
        model.backend,
        ca_input.astype(np.float32),
        model.iters,
        seed=args.seed,
        known=known,
        settle=args.settle,
        fusion=model.fusion,
        runs=args.runs,
    ).image
    return out, time.perf_counter() - start


def run_classic(name: str, damaged: np.ndarray, missing, sigma=None) -> tuple[np.ndarray, float]:
    h, w, _ = damaged.shape
    keep = torch.from_numpy((~missing if missing is not None else np.ones((h, w), bool)).astype(np.float32))
    start = time.perf_counter()
    restored = run_baseline(name, to_t(damaged), keep[None, None], sigma=sigma)[0].permute(1, 2, 0).numpy()
    return restored, time.perf_counter() - start


def is_classic(method: str) -> bool:
    return method != "input" and not method.startswith("vitca")


def method_entry(mean: tuple, per_photo: list) -> dict:
    """One method's JSON entry for one kind: the means and the per-photo figures (each tuple is PSNR, SSIM,
    seconds and, for masked kinds, the PSNR inside the holes)."""
    entry = {
        "psnr": round(mean[0], 3),
        "ssim": round(mean[1], 4),
        "seconds": round(mean[2], 3),
        "psnr_per_photo": [round(x[0], 3) for x in per_photo],
        "ssim_per_photo": [round(x[1], 4) for x in per_photo],
        "seconds_per_photo": [round(x[2], 3) for x in per_photo],
    }
    if len(per_photo[0]) > 3:
        entry["psnr_hole"] = round(float(np.mean([x[3] for x in per_photo])), 3)
        entry["psnr_hole_per_photo"] = [round(x[3], 3) for x in per_photo]
    return entry


def print_paired(rows: dict, a: str = "vitca", b: str = "vitca2") -> dict:
    """vitca2 − vitca per kind (PSNR as in the table), paired over photos, with its 95% interval; and pooled."""
    print(f"\n{b} − {a}, PSNR dB, paired over photos (95% interval):")
    pooled, out = [], {}
    for kind, methods in rows.items():
        d = [q[0] - p[0] for p, q in zip(methods[a], methods[b])]
        pooled += d
        diff, half = mean_interval(d)
        out[kind] = {"diff": round(diff, 3), "half": round(half, 3)}
        print(f"  {kind:<22}{diff:+7.3f} ± {half:.3f}")
    diff, half = mean_interval(pooled)
    out["all kinds"] = {"diff": round(diff, 3), "half": round(half, 3)}
    print(f"  {'all kinds':<22}{diff:+7.3f} ± {half:.3f}  ({len(pooled)} photo × damage pairs)")
    return out


def save_png(folder: Path, name: str, image: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(folder / name)


def models_meta(models: list[Model]) -> dict:
    meta = {}
    for m in models[1:]:
        n = m.label.removeprefix("vitca")
        meta |= {f"weights{n}": m.backend.name, f"iters{n}": m.iters, f"fusion{n}": str(m.fusion or "")}
    return meta
