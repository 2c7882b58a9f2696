"""Turn a training checkpoint (e.g. a run's ``best.pt``) into shipped weights with a manifest entry.

    python -m vitca_cli.training.ship runs/fmnist/best.pt --name fashion-mnist \
        --dataset "FashionMNIST (full train split)"
        [--weights-dir weights] [--val-psnr 21.3 --val-ssim 0.80] [--iterations N] [--trained "how it was trained"]

Keeps only what inference needs (config, model weights, a small meta dict) and drops the optimizer, scheduler,
pool and RNG states; writes ``weights/NAME.pt`` atomically and adds or replaces the ``NAME`` entry of
``weights/manifest.json`` (dataset, channels, training image size, iterations, validation PSNR/SSIM, mask type,
sha256, size, how it was trained). Values missing from the checkpoint's meta are looked up in the run folder's
``metrics.jsonl`` and command line, and can always be given as flags.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from vitca_cli.errors import VitcaError
from vitca_cli.io.checkpoint import read_checkpoint, save_checkpoint
from vitca_cli.io.weights import sha256_file, shipped_dir, write_manifest_entry
from vitca_cli.nca.config import CAConfig

SHIPPED_MAX_BYTES = 1 << 20  # each shipped model stays under 1 MB


def _plain(value, depth: int = 0):
    """Keep JSON-like values only (``torch.load(weights_only=True)`` and the manifest both need them)."""
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth < 4 and isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    if depth < 4 and isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items() if _plain(v, depth + 1) is not None}
    if hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:  # a 0-d tensor
        return _plain(value.item(), depth)
    return None


def _recorded(obj: dict, key: str):
    """``key`` where training records it: in the checkpoint, its ``meta``, its ``best`` record or its ``train``
    configuration (the first that has it)."""
    for scope in (obj, obj.get("meta"), obj.get("best"), obj.get("train")):
        if isinstance(scope, dict) and scope.get(key) is not None:
            return scope[key]
    return None


def best_validation(run_dir: Path) -> dict:
    """The record with the highest validation PSNR in ``run_dir/metrics.jsonl`` (empty if none)."""
    path = run_dir / "metrics.jsonl"
    best: dict = {}
    if not path.is_file():
        return best
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        psnr = rec.get("val_psnr")
        if isinstance(psnr, (int, float)) and psnr > best.get("val_psnr", -math.inf):
            best = {"val_psnr": float(psnr), "val_ssim": rec.get("val_ssim"), "iteration": rec.get("iteration")}
    return best


def training_command(run_dir: Path) -> str | None:
    """How the checkpoint was made: the command lines training appended to its run folder's ``command.txt``."""
    path = run_dir / "command.txt"
    return path.read_text().strip() if path.is_file() else None


def ship(
    checkpoint: Path,
    name: str,
    dataset: str | None = None,
    weights_dir: Path | None = None,
    val_psnr: float | None = None,
    val_ssim: float | None = None,
    iterations: int | None = None,
    trained: str | None = None,
    mask_type: str | None = None,
    notes: str | None = None,
    default_iters: int | None = None,
    default_fusion: bool = False,
    max_iters: int | None = None,
) -> dict:
    """Write ``weights_dir/NAME.pt`` from ``checkpoint`` and its manifest entry; returns the entry. ``max_iters``:
    the most steps the weights are known to improve with (``vitca inpaint`` runs up to that many for deep holes;
    without it, no more than ``default_iters``)."""
    checkpoint = Path(checkpoint)
    weights_dir = Path(weights_dir or shipped_dir())
    obj = read_checkpoint(checkpoint)
    cfg = CAConfig.from_dict(obj["config"])
    run_dir = checkpoint.parent
    best = best_validation(run_dir)
    meta = _plain(obj.get("meta") or {}) or {}

    def pick(given, *keys):
        if given is not None:
            return given
        found = next((v for v in (_recorded(obj, k) for k in keys) if v is not None), None)
        return found if found is not None else best.get(keys[0])

    entry = {
        "name": name,
        "file": f"{name}.pt",
        "dataset": dataset or _recorded(obj, "dataset") or "unknown",
        "channels": cfg.channels,
        "image_size": list(cfg.image_size),
        "patch_size": cfg.patch_size,
        "arch": cfg.arch,
        "pos_encoding": cfg.pos_encoding,
        "iterations": pick(iterations, "iteration", "iterations"),
        "val_psnr": pick(val_psnr, "val_psnr", "best_val_psnr"),
        "val_ssim": pick(val_ssim, "val_ssim", "best_val_ssim"),
        "mask_type": mask_type or _recorded(obj, "mask_type") or "noise",
        "mask_channel": cfg.mask_channel,
        "cell_init": cfg.cell_init,
        "corruptions": _recorded(obj, "corruptions") or "patch",
        "crop_sizes": _recorded(obj, "crop_sizes") or list(cfg.image_size[:1]),
        "trained": trained or training_command(run_dir) or "unknown",
    }
    if default_iters:
        entry["default_iters"] = default_iters
    if max_iters:
        entry["max_iters"] = max_iters
    if default_fusion:
        entry["default_fusion"] = True
        if meta.get("fusion_schedule"):
            entry["fusion_schedule"] = meta["fusion_schedule"]
    if notes:
        entry["notes"] = notes
    entry = {k: _plain(v) for k, v in entry.items()}
    shipped_meta = {**meta, **{k: v for k, v in entry.items() if k not in ("file",)}, "shipped_from": checkpoint.name}
    state = {
        k: v.detach().float().contiguous().clone() if v.is_floating_point() else v.clone()
        for k, v in obj["model"].items()
    }
    out = weights_dir / entry["file"]
    save_checkpoint(out, cfg, state, _plain(shipped_meta))
    entry["sha256"] = sha256_file(out)
    entry["bytes"] = out.stat().st_size
    write_manifest_entry(entry, weights_dir)
    if entry["bytes"] > SHIPPED_MAX_BYTES:
        print(f"warning: {out} is {entry['bytes']} bytes, over the 1 MB shipping budget", file=sys.stderr)
    return entry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, help="a training checkpoint, e.g. RUN/best.pt")
    ap.add_argument("--name", required=True, help="the weights name (what --weights NAME selects)")
    ap.add_argument("--dataset", help="what it was trained on, in words")
    ap.add_argument("--weights-dir", type=Path, help="default: the package's weights/ folder")
    ap.add_argument("--val-psnr", type=float)
    ap.add_argument("--val-ssim", type=float)
    ap.add_argument("--iterations", type=int)
    ap.add_argument("--trained", help="how it was trained (default: the run's command line)")
    ap.add_argument("--mask-type", choices=["dropout", "noise"])
    ap.add_argument("--notes")
    ap.add_argument("--default-iters", type=int, help="CA steps `vitca denoise` runs by default with these weights")
    ap.add_argument(
        "--max-iters",
        type=int,
        help="the most CA steps these weights are known to improve with (`vitca inpaint` runs up to that many for "
        "deep holes; default: no more than --default-iters)",
    )
    ap.add_argument(
        "--default-fusion", action="store_true", help="`vitca denoise` runs fused by default (trained with fusion)"
    )
    args = ap.parse_args(argv)
    try:
        entry = ship(
            args.checkpoint,
            args.name,
            args.dataset,
            args.weights_dir,
            args.val_psnr,
            args.val_ssim,
            args.iterations,
            args.trained,
            args.mask_type,
            args.notes,
            args.default_iters,
            args.default_fusion,
            args.max_iters,
        )
    except VitcaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(entry, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
