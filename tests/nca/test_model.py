"""The core: parameter counts, step semantics, localised attention, patches, encodings, fusion/mitosis."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise
from typer.testing import CliRunner

from vitca_cli.cli import app
from vitca_cli.nca.attention import local_attention, local_attention_at
from vitca_cli.nca.config import CAConfig, preset
from vitca_cli.nca.levels import divide_cells
from vitca_cli.nca.model import (
    CellularAutomaton,
    count_parameters,
    patchify,
    unpatchify,
    vit_position_encoding,
)
from vitca_cli.nca.reference import unfold_step
from vitca_cli.nca.rollout import draw_update_mask


@pytest.mark.parametrize("patch, expected", [(1, 92_515), (2, 95_980), (4, 109_840), (8, 165_280), (16, 387_040)])
def test_celeba_parameter_counts_match_appendix_table_4(patch, expected):
    assert count_parameters(CellularAutomaton(preset("celeba", patch_size=patch))) == expected


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_grayscale_presets_have_91745_parameters(name):
    assert count_parameters(CellularAutomaton(preset(name))) == 91_745


def test_single_head_drops_output_projection_like_the_reference():
    assert count_parameters(CellularAutomaton(preset("celeba", heads=1))) == 76_003


def test_unetca_lands_near_vitca_parameter_count():
    n = count_parameters(CellularAutomaton(preset("celeba", arch="unetca")))
    assert n == 93_957 and abs(n - 92_515) / 92_515 < 0.02


def test_fresh_model_leaves_state_unchanged():
    ca = CellularAutomaton(preset("fashion-mnist"))
    z = ca.seed(torch.rand(2, 1, 28, 28))
    assert torch.equal(ca(z, 8, update_rate=1.0), z)


@pytest.mark.parametrize("arch", ["vitca", "unetca"])
def test_input_channels_never_change_but_outputs_do(arch):
    cfg = preset("cifar10", arch=arch, pos_encoding="nerf")
    ca = randomise(CellularAutomaton(cfg))
    image = torch.rand(2, 3, 32, 32)
    z0 = ca.seed(image)
    z = ca(z0, 6, update_rate=1.0)
    assert torch.equal(z[:, : cfg.static_channels], z0[:, : cfg.static_channels])
    assert torch.equal(z[:, cfg.input_slice], image)
    assert (z[:, cfg.output_slice] - z0[:, cfg.output_slice]).abs().max() > 1e-3


@pytest.mark.parametrize("rate", [0.25, 0.5, 0.75])
def test_update_rate_updates_about_that_fraction_of_cells(rate):
    ca = randomise(CellularAutomaton(preset("fashion-mnist")))
    z0 = ca.seed(torch.rand(4, 1, 28, 28))
    mask = draw_update_mask(4, 28, 28, rate, torch.Generator().manual_seed(1))
    z1 = ca.step(z0, mask)
    changed = (z1 - z0).abs().amax(dim=1) > 0  # b h w
    assert torch.equal(changed, mask[:, 0].bool())  # exactly the masked cells, all channels together
    assert abs(changed.float().mean().item() - rate) < 0.05


def test_synchronous_rate_updates_every_cell():
    ca = randomise(CellularAutomaton(preset("fashion-mnist")))
    z0 = ca.seed(torch.rand(2, 1, 28, 28))
    z1 = ca(z0, 1, update_rate=1.0)
    assert bool(((z1 - z0).abs().amax(dim=1) > 0).all())


@pytest.mark.parametrize("nb", [3, 5, 7])
@pytest.mark.parametrize("pe", ["none", "vit", "learned"])
def test_fast_step_equals_unfold_reference(nb, pe):
    cfg = preset("cifar10", neighbourhood=(nb, nb), pos_encoding=pe, image_size=(12, 16))
    ca = randomise(CellularAutomaton(cfg), scale=0.1)
    z = ca.seed(torch.rand(2, 3, 12, 16))
    z[:, cfg.hidden_slice] = torch.rand_like(z[:, cfg.hidden_slice]) * 2 - 1
    mask = draw_update_mask(2, 12, 16, 0.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast, ref = ca.step(z, mask), unfold_step(ca, z, mask)
    assert (fast - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("arch,nb", [("vitca", 3), ("vitca", 5), ("unetca", 3)])
def test_step_on_the_selected_cells_equals_the_dense_update(arch, nb):
    """With σ < 1 the step computes updates for the masked-in cells only; the grid must be the dense update's."""
    cfg = preset("fashion-mnist", arch=arch, neighbourhood=(nb, nb), image_size=(9, 11), unet_features=8)
    ca = randomise(CellularAutomaton(cfg), scale=0.1)
    z = ca.seed(torch.rand(2, 1, 9, 11)).requires_grad_()
    binary = draw_update_mask(2, 9, 11, 0.5, torch.Generator().manual_seed(1))
    dense_ish = draw_update_mask(2, 9, 11, 0.8, torch.Generator().manual_seed(2))  # rows padded up to all 198 cells
    # any mask values, not only 0/1; the row count is padded up to a multiple of ROW_BUCKET with idle cells
    for mask in (binary, binary * torch.rand(2, 1, 9, 11), dense_ish):
        cells, m = z.permute(0, 2, 3, 1), mask.permute(0, 2, 3, 1)
        dense = ca.apply_update(cells, m, ca.rule.update_cells(cells))
        sparse = ca.step_cells(cells, m)
        assert (sparse - dense).abs().max().item() < 1e-6
        g_sparse, g_dense = (torch.autograd.grad(t.square().sum(), z)[0] for t in (sparse, dense))
        assert torch.allclose(g_sparse, g_dense, atol=1e-5)


