"""Inpainting computed only within the holes' reach (``vitca_cli.restore.holes``): the bytes of the whole grid's
computation, and as many steps as the holes are deep."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from vitca_cli.cli import app
from vitca_cli.nca.config import APPENDIX_A1, CAConfig, FusionSchedule
from vitca_cli.nca.model import CellularAutomaton
from vitca_cli.restore import holes
from vitca_cli.restore.backends import TorchBackend
from vitca_cli.restore.loop import restore

ROOT = Path(__file__).resolve().parents[2]
EXACT = ["--compile", "off", "--precision", "fp32", "--threads", "1"]


def hole_mask(h: int, w: int) -> np.ndarray:
    """Separate holes: a 4-px diagonal scribble, a 12-px blob, a notch in the top edge, a strip along the left edge
    and the bottom-right corner."""
    m = np.zeros((h, w), bool)
    for i in range(150):
        m[40 + i // 2 : 44 + i // 2, 30 + i] = True
    m[150:162, 170:182] = True
    m[0:5, 100:112] = True
    m[120:200, 0:3] = True
    m[h - 7 :, w - 9 :] = True
    return m


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def reach_line(log: str) -> tuple[int, float]:
    """The crops and the share of the image's cells computed, from the -v log."""
    found = re.search(r"holes' reach: (\d+) crops; ([\d.]+)% of the image's cells computed", log)
    assert found, log
    return int(found.group(1)), float(found.group(2)) / 100


@pytest.mark.parametrize("weights", ["photo", "photo-fused"])  # photo-fused runs with fusion by default
def test_holes_only_writes_the_same_bytes_as_the_whole_grid(tmp_path, monkeypatch, weights):
    """Real files through the CLI, the exact step: several holes, some at the image's edges, shared out among
    several crops (small cores, so that the scribble crosses from one to the next)."""
    monkeypatch.setattr(holes, "CORE", 96)
    photo = tmp_path / "photo.png"
    Image.open(ROOT / "samples" / "fruits.png").convert("RGB").save(photo)  # 256×240
    w, h = Image.open(photo).size
    missing = hole_mask(h, w)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.where(missing, 255, 0).astype(np.uint8)).save(mask)
    common = ["--mask", mask, "-w", weights, "--iters", "10", *EXACT]
    reach = cli("-v", "inpaint", photo, "-o", tmp_path / "holes.png", *common)
    whole = cli("-v", "inpaint", photo, "-o", tmp_path / "whole.png", *common, "--whole-grid")
    assert reach.exit_code == 0 and whole.exit_code == 0, reach.stderr + whole.stderr
    crops, share = reach_line(reach.stderr)
    assert crops >= 4 and 0 < share < 0.5
    assert "holes' reach" not in whole.stderr
    assert (weights == "photo-fused") == (", fused" in reach.stderr)
    assert (tmp_path / "holes.png").read_bytes() == (tmp_path / "whole.png").read_bytes()
    out, given = np.asarray(Image.open(tmp_path / "holes.png")), np.asarray(Image.open(photo))
    assert np.array_equal(out[~missing], given[~missing]) and not np.array_equal(out[missing], given[missing])


# ---------------------------------------------------------------------------------------------------------------------
# The library: every setting that changes a run, and that the exactness is not vacuous
# ---------------------------------------------------------------------------------------------------------------------
def tiny_backend(patch: int = 1, cell_init: str = "constant") -> TorchBackend:
    """A small random mask-aware model whose every step changes the cells."""
    torch.manual_seed(0)
    cfg = CAConfig(
        channels=3,
        embed=16,
        heads=2,
        mlp=16,
        hidden=4,
        pos_encoding="none",
        mask_channel=True,
        patch_size=patch,
        cell_init=cell_init,
    )
    ca = CellularAutomaton(cfg)
    with torch.no_grad():
        ca.rule.head[1].weight.normal_(0, 0.2)
        ca.rule.head[1].bias.normal_(0, 0.05)
    return TorchBackend(ca, "tiny")


