"""The restore library: padding, tiling and blending, reproducible masks, backends, frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitca_cli.errors import UsageError
from vitca_cli.nca.config import CAConfig
from vitca_cli.nca.model import CellularAutomaton
from vitca_cli.restore.backends import TorchBackend
from vitca_cli.restore.loop import (
    MASK_BLOCK,
    UpdateMasks,
    corrupt,
    frame_schedule,
    mask_missing,
    restore,
)
from vitca_cli.restore.tiles import TILE_CELLS, plan_tiles

SMALL = dict(embed=16, heads=2, mlp=16, hidden=4)


def small_backend(**cfg_kw) -> TorchBackend:
    """A tiny CA with a non-zero head, so every step changes the cells."""
    torch.manual_seed(0)
    cfg = CAConfig(**{**SMALL, **cfg_kw})
    ca = CellularAutomaton(cfg)
    with torch.no_grad():
        head = ca.rule.head[1]
        head.weight.normal_(0, 0.2)
        head.bias.normal_(0, 0.05)
    return TorchBackend(ca, "tiny")


def rand_image(h, w, c=1, seed=0):
    return np.random.default_rng(seed).random((h, w, c), dtype=np.float32)


def test_output_keeps_size_when_not_divisible_by_patch():
    backend = small_backend(patch_size=2, pos_encoding="none")
    out = restore(backend, rand_image(13, 11), iters=3).image
    assert out.shape == (13, 11, 1)
    assert np.isfinite(out).all()


def test_size_dependent_model_pads_small_images_to_training_size():
    backend = small_backend(pos_encoding="vit", image_size=(16, 16))
    result = restore(backend, rand_image(10, 7), iters=2)
    assert result.image.shape == (10, 7, 1)
    assert result.plan.tile == (16, 16) and result.plan.count == 1


def test_same_seed_same_output_other_seed_differs():
    backend = small_backend(pos_encoding="none")
    img = rand_image(12, 12)
    a = restore(backend, img, iters=4, seed=3).image
    b = restore(backend, img, iters=4, seed=3).image
    c = restore(backend, img, iters=4, seed=4).image
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_runs_average_the_runs_of_consecutive_seeds_tiled_or_not():
    backend = small_backend(pos_encoding="none")
    img = rand_image(12, 12)
    one = [restore(backend, img, iters=4, seed=s).image for s in (3, 4, 5)]
    mean = restore(backend, img, iters=4, seed=3, runs=3)
    assert np.allclose(mean.image, np.mean(one, axis=0), atol=1e-6)
    assert not np.allclose(mean.image, one[0], atol=1e-3)
    assert mean.dense == 3 * restore(backend, img, iters=4, seed=3).dense
    tiled = restore(backend, img, iters=4, seed=3, runs=3, tile=8)
    assert np.allclose(tiled.image, mean.image, atol=1e-5)
    with pytest.raises(UsageError, match="runs"):
        restore(backend, img, iters=4, runs=0)


def test_restore_matches_a_plain_rollout_with_the_same_masks():
    backend = small_backend(pos_encoding="none")
    img = rand_image(9, 10)
    steps = 5
    out = restore(backend, img, iters=steps, seed=7).image
    masks = UpdateMasks(7, steps, 0.5).window(0, 0, 9, 10).float()  # T 1 h w
    z = backend.model.seed(torch.from_numpy(img).permute(2, 0, 1)[None])
    with torch.no_grad():
        z = backend.model(z, steps, masks=masks[:, None])
    expected = backend.model.output(z)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_masks_of_a_window_equal_the_same_cells_of_the_whole_grid():
    masks = UpdateMasks(seed=1, steps=3, rate=0.5)
    whole = masks.window(0, 0, 2 * MASK_BLOCK + 5, MASK_BLOCK + 9)
    part = masks.window(MASK_BLOCK - 3, 17, MASK_BLOCK + 6, MASK_BLOCK - 10)
    assert torch.equal(part, whole[..., MASK_BLOCK - 3 : 2 * MASK_BLOCK + 3, 17 : MASK_BLOCK + 7])
    rate = whole.float().mean().item()
    assert 0.45 < rate < 0.55


@pytest.mark.parametrize("patch", [1, 2])
def test_tiled_equals_untiled_for_a_size_agnostic_model(patch):
    backend = small_backend(pos_encoding="none", patch_size=patch)
    img = rand_image(30 * patch + 1, 27 * patch, seed=patch)
    iters = 3
    untiled = restore(backend, img, iters=iters, tile=0)
    tiled = restore(backend, img, iters=iters, tile=16 * patch)
    assert untiled.plan.count == 1
    assert tiled.plan.count >= 4 and tiled.plan.exact
    np.testing.assert_allclose(tiled.image, untiled.image, atol=1e-5)


@pytest.mark.parametrize("patch", [1, 2])
def test_fused_tiles_equal_the_fused_untiled_run(patch):
    backend = small_backend(pos_encoding="none", patch_size=patch)
    img = rand_image(45 * patch + 1, 39 * patch, seed=patch)  # odd cell counts: padded to even for fusion
    untiled = restore(backend, img, iters=6, tile=0, fusion=True)
    tiled = restore(backend, img, iters=6, tile=25 * patch, fusion=True)
    assert tiled.plan.count >= 4 and tiled.plan.exact
    assert all(o % 2 == 0 for o in tiled.plan.ys + tiled.plan.xs) and tiled.plan.tile[0] % 2 == 0
    np.testing.assert_allclose(tiled.image, untiled.image, atol=1e-5)
    assert untiled.image.shape == img.shape


def test_fusion_runs_the_middle_steps_on_the_fused_grid():
    backend = small_backend(pos_encoding="none")
    img = rand_image(32, 32)
    plain = restore(backend, img, iters=12, tile=0, frames=12)
    fused = restore(backend, img, iters=12, tile=0, frames=12, fusion=True)
    # 2 + 2 full steps and 8 at a quarter of the cells: a third of the dense run's cell-steps.
    assert fused.computed == 32 * 32 * 4 + 16 * 16 * 8 and plain.computed == 32 * 32 * 12
    np.testing.assert_allclose(fused.frames[1], plain.frames[1], atol=1e-6)  # the same first two steps
    middle = fused.frames[6]  # on the fused grid: shown with each 2×2 group of pixels alike
    assert np.array_equal(middle[0::2, 0::2], middle[1::2, 1::2]) and not np.allclose(middle, plain.frames[6])
    np.testing.assert_array_equal(fused.frames[-1], fused.image)
    assert len(fused.frames) == 12 and not np.allclose(fused.image, plain.image)


def test_fusion_refused_where_it_cannot_run():
    with pytest.raises(UsageError, match="at least 4"):
        restore(small_backend(pos_encoding="none"), rand_image(8, 8), iters=3, fusion=True)
    with pytest.raises(UsageError, match="position encoding"):
        restore(small_backend(pos_encoding="vit", image_size=(8, 8)), rand_image(8, 8), iters=6, fusion=True)


def test_too_small_a_margin_would_show_the_tile_edges(monkeypatch):
    """The exactness above is not vacuous: tiles without the margin differ from the untiled run."""
    import vitca_cli.restore.tiles as r

    backend = small_backend(pos_encoding="none")
    img = rand_image(40, 40)
    untiled = restore(backend, img, iters=6, tile=0).image
    monkeypatch.setattr(r, "MAX_MARGIN", 0)
    tiled = restore(backend, img, iters=6, tile=16)
    assert not tiled.plan.exact
    assert np.abs(tiled.image - untiled).max() > 1e-4


def test_size_dependent_tiles_are_the_training_size_and_blend_smoothly():
    cfg = CAConfig(**SMALL, pos_encoding="vit", image_size=(28, 28))
    plan = plan_tiles(cfg, (100, 61), iters=64)
    assert plan.tile == (28, 28)
    # Weights form a partition that every cell is covered by, with no jumps larger than one ramp step.
    total = torch.zeros(100, 61)
    for y, x in plan.origins:
        total[y : y + 28, x : x + 28] += plan.weights(y, x)
    assert (total > 0).all()
    for y, x in plan.origins:
        w = plan.weights(y, x)
        assert w.diff(dim=0).abs().max() <= 1 / (plan.band + 1) + 1e-6
        assert w.diff(dim=1).abs().max() <= 1 / (plan.band + 1) + 1e-6
    # Blending a constant field through the weights gives the constant back (no seams from normalisation).
    acc = torch.zeros(100, 61)
    for y, x in plan.origins:
        acc[y : y + 28, x : x + 28] += 0.7 * plan.weights(y, x)
    torch.testing.assert_close(acc / total, torch.full((100, 61), 0.7))


def test_size_dependent_run_over_several_tiles():
    backend = small_backend(pos_encoding="vit", image_size=(8, 8))
    result = restore(backend, rand_image(20, 13), iters=2)
    assert result.plan.count > 1 and result.plan.tile == (8, 8)
    assert result.image.shape == (20, 13, 1) and np.isfinite(result.image).all()


def test_memory_stays_bounded_for_a_4000_by_3000_photo():
    """A 12-megapixel photo is cut into as few tiles as fit the tile budget, each with its exact margin."""
    agnostic = CAConfig(channels=3, pos_encoding="none")
    plan = plan_tiles(agnostic, (3000, 4000), iters=64)
    assert 1 < plan.count <= 4 and plan.tile[0] * plan.tile[1] <= TILE_CELLS
    assert plan.exact and plan.margin == 64
    assert plan.count * plan.tile[0] * plan.tile[1] < 1.1 * 3000 * 4000  # overlaps cost under 10%
    small = plan_tiles(CAConfig(channels=3, pos_encoding="vit", image_size=(32, 32)), (3000, 4000), iters=64)
    assert small.tile == (32, 32)
    for p in (plan, small):  # every cell is covered by some tile
        assert p.ys[0] == 0 and p.ys[-1] + p.tile[0] == 3000
        assert p.xs[0] == 0 and p.xs[-1] + p.tile[1] == 4000


def test_a_step_never_holds_more_than_max_cells_whatever_the_image():
    """Each backend call sees at most ``max_cells`` cells: a step's memory does not grow with the image."""
    backend = small_backend(pos_encoding="none")
    shapes = []
    step_rows = backend.step_rows
    backend.step_rows = lambda z, only: (shapes.append(tuple(z.shape)), step_rows(z, only))[1]
    img = rand_image(150, 170)
    out = restore(backend, img, iters=2, max_cells=3 * 64 * 64).image
    assert max(s[0] * s[1] * s[2] for s in shapes) <= 3 * 64 * 64
    assert len({s[1:3] for s in shapes}) == 1  # one window shape: backends see few shapes
    backend.step_rows = step_rows
    # ... and windowed steps equal whole-grid steps with the same masks.
    masks = UpdateMasks(0, 2, 0.5).window(0, 0, 150, 170).float()
    z = backend.model.seed(torch.from_numpy(img).permute(2, 0, 1)[None])
    with torch.no_grad():
        z = backend.model(z, 2, masks=masks[:, None])
    np.testing.assert_allclose(out, backend.model.output(z)[0].permute(1, 2, 0).numpy(), atol=1e-5)