def test_attention_of_selected_cells_equals_the_whole_grid_attention():
    g = torch.Generator().manual_seed(0)
    for (h, w), nbh in [((5, 7), (3, 3)), ((6, 4), (5, 7)), ((1, 1), (3, 3))]:
        q, k, v = (torch.randn(2, h, w, 3, 4, generator=g) for _ in range(3))
        only = torch.randperm(2 * h * w, generator=g)[: max(1, h * w)]
        ref_out, ref_w = local_attention(q, k, v, nbh, 0.5)
        out, weights = local_attention_at(q.flatten(0, 2)[only], k, v, only, nbh, 0.5)
        assert torch.allclose(out, ref_out.flatten(0, 2)[only], atol=1e-6)
        assert torch.allclose(weights, ref_w.flatten(0, 2)[only], atol=1e-6)


def test_border_cells_attend_to_zero_padded_ghosts():
    """A corner cell's 3×3 window has 5 ghosts with k = 0 (logit 0) and v = 0 that still take softmax mass."""
    cfg = preset("fashion-mnist", pos_encoding="none", image_size=(6, 6))
    ca = randomise(CellularAutomaton(cfg), scale=0.3)
    z = ca.seed(torch.rand(1, 1, 6, 6))
    with torch.no_grad():
        ca.step(z, torch.ones(1, 1, 6, 6), keep_attention=True)
        weights = ca.last_attention[0][0, 0, 0]  # heads K at the top-left cell
        block = ca.rule.blocks[0]
        x = block.norm1(ca.rule.embed(z.permute(0, 2, 3, 1)))
        q, k, _ = block.attn.to_qkv(x).view(1, 6, 6, 3, cfg.heads, -1).unbind(3)
        d = k.shape[-1]
        real = [(0, 0), (0, 1), (1, 0), (1, 1)]  # in-grid neighbours of (0, 0): window offsets (1,1),(1,2),(2,1),(2,2)
        logits = torch.zeros(cfg.heads, 9)
        for (i, j), kk in zip(real, [4, 5, 7, 8]):
            logits[:, kk] = (q[0, 0, 0] * k[0, i, j]).sum(-1) * d**-0.5
    assert torch.allclose(weights, logits.softmax(-1), atol=1e-6)
    assert bool((weights[:, [0, 1, 2, 3, 6]] > 0).all())  # ghosts take mass