def damaged(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    img = np.random.default_rng(0).random((h, w, 3), dtype=np.float32)
    missing = hole_mask(h, w)
    img[missing] = 0
    return img, ~missing


@pytest.mark.parametrize(
    "patch, size, settings",
    [
        (1, (211, 243), dict(iters=6)),
        (1, (211, 243), dict(iters=6, runs=2, frames=3)),
        (1, (211, 243), dict(iters=8, fusion=True, frames=4)),
        (2, (259, 271), dict(iters=6, fusion=True, runs=2)),  # the fused grid at least a window (64 cells) a side
        (1, (211, 243), dict(iters=6, settle=0.02)),
        (1, (211, 243), dict(iters=6, cell_init="fill")),  # every crop starts from the whole image's fill
    ],
)
def test_holes_only_equals_the_whole_grid_to_the_bit(monkeypatch, patch, size, settings):
    monkeypatch.setattr(holes, "CORE", 64)
    backend = tiny_backend(patch, settings.pop("cell_init", "constant"))
    img, known = damaged(*size)  # odd sizes: padded to whole (and, with fusion, even) cells
    reach = restore(backend, img, known=known, seed=3, **settings)
    whole = restore(backend, img, known=known, seed=3, holes_only=False, tile=0, **settings)
    assert reach.crops > 1 and reach.plan is None and reach.computed < whole.computed
    assert np.array_equal(reach.image, whole.image)
    assert len(reach.frames) == len(whole.frames) == settings.get("frames", 0)
    assert all(np.array_equal(a, b) for a, b in zip(reach.frames, whole.frames))


TWO_LEVELS = FusionSchedule.parse("1,1:1,2")  # 1 step, fused, 1 step, fused again, the rest, divided, 1, 2


@pytest.mark.parametrize(
    "patch, size, settings",
    [
        (1, (259, 271), dict(iters=9, frames=4)),
        (2, (515, 530), dict(iters=6, runs=2)),
        (1, (259, 271), dict(iters=5)),  # no step on the coarsest level
        (1, (259, 271), dict(iters=9, detail=True)),  # divisions that add back the detail
    ],
)
def test_holes_only_equals_the_whole_grid_over_two_fusion_levels(monkeypatch, patch, size, settings):
    """A schedule over two levels: each phase's cone on its own level's grid, crops on multiples of 4 cells, the
    update masks of each level drawn as the whole grid's. (Grids of at least 64 cells a side on the coarsest
    level: a smaller one runs whole, below.)"""
    monkeypatch.setattr(holes, "CORE", 64)
    backend = tiny_backend(patch)
    img, known = damaged(*size)  # padded to multiples of 4 cells
    fusion = replace(TWO_LEVELS, detail=settings.pop("detail", False))
    reach = restore(backend, img, known=known, seed=5, fusion=fusion, **settings)
    whole = restore(backend, img, known=known, seed=5, fusion=fusion, holes_only=False, tile=0, **settings)
    assert reach.crops > 1 and reach.plan is None and reach.computed < whole.computed
    assert np.array_equal(reach.image, whole.image)
    assert all(np.array_equal(a, b) for a, b in zip(reach.frames, whole.frames))
    assert len(reach.frames) == settings.get("frames", 0)


def test_crops_run_cell_by_cell_with_kept_keys_under_the_exact_step_only(monkeypatch):
    """The equalities above run through ``vitca_cli.restore.sparse`` (each step its updating cells, with their
    neighbours' keys and values kept); settling, and the fast step, run the windows."""
    from vitca_cli.restore import sparse

    monkeypatch.setattr(holes, "CORE", 64)
    backend = tiny_backend()
    img, known = damaged(211, 243)
    runs, kept = [], sparse.rollout_kept
    monkeypatch.setattr(sparse, "rollout_kept", lambda *args: runs.append(kept(*args)) or runs[-1])
    restore(backend, img, known=known, iters=6)
    assert len(runs) > 1 and all(run is not None for run in runs)
    runs.clear()
    restore(backend, img, known=known, iters=6, settle=0.02)
    assert not runs
    backend.use_bf16 = True
    assert backend.kept_keys(10, 128) is None


def test_a_coarsest_level_narrower_than_a_window_runs_the_whole_grid(monkeypatch):
    """211×243 cells fused twice: 53×61 cells, one window smaller than 64, whose scalar kernel tails round some
    cells otherwise than the crops' full windows would: the whole grid runs, and the bytes are its own."""
    monkeypatch.setattr(holes, "CORE", 64)
    backend = tiny_backend()
    img, known = damaged(211, 243)
    result = restore(backend, img, known=known, iters=6, fusion=TWO_LEVELS)
    whole = restore(backend, img, known=known, iters=6, fusion=TWO_LEVELS, holes_only=False, tile=0)
    assert result.crops == 0 and result.plan is not None
    assert np.array_equal(result.image, whole.image)
    assert restore(backend, img, known=known, iters=6, fusion=True).crops > 1  # fused once: 106×122 cells


def test_two_level_cones_a_step_short_would_change_the_holes(monkeypatch):
    monkeypatch.setattr(holes, "CORE", 64)
    backend = tiny_backend()
    img, known = damaged(259, 271)
    whole = restore(backend, img, known=known, iters=8, fusion=TWO_LEVELS, holes_only=False, tile=0).image
    last_steps = holes._last_steps
    monkeypatch.setattr(holes, "_last_steps", lambda *a: last_steps(*a) - 1)
    assert not np.array_equal(restore(backend, img, known=known, iters=8, fusion=TWO_LEVELS).image, whole)


def test_crops_of_a_two_level_schedule_reach_as_far_as_the_schedule():
    cfg = CAConfig(channels=3, pos_encoding="none")
    assert holes.reach_cells(cfg, 9, TWO_LEVELS) == TWO_LEVELS.reach(9) == 1 + 2 + 4 * 4 + 2 + 2 + 2 * (1 + 2)
    assert holes.reach_cells(cfg, 9, APPENDIX_A1) == APPENDIX_A1.reach(9) == 2 * 9 - 2
    assert holes.reach_cells(cfg, 9, None) == 9
    maps = holes.until_maps(np.pad(np.ones((4, 4), bool), 14), 9, 1, TWO_LEVELS)
    assert [m.shape for m in maps] == [(32, 32), (16, 16), (8, 8), (16, 16), (32, 32)]
    assert [int(m.max()) for m in maps] == [1, 1, 4, 1, 2]  # each phase's steps, at the holes


def test_a_reach_one_step_short_would_change_the_holes(monkeypatch):
    """The equality above is not vacuous: crops a cell too narrow, or a cone a step too short, change the output."""
    monkeypatch.setattr(holes, "CORE", 64)
    backend = tiny_backend()
    img, known = damaged(200, 230)
    whole = restore(backend, img, known=known, iters=6, holes_only=False, tile=0).image
    reach_cells, last_steps = holes.reach_cells, holes._last_steps
    monkeypatch.setattr(holes, "reach_cells", lambda *a: reach_cells(*a) - 1)
    assert not np.array_equal(restore(backend, img, known=known, iters=6).image, whole)
    monkeypatch.setattr(holes, "reach_cells", reach_cells)
    monkeypatch.setattr(holes, "_last_steps", lambda *a: last_steps(*a) - 1)
    assert not np.array_equal(restore(backend, img, known=known, iters=6).image, whole)
    monkeypatch.setattr(holes, "_last_steps", last_steps)
    assert np.array_equal(restore(backend, img, known=known, iters=6).image, whole)


def test_holes_covering_most_of_the_image_run_the_whole_grid():
    backend = tiny_backend()
    img = np.random.default_rng(1).random((60, 70, 3), dtype=np.float32)
    known = np.random.default_rng(2).random((60, 70)) > 0.3
    result = restore(backend, img, known=known, iters=4)
    assert result.crops == 0 and result.plan is not None


def test_crops_share_out_every_hole_once_on_aligned_edges():
    missing = np.zeros((300, 410), bool)
    missing[10:12, 5:400] = True  # crosses every core of its row
    missing[250:260, 200:210] = True
    missing[299, 409] = True
    crops = holes.plan_crops(missing, margin=9, align=2, min_side=24, core=64)
    count = np.zeros(missing.shape, int)
    for crop in crops:
        (h, w), y0, x0 = crop.size, crop.y0, crop.x0
        assert y0 % 2 == x0 % 2 == h % 2 == w % 2 == 0 and h >= 24 and w >= 24
        assert y0 >= 0 and x0 >= 0 and y0 + h <= 300 and x0 + w <= 410
        count[y0 : y0 + h, x0 : x0 + w] += crop.holes
        own = np.zeros(missing.shape, bool)
        own[y0 : y0 + h, x0 : x0 + w] = crop.holes
        rect = np.zeros(missing.shape, bool)
        rect[y0 : y0 + h, x0 : x0 + w] = True
        assert not (ndimage.binary_dilation(own, np.ones((19, 19), bool)) & ~rect).any()  # its holes' reach: 9 cells
    assert np.array_equal(count, missing.astype(int))


# ---------------------------------------------------------------------------------------------------------------------
# Enough steps for the holes
# ---------------------------------------------------------------------------------------------------------------------
def test_hole_depth_is_the_farthest_missing_pixel_from_a_known_one(monkeypatch):
    scribble = np.zeros((50, 300), bool)
    scribble[20:24, 10:290] = True
    blob = np.zeros((100, 100), bool)
    blob[20:60, 30:70] = True
    assert holes.hole_depth(scribble) == 2.0 and holes.hole_depth(blob) == 20.0
    assert holes.hole_depth(np.zeros((5, 5), bool)) == 0.0 and holes.hole_depth(np.ones((5, 5), bool)) is None
    rng = np.random.default_rng(0)
    for i in range(40):  # random blobs, some at the edges: the cheap search finds the transform's maximum
        if i == 20:  # tiles and margins smaller than the blobs: some holes deeper than the margin
            monkeypatch.setattr(holes, "DEPTH_TILE", 16)
            monkeypatch.setattr(holes, "DEPTH_MARGIN", 5)
        noise = ndimage.gaussian_filter(rng.random((90, 120)), rng.uniform(2, 8))
        missing = noise > np.quantile(noise, rng.uniform(0.5, 0.95))
        assert holes.hole_depth(missing) == ndimage.distance_transform_edt(missing).max()


def test_hole_steps_keep_the_default_for_a_scribble_and_grow_with_a_blob():
    cfg = CAConfig(channels=3, pos_encoding="none")  # a 3×3 neighbourhood, one block: one cell a step
    assert holes.hole_steps(2.0, 32, cfg, 0.5, False, 256) == 32  # a 4-px scribble
    assert holes.hole_steps(20.0, 32, cfg, 0.5, False, 256) == 40  # a 40-px blob: 20 px ÷ 0.5 px a step
    assert holes.hole_steps(20.0, 32, cfg, 1.0, False, 256) == 32
    assert holes.hole_steps(20.0, 24, cfg, 0.5, True, 256) == 24  # fused: 4 + 18 px ÷ 1 px a step = 22
    assert holes.hole_steps(40.0, 24, cfg, 0.5, True, 256) == 42
    assert holes.hole_steps(1000.0, 32, cfg, 0.5, False, 256) == 256
    assert holes.hole_steps(1000.0, 300, cfg, 0.5, False, 256) == 300
    assert holes.hole_steps(None, 32, cfg, 0.5, False, 256) == 32
    assert holes.hole_steps(20.0, 8, CAConfig(channels=3, pos_encoding="none", patch_size=2), 0.5, False, 256) == 20
    assert holes.hole_steps(40.0, 24, cfg, 0.5, APPENDIX_A1, 256) == 42  # a schedule, as True
    # the 5 fixed steps: 0.5 px, 1 px, then 1 px, 2 × 0.5 px on the way up; then 2 px a step on the coarsest level
    assert holes.hole_steps(40.0, 8, cfg, 0.5, TWO_LEVELS, 256) == 5 + 19  # 5 + ⌈(40 - 3.5) / 2⌉


def steps_run(log: str) -> int:
    found = re.search(r", (\d+) steps", log)
    assert found, log
    return int(found.group(1))


def test_inpaint_steps_follow_the_holes_depth_up_to_the_weights_ceiling_unless_iters_is_given(tmp_path):
    from vitca_cli.io.checkpoint import save_checkpoint

    photo = tmp_path / "photo.png"
    Image.open(ROOT / "samples" / "fruits.png").convert("RGB").resize((96, 90)).save(photo)
    scribble, blob = np.zeros((90, 96), np.uint8), np.zeros((90, 96), np.uint8)
    scribble[40:44, 10:80] = 255
    blob[25:65, 28:68] = 255
    Image.fromarray(scribble).save(tmp_path / "scribble.png")
    Image.fromarray(blob).save(tmp_path / "blob.png")
    long_lived = tmp_path / "long.pt"  # weights known to improve up to 64 steps
    model = tiny_backend().model
    save_checkpoint(
        long_lived, model.cfg, model.state_dict(), {"mask_type": "dropout", "default_iters": 8, "max_iters": 64}
    )
    counts, logs = {}, {}
    runs = [("long.pt", "scribble", []), ("long.pt", "blob", []), ("long.pt", "blob", ["--iters", "3"])]
    runs += [("photo", "scribble", []), ("photo", "blob", [])]  # trained on short rollouts: no max_iters
    for weights, mask, extra in runs:
        w = str(long_lived) if weights == "long.pt" else weights
        result = cli(
            "inpaint", photo, "--mask", tmp_path / f"{mask}.png", "-o", tmp_path / "o.png", "--overwrite", "-w", w,
            *EXACT, *extra,
        )  # fmt: skip
        assert result.exit_code == 0, result.stderr
        key = " ".join([weights, mask, *extra])
        counts[key], logs[key] = steps_run(result.stderr), result.stderr
    assert counts == {
        "long.pt scribble": 8,  # 2 px deep: 4 steps, fewer than the default
        "long.pt blob": 40,  # 20 px deep: 20 px ÷ 0.5 px a step
        "long.pt blob --iters 3": 3,
        "photo scribble": 32,
        "photo blob": 32,  # held at the default, and the log says so
    }
    assert "would take 40 steps" in logs["photo blob"] and "--iters runs more" in logs["photo blob"]


def test_the_api_computes_the_holes_reach_with_the_holes_depth_steps_as_the_cli(tmp_path, monkeypatch):
    """``vitca_cli.inpaint`` runs the CLI's per-image path: as many steps as the holes are deep (up to the weights'
    max_iters), only the holes' reach computed, and the CLI's bytes."""
    from vitca_cli import api
    from vitca_cli.io.checkpoint import save_checkpoint
    from vitca_cli.restore import loop

    photo = tmp_path / "photo.png"
    Image.open(ROOT / "samples" / "fruits.png").convert("RGB").resize((200, 190)).save(photo)
    blob = np.zeros((190, 200), bool)
    blob[75:115, 80:120] = True  # 20 px deep: 40 steps at half a pixel a step
    Image.fromarray(np.where(blob, 255, 0).astype(np.uint8)).save(tmp_path / "blob.png")
    weights = tmp_path / "long.pt"
    model = tiny_backend().model
    save_checkpoint(
        weights, model.cfg, model.state_dict(), {"mask_type": "dropout", "default_iters": 8, "max_iters": 64}
    )
    runs = []

    def spy(backend, x, k, size, iters, *rest, **named):
        result = restore_holes(backend, x, k, size, iters, *rest, **named)
        runs.append((iters, None if result is None else result.crops))
        return result

    restore_holes = loop.restore_holes
    monkeypatch.setattr(loop, "restore_holes", spy)
    out = api.inpaint(np.asarray(Image.open(photo)), blob, weights=weights, compile="off", precision="fp32", threads=1)
    result = cli("inpaint", photo, "--mask", tmp_path / "blob.png", "-o", tmp_path / "o.png", "-w", weights, *EXACT)
    assert result.exit_code == 0, result.stderr
    assert runs == [(40, 1), (40, 1)]  # the API's run, then the CLI's
    assert np.array_equal(out, np.asarray(Image.open(tmp_path / "o.png")))