def test_a_window_updates_its_core_cells_only():
    """A window's halo cells are read as neighbours but never updated (their update would be thrown away); every
    cell of the image is updated by exactly one window, with the whole grid's mask."""
    backend = small_backend(pos_encoding="none")
    selected = []
    step_rows = backend.step_rows
    backend.step_rows = lambda z, only: (selected.append(len(only)), step_rows(z, only))[1]
    restore(backend, rand_image(150, 170), iters=3, max_cells=64 * 64)
    backend.step_rows = step_rows
    full = UpdateMasks(0, 3, 0.5).window(0, 0, 150, 170)
    assert sum(selected) == full.sum().item()  # halo cells would add to the windows' count


def test_a_backend_with_whole_window_steps_only_restores_the_same_image():
    """A backend without ``step_rows`` (ONNX Runtime's) steps whole windows with a mask of the updating cells; the
    restored image is the one that the rows-only step gives."""
    backend = small_backend(pos_encoding="none")

    class WindowSteps:  # the torch backend seen through its whole-window step only
        cfg, tensor_device = backend.cfg, backend.tensor_device

        def step(self, z, m):
            assert z.shape[1] == backend.cfg.cell_channels and m.shape[1] == 1
            return backend.step(z, m)

    img = rand_image(150, 170)
    rows = restore(backend, img, iters=3, max_cells=2 * 64 * 64, settle=0.01)
    whole = restore(WindowSteps(), img, iters=3, max_cells=2 * 64 * 64, settle=0.01)
    np.testing.assert_allclose(whole.image, rows.image, atol=1e-5)
    assert (whole.computed, whole.skipped) == (rows.computed, rows.skipped)


