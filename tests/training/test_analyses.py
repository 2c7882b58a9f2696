"""The appendix analyses on a tiny model: each writes a real PNG and a table with the expected rows."""

import csv
import json

import pytest
import torch
from PIL import Image

from vitca_cli.nca.config import CAConfig
from vitca_cli.nca.model import CellularAutomaton
from vitca_cli.training.analyses import iterations_to_converge, run_analysis, unseen_conditions
from vitca_cli.training.figures import format_table

CFG = CAConfig(channels=1, image_size=(16, 16), embed=16, heads=2, mlp=16, hidden=8)


@pytest.fixture
def model(randomise_model):
    return randomise_model(CellularAutomaton(CFG)).eval()


@pytest.fixture
def clean():
    return torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))


def _check_files(result, rows):
    png, csv_path, json_path = result["files"]
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 200 and im.height > 100
    with open(csv_path) as f:
        assert len(list(csv.DictReader(f))) == rows
    assert len(json.load(open(json_path))["table"]) == rows
    assert format_table(result["table"]).count("\n") == rows + 1


def test_eval_and_analyze_damage_as_denoise_corrupt_does_for_the_same_seed(model):
    """One patch-masking stream (``nca.masking.random_mask``): ``vitca eval --seed S`` damages its first batch, and
    ``vitca analyze --corruption`` its images, as ``vitca denoise --corrupt p=…,patch=… --seed S`` damages an image,
    including sizes the patch does not divide."""
    from vitca_cli.restore.loop import corrupt
    from vitca_cli.training.analyses import corrupt_spec
    from vitca_cli.training.evaluate import eval_combos, evaluate
    from vitca_cli.training.metrics import psnr_per_image

    def denoise_corrupt(image, prob, patch, mask_type, seed):  # CHW in, CHW out, through the CLI's HWC helper
        return torch.from_numpy(corrupt(image.permute(1, 2, 0).numpy(), prob, patch, mask_type, seed)).permute(2, 0, 1)

    clean, seed = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(2)), 7
    prob, patch = eval_combos()[0]  # the first batch's combo
    for mask_type in ("noise", "dropout"):
        damaged = denoise_corrupt(clean[0], prob, patch, mask_type, seed)
        report = evaluate(model, [clean], iters=1, mask_type=mask_type, seed=seed)
        expected = psnr_per_image(damaged[None], clean).item()
        assert report["methods"]["input"]["psnr"]["mean"] == pytest.approx(expected, abs=1e-3)
    odd = torch.rand(1, 1, 18, 13, generator=torch.Generator().manual_seed(3))  # a 4×4 patch grid cropped at the edges
    for mask_type in ("noise", "dropout"):
        spec = corrupt_spec(odd, f"p=0.5,patch=4,type={mask_type}", torch.Generator().manual_seed(seed))
        assert torch.equal(spec[0], denoise_corrupt(odd[0], 0.5, 4, mask_type, seed))
        assert not torch.equal(spec[0], odd[0])


def test_iterations_to_converge():
    assert iterations_to_converge([1.0, 5.0, 9.0, 10.0, 10.1, 10.0]) == 4  # 9.0 is 1 dB short of the final 10
    assert iterations_to_converge([1.0, 5.0, 9.9, 10.0, 10.1, 10.0]) == 3
    assert iterations_to_converge([3.0, 3.0, 3.0]) == 1
    assert iterations_to_converge([10.0, 2.0, 2.0]) == 2  # settles, even if to something worse
    assert iterations_to_converge([1.0, 10.0, 1.0]) == 3


def test_update_rate(model, clean, tmp_path):
    result = run_analysis("update-rate", model, clean, tmp_path, iters=6, seed=1)
    assert [r["update_rate"] for r in result["table"]] == [0.25, 0.5, 1.0]
    for r in result["table"]:
        assert 1 <= r["iterations_to_converge"] <= 6
        assert r["best_psnr"] >= r["final_psnr"]
    # different update rates take different paths
    assert len({r["final_psnr"] for r in result["table"]}) == 3
    _check_files(result, 3)


