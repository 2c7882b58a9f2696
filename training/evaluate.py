"""``vitca eval``: the paper's test protocol on a dataset split, with classic baselines beside it.

Protocol (reference §5): each test image is corrupted with the curriculum's test masking (all nine
probability × patch-size combos, ``MaskingSchedule.allowed(-1)``), seeded into the CA, run ``iters`` steps at the
model's update rate (updates stay stochastic at test time), and scored on the clipped output.

Choice made here: the reference draws one combo per batch at random; we **cycle through the nine combos, one per
batch** (batch k uses combo k mod 9), so the combos get equal shares of the test set (exactly equal when the
number of batches is a multiple of 9, e.g. 2000 images in batches of 32) and batches stay homogeneous as in the
reference; the report breaks PSNR down per combo, with image counts. Mask noise comes from a CPU generator seeded
from ``seed``, so the corruption does not depend on the device or on whether baselines run. The CA's update masks
are those ``vitca denoise --seed SEED`` draws (``vitca_cli.nca.rollout.BlockMasks``: per 64×64 block of cells,
the same for every image), so the CA's output for an image is what ``vitca denoise`` gives for that corrupted
image with the same seed, and a run is deterministic for a seed.

Reported (each as mean and 95% interval): per-image PSNR, the reference's per-batch PSNR (one MSE per batch),
SSIM (Gaussian 11×11, σ 1.5), LPIPS (VGG) when its weights are on disk, and the same for the corrupted input
itself and for each baseline; plus images/s of the CA.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from vitca_cli import tables
from vitca_cli.errors import SettingError, UsageError
from vitca_cli.io.weights import home_dir
from vitca_cli.nca.masking import MaskingSchedule, random_mask
from vitca_cli.nca.rollout import BlockMasks, MaskSource, rollout
from vitca_cli.training.metrics import LPIPS, mean_interval, psnr_batch, psnr_per_image, ssim_per_image


# ---------------------------------------------------------------------------------------------------------------------
# Data plumbing
# ---------------------------------------------------------------------------------------------------------------------
def batches(
    dataset, batch_size: int, limit: int | None = None, with_labels: bool = False, drop_last: bool = False
) -> Iterator:
    """Consecutive batches ``(B, C, H, W)`` of the first ``limit`` images of ``dataset`` (``ds[i]`` → image);
    ``drop_last`` leaves out a last, smaller batch (as the reference's test loader does)."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if drop_last:
        n -= n % batch_size
    labels = getattr(dataset, "labels", None)
    for start in range(0, n, batch_size):
        idx = range(start, min(start + batch_size, n))
        # ImageDataset.batch reads (and resizes) a whole batch at once; anything indexable works too
        images = dataset.batch(list(idx)) if hasattr(dataset, "batch") else torch.stack([dataset[i] for i in idx])
        if with_labels:
            yield images, torch.as_tensor([int(labels[i]) for i in idx])
        else:
            yield images


def open_eval_dataset(spec: str, split: str, cfg, data_dir=None):
    """The dataset ``spec`` at the model's training size (no augmentation), checked against the model's channels.

    Image folders are read with the model's channel count (photos become grayscale for a grayscale model).
    """
    from vitca_cli.training.data import open_dataset

    ds = open_dataset(spec, split, data_dir=data_dir, image_size=tuple(cfg.image_size), augment=False)
    if getattr(ds, "files", None) is not None:  # decoded on demand: read them as the model sees images
        ds.channels = cfg.channels
    if len(ds) == 0:
        raise SettingError("dataset", f"{spec}: the {split} split has no images")
    if ds.channels != cfg.channels:
        raise SettingError("dataset", f"{spec} has {ds.channels}-channel images but the model expects {cfg.channels}")
    return ds


# ---------------------------------------------------------------------------------------------------------------------
# Corruption and rollout
# ---------------------------------------------------------------------------------------------------------------------
def schedule_for(meta: dict | None = None, max_patch: int | None = None) -> MaskingSchedule:
    """The masking schedule a checkpoint was trained with (its ``meta["masking"]``), else the default one;
    ``max_patch`` overrides its largest patch size."""
    masking = (meta or {}).get("masking")
    try:
        schedule = MaskingSchedule(**masking) if isinstance(masking, dict) else MaskingSchedule()
    except TypeError:  # a meta from another version: fall back to the reference's defaults
        schedule = MaskingSchedule()
    return dataclasses.replace(schedule, max_patch=max_patch) if max_patch else schedule


def eval_combos(schedule: MaskingSchedule | None = None) -> list[tuple[float, int]]:
    """The test-time (drop probability, patch size) combos: the curriculum with everything unlocked (nine)."""
    return (schedule or MaskingSchedule()).allowed(-1)


def check_patch_sizes(image_size: tuple[int, int], schedule: MaskingSchedule | None = None) -> None:
    """Every test patch size must tile the image (the reference asserts it)."""
    bad = [s for _, s in eval_combos(schedule) if image_size[0] % s or image_size[1] % s]
    if bad:
        raise SettingError(
            "max_patch",
            f"{(schedule or MaskingSchedule()).max_patch}: test mask patch sizes {sorted(set(bad))} do "
            f"not divide the image size {image_size[0]}×{image_size[1]}; pick a largest patch so that 1, max/2 and "
            "max all divide it",
        )


def restore(
    model,
    corrupted: torch.Tensor,
    steps: int,
    masks: MaskSource,
    generator: torch.Generator | None = None,
    device=None,
    known: torch.Tensor | None = None,
    step=None,
) -> torch.Tensor:
    """Seed the CA with ``corrupted`` (random cell init from the CPU ``generator``), run ``steps`` steps with update
    masks from ``masks``, and return the output image (on the CPU, not clipped). With ``known`` ``(B, 1, H, W)``
    (1 = pixel given), a mask-aware model sees it, and known pixels come back as given. ``step`` replaces
    ``model.step`` (same signature; e.g. a restore backend's fast step)."""
    device = device or next(model.parameters()).device
    z = model.seed(corrupted, generator, known).to(device)  # seeded on the CPU: random cell init replays too
    out = model.output(rollout(step or model.step, z, steps, masks)).float().cpu()
    return out if known is None else torch.where(known.bool(), corrupted, out)


# ---------------------------------------------------------------------------------------------------------------------
# LPIPS weights (never downloaded here: the report says why it was skipped)
# ---------------------------------------------------------------------------------------------------------------------
VGG_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16
LPIPS_FILE = "vgg.pth"  # LPIPS v0.1 linear layers


def lpips_weight_paths() -> tuple[Path | None, Path | None, list[Path]]:
    """Where LPIPS's two weight files are, if anywhere: ``(vgg16, linear, searched folders)``.

    Looked for in ``$VITCA_HOME/lpips/``, torch hub's checkpoint cache (where torchvision keeps VGG16), and the
    ``lpips`` / ``torchmetrics`` package folders (which ship the linear layers), without importing those packages.
    """
    import importlib.util

    folders = [home_dir() / "lpips", Path(torch.hub.get_dir()) / "checkpoints"]
    for pkg, sub in (("lpips", "weights/v0.1"), ("torchmetrics", "functional/image/lpips_models")):
        try:
            spec = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            folders.append(Path(list(spec.submodule_search_locations)[0]) / sub)
    vgg = next((f / VGG_FILE for f in folders if (f / VGG_FILE).is_file()), None)
    lin = next((f / LPIPS_FILE for f in folders if (f / LPIPS_FILE).is_file()), None)
    return vgg, lin, folders


def load_lpips(device) -> tuple[LPIPS | None, str]:
    """An LPIPS module and ``"computed"``, or ``None`` and ``"skipped: <why>"``."""
    vgg, lin, folders = lpips_weight_paths()
    missing = [name for name, path in ((VGG_FILE, vgg), (LPIPS_FILE, lin)) if path is None]
    if missing:
        where = ", ".join(str(f) for f in folders[:2])
        return None, (
            f"skipped: LPIPS (VGG) weights not found ({' and '.join(missing)}; looked in {where} and the lpips/"
            f"torchmetrics packages); vitca does not download them: put torchvision's {VGG_FILE} and LPIPS "
            f"v0.1 {LPIPS_FILE} in {folders[0]} to enable it"
        )
    try:
        module = LPIPS(
            torch.load(vgg, map_location="cpu", weights_only=True),
            torch.load(lin, map_location="cpu", weights_only=True),
        )
    except Exception as exc:  # noqa: BLE001 - a broken file only costs this one metric
        return None, f"skipped: LPIPS weights unreadable ({type(exc).__name__}: {exc})"
    return module.to(device), "computed"


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class _Scores:
    """Per-image and per-batch scores of one method."""

    psnr: list = field(default_factory=list)
    psnr_batch: list = field(default_factory=list)
    ssim: list = field(default_factory=list)
    lpips: list = field(default_factory=list)
    seconds: float = 0.0

    def add(self, output: torch.Tensor, target: torch.Tensor, lpips: LPIPS | None) -> None:
        self.psnr += psnr_per_image(output, target).tolist()
        self.psnr_batch.append(psnr_batch(output, target))
        self.ssim += ssim_per_image(output, target).tolist()
        if lpips is not None:
            dev = next(lpips.parameters()).device
            with torch.no_grad():
                self.lpips += lpips(output.to(dev), target.to(dev)).cpu().tolist()

    def summary(self) -> dict:
        out = {}
        for key in ("psnr", "psnr_batch", "ssim", "lpips"):
            values = getattr(self, key)
            if values:
                mean, half = mean_interval(values)
                # Fewer than 3 values (e.g. one or two batches for batch PSNR): a t interval says nothing.
                ci = round(half, 4) if len(values) >= MIN_FOR_INTERVAL else None
                out[key] = {"mean": round(mean, 4), "ci95": ci, "n": len(values)}
            else:
                out[key] = None
        if self.seconds:
            out["images_per_s"] = round(len(self.psnr) / self.seconds, 2)
        return out


def evaluate(
    model,
    data: Iterable[torch.Tensor],
    iters: int = 64,
    mask_type: str = "noise",
    seed: int = 0,
    schedule: MaskingSchedule | None = None,
    update_rate: float | None = None,
    baselines: Iterable[str] = (),
    lpips: LPIPS | None = None,
    progress: Callable[[int], None] | None = None,
    corruptions: str | None = None,
    protocol: str = "cycled",
    step=None,
    runs: int = 1,
) -> dict:
    """Score ``model`` on batches of clean images (CPU tensors in [0, 1]) under the test masking of ``schedule``
    (default: the reference's, max patch 4), or, with ``corruptions`` (a ``vitca_cli.nca.corruptions`` mixture), one
    draw per image from that mixture (patch entries cycle the test combos per batch).

    Returns a JSON-ready dict: settings, one row per method (``vitca``, ``input`` = the corrupted image itself,
    then each baseline) with mean and 95% half-width of each metric, and PSNR per mask combo (or per corruption
    kind) for the CA. Inpainting corruptions are scored as users get them: known pixels kept as given.

    ``protocol``: ``cycled`` (batch k uses combo k mod 9: equal shares, low variance) or ``paper`` (the reference's:
    one combo drawn at random per batch from a generator seeded with ``seed``; feed it batches of 32 with
    ``drop_last``; its headline is the batch PSNR averaged over batches). ``step`` replaces ``model.step`` (see
    :func:`restore`). ``runs`` > 1 scores the mean of that many runs of the CA per batch, run ``r`` with the update
    masks of seed ``seed + r`` (the damage is the same whatever ``runs`` is).
    """
    if runs < 1:
        raise SettingError("runs", f"must be at least 1, got {runs}")
    if protocol not in PROTOCOLS:
        raise SettingError("protocol", f"{protocol!r}: choose from {', '.join(PROTOCOLS)}")
    from vitca_cli.nca.corruptions import mixture_str, parse_mixture

    baselines = list(baselines)
    schedule = schedule or MaskingSchedule()
    combos = eval_combos(schedule)
    mask_gen = torch.Generator().manual_seed(seed)
    ca_gen = torch.Generator().manual_seed(seed + 1)  # random cell init, if the model has it
    rate = model.cfg.update_rate if update_rate is None else update_rate
    update_masks = [BlockMasks(seed + r, rate) for r in range(runs)]
    device = next(model.parameters()).device
    rows = {name: _Scores() for name in ["vitca", "input", *baselines]}
    mixture = parse_mixture(corruptions) if corruptions else None
    draw = random.Random(seed)  # the paper protocol's combo per batch
    per_combo: dict[str, list] = (
        {c.kind: [] for c in mixture} if mixture else {f"p={p:g},patch={s}": [] for p, s in combos}
    )
    n_images = 0
    with torch.inference_mode():
        for k, clean in enumerate(data):
            clean = clean.float()
            if k == 0:
                check_patch_sizes(tuple(clean.shape[-2:]), schedule)
            prob, patch = draw.choice(combos) if protocol == "paper" else combos[k % len(combos)]
            corrupted, known, keep, kinds = _corrupt_batch(clean, prob, patch, mixture, mask_type, mask_gen)
            output, seconds = _timed(
                device,
                lambda: torch.stack(
                    [restore(model, corrupted, iters, m, ca_gen, device, known, step) for m in update_masks]
                ).mean(0),
            )
            rows["vitca"].seconds += seconds
            rows["vitca"].add(output, clean, lpips)
            scores = psnr_per_image(output, clean).tolist()
            for key, value in zip(kinds or [f"p={prob:g},patch={patch}"] * len(scores), scores):
                per_combo[key].append(value)
            rows["input"].add(corrupted, clean, lpips)
            _score_baselines(rows, baselines, corrupted, keep, clean, lpips)
            n_images += clean.shape[0]
            if progress is not None:
                progress(clean.shape[0])
    if n_images == 0:
        raise UsageError("no images to evaluate")
    return {
        "images": n_images,
        "protocol": protocol,
        "headline": "batch PSNR (mean over batches)" if protocol == "paper" else "per-image PSNR",
        "iters": iters,
        "mask_type": mask_type,
        "seed": seed,
        "update_rate": rate,
        "runs": runs,
        "combos": _describe_combos(combos, mixture_str(mixture) if mixture else None, protocol, seed),
        "corruptions": mixture_str(mixture) if mixture else "patch",
        "methods": {name: scores.summary() for name, scores in rows.items()},
        "psnr_per_combo": _combo_summary(per_combo),
        # Each batch's PSNR for the CA, in order: two models evaluated with the same seed see the same masks, so
        # their difference can be judged batch by batch (a paired interval, far narrower than either's own).
        "vitca_batch_psnr": [round(v, 4) for v in rows["vitca"].psnr_batch],
    }


def _combo_summary(per_combo: dict[str, list]) -> dict:
    """Mean PSNR and image count per mask combo (or corruption kind) that scored any image."""
    return {key: {"psnr": round(mean_interval(v)[0], 4), "images": len(v)} for key, v in per_combo.items() if v}


def _corrupt_batch(clean: torch.Tensor, prob: float, patch: int, mixture, mask_type: str, gen: torch.Generator):
    """One batch's corruption: one draw per image from ``mixture`` (patch entries at the combo ``(prob, patch)``), or
    the paper's masking at that combo. Returns (corrupted, known pixels or None, the pixels baselines may keep, the
    kind drawn per image or None)."""
    from vitca_cli.nca.corruptions import corrupt_batch

    if mixture:
        corrupted, known, kinds = corrupt_batch(clean, mixture, gen, mask_type, (prob, patch))
        return corrupted, known, known, kinds
    corrupted, keep = random_mask(clean, prob, patch, mask_type, gen)
    return corrupted, None, keep, None


def _score_baselines(rows: dict, baselines: list[str], corrupted, keep, clean, lpips: LPIPS | None) -> None:
    """Run each baseline on one corrupted batch, adding its time and scores to its row."""
    from vitca_cli.training.baselines import run_baseline

    for name in baselines:
        start = time.perf_counter()
        restored = run_baseline(name, corrupted, keep)
        rows[name].seconds += time.perf_counter() - start
        rows[name].add(restored, clean, lpips)


def _timed(device: torch.device, fn: Callable):
    """``fn()`` and the seconds it took, with the device's queued work finished before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def _describe_combos(combos: list[tuple[float, int]], mixture: str | None, protocol: str, seed: int) -> str:
    """The report's line on how images were corrupted."""
    if mixture:
        return f"mixture {mixture}, one draw per image"
    per_batch = f"one drawn at random per batch (seed {seed})" if protocol == "paper" else "cycled one per batch"
    return (
        f"{len(combos)} test combos (p in {sorted({p for p, _ in combos})} x patch sizes "
        f"{sorted({s for _, s in combos})}), " + per_batch
    )


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------
MIN_FOR_INTERVAL = 3
PROTOCOLS = ("cycled", "paper")
PAPER_BATCH = 32  # the reference's test batch size


def _fmt(metric: dict | None, digits: int) -> str:
    if metric is None:
        return "—"
    mean = metric["mean"]
    if not math.isfinite(mean):
        return str(mean)
    if metric.get("ci95") is None:
        return f"{mean:.{digits}f} (n={metric.get('n', '?')})"
    return f"{mean:.{digits}f} ± {metric['ci95']:.{digits}f}"


def format_report(report: dict) -> str:
    """The report as a plain-text table (one row per method) plus settings lines."""
    header = ["method", "PSNR (dB)", "batch PSNR", "SSIM", "LPIPS", "images/s"]
    lines = []
    for name, m in report["methods"].items():
        lines.append(
            [
                "corrupted input" if name == "input" else name,
                _fmt(m["psnr"], 2),
                _fmt(m["psnr_batch"], 2),
                _fmt(m["ssim"], 4),
                _fmt(m["lpips"], 4),
                f"{m['images_per_s']:.1f}" if m.get("images_per_s") else "—",
            ]
        )
    out = [
        f"{report.get('dataset', '?')} {report.get('split', '')}: {report['images']} images, {report['iters']} CA "
        f"steps at σ={report['update_rate']:g}"
        + (f", the mean of {report['runs']} runs" if report.get("runs", 1) > 1 else "")
        + f", {report['mask_type']} masking, seed {report['seed']}",
        f"corruption: {report['combos']}; protocol {report.get('protocol', 'cycled')}, headline: "
        f"{report.get('headline', 'per-image PSNR')}",
        tables.format_table(header, lines),
        f"means ± 95% interval (none where fewer than {MIN_FOR_INTERVAL} values: (n=…)); PSNR/SSIM/LPIPS on clipped "
        f"images; batch PSNR = one MSE per batch (batch size {report.get('batch_size', '?')}), as in the reference",
        f"LPIPS: {report.get('lpips', 'skipped')}",
        f"images/s on {report.get('device', '?')} ({report.get('threads', '?')} threads), CA steps or baseline only; "
        f"CA step: {report.get('step', 'exact (eager, fp32)')}",
        "CA PSNR per combo: "
        + ", ".join(f"{k} {v['psnr']:.2f} ({v['images']})" for k, v in report["psnr_per_combo"].items()),
    ]
    return "\n".join(out)