def test_tile_options_checked_against_the_model():
    backend = small_backend(pos_encoding="vit", image_size=(8, 8))
    with pytest.raises(UsageError):
        restore(backend, rand_image(8, 8), iters=1, tile=0)
    with pytest.raises(UsageError):
        restore(backend, rand_image(8, 8), iters=1, tile=16)
    with pytest.raises(UsageError):
        restore(backend, rand_image(8, 8), iters=0)


def test_frames_follow_the_schedule_and_end_at_the_result():
    assert frame_schedule(64, 8) == [8, 16, 24, 32, 40, 48, 56, 64]
    assert frame_schedule(3, 10) == [1, 2, 3]
    backend = small_backend(pos_encoding="none")
    result = restore(backend, rand_image(10, 10), iters=6, frames=3)
    assert result.frame_steps == [2, 4, 6]
    assert len(result.frames) == 3
    np.testing.assert_array_equal(result.frames[-1], result.image)
    assert not np.allclose(result.frames[0], result.image)


def test_corruption_is_seeded_and_patchy():
    img = np.full((10, 9, 1), 0.5, np.float32)
    a = corrupt(img, 0.5, 4, "dropout", seed=1)
    assert np.array_equal(a, corrupt(img, 0.5, 4, "dropout", seed=1))
    dropped = a[..., 0] == 0
    assert 0 < dropped.mean() < 1
    assert dropped[:4, :4].all() or not dropped[:4, :4].any()  # whole 4×4 patches
    noisy = corrupt(img, 1.0, 1, "noise", seed=1)
    assert noisy.std() > 0.5


