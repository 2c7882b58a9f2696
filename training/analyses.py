"""The appendix analyses (A.3, Fig. 4, 7): how a trained CA behaves outside its training conditions.

Each analysis runs the CA on a few test images, writes a PNG figure plus the same numbers as CSV and JSON into
an output folder, and returns a result dict whose ``table`` is printed by ``vitca analyze``:

- ``update-rate``  σ = 0.25, 0.5, 1.0 at test time: PSNR against iteration and iterations to converge.
- ``unseen-noise`` corruptions never seen in training (additive Gaussian, salt-and-pepper, larger patches), an
  unmasked and a fully masked input: PSNR against iteration, final quality and the final cell-state range.
- ``head-masking`` every subset of attention heads silenced: output quality and each head's attention map.
- ``stability``    many iterations (1000 by default): PSNR and the cell-state range at every step.

The figures and the table files are made by ``training/figures.py``.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch
from PIL import Image

from vitca_cli.errors import SettingError, UsageError
from vitca_cli.nca.masking import parse_corruption, random_mask
from vitca_cli.nca.rollout import BlockMasks, rollout
from vitca_cli.training.figures import image_grid, line_chart, save_png, save_table, stack_vertically
from vitca_cli.training.metrics import psnr_per_image, ssim_per_image

KINDS = ("update-rate", "unseen-noise", "head-masking", "stability")
DEFAULT_ITERS = {"update-rate": 64, "unseen-noise": 64, "head-masking": 64, "stability": 1000}
CONVERGE_TOL_DB = 0.25  # "converged": PSNR stays within this of its final value from then on
DIVERGED_ABS = 100.0  # a cell state beyond this magnitude (or non-finite) counts as divergence


# ---------------------------------------------------------------------------------------------------------------------
# Corruptions, including the unseen ones
# ---------------------------------------------------------------------------------------------------------------------
def corrupt_spec(x: torch.Tensor, spec: str, gen: torch.Generator) -> torch.Tensor:
    """Apply a ``parse_corruption`` spec (``p=…,patch=…,type=…``) with ``random_mask``, or nothing for ``none``."""
    if spec.strip().lower() == "none":
        return x.clone()
    try:
        prob, patch, kind = parse_corruption(spec)
    except ValueError as exc:
        raise SettingError("corruption", f"{spec!r}: {exc}") from None
    return random_mask(x, prob, patch, kind, gen)[0]


def unseen_conditions(mask_type: str) -> dict[str, callable]:
    """The corruptions of the unseen-noise analysis, each a function ``(x, generator) -> corrupted``."""

    def trained(x, g):
        return corrupt_spec(x, f"p=0.5,patch=2,type={mask_type}", g)

    def gaussian(x, g):
        return x + 0.2 * torch.randn(x.shape, generator=g)

    def salt_pepper(x, g):
        b, _, h, w = x.shape
        hit = torch.rand(b, 1, h, w, generator=g) < 0.2
        salt = (torch.rand(b, 1, h, w, generator=g) < 0.5).to(x.dtype)
        return torch.where(hit, salt.expand_as(x), x)

    def large_patches(x, g):
        return corrupt_spec(x, f"p=0.5,patch=8,type={mask_type}", g)

    def unmasked(x, g):
        return x.clone()

    def fully_masked(x, g):
        return corrupt_spec(x, f"p=1,patch=1,type={mask_type}", g)

    return {
        f"trained-like 2x2 p=0.5 {mask_type}": trained,
        "gaussian sd=0.2": gaussian,
        "salt & pepper 20%": salt_pepper,
        f"8x8 patches p=0.5 {mask_type}": large_patches,
        "unmasked": unmasked,
        f"fully masked {mask_type}": fully_masked,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Tracking a rollout
# ---------------------------------------------------------------------------------------------------------------------
class Trace:
    """Per-step PSNR and cell-state range of a rollout (a ``rollout`` callback)."""

    def __init__(self, model, target: torch.Tensor, keep_at: tuple[int, ...] = ()):
        self.model, self.target, self.keep_at = model, target, set(keep_at)
        self.psnr: list[float] = []
        self.out_range: list[tuple[float, float]] = []
        self.hidden_range: list[tuple[float, float]] = []
        self.snapshots: dict[int, torch.Tensor] = {}

    def __call__(self, t: int, z: torch.Tensor) -> None:
        out = self.model.output(z).float().cpu()
        self.psnr.append(float(psnr_per_image(out, self.target).mean()))
        o, hdn = z[:, self.model.cfg.output_slice], self.model.hidden(z)
        self.out_range.append((float(o.min()), float(o.max())))
        self.hidden_range.append((float(hdn.min()), float(hdn.max())) if hdn.numel() else (0.0, 0.0))
        if t in self.keep_at:
            self.snapshots[t] = out[0]

    def max_abs(self) -> float:
        values = [abs(v) for pair in self.out_range + self.hidden_range for v in pair]
        return max(values) if all(map(math.isfinite, values)) else float("inf")


def iterations_to_converge(psnr: list[float], tol: float = CONVERGE_TOL_DB) -> int:
    """First iteration (1-based) from which PSNR stays within ``tol`` dB of its final value."""
    final = psnr[-1]
    t = len(psnr)
    while t > 0 and abs(psnr[t - 1] - final) <= tol:
        t -= 1
    return t + 1


def _run(
    model,
    corrupted: torch.Tensor,
    clean: torch.Tensor,
    steps: int,
    seed: int,
    rate=None,
    head_mask=None,
    keep_attention=False,
    keep_at=(),
) -> tuple[Trace, torch.Tensor]:
    device = next(model.parameters()).device
    trace = Trace(model, clean, keep_at)
    gen = torch.Generator().manual_seed(seed)
    masks = BlockMasks(seed, model.cfg.update_rate if rate is None else rate)  # as `vitca denoise --seed` draws
    with torch.inference_mode():
        z = model.seed(corrupted, gen).to(device)
        z = rollout(
            model.step,
            z,
            steps,
            masks,
            head_mask.to(device) if head_mask is not None else None,
            keep_attention,
            callback=trace,
        )
    return trace, model.output(z).float().cpu()


def _snapshot_steps(steps: int) -> tuple[int, ...]:
    marks = [1, 8, 16, 32, 64, 128, 256, 512, 1000, steps]
    return tuple(sorted({m for m in marks if m <= steps}))


# ---------------------------------------------------------------------------------------------------------------------
# The analyses
# ---------------------------------------------------------------------------------------------------------------------
def update_rate(model, clean, out_dir: Path, iters: int, seed: int, corruption: str, rates=(0.25, 0.5, 1.0)) -> dict:
    """Appendix A.3 / Fig. 4d: PSNR against iteration at test-time update rates ``rates``."""
    corrupted = corrupt_spec(clean, corruption, torch.Generator().manual_seed(seed))
    marks = _snapshot_steps(iters)
    rows, series, grid, labels = [], {}, [], []
    for rate in rates:
        trace, out = _run(model, corrupted, clean, iters, seed + 1, rate=rate, keep_at=marks)
        series[f"rate {rate:g}"] = (list(range(1, iters + 1)), trace.psnr)
        rows.append(
            {
                "update_rate": rate,
                "final_psnr": round(trace.psnr[-1], 3),
                "best_psnr": round(max(trace.psnr), 3),
                "iterations_to_converge": iterations_to_converge(trace.psnr),
                "final_ssim": round(float(ssim_per_image(out, clean).mean()), 4)
                if min(clean.shape[-2:]) >= 11
                else None,
            }
        )
        grid.append([corrupted[0], *[trace.snapshots[m] for m in marks], clean[0]])
        labels.append(f"update rate {rate:g}")
    chart = line_chart(series, f"PSNR vs CA iteration ({corruption})", "iteration", "PSNR (dB)")
    strip = image_grid(grid, labels, ["input", *[f"t={m}" for m in marks], "target"])
    return _finish(
        out_dir,
        "update-rate",
        stack_vertically([chart, strip]),
        rows,
        {
            "corruption": corruption,
            "iters": iters,
            "images": len(clean),
            "seed": seed,
            "converge_tolerance_db": CONVERGE_TOL_DB,
        },
    )


def unseen_noise(model, clean, out_dir: Path, iters: int, seed: int, mask_type: str) -> dict:
    """Appendix A.3 / Fig. 4e, 4g: unseen corruptions, unmasked and fully masked inputs."""
    marks = _snapshot_steps(iters)
    rows, series, grid, labels = [], {}, [], []
    for k, (name, fn) in enumerate(unseen_conditions(mask_type).items()):
        corrupted = fn(clean, torch.Generator().manual_seed(seed + 10 * k))
        trace, out = _run(model, corrupted, clean, iters, seed + 1, keep_at=marks)
        series[name] = (list(range(1, iters + 1)), trace.psnr)
        lo = min(min(r[0] for r in trace.out_range), min(r[0] for r in trace.hidden_range))
        hi = max(max(r[1] for r in trace.out_range), max(r[1] for r in trace.hidden_range))
        rows.append(
            {
                "condition": name,
                "input_psnr": round(float(psnr_per_image(corrupted, clean).mean()), 3),
                "final_psnr": round(trace.psnr[-1], 3),
                "best_psnr": round(max(trace.psnr), 3),
                "final_ssim": round(float(ssim_per_image(out, clean).mean()), 4)
                if min(clean.shape[-2:]) >= 11
                else None,
                "state_min": round(lo, 4),
                "state_max": round(hi, 4),
                "diverged": not (trace.max_abs() <= DIVERGED_ABS),
            }
        )
        grid.append([corrupted[0], *[trace.snapshots[m] for m in marks], clean[0]])
        labels.append(name)
    chart = line_chart(series, "PSNR vs CA iteration, unseen inputs", "iteration", "PSNR (dB)", size=(820, 420))
    strip = image_grid(grid, labels, ["input", *[f"t={m}" for m in marks], "target"])
    return _finish(
        out_dir,
        "unseen-noise",
        stack_vertically([chart, strip]),
        rows,
        {"iters": iters, "images": len(clean), "seed": seed, "mask_type": mask_type},
    )


def head_masking(model, clean, out_dir: Path, iters: int, seed: int, corruption: str = "none") -> dict:
    """Appendix Fig. 7: every subset of heads silenced; outputs and each head's attention map.

    The map shown per head is, for each cell, the attention weight it gives to its neighbours rather than to
    itself (1 − self-weight) at the last step, first block, first image: bright = looks around. All maps in the
    figure share one contrast stretch, 1st to 99th percentile (its range is in the JSON).
    """
    if model.cfg.arch != "vitca":
        raise UsageError("head masking needs a ViTCA model (UNetCA has no attention heads)")
    heads = model.cfg.heads
    nh, nw = model.cfg.neighbourhood
    centre = (nh * nw) // 2
    corrupted = corrupt_spec(clean, corruption, torch.Generator().manual_seed(seed))
    subsets = sorted(  # none, each head alone, pairs, … in index order
        itertools.product((0, 1), repeat=heads), key=lambda s: (sum(s), [i for i, v in enumerate(s) if v])
    )
    rows, grid, labels = [], [], []
    for subset in subsets:
        mask = torch.tensor(subset, dtype=torch.float32)
        trace, out = _run(model, corrupted, clean, iters, seed + 1, head_mask=mask, keep_attention=True)
        attn = model.last_attention[0][0].float().cpu()  # h w heads n
        maps = [1.0 - attn[..., i, centre] for i in range(heads)]
        masked = [i + 1 for i, s in enumerate(subset) if s]
        label = "masked: " + (",".join(map(str, masked)) if masked else "none")
        rows.append(
            {
                "masked_heads": ",".join(map(str, masked)) or "none",
                "psnr": round(trace.psnr[-1], 3),
                "ssim": round(float(ssim_per_image(out, clean).mean()), 4) if min(clean.shape[-2:]) >= 11 else None,
                "mean_neighbour_attention": round(float(torch.stack(maps).mean()), 4),
            }
        )
        grid.append([out[0], *maps])
        labels.append(label)
    # One contrast stretch (1st-99th percentile of every map in the figure), so heads and subsets stay comparable
    # and a few extreme cells do not wash the rest out.
    all_maps = torch.stack([m for row in grid for m in row[1:]]).flatten()
    lo, hi = (float(v) for v in torch.quantile(all_maps, torch.tensor([0.01, 0.99])))
    scale = max(hi - lo, 1e-6)
    grid = [
        [
            corrupted[0] if i == 0 else None,
            clean[0] if i == 0 else None,
            row[0],
            *[((m - lo) / scale).clamp(0, 1) for m in row[1:]],
        ]
        for i, row in enumerate(grid)
    ]
    columns = ["input", "target", "output", *[f"head {i + 1}" for i in range(heads)]]
    fig = image_grid(grid, labels, columns, cell=80)
    return _finish(
        out_dir,
        "head-masking",
        fig,
        rows,
        {
            "iters": iters,
            "images": len(clean),
            "seed": seed,
            "corruption": corruption,
            "attention_map": "1 - self-attention weight, last step, block 1, image 1",
            "attention_map_range": [round(lo, 4), round(hi, 4)],
        },
    )


def stability(model, clean, out_dir: Path, iters: int, seed: int, corruption: str) -> dict:
    """Appendix A.3: run ``iters`` (1000) steps and report the PSNR and cell-state range as it goes."""
    corrupted = corrupt_spec(clean, corruption, torch.Generator().manual_seed(seed))
    marks = _snapshot_steps(iters)
    trace, _ = _run(model, corrupted, clean, iters, seed + 1, keep_at=marks)
    steps = list(range(1, iters + 1))
    rows = [
        {
            "iteration": m,
            "psnr": round(trace.psnr[m - 1], 3),
            "output_min": round(trace.out_range[m - 1][0], 4),
            "output_max": round(trace.out_range[m - 1][1], 4),
            "hidden_min": round(trace.hidden_range[m - 1][0], 4),
            "hidden_max": round(trace.hidden_range[m - 1][1], 4),
        }
        for m in marks
    ]
    psnr_chart = line_chart(
        {"PSNR": (steps, trace.psnr)}, f"PSNR over {iters} iterations ({corruption})", "iteration", "PSNR (dB)"
    )
    range_chart = line_chart(
        {
            "output min": (steps, [r[0] for r in trace.out_range]),
            "output max": (steps, [r[1] for r in trace.out_range]),
            "hidden min": (steps, [r[0] for r in trace.hidden_range]),
            "hidden max": (steps, [r[1] for r in trace.hidden_range]),
        },
        "cell-state range",
        "iteration",
        "value",
    )
    strip = image_grid(
        [[corrupted[0], *[trace.snapshots[m] for m in marks], clean[0]]],
        ["image 1"],
        ["input", *[f"t={m}" for m in marks], "target"],
    )
    max_abs = trace.max_abs()
    return _finish(
        out_dir,
        "stability",
        stack_vertically([psnr_chart, range_chart, strip]),
        rows,
        {
            "iters": iters,
            "images": len(clean),
            "seed": seed,
            "corruption": corruption,
            "max_abs_state": max_abs,
            "diverged": not (max_abs <= DIVERGED_ABS),
        },
    )


def _finish(out_dir: Path, name: str, figure: Image.Image, rows: list[dict], extra: dict) -> dict:
    out_dir = Path(out_dir)
    png = out_dir / f"{name}.png"
    save_png(png, figure)
    files = [png, *save_table(out_dir, name, rows, extra)]
    return {"kind": name, **extra, "table": rows, "files": [str(f) for f in files]}


def run_analysis(
    kind: str,
    model,
    clean: torch.Tensor,
    out_dir: Path,
    iters: int | None = None,
    seed: int = 0,
    mask_type: str = "noise",
    corruption: str | None = None,
) -> dict:
    """Run analysis ``kind`` on the clean images ``clean`` ``(B, C, H, W)`` and write its files to ``out_dir``."""
    if kind not in KINDS:
        raise UsageError(f"unknown analysis {kind!r}; choose from {', '.join(KINDS)}")
    iters = iters or DEFAULT_ITERS[kind]
    default = "none" if kind == "head-masking" else f"p=0.5,patch=2,type={mask_type}"
    corruption = corruption or default
    clean = clean.float()
    if kind == "update-rate":
        return update_rate(model, clean, out_dir, iters, seed, corruption)
    if kind == "unseen-noise":
        return unseen_noise(model, clean, out_dir, iters, seed, mask_type)
    if kind == "head-masking":
        return head_masking(model, clean, out_dir, iters, seed, corruption)
    return stability(model, clean, out_dir, iters, seed, corruption)
