"""The paper's masking curriculum and masks (reference §3)."""

import random

import pytest
import torch

from vitca_cli.nca.masking import MaskingSchedule, apply_mask, parse_corruption, patch_keep_mask, random_mask


def test_schedule_thresholds_and_combos():
    s = MaskingSchedule(max_patch=4)
    assert s.thresholds == [500, 727, 1057, 1537, 2236, 3251, 4728, 6876, 10000]
    assert s.combos[:4] == [(0.25, 1), (0.25, 2), (0.25, 4), (0.5, 1)]
    assert len(s.combos) == 9 and s.combos[-1] == (0.75, 4)
    assert [p for _, p in MaskingSchedule(max_patch=10).combos[:3]] == [1, 5, 10]
    assert [p for _, p in MaskingSchedule(max_patch=8).combos[:3]] == [1, 4, 8]


@pytest.mark.parametrize(
    "iteration, allowed", [(0, 1), (500, 1), (501, 2), (727, 2), (728, 3), (6876, 8), (6877, 9), (10**6, 9), (-1, 9)]
)
def test_schedule_unlocks_combos_at_thresholds(iteration, allowed):
    assert len(MaskingSchedule().allowed(iteration)) == allowed


def test_schedule_draws_uniformly_from_allowed():
    s, rng = MaskingSchedule(), random.Random(0)
    draws = {s(2000, rng) for _ in range(300)}
    assert draws == set(s.allowed(2000))


def test_dropout_mask_zeroes_patches_with_probability_p():
    x = torch.rand(8, 3, 32, 32) + 0.1
    out, keep = random_mask(x, 0.5, 4, "dropout", torch.Generator().manual_seed(0))
    dropped = out == 0
    assert torch.equal(dropped[:, :1], keep == 0)
    assert torch.equal(dropped[:, 0], dropped[:, 2])  # all channels of a patch share the mask
    blocks = dropped[:, 0].reshape(8, 8, 4, 8, 4)
    assert bool((blocks.all(dim=(2, 4)) | (~blocks).all(dim=(2, 4))).all())  # whole 4×4 patches
    assert abs(dropped.float().mean().item() - 0.5) < 0.08


def test_noise_mask_uses_one_gaussian_scalar_per_patch():
    x = torch.full((2, 3, 8, 8), 0.5)
    keep = torch.zeros(2, 1, 8, 8)
    out = apply_mask(x, keep, "noise", patch=4, generator=torch.Generator().manual_seed(0))
    patch = out[0, :, :4, :4]
    assert torch.all(patch == patch[0, 0, 0])  # shared over pixels and channels
    assert not torch.equal(out[0, :, :4, :4], out[0, :, 4:, 4:])


def test_noise_is_not_clipped():
    x = torch.full((64, 1, 4, 4), 0.5)
    out = apply_mask(x, torch.zeros(64, 1, 4, 4), "noise", generator=torch.Generator().manual_seed(0))
    assert out.min() < 0 and out.max() > 1


def test_keep_mask_requires_divisible_size_and_same_seed_same_mask():
    with pytest.raises(ValueError, match="divide"):
        patch_keep_mask(1, 10, 10, 0.5, 4)
    a = patch_keep_mask(2, 8, 8, 0.5, 2, torch.Generator().manual_seed(5))
    b = patch_keep_mask(2, 8, 8, 0.5, 2, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_random_mask_draws_the_keep_mask_then_one_noise_value_per_patch():
    """The stream every patch-masking caller shares (training, eval, analyses, ``denoise --corrupt``): first one
    uniform per patch (kept where ``U + 1 - p ≥ 1``), then one N(0,1) per patch; sizes that ``patch`` does not divide
    take the patch grid cropped at the right and bottom."""
    x = torch.rand(2, 3, 10, 9)
    out, keep = random_mask(x, 0.5, 4, "noise", torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    grid_keep = torch.floor(torch.rand(2, 1, 3, 3, generator=gen) + 0.5).clamp(max=1)
    noise = torch.randn(2, 1, 3, 3, generator=gen)
    up = lambda t: t.repeat_interleave(4, 2).repeat_interleave(4, 3)[..., :10, :9]  # noqa: E731
    assert torch.equal(keep, up(grid_keep))
    assert torch.equal(out, x * keep + up(noise) * (1 - keep))
    padded = torch.nn.functional.pad(x, (0, 3, 0, 2))  # 12×12: the same draws, uncropped
    whole, _ = random_mask(padded, 0.5, 4, "noise", torch.Generator().manual_seed(3))
    assert torch.equal(whole[..., :10, :9], out)


def test_parse_corruption():
    assert parse_corruption("p=0.25,patch=4,type=dropout") == (0.25, 4, "dropout")
    assert parse_corruption("patch=2") == (0.5, 2, "noise")
    for bad in ["p=2", "patch=0", "type=blur", "q=1", "p=x"]:
        with pytest.raises(ValueError):
            parse_corruption(bad)