def test_mask_missing_touches_only_missing_pixels():
    img = rand_image(6, 5, 3)
    missing = np.zeros((6, 5), bool)
    missing[2:4, 1:3] = True
    out = mask_missing(img, missing, "dropout")
    assert np.array_equal(out[~missing], img[~missing])
    assert (out[missing] == 0).all()
    noisy = mask_missing(img, missing, "noise")
    assert np.array_equal(noisy[~missing], img[~missing])
    assert not np.allclose(noisy[missing], img[missing])


# settling ------------------------------------------------------------------------------------------------------------
def test_settle_zero_computes_every_cell_step_and_a_still_rule_ends_the_run_early():
    backend = small_backend(pos_encoding="none")
    img = rand_image(20, 24)
    dense = restore(backend, img, iters=6)
    assert dense.skipped == 0 and dense.computed >= dense.dense
    still = small_backend(pos_encoding="none")
    with torch.no_grad():
        still.model.rule.head[1].weight.zero_()
        still.model.rule.head[1].bias.zero_()  # a rule that never changes a cell: everything settles at once
    run = restore(still, img, iters=40, settle=1e-3)
    assert run.skipped > 0.5 * (run.computed + run.skipped)
    np.testing.assert_array_equal(run.image, restore(still, img, iters=40).image)


def test_settled_tiles_still_equal_the_untiled_run(monkeypatch, photo_backend):
    import vitca_cli.restore.windows as windows

    monkeypatch.setattr(windows, "WINDOW", 8)  # small windows, so that some settle while others still run
    img = smooth_noisy(80, 80)
    untiled = restore(photo_backend, img, iters=16, tile=0, settle=0.03)
    tiled = restore(photo_backend, img, iters=16, tile=56, settle=0.03)
    assert tiled.plan.count >= 4 and tiled.plan.exact and untiled.skipped > 0 and tiled.skipped > 0
    np.testing.assert_allclose(tiled.image, untiled.image, atol=1e-5)


def test_settling_the_shipped_photo_model_skips_work_and_stays_close_to_the_dense_run(photo_backend):
    noisy = smooth_noisy(48, 48)
    dense = restore(photo_backend, noisy, iters=48).image
    settled = restore(photo_backend, noisy, iters=48, settle=2e-3)
    assert settled.skipped > 0.05 * (settled.computed + settled.skipped)
    assert np.abs(settled.image - dense).mean() < 4e-3 and np.abs(settled.image - dense).max() < 0.05


@pytest.fixture(scope="module")
def photo_backend():
    from vitca_cli.io import weights

    return TorchBackend.from_file(weights.resolve("photo").path)


