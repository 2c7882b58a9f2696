"""Metrics against known values and against scikit-image on the same images."""

import math

import numpy as np
import pytest
import torch

from vitca_cli.training.metrics import LPIPS, mean_interval, psnr_batch, psnr_per_image, ssim_per_image


def _pair(seed=0, shape=(2, 3, 32, 32)):
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(shape, generator=g)
    noisy = (clean + 0.1 * torch.randn(shape, generator=g)).clamp(0, 1)
    return clean, noisy


def test_identical_images_are_perfect():
    x = torch.rand(3, 1, 16, 16)
    assert torch.all(psnr_per_image(x, x) >= 99.9)  # MSE 0 is capped, not inf
    assert psnr_batch(x, x) >= 99.9
    assert torch.allclose(ssim_per_image(x, x), torch.ones(3), atol=1e-6)


def test_psnr_of_known_uniform_noise():
    # Noise uniform in [-a, a] has MSE a²/3; a grid of 100k evenly spaced values hits it to 1e-5.
    a = 0.1
    base = torch.full((1, 1, 100, 1000), 0.5)
    noise = torch.linspace(-a, a, base.numel()).view_as(base)
    expected = 10 * math.log10(1 / (a * a / 3))
    assert psnr_per_image(base + noise, base).item() == pytest.approx(expected, abs=1e-3)


def test_psnr_clips_before_comparing():
    target = torch.ones(1, 1, 8, 8)
    assert psnr_per_image(target * 5, target).item() >= 99.9  # 5 clips to 1


def test_batch_psnr_is_one_mse_not_mean_of_psnrs():
    clean = torch.zeros(2, 1, 8, 8)
    out = clean.clone()
    out[0] += 0.1  # image 0: MSE 0.01 (20 dB); image 1 perfect (capped 100 dB)
    per_image = psnr_per_image(out, clean)
    assert per_image[0].item() == pytest.approx(20.0, abs=1e-4)
    assert psnr_batch(out, clean) == pytest.approx(10 * math.log10(1 / 0.005), abs=1e-4)
    assert per_image.mean().item() > psnr_batch(out, clean) + 30


def test_psnr_and_ssim_agree_with_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    clean, noisy = _pair()
    ours_psnr = psnr_per_image(noisy, clean)
    ours_ssim = ssim_per_image(noisy, clean)
    for i in range(clean.shape[0]):
        a, b = noisy[i].permute(1, 2, 0).double().numpy(), clean[i].permute(1, 2, 0).double().numpy()
        ref_psnr = metrics.peak_signal_noise_ratio(b, a, data_range=1)
        ref_ssim = metrics.structural_similarity(
            b, a, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=-1
        )
        assert ours_psnr[i].item() == pytest.approx(ref_psnr, abs=1e-3)
        assert ours_ssim[i].item() == pytest.approx(ref_ssim, abs=1e-5)


def test_mean_interval():
    mean, half = mean_interval([1.0, 2.0, 3.0])
    # t(0.975, 2 dof) = 4.303, sd = 1, n = 3
    assert mean == pytest.approx(2.0)
    assert half == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)
    values = np.random.default_rng(0).normal(5, 2, 400)
    mean, half = mean_interval(values)
    assert half == pytest.approx(1.96 * values.std(ddof=1) / 20, rel=1e-6)
    assert mean_interval([7.0]) == (7.0, 0.0)


def test_lpips_from_state_dicts():
    # No real weights offline: random ones in the published key layout check loading and the distance's shape.
    g = torch.Generator().manual_seed(0)
    widths, cin, idx = (64, 128, 256, 512, 512), 3, 0
    vgg = {}
    for stage, n in zip(widths, (2, 2, 3, 3, 3)):
        for _ in range(n):
            vgg[f"features.{idx}.weight"] = 0.05 * torch.randn(stage, cin, 3, 3, generator=g)
            vgg[f"features.{idx}.bias"] = torch.zeros(stage)
            cin, idx = stage, idx + 2
        idx += 1  # the max-pool after the stage
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(widths)}
    lpips = LPIPS(vgg, lin)
    clean, noisy = _pair(shape=(2, 1, 32, 32))
    same = lpips(clean, clean)
    diff = lpips(noisy, clean)
    assert same.shape == (2,) and torch.allclose(same, torch.zeros(2))
    assert torch.all(diff > 0)


def test_hole_psnr_scores_only_the_missing_pixels_of_images_that_have_any():
    from vitca_cli.training.metrics import hole_psnr

    target = torch.full((3, 3, 8, 8), 0.5)
    known = torch.ones(3, 1, 8, 8)
    known[1, :, 2:4, 2:4] = 0
    known[2, :, 5:, :] = 0
    out = target.clone()
    out[1] += 0.2 * known[1]  # wrong only where the pixels are given: the holes are exact
    out[2] += 0.1 * (1 - known[2])  # wrong by 0.1 inside the holes only
    scores = hole_psnr(out, target, known)  # the first image has no holes: left out
    assert scores.shape == (2,)
    assert scores[0] == pytest.approx(100.0) and scores[1] == pytest.approx(20.0, abs=1e-4)
    assert float(psnr_per_image(out, target)[1]) < 30