def test_unseen_noise(model, clean, tmp_path):
    result = run_analysis("unseen-noise", model, clean, tmp_path, iters=4, seed=0, mask_type="dropout")
    rows = {r["condition"]: r for r in result["table"]}
    assert set(rows) == set(unseen_conditions("dropout"))
    assert rows["unmasked"]["input_psnr"] >= 99  # the clean image itself
    assert rows["fully masked dropout"]["input_psnr"] < 15  # all zeros
    for r in rows.values():
        assert r["state_min"] <= r["state_max"] and r["diverged"] in (False, True)
    _check_files(result, 6)


def test_salt_and_pepper_hits_about_a_fifth():
    x = torch.full((4, 3, 32, 32), 0.5)
    y = unseen_conditions("noise")["salt & pepper 20%"](x, torch.Generator().manual_seed(0))
    hit = (y != 0.5).all(1)  # channels share the hit
    assert 0.15 < hit.float().mean() < 0.25
    assert set(y.permute(0, 2, 3, 1)[hit].unique().tolist()) == {0.0, 1.0}


def test_head_masking(model, clean, tmp_path):
    result = run_analysis("head-masking", model, clean, tmp_path, iters=3, seed=0)
    table = result["table"]
    assert [r["masked_heads"] for r in table] == ["none", "1", "2", "1,2"]
    assert len({r["psnr"] for r in table}) > 1  # silencing heads changes the output
    _check_files(result, 4)


def test_head_masking_needs_attention(clean, tmp_path):
    from vitca_cli.errors import UsageError

    unet = CellularAutomaton(CFG.replace(arch="unetca", unet_features=4)).eval()
    with pytest.raises(UsageError):
        run_analysis("head-masking", unet, clean, tmp_path, iters=2)


def test_stability_of_an_untrained_rule(clean, tmp_path):
    # The zero-initialised head leaves the grid exactly where it was seeded: output 0.5, hidden 0, forever.
    still = CellularAutomaton(CFG).eval()
    result = run_analysis("stability", still, clean, tmp_path, iters=20, seed=0)
    assert [r["iteration"] for r in result["table"]] == [1, 8, 16, 20]
    assert all(r["output_min"] == r["output_max"] == 0.5 for r in result["table"])
    assert all(r["hidden_min"] == r["hidden_max"] == 0.0 for r in result["table"])
    assert result["max_abs_state"] == 0.5 and result["diverged"] is False
    _check_files(result, 4)


def test_stability_flags_divergence(model, clean, tmp_path):
    with torch.no_grad():  # a rule that pushes every cell up by 10 per update diverges
        model.rule.head[1].bias.fill_(10.0)
    result = run_analysis("stability", model, clean, tmp_path, iters=30, seed=0)
    assert result["diverged"] is True and result["max_abs_state"] > 100


def test_profile_command_on_a_tiny_model(tmp_path):
    from typer.testing import CliRunner

    from vitca_cli.cli import app
    from vitca_cli.io.checkpoint import save_checkpoint

    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(ckpt, CFG, CellularAutomaton(CFG).state_dict(), {})
    base = [
        "profile",
        "-w",
        str(ckpt),
        "-b",
        "2",
        "--height",
        "8",
        "--width",
        "8",
        "-T",
        "4",
        "--repeats",
        "1",
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(app, base + ["--mode", "plain", "--mode", "checkpointing"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("one training pass: batch 2 × 8×8, T = 4")
    assert lines[3].startswith("no checkpointing") and lines[4].startswith("checkpointing (T/2 segments)")
    assert "memory ×" in lines[5] and "backward ×" in lines[5]
    bad = CliRunner().invoke(app, base + ["--mode", "sideways"])
    assert bad.exit_code == 2 and "sideways" in bad.output