def smooth_noisy(h, w):
    """Smooth content (8×8 blocks of grey levels) with light Gaussian noise, ``(h, w, 3)``."""
    clean = rand_image(-(-h // 8), -(-w // 8), 3).repeat(8, 0).repeat(8, 1)[:h, :w] * 0.5 + 0.25
    return np.clip(clean + np.random.default_rng(1).normal(0, 0.05, clean.shape), 0, 1).astype(np.float32)


# cheaper arithmetic -------------------------------------------------------------------------------------------------
def test_bf16_products_stay_close_to_fp32(photo_backend):
    bf16 = TorchBackend(photo_backend.model, "photo", precision="bf16")
    img = smooth_noisy(32, 32)
    a, b = restore(photo_backend, img, iters=16).image, restore(bf16, img, iters=16).image
    assert 0 < np.abs(a - b).mean() < 5e-3


def test_a_settling_run_with_bf16_asked_for_settles_as_with_fp32(photo_backend):
    # Under bf16 products a converged cell's update stays at their rounding floor (about 1e-3, more on CPUs without
    # AMX), so it would never settle: a settling run computes in fp32, and only it.
    bf16 = TorchBackend(photo_backend.model, "photo", precision="bf16")
    img = smooth_noisy(48, 48)
    fp32_run = restore(photo_backend, img, iters=48, settle=2e-3)
    bf16_run = restore(bf16, img, iters=48, settle=2e-3)
    assert not bf16.use_bf16  # a settling run computes in fp32 ...
    assert fp32_run.skipped > 0.05 * fp32_run.dense
    assert bf16_run.skipped == fp32_run.skipped
    np.testing.assert_array_equal(bf16_run.image, fp32_run.image)
    restore(bf16, img, iters=2)
    assert bf16.use_bf16  # ... a dense one keeps the cheaper bf16 products


def test_auto_settings_take_the_fast_step_for_large_jobs_only_and_bf16_only_where_the_cpu_multiplies_it(
    monkeypatch,
):
    import vitca_cli.runtime as runtime
    from vitca_cli.restore.backends import FAST_WORK

    backend = TorchBackend(small_backend().model, precision="auto", compile="auto")
    monkeypatch.setattr(runtime, "has_cxx_compiler", lambda: True)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    backend.prepare(FAST_WORK - 1)
    assert (backend.use_bf16, backend.use_compiled) == (False, False)
    backend.prepare(FAST_WORK)
    assert (backend.use_bf16, backend.use_compiled) == (True, True)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(runtime, "has_cxx_compiler", lambda: False)
    backend.prepare(FAST_WORK)
    assert (backend.use_bf16, backend.use_compiled) == (False, False)
    exact = TorchBackend(small_backend().model, precision="fp32", compile="off")
    exact.prepare(FAST_WORK * 100)
    assert (exact.use_bf16, exact.use_compiled) == (False, False)
    with pytest.raises(UsageError):
        TorchBackend(small_backend().model, precision="fp16")
    with pytest.raises(UsageError):
        TorchBackend(small_backend().model, compile="yes")


def test_the_compiled_step_restores_what_the_exact_step_does(photo_backend):
    compiled = TorchBackend(photo_backend.model, "photo", compile="on")
    img = smooth_noisy(40, 36)
    exact, fast = restore(photo_backend, img, iters=8), restore(compiled, img, iters=8)
    assert compiled.use_compiled, "the compiled step fell back to the exact one"
    np.testing.assert_allclose(fast.image, exact.image, atol=1e-4)


def test_a_compiler_failure_falls_back_to_the_exact_step_with_a_warning(photo_backend, monkeypatch, caplog):
    def broken(fn, **kwargs):
        def fail(*args, **kw):
            raise RuntimeError("no C++ compiler")

        return fail

    monkeypatch.setattr(torch, "compile", broken)
    backend = TorchBackend(photo_backend.model, "photo", compile="on")
    img = smooth_noisy(24, 24)
    with caplog.at_level("WARNING"):
        out = restore(backend, img, iters=4).image
    assert not backend.use_compiled and "compiled step unavailable" in caplog.text
    assert np.array_equal(out, restore(photo_backend, img, iters=4).image)


def test_the_compiled_step_compiles_once_for_windows_of_one_shape(photo_backend):
    """The kernels are specialised to the cells' shape while the count of updating cells varies from step to
    step: one compile serves every step (a recompile per count would cost seconds each)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = TorchBackend(photo_backend.model, "photo", compile="on")
    img = smooth_noisy(64, 64)  # one window: about 2,048 ± 32 updating cells a step, rows rounded up to 128s
    restore(compiled, img, iters=12, seed=3)
    assert compiled.use_compiled
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_a_fused_run_compiles_once_though_its_grids_differ_in_size(photo_backend):
    """The full-size and the fused grid (and tiles of any size) are stepped in windows of one shape, and the
    updating cells' indices reach the compiled update as the same kind of tensor: one compile for the whole run."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = TorchBackend(photo_backend.model, "photo", compile="on")
    restore(compiled, smooth_noisy(150, 202), iters=8, fusion=True)  # grids 150×202 and 75×101
    assert compiled.use_compiled
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_the_auto_fast_step_is_compiled_ahead_of_time_once_and_loaded_by_later_backends(
    photo_backend, tmp_path, monkeypatch, caplog
):
    """With ``compile="auto"`` a large job's fast step comes from a package built once per CPU and weights under
    VITCA_HOME; a later backend loads it without building (nor tracing) again and restores the same bytes,
    close to the exact step's; a damaged package is dropped with a warning and the step compiles in the process;
    a build that fails is not tried again."""
    import vitca_cli.restore.aot as aot
    import vitca_cli.restore.backends as backends

    monkeypatch.setenv("VITCA_HOME", str(tmp_path))
    monkeypatch.setattr(backends, "FAST_WORK", 0)  # every job is large enough for the fast step
    img = smooth_noisy(40, 36)
    exact = restore(photo_backend, img, iters=8).image
    first = TorchBackend(photo_backend.model, "photo", compile="auto")
    fast = restore(first, img, iters=8).image
    assert first.use_compiled and not first._in_process, "the fast step did not come ahead of time"
    np.testing.assert_allclose(fast, exact, atol=1e-4)
    (package,) = (tmp_path / "aot").glob("step-*.pt2")

    def no_build(*args):
        raise AssertionError("built again")

    monkeypatch.setattr(aot, "_build", no_build)
    again = TorchBackend(photo_backend.model, "photo", compile="auto")
    assert np.array_equal(restore(again, img, iters=8).image, fast)

    package.write_bytes(b"not a package")
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the in-process fallback, without compiling
    damaged = TorchBackend(photo_backend.model, "photo", compile="auto")
    with caplog.at_level("WARNING"):
        out = restore(damaged, img, iters=8).image
    assert "unreadable ahead-of-time step" in caplog.text and not package.exists()
    np.testing.assert_allclose(out, exact, atol=1e-4)

    builds = []

    def failing(*args):
        builds.append(1)
        raise RuntimeError("no compiler")

    monkeypatch.setattr(aot, "_build", failing)  # a build that fails is tried once, not in every process
    for _ in range(2):
        retry = TorchBackend(photo_backend.model, "photo", compile="auto")
        assert np.array_equal(restore(retry, img, iters=8).image, out)
    assert builds == [1] and package.with_suffix(".failed").exists()


def test_windows_have_one_size_and_their_cores_partition_the_axis():
    from vitca_cli.restore.windows import axis_windows

    for length in (64, 65, 100, 127, 1000, 1562):
        wins = axis_windows(length, 64, 1)
        assert {w.size for w in wins} == {64}
        assert [w.lo for w in wins[1:]] == [w.hi for w in wins[:-1]] and wins[0].lo == 0 and wins[-1].hi == length
        assert all(w.origin >= 0 and w.origin + w.size <= length for w in wins)
        inner = [(w.lo - w.origin, w.origin + w.size - w.hi) for w in wins]
        assert all(a >= 1 for a, _ in inner[1:]) and all(b >= 1 for _, b in inner[:-1])
    assert axis_windows(40, 64, 1)[0].size == 40


@pytest.mark.parametrize("spec", ["1,1:1,2", "1,1:1,2+detail"])
def test_two_level_fused_tiles_equal_the_untiled_run_and_run_each_level(spec):
    from vitca_cli.nca.config import FusionSchedule

    schedule = FusionSchedule.parse(spec)
    backend = small_backend(pos_encoding="none")
    img = rand_image(150, 129, seed=3)  # padded to multiples of 4 cells
    untiled = restore(backend, img, iters=9, tile=0, fusion=schedule)
    tiled = restore(backend, img, iters=9, tile=72, fusion=schedule)
    assert tiled.plan.count >= 4 and tiled.plan.exact
    assert all(o % 4 == 0 for o in tiled.plan.ys + tiled.plan.xs)
    np.testing.assert_allclose(tiled.image, untiled.image, atol=1e-5)
    plain = restore(backend, img, iters=9, tile=0)
    # 3 steps at full resolution, 2 at a quarter of the cells, 4 at a sixteenth
    assert untiled.computed / plain.computed == pytest.approx((3 + 2 / 4 + 4 / 16) / 9, rel=0.1)
    assert untiled.image.shape == img.shape
    with pytest.raises(UsageError, match="at least 5"):
        restore(backend, img, iters=4, fusion=schedule)