@pytest.mark.parametrize("nb", [3, 5, 7])
@pytest.mark.parametrize("patch", [1, 2, 4, 8, 16])
def test_every_neighbourhood_and_patch_size_runs(nb, patch):
    cfg = preset("celeba", patch_size=patch, neighbourhood=(nb, nb), image_size=(32, 32))
    ca = randomise(CellularAutomaton(cfg))
    image = torch.rand(1, 3, 32, 32)
    z = ca.seed(image)
    assert z.shape == (1, cfg.cell_channels, 32 // patch, 32 // patch)
    with torch.no_grad():
        out = ca.output(ca(z, 2))
    assert out.shape == image.shape and torch.isfinite(out).all()


def test_patchify_roundtrip_and_reference_channel_order():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    cells = patchify(x, 2)
    assert cells.shape == (2, 12, 2, 2)
    # b (p1 p2 c) h w: channel index (p1·P + p2)·C + c
    assert cells[0, (1 * 2 + 0) * 3 + 2, 1, 0] == x[0, 2, 1 * 2 + 1, 0 * 2 + 0]
    assert torch.equal(unpatchify(cells, 2), x)


def test_vit_position_encoding_uses_odd_exponent_for_cosines():
    pe = vit_position_encoding(3, 5, 8)
    n, c = 7, 3  # row 1, column 2; odd channel: cos(n·exp(-c·ln(1e4)/E)) with c = 2k+1
    assert math.isclose(pe[1, 2, c].item(), math.cos(n * math.exp(-c * math.log(1e4) / 8)), rel_tol=1e-5)
    assert math.isclose(pe[1, 2, 2].item(), math.sin(n * math.exp(-2 * math.log(1e4) / 8)), rel_tol=1e-5)


def test_cell_init_constant_and_random():
    image = torch.rand(2, 1, 8, 8)
    cfg = preset("mnist", image_size=(8, 8))
    z = CellularAutomaton(cfg).seed(image)
    assert torch.all(z[:, cfg.output_slice] == 0.5) and torch.all(z[:, cfg.hidden_slice] == 0)
    zr = CellularAutomaton(cfg.replace(cell_init="random")).seed(image, torch.Generator().manual_seed(0))
    out, hid = zr[:, cfg.output_slice], zr[:, cfg.hidden_slice]
    assert 0 <= out.min() and out.max() < 1 and -1 <= hid.min() < -0.5 and 0.5 < hid.max() < 1


def test_fusion_and_mitosis_shapes_and_reinjection():
    cfg = preset("celeba", image_size=(16, 16))
    ca = randomise(CellularAutomaton(cfg))
    image = torch.rand(2, 3, 16, 16)
    z = ca(ca.seed(image), 2)
    fused, stash = ca.fusion(z)
    assert fused.shape == (2, cfg.cell_channels, 8, 8)
    assert torch.allclose(fused[0, :, 0, 0], z[0, :, :2, :2].mean(dim=(1, 2)))
    grown = ca.mitosis(fused + 1.0, stash)
    assert grown.shape == z.shape
    assert torch.equal(grown[:, cfg.input_slice], image)  # stashed input re-injected exactly
    hs = cfg.hidden_slice
    assert torch.equal(grown[:, hs, 1, 1], fused[:, hs, 0, 0] + 1.0)  # bottom-right copy
    out = ca.fusion_rollout(ca.seed(image), 8, generator=torch.Generator().manual_seed(0))
    assert out.shape == z.shape


def test_mitosis_in_place_equals_the_training_mitosis():
    cfg = preset("celeba", image_size=(16, 16))
    ca = randomise(CellularAutomaton(cfg))
    z = ca(ca.seed(torch.rand(2, 3, 16, 16)), 2).contiguous(memory_format=torch.channels_last)
    fused, stash = ca.fusion(z)
    fused = fused * 1.5 - 0.2  # as if the fused grid had been stepped
    expected = ca.mitosis(fused, stash)
    grown = divide_cells(cfg, fused, z.clone(memory_format=torch.channels_last))
    assert torch.equal(grown, expected)


def test_same_seed_same_result_and_different_seed_differs():
    ca = randomise(CellularAutomaton(preset("fashion-mnist")))
    z0 = ca.seed(torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        a = ca(z0, 10, generator=torch.Generator().manual_seed(7))
        b = ca(z0, 10, generator=torch.Generator().manual_seed(7))
        c = ca(z0, 10, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_checkpointed_rollout_matches_plain_forward_and_gradients():
    ca = randomise(CellularAutomaton(preset("fashion-mnist", image_size=(8, 8))))
    z0 = ca.seed(torch.rand(2, 1, 8, 8))
    masks = ca.update_masks(z0, 9, generator=torch.Generator().manual_seed(0))
    grads = []
    for segments in (0, 4):
        ca.zero_grad()
        out = ca(z0, 9, masks=masks, checkpoint_segments=segments)
        out.square().mean().backward()
        grads.append([p.grad.clone() for p in ca.parameters()])
    for g0, g1 in zip(*grads):
        assert torch.allclose(g0, g1, atol=1e-6)


def test_head_mask_silences_heads_and_attention_maps_are_exposed():
    ca = randomise(CellularAutomaton(preset("fashion-mnist")))
    z0 = ca.seed(torch.rand(1, 1, 28, 28))
    ones = torch.ones(1, 1, 28, 28)
    with torch.no_grad():
        full = ca.step(z0, ones, keep_attention=True)
        maps = ca.last_attention
        part = ca.step(z0, ones, head_mask=torch.tensor([1.0, 0, 0, 0]))
        none = ca.step(z0, ones, head_mask=torch.ones(4))
    assert maps[0].shape == (1, 28, 28, 4, 9) and torch.allclose(maps[0].sum(-1), torch.ones(1, 28, 28, 4))
    assert not torch.equal(full, part) and not torch.equal(part, none)


def test_learned_encoding_refuses_other_grid_sizes():
    ca = CellularAutomaton(preset("fashion-mnist", pos_encoding="learned"))
    with pytest.raises(ValueError, match="learned position encoding"):
        ca.step(ca.seed(torch.rand(1, 1, 32, 32)), torch.ones(1, 1, 32, 32))


def test_config_roundtrip_and_validation():
    cfg = preset("celeba", patch_size=4, neighbourhood=(5, 5))
    assert CAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="divisible"):
        preset("mnist", patch_size=8)
    with pytest.raises(ValueError, match="odd"):
        preset("mnist", neighbourhood=(4, 4))


def test_cli_model_prints_exact_parameter_count():
    result = CliRunner().invoke(app, ["model", "--preset", "celeba", "--patch-size", "8", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["parameters"] == 165_280
    bad = CliRunner().invoke(app, ["model", "--preset", "mnist", "--neighbourhood", "4"])
    assert bad.exit_code == 2 and "odd" in bad.output


def test_fast_step_gradients_equal_unfold_reference():
    cfg = preset("cifar10", image_size=(8, 10))
    ca = randomise(CellularAutomaton(cfg), scale=0.1)
    z = ca.seed(torch.rand(2, 3, 8, 10))
    mask = draw_update_mask(2, 8, 10, 0.5, torch.Generator().manual_seed(0))
    grads = []
    for step in (ca.step, lambda z, m: unfold_step(ca, z, m)):
        ca.zero_grad()
        step(step(z, mask), mask).square().mean().backward()
        grads.append([p.grad.clone() for p in ca.parameters()])
    for g_fast, g_ref in zip(*grads):
        assert torch.allclose(g_fast, g_ref, atol=1e-6, rtol=1e-4)


def test_compiled_kernels_match_eager_values_and_gradients():
    from vitca_cli.nca.attention import use_compiled_kernels

    ca = randomise(CellularAutomaton(preset("fashion-mnist", image_size=(8, 8))), scale=0.1)
    z = ca.seed(torch.rand(2, 1, 8, 8))
    mask = draw_update_mask(2, 8, 8, 0.5, torch.Generator().manual_seed(0))

    def run():
        ca.zero_grad()
        out = ca.step(ca.step(z, mask), mask)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in ca.parameters()]

    eager, eager_grads = run()
    with torch.no_grad():  # inference takes another path: queries and attention of the updated cells only
        eager_inference = ca.step(ca.step(z, mask), mask)
    try:
        use_compiled_kernels(True)
        compiled, compiled_grads = run()
        with torch.no_grad():
            compiled_inference = ca.step(ca.step(z, mask), mask)
    finally:
        use_compiled_kernels(False)
    assert (compiled - eager).abs().max().item() < 1e-5
    assert (compiled_inference - eager_inference).abs().max().item() < 1e-5
    for g_c, g_e in zip(compiled_grads, eager_grads):
        assert torch.allclose(g_c, g_e, atol=1e-6, rtol=1e-4)


def test_a_fusion_schedule_parses_runs_its_levels_in_order_and_reaches_further():
    from vitca_cli.nca.config import APPENDIX_A1, FusionSchedule

    two = FusionSchedule.parse("2,1:3,4")
    assert str(two) == "2,1:3,4" and two.levels == 2 and two.outer_steps == 10
    assert two.segments(16) == [(0, 2), (1, 1), (2, 6), (1, 3), (0, 4)]
    assert FusionSchedule.parse("2:2") == APPENDIX_A1
    assert two.reach(16) > APPENDIX_A1.reach(16) > 16
    for bad in ("2,2", "2,2:2", "a:b", "-1:2"):
        with pytest.raises(ValueError):
            FusionSchedule.parse(bad)
    assert two.level_steps(16) == [6, 4, 6]
    with pytest.raises(ValueError, match="at least 10"):
        two.segments(9)


def test_a_two_level_rollout_is_the_composition_of_its_phases():
    from vitca_cli.nca.config import FusionSchedule
    from vitca_cli.nca.rollout import GeneratorMasks, rollout

    cfg = preset("celeba", image_size=(16, 16))
    ca = CellularAutomaton(cfg).eval()
    image = torch.rand(2, cfg.channels, 16, 16)
    schedule = FusionSchedule.parse("1,1:1,2")
    with torch.no_grad():
        out = ca.fusion_rollout(ca.seed(image), 8, generator=torch.Generator().manual_seed(3), schedule=schedule)
        masks = GeneratorMasks(cfg.update_rate, torch.Generator().manual_seed(3))
        z = rollout(ca.step, ca.seed(image), 1, masks)
        z1, stash0 = ca.fusion(z)
        z1 = rollout(ca.step, z1, 1, masks)
        z2, stash1 = ca.fusion(z1)
        assert z2.shape[-2:] == (4, 4)
        z2 = rollout(ca.step, z2, 3, masks)
        z1 = rollout(ca.step, ca.mitosis(z2, stash1), 1, masks)
        expected = rollout(ca.step, ca.mitosis(z1, stash0), 2, masks)
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="multiples of 4"):
        ca.fusion_rollout(ca.seed(torch.rand(1, cfg.channels, 10, 10)), 8, schedule=schedule)


def test_a_division_with_detail_gives_back_what_fusion_averaged_away():
    from vitca_cli.nca.config import FusionSchedule

    schedule = FusionSchedule.parse("2,2:2,8+detail")
    assert schedule.detail and str(schedule) == "2,2:2,8+detail" and not FusionSchedule.parse("2:2").detail
    with pytest.raises(ValueError, match=r"\+detail"):
        FusionSchedule.parse("2:2+sharp")
    for mask_channel in (False, True):
        cfg = preset("celeba", image_size=(16, 16), cell_init="input", mask_channel=mask_channel)
        ca = CellularAutomaton(cfg)
        image = torch.rand(2, 3, 16, 16)
        known = (torch.rand(2, 1, 16, 16) > 0.3).float() if mask_channel else None
        z = ca.seed(image * known if mask_channel else image, known=known)
        fused, stash = ca.fusion(z)
        # a coarse level that restored the clean image: division with detail gives back every known pixel
        if mask_channel:
            fused = fused.clone()
            k = F.avg_pool2d(known, 2)
            fused[:, cfg.output_slice] = F.avg_pool2d(image * known, 2) / k.clamp_min(1e-6)
            whole = (known * (k > 0).repeat_interleave(2, 2).repeat_interleave(2, 3)).expand_as(image).bool()
        else:
            whole = torch.ones_like(image, dtype=torch.bool)
            assert not torch.allclose(ca.output(ca.mitosis(fused, stash)), image, atol=1e-3)  # a copy is blocky
        out = ca.output(ca.mitosis(fused, stash, detail=True))
        assert torch.allclose(out[whole], image[whole], atol=1e-5)
        stepped = fused * 1.5 - 0.2
        in_place = divide_cells(cfg, stepped, z.clone(memory_format=torch.channels_last), detail=True)
        assert torch.equal(in_place, ca.mitosis(stepped, stash, detail=True))
