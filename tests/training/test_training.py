"""Training: Algorithm 1's loss, gradient normalisation, pool semantics, checkpointed gradients, exact resume,
NaN and Ctrl-C handling, and `vitca train` end to end on real PNG files (all with tiny models and grids)."""

from __future__ import annotations

import json
import math
import signal
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vitca_cli.cli import app
from vitca_cli.errors import UsageError, VitcaError
from vitca_cli.io.checkpoint import load_model, read_checkpoint
from vitca_cli.nca.config import CAConfig, preset
from vitca_cli.nca.model import CellularAutomaton
from vitca_cli.training.config import TrainConfig
from vitca_cli.training.data import open_dataset
from vitca_cli.training.dataset import ImageDataset
from vitca_cli.training.pool import Pool
from vitca_cli.training.run import read_run
from vitca_cli.training.step import ca_loss, lr_factor, normalize_gradients, rollout
from vitca_cli.training.train import train
from vitca_cli.training.trainer import Trainer

SIZE = 8
CFG = preset("mnist", image_size=(SIZE, SIZE), embed=16, heads=2, mlp=16, hidden=4)


def photo_folder(tmp_path, n: int, shape: tuple, seed: int):
    """A folder of ``n`` random PNG photos of ``shape`` (H, W) or (H, W, 3), for ``--dataset folder:DIR``."""
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.RandomState(seed)
    for k in range(n):
        Image.fromarray(rng.randint(0, 256, shape, dtype=np.uint8)).save(photos / f"p{k}.png")
    return photos


def tiny_dataset(n=16, seed=0) -> ImageDataset:
    rng = np.random.RandomState(seed)
    images = np.zeros((n, 1, SIZE, SIZE), np.uint8)
    for k in range(n):  # simple structured images: a bright rectangle on black
        r, c = rng.randint(0, SIZE - 3, 2)
        images[k, 0, r : r + 3, c : c + 4] = 255
    return ImageDataset("tiny", array=images, labels=np.arange(n) % 2)


def tcfg(**kw) -> TrainConfig:
    base = dict(
        dataset="tiny", iterations=12, batch_size=4, pool_size=8, t_min=2, t_max=4, val_every=4, val_size=4,
        val_steps=4, mask_start=2, mask_end=8, mask_max_patch=2, log_every=1, compile=False,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig.from_dict(base)  # flat mask_* keys, as older runs stored them


def test_loss_matches_algorithm_1():
    ca = CellularAutomaton(CFG)
    z = ca.seed(torch.zeros(2, 1, SIZE, SIZE))
    z[:, CFG.output_slice] = 1.5  # 0.5 above the [0, 1] range
    z[:, CFG.hidden_slice] = -3.0  # 2 below the [-1, 1] range
    target = torch.ones(2, 1, SIZE, SIZE)
    loss, rec, overflow = ca_loss(ca, z, target, alpha=100.0, beta=10.0)
    assert rec.item() == pytest.approx(0.5)
    assert overflow.item() == pytest.approx(0.5 + 2.0)
    assert loss.item() == pytest.approx(100 * 0.5 + 10 * 2.5)


def test_gradient_normalisation_is_per_tensor():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.full((2, 2), 10.0)
    normalize_gradients([a, b])
    assert a.grad.norm().item() == pytest.approx(1.0, abs=1e-6)
    assert b.grad.norm().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(a.grad, torch.tensor([0.6, 0.8, 0.0]))


def test_pool_append_shuffle_truncate_and_overwrite():
    pool = Pool(capacity=6)
    g = torch.Generator().manual_seed(0)
    ids = lambda k: torch.full((k, 1, 1, 1), 0.0)  # noqa: E731
    pool.update(torch.arange(4.0).view(4, 1, 1, 1), torch.arange(4.0).view(4, 1, 1, 1), False, False, g)
    assert len(pool) == 4
    pool.update(torch.arange(4.0, 8.0).view(4, 1, 1, 1), torch.arange(4.0, 8.0).view(4, 1, 1, 1), False, False, g)
    assert len(pool) == 6  # truncated to capacity
    assert torch.equal(pool.z, pool.x)  # grids stay paired with their targets through the shuffle
    z, x = pool.take(2)
    assert torch.equal(z, pool.z[:2]) and torch.equal(x, pool.x[:2])  # the first b
    # Overwrite (sample_with_replacement): a pool batch replaces its own entries, the size stays.
    before = pool.z[2:].flatten().tolist()
    pool.update(ids(2) - 1, ids(2) - 1, True, True, g)
    assert len(pool) == 6 and (pool.z == -1).sum() == 2
    assert sorted(v for v in pool.z.flatten().tolist() if v >= 0) == sorted(before)


def test_pool_used_on_even_iterations_once_larger_than_a_batch():
    trainer = Trainer(CFG, tcfg(pool_size=32), tiny_dataset(), None, "cpu")
    used = [trainer.step()["pool"] for _ in range(6)]
    # i=1 fresh; i=2 pool holds 4 = b (not more): fresh; i=3 odd: fresh; i=4 pool holds 12 > 4: pool; ...
    assert used == [False, False, False, True, False, True]
    assert len(trainer.pool) == 24  # every batch appended, sampled grids included (duplicates allowed)


def test_checkpointed_and_plain_gradients_agree():
    torch.manual_seed(0)
    ca = CellularAutomaton(CFG)
    torch.nn.init.normal_(ca.rule.head[1].weight, std=0.1)  # a non-zero head so gradients flow through all steps
    x = torch.rand(2, 1, SIZE, SIZE)
    z0 = ca.seed(x)
    grads = []
    for checkpointing in (False, True):
        ca.zero_grad()
        z = rollout(ca, z0, 8, tcfg(checkpointing=checkpointing), torch.Generator().manual_seed(5))
        ca_loss(ca, z, x, 100.0, 100.0)[0].backward()
        grads.append([p.grad.clone() for p in ca.parameters()])
    for plain, ckpt in zip(*grads):
        torch.testing.assert_close(plain, ckpt, rtol=1e-4, atol=1e-6)


def test_tiny_run_lowers_the_loss_on_a_fixed_batch():
    ds = tiny_dataset()
    t = tcfg(batch_size=8, pool_size=0, lr=3e-3, t_min=4, t_max=4, mask_start=100, mask_end=200)
    trainer = Trainer(CFG, t, ds, None, "cpu")
    x = ds.batch(list(range(8)))

    def fixed_loss():
        with torch.no_grad():
            z = trainer.ca(trainer.ca.seed(x), 4, generator=torch.Generator().manual_seed(1))
            return ca_loss(trainer.ca, z, x, 100.0, 100.0)[0].item()

    before = fixed_loss()
    for _ in range(30):
        trainer.step()
    after = fixed_loss()
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("schedule", ["", "1,1:1,1"])
def test_fusion_mitosis_training_step(schedule):
    config = tcfg(fusion_mitosis=not schedule, fusion_schedule=schedule, t_min=6, t_max=6)
    trainer = Trainer(CFG, config, tiny_dataset(), None, "cpu")
    rec = trainer.step()
    assert math.isfinite(rec["loss"]) and rec["T"] == 6
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.ca.parameters())
    assert trainer.meta()["fusion_schedule"] == (schedule or "2:2")


def test_a_fusion_schedule_is_checked_against_the_steps_and_crop_sizes():
    from vitca_cli.errors import UsageError

    assert tcfg(fusion_schedule="2,2:2,4", t_min=10, t_max=16).fusion_mitosis
    with pytest.raises(UsageError, match="t_min ≥ 10"):
        tcfg(fusion_schedule="2,2:2,4", t_min=9, t_max=16)
    with pytest.raises(UsageError, match="multiples of 4"):
        tcfg(fusion_schedule="2,2:2,4", t_min=12, t_max=16, crop_sizes=(32, 30))
    with pytest.raises(UsageError, match="bad fusion schedule"):
        tcfg(fusion_schedule="2,2")


def test_exact_resume_10_plus_10_equals_20(tmp_path):
    ds, val = tiny_dataset(), tiny_dataset(8, seed=1)
    t = tcfg(iterations=20, val_every=5)
    train(CFG, t, tmp_path / "a", train_ds=ds, val_ds=val, progress=False)
    first = train(CFG, t, tmp_path / "b", train_ds=ds, val_ds=val, progress=False, stop_at=10)
    assert first["iteration"] == 10
    cfg2, t2, ckpt = read_run(tmp_path / "b")
    assert cfg2 == CFG and t2 == t and ckpt["iteration"] == 10
    train(cfg2, t2, tmp_path / "b", train_ds=ds, val_ds=val, progress=False, resume_from=ckpt)
    a, b = read_checkpoint(tmp_path / "a" / "last.pt"), read_checkpoint(tmp_path / "b" / "last.pt")
    assert a["iteration"] == b["iteration"] == 20
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["pool"]["z"], b["pool"]["z"])
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k != "time"} for l in p.read_text().splitlines()]  # noqa
    assert strip(tmp_path / "a" / "metrics.jsonl") == strip(tmp_path / "b" / "metrics.jsonl")


def test_a_run_saved_with_flat_masking_keys_resumes_exactly(tmp_path):
    """Runs saved before MaskingConfig stored the masking settings as flat TrainConfig keys (mask_type, mask_start,
    …); their last.pt must still resume, with the same masking and the same trajectory."""
    ds = tiny_dataset()
    t = tcfg(iterations=8, val_every=0, mask_type="dropout", mask_start=3, mask_end=6)
    assert t.masking.type == "dropout" and (t.masking.start, t.masking.end, t.masking.max_patch) == (3, 6, 2)
    train(CFG, t, tmp_path / "a", train_ds=ds, progress=False)
    train(CFG, t, tmp_path / "b", train_ds=ds, progress=False, stop_at=4)
    last = tmp_path / "b" / "last.pt"
    flatten_masking(last)
    old = read_checkpoint(last)["train"]
    assert "masking" not in old and old["mask_type"] == "dropout" and old["mask_max_patch"] == 2
    cfg2, t2, resumed = read_run(tmp_path / "b")
    assert t2 == t and resumed["iteration"] == 4
    train(cfg2, t2, tmp_path / "b", train_ds=ds, progress=False, resume_from=resumed)
    a, b = read_checkpoint(tmp_path / "a" / "last.pt"), read_checkpoint(last)
    assert b["iteration"] == 8 and b["train"]["masking"] == a["train"]["masking"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def flatten_masking(last) -> None:
    """Rewrite ``last`` as versions before MaskingConfig saved it: the masking settings as flat mask_* keys."""
    from vitca_cli.io.checkpoint import save_checkpoint

    ckpt = read_checkpoint(last)
    old = {k: v for k, v in ckpt["train"].items() if k != "masking"}
    old.update({f"mask_{k}": v for k, v in ckpt["train"]["masking"].items()})
    extra = {k: v for k, v in ckpt.items() if k not in ("format", "version", "config", "model", "meta", "train")}
    save_checkpoint(last, CAConfig.from_dict(ckpt["config"]), ckpt["model"], ckpt["meta"], train=old, **extra)


def test_cli_resumes_a_run_folder_saved_with_flat_masking_keys(tmp_path):
    photos = photo_folder(tmp_path, 6, (12, 12), seed=3)
    run = tmp_path / "run"
    args = [
        "train",
        "--dataset",
        f"folder:{photos}",
        "--image-size",
        "8",
        "-o",
        str(run),
        "--iterations",
        "4",
        "--t-min",
        "2",
        "--t-max",
        "2",
        "-b",
        "2",
        "--embed",
        "16",
        "--heads",
        "2",
        "--mlp",
        "16",
        "--hidden",
        "4",
        "--val-every",
        "0",
        "--no-compile",
        "--mask-type",
        "dropout",
        "--mask-max-patch",
        "2",
        "--mask-start",
        "5",
        "--mask-end",
        "50",
    ]
    res = CliRunner().invoke(app, [*args, "--stop-at", "2"])
    assert res.exit_code == 0, res.output
    flatten_masking(run / "last.pt")
    assert "masking" not in read_checkpoint(run / "last.pt")["train"]
    res = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert res.exit_code == 0, res.output
    ckpt = read_checkpoint(run / "last.pt")
    assert ckpt["iteration"] == 4 and ckpt["meta"]["mask_type"] == "dropout"
    assert ckpt["train"]["masking"] == {
        "type": "dropout",
        "start": 5,
        "end": 50,
        "max_prob": 0.75,
        "prob_stages": 3,
        "max_patch": 2,
        "patch_stages": 3,
    }
    assert json.loads((run / "config.json").read_text())["train"]["masking"]["end"] == 50


def test_run_folder_contents_and_checkpoint_meta(tmp_path):
    summary = train(CFG, tcfg(), tmp_path, train_ds=tiny_dataset(), val_ds=tiny_dataset(8, 1), progress=False,
                    argv=["vitca", "train", "--seed", "0"])  # fmt: skip
    assert summary["status"] == "done" and summary["iteration"] == 12
    for name in ("config.json", "command.txt", "metrics.jsonl", "last.pt", "best.pt"):
        assert (tmp_path / name).is_file(), name
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["seed"] == 0 and config["argv"][:2] == ["vitca", "train"] and config["model"]["hidden"] == 4
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert {"optimizer", "scheduler", "pool", "rng", "iteration"} <= set(last)
    model, meta = load_model(tmp_path / "best.pt")
    assert meta["dataset"] == "tiny" and meta["val_steps"] == 4 and meta["mask_type"] == "noise"
    assert meta["image_size"] == [SIZE, SIZE] and meta["best_val_psnr"] == pytest.approx(summary["best_val_psnr"])
    assert meta["best_val_ssim"] is None  # 8×8 is smaller than the 11×11 SSIM window: reported as absent
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]  # noqa: E741
    assert [r["iteration"] for r in lines if "val_psnr" in r] == [4, 8, 12]
    assert math.isclose(lines[0]["lr"], 1e-3)  # cosine starts at the base lr ...
    assert lines[-2]["lr"] < 1e-4  # ... and decays towards 0


def test_warmup_ramps_the_lr_linearly_then_follows_the_cosine_and_resumes_exactly(tmp_path):
    t = tcfg(iterations=12, warmup=4, val_every=0)
    cosine = t.replace(warmup=0)
    assert [lr_factor(i, t) / lr_factor(i, cosine) for i in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1, 1])
    ds = tiny_dataset()
    train(CFG, t, tmp_path / "a", train_ds=ds, progress=False)
    logged = [json.loads(l)["lr"] for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]  # noqa: E741
    assert logged[0] == pytest.approx(2.5e-4) and logged == pytest.approx([1e-3 * lr_factor(i, t) for i in range(12)])
    assert max(logged) == logged[3] and logged[-1] < logged[4]  # peak right after the warm-up, then decay
    train(CFG, t, tmp_path / "b", train_ds=ds, progress=False, stop_at=2)  # stop inside the warm-up ...
    cfg2, t2, ckpt = read_run(tmp_path / "b")
    assert t2.warmup == 4
    train(cfg2, t2, tmp_path / "b", train_ds=ds, progress=False, resume_from=ckpt)  # ... and finish it
    a, b = read_checkpoint(tmp_path / "a" / "last.pt"), read_checkpoint(tmp_path / "b" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    train(CFG, tcfg(iterations=4), tmp_path, train_ds=tiny_dataset(), progress=False)
    before = (tmp_path / "last.pt").read_bytes()
    cfg, t, ckpt = read_run(tmp_path)
    with pytest.raises(VitcaError, match=r"loss became nan at iteration 5.*last\.pt \(iteration 4\)"):
        train(cfg, t.replace(iterations=8, alpha=float("nan")), tmp_path, train_ds=tiny_dataset(),
              progress=False, resume_from=ckpt)  # fmt: skip
    assert (tmp_path / "last.pt").read_bytes() == before


class InterruptingDataset(ImageDataset):
    """Sends the process a real SIGINT while drawing the batch of the 3rd fresh-batch iteration."""

    calls = 0

    def batch(self, indices, generator=None):
        InterruptingDataset.calls += 1
        if InterruptingDataset.calls == 3:
            signal.raise_signal(signal.SIGINT)
        return super().batch(indices, generator)


def test_ctrl_c_finishes_the_iteration_and_saves(tmp_path):
    base = tiny_dataset()
    ds = InterruptingDataset("tiny", array=base.array.numpy(), labels=base.labels)
    summary = train(CFG, tcfg(iterations=50, val_every=0, pool_size=0), tmp_path, train_ds=ds, progress=False)
    assert summary["status"] == "interrupted" and summary["iteration"] == 3
    assert read_checkpoint(tmp_path / "last.pt")["iteration"] == 3


def test_bad_training_config_is_a_usage_error():
    with pytest.raises(UsageError, match="t_min"):
        tcfg(t_min=5, t_max=3)
    with pytest.raises(UsageError, match="not both"):
        tcfg(checkpointing=True, fusion_mitosis=True)
    with pytest.raises(UsageError, match="warm-up"):
        tcfg(warmup=-1)


def test_bf16_rollout_keeps_an_fp32_grid_and_matches_fp32_gradients():
    torch.manual_seed(0)
    ca = CellularAutomaton(CFG)
    torch.nn.init.normal_(ca.rule.head[1].weight, std=0.1)  # a rule that moves the grid
    x = torch.rand(4, 1, SIZE, SIZE)
    z0 = ca.seed(x)
    grads, grids = {}, {}
    for precision in ("fp32", "bf16"):
        ca.zero_grad()
        z = rollout(ca, z0, 6, tcfg(precision=precision), torch.Generator().manual_seed(3))
        assert z.dtype == torch.float32  # the carried state (and what goes to the pool) is never bfloat16
        ca_loss(ca, z, x, 100.0, 100.0)[0].backward()
        grads[precision] = [p.grad.clone() for p in ca.parameters()]
        grids[precision] = z.detach()
    assert 0 < (grids["bf16"] - grids["fp32"]).abs().max().item() < 0.05  # bf16 products really ran
    for g32, g16 in zip(grads["fp32"], grads["bf16"]):
        assert (g16 - g32).norm() <= 0.1 * g32.norm() + 1e-6
    with pytest.raises(UsageError, match="precision"):
        tcfg(precision="fp16")


def test_cli_train_and_resume_on_png_folder(tmp_path, monkeypatch):
    photos = photo_folder(tmp_path, 12, (20, 24, 3), seed=0)
    run = tmp_path / "run"
    common = ["--t-min", "2", "--t-max", "3", "--val-size", "2", "--val-steps", "2", "--embed", "16", "--heads",
              "2", "--mlp", "16", "--hidden", "4", "-b", "2", "--mask-max-patch", "2", "--no-compile"]  # fmt: skip
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--dataset", f"folder:{photos}", "--image-size", "8", "-o", str(run),
                              "--iterations", "4", "--val-every", "2", "--stop-at", "2", *common])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert read_checkpoint(run / "last.pt")["iteration"] == 2
    res = runner.invoke(app, ["train", "--resume", str(run), "--lr", "0.1"])
    assert res.exit_code == 2 and "cannot change --lr" in res.output
    res = runner.invoke(app, ["train", "--dataset", f"folder:{photos}", "--image-size", "8", "-o", str(run)])
    assert res.exit_code == 2 and f"--run-dir {run} already holds a run; resume it (--resume {run})" in res.output
    monkeypatch.setattr("vitca_cli.runtime.cpu_has_native_bf16", lambda: False)  # an AVX2-only CPU
    res = runner.invoke(app, ["train", "--resume", str(run), "--precision", "bf16"])  # speed knobs may change
    assert res.exit_code == 0, res.output
    assert "no bfloat16 instructions" in res.output and "prefer --precision fp32" in res.output
    assert json.loads((run / "config.json").read_text())["train"]["precision"] == "bf16"
    ckpt = read_checkpoint(run / "last.pt")
    assert ckpt["iteration"] == 4 and ckpt["config"]["channels"] == 3 and tuple(ckpt["config"]["image_size"]) == (8, 8)
    assert len((run / "command.txt").read_text().splitlines()) == 2
    res = runner.invoke(
        app, ["train", "--dataset", f"folder:{photos}", "--precision", "fp16", "-o", str(tmp_path / "r3")]
    )
    assert res.exit_code == 2 and "precision must be one of" in res.output
    res = runner.invoke(app, ["train", "--dataset", f"folder:{tmp_path / 'none'}", "--image-size", "8"])
    assert res.exit_code == 1 and "image folder not found" in res.output
    res = runner.invoke(
        app, ["train", "--dataset", f"folder:{photos}", "--image-size", "10", "-o", str(tmp_path / "r2")]
    )
    assert res.exit_code == 2 and "does not divide" in res.output


def test_cli_init_weights_starts_a_new_run_from_trained_weights(tmp_path):
    photos = photo_folder(tmp_path, 6, (12, 12, 3), seed=1)
    common = ["--dataset", f"folder:{photos}", "--t-min", "2", "--t-max", "2", "-b", "2", "--mask-max-patch", "2",
              "--val-every", "0", "--no-compile"]  # fmt: skip
    runner = CliRunner()
    first = tmp_path / "first"
    res = runner.invoke(app, ["train", *common, "--image-size", "8", "--embed", "16", "--heads", "2", "--mlp", "16",
                              "--hidden", "4", "--iterations", "3", "-o", str(first)])  # fmt: skip
    assert res.exit_code == 0, res.output
    second = tmp_path / "second"
    res = runner.invoke(app, ["train", *common, "--init-weights", str(first / "best.pt"), "--iterations", "1",
                              "--lr", "1e-12", "--warmup", "5", "-o", str(second)])  # fmt: skip
    assert res.exit_code == 0, res.output
    a, b = read_checkpoint(first / "best.pt"), read_checkpoint(second / "last.pt")
    assert b["config"] == a["config"] and b["iteration"] == 1  # model and image size come from the weights
    assert b["train"]["warmup"] == 5
    assert max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]) < 1e-6
    assert b["train"]["init_weights"].startswith("best (best.pt, sha256 ")
    fresh = CellularAutomaton(CAConfig.from_dict(a["config"])).state_dict()
    assert any((fresh[k] - b["model"][k]).abs().max() > 1e-3 for k in fresh)  # not a fresh initialisation
    res = runner.invoke(app, ["train", *common, "--init-weights", str(first / "best.pt"), "--embed", "32"])
    assert res.exit_code == 2 and "cannot also set --embed" in res.output
    third = tmp_path / "third"  # options that change no weight may change with the same weights
    res = runner.invoke(app, ["train", *common, "--init-weights", str(first / "best.pt"), "--iterations", "1",
                              "--cell-init", "fill", "--update-rate", "0.75", "-o", str(third)])  # fmt: skip
    assert res.exit_code == 0, res.output
    c = read_checkpoint(third / "last.pt")["config"]
    assert (c["cell_init"], c["update_rate"]) == ("fill", 0.75) and c["hidden"] == a["config"]["hidden"]
    res = runner.invoke(app, ["train", "--resume", str(second), "--init-weights", str(first / "best.pt")])
    assert res.exit_code == 2 and "pick one" in res.output
    res = runner.invoke(app, ["train", *common, "--init-weights", str(tmp_path / "missing.pt")])
    assert res.exit_code == 3 and "not found" in res.output


def test_cli_init_weights_moves_a_fixed_position_encoding_to_another_size_but_not_a_learned_one(tmp_path):
    photos = photo_folder(tmp_path, 6, (12, 12, 3), seed=2)
    common = ["--dataset", f"folder:{photos}", "--t-min", "2", "--t-max", "2", "-b", "2", "--mask-max-patch", "2",
              "--val-every", "0", "--no-compile", "--iterations", "1"]  # fmt: skip
    small = ["--image-size", "8", "--embed", "16", "--heads", "2", "--mlp", "16", "--hidden", "4"]
    runner = CliRunner()
    for kind, moved in (("vit", True), ("learned", False)):
        first = tmp_path / f"{kind}8"
        res = runner.invoke(app, ["train", *common, *small, "--pos-encoding", kind, "-o", str(first)])
        assert res.exit_code == 0, res.output
        res = runner.invoke(app, ["train", *common, "--init-weights", str(first / "best.pt"), "--image-size", "12",
                                  "-o", str(tmp_path / f"{kind}12")])  # fmt: skip
        if moved:
            assert res.exit_code == 0, res.output
            assert list(read_checkpoint(tmp_path / f"{kind}12" / "last.pt")["config"]["image_size"]) == [12, 12]
        else:
            assert res.exit_code == 2 and "learned position encoding" in res.output


def test_profile_training_reports_times_and_checkpointing_saves_memory():
    from vitca_cli.training.profiling import profile_training

    cfg = preset("mnist", image_size=(16, 16))
    args = dict(batch=4, height=16, width=16, steps=8, repeats=1)
    plain = profile_training(cfg, mode="plain", **args)  # each in a fresh subprocess: honest RSS peaks
    ckpt = profile_training(cfg, mode="checkpointing", **args)
    for r in (plain, ckpt):
        assert r["memory_method"] in ("rss", "ru_maxrss") and r["forward_ms"] > 0 and r["backward_ms"] > 0
        assert r["nograd_rollout_ms"] > 0 and r["iteration_ms"] >= r["forward_ms"]
    assert 0 < ckpt["peak_bytes"] < plain["peak_bytes"]
    fm = profile_training(cfg, mode="fusion-mitosis", isolate=False, **args)
    assert fm["mode"] == "fusion-mitosis" and fm["backward_ms"] > 0
    with pytest.raises(ValueError, match="mode"):
        profile_training(cfg, mode="nope")


def test_cpu_bf16_detection_reads_the_cpu_flags():
    from vitca_cli.runtime import cpu_has_native_bf16

    flags = open("/proc/cpuinfo").read() if sys.platform.startswith("linux") else ""
    expected = ("avx512_bf16" in flags or "amx_bf16" in flags) if " flags" in flags or "flags\t" in flags else None
    assert cpu_has_native_bf16() is expected


def test_a_warm_started_run_validates_its_initial_weights_first(tmp_path):
    photos = photo_folder(tmp_path, 12, (12, 12, 3), seed=2)
    common = ["--dataset", f"folder:{photos}", "--t-min", "2", "--t-max", "2", "-b", "2", "--mask-max-patch", "2",
              "--val-size", "2", "--val-steps", "2", "--no-compile"]  # fmt: skip
    runner = CliRunner()
    first = tmp_path / "first"
    res = runner.invoke(app, ["train", *common, "--image-size", "8", "--embed", "16", "--heads", "2", "--mlp", "16",
                              "--hidden", "4", "--iterations", "2", "--val-every", "2", "-o", str(first)])  # fmt: skip
    assert res.exit_code == 0, res.output

    def vals(run):
        return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_psnr" in r]

    assert [r["iteration"] for r in vals(first)] == [2]  # a fresh initialisation has no origin worth scoring
    second = tmp_path / "second"
    res = runner.invoke(app, ["train", *common, "--init-weights", str(first / "last.pt"), "--iterations", "4",
                              "--val-every", "2", "--lr", "1e-2", "--stop-at", "2", "-o", str(second)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "iteration 0 (the initial weights): validation PSNR" in res.output
    origin = vals(second)[0]
    assert origin["iteration"] == 0
    # The origin is the initial weights on the second run's own validation damage.
    cfg, tcfg = CAConfig.from_dict(read_checkpoint(first / "last.pt")["config"]), read_run(second)[1]
    val = open_dataset(tcfg.dataset, "val", tcfg.data_dir, tuple(cfg.image_size))
    probe = Trainer(cfg, tcfg, val, val)
    probe.ca.load_state_dict(read_checkpoint(first / "last.pt")["model"])
    assert probe.validate()["val_psnr"] == pytest.approx(origin["val_psnr"], abs=1e-5)
    res = runner.invoke(app, ["train", "--resume", str(second)])  # resuming does not score the origin again
    assert res.exit_code == 0, res.output
    assert [r["iteration"] for r in vals(second)] == [0, 2, 4]


def test_the_weight_average_follows_its_recurrence_and_starts_where_it_is_turned_on(tmp_path):
    ds = tiny_dataset()
    trainer = Trainer(CFG, tcfg(ema=0.75, lr=1e-2), ds)
    expected = {k: v.clone() for k, v in trainer.state_dict_model().items()}  # the average starts at the weights
    for _ in range(3):
        trainer.step()
        weights = trainer.state_dict_model()
        expected = {k: 0.75 * expected[k] + 0.25 * weights[k] for k in weights}
        average = trainer.state_dict_model(average=True)
        for k in weights:
            assert torch.allclose(average[k], expected[k], atol=1e-6), k
    assert trainer.average_updates == 3
    assert not all(torch.equal(average[k], weights[k]) for k in weights)
    # A run saved without an average and resumed with one starts it at the resumed weights.
    train(CFG, tcfg(iterations=4, val_every=0), tmp_path / "run", train_ds=ds, progress=False)
    _, t, ckpt = read_run(tmp_path / "run")
    assert "ema" not in ckpt and not (tmp_path / "run" / "ema.pt").exists()
    resumed = Trainer(CFG, t.replace(ema=0.5, iterations=6), ds)
    resumed.load(ckpt)
    for k, v in resumed.state_dict_model(average=True).items():
        assert torch.equal(v, ckpt["model"][k]), k
    assert TrainConfig.from_dict({**t.to_dict(), "ema": 0.999}).ema == 0.999
    with pytest.raises(UsageError, match="decay must be in"):
        tcfg(ema=1.0)


def test_a_run_with_a_weight_average_resumes_it_exactly_and_saves_it(tmp_path):
    ds, val = tiny_dataset(), tiny_dataset(8, seed=1)
    t = tcfg(iterations=20, val_every=5, ema=0.9)
    train(CFG, t, tmp_path / "a", train_ds=ds, val_ds=val, progress=False)
    train(CFG, t, tmp_path / "b", train_ds=ds, val_ds=val, progress=False, stop_at=10)
    cfg2, t2, ckpt = read_run(tmp_path / "b")
    assert t2.ema == 0.9 and ckpt["ema_updates"] == 10
    train(cfg2, t2, tmp_path / "b", train_ds=ds, val_ds=val, progress=False, resume_from=ckpt)
    a, b = read_checkpoint(tmp_path / "a" / "ema.pt"), read_checkpoint(tmp_path / "b" / "ema.pt")
    assert read_checkpoint(tmp_path / "a" / "last.pt")["ema_updates"] == 20
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    weights = read_checkpoint(tmp_path / "a" / "last.pt")["model"]
    assert not all(torch.equal(a["model"][k], weights[k]) for k in a["model"])
    assert a["meta"]["weights"] == "moving average (decay 0.9, 20 iterations)"
    model, _ = load_model(tmp_path / "a" / "ema.pt")  # what `vitca eval -w RUN/ema.pt` and ship read
    assert isinstance(model, CellularAutomaton)
    lines = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]  # noqa: E741
    vals = [r for r in lines if "val_psnr" in r]
    assert [r["iteration"] for r in vals] == [5, 10, 15, 20]
    assert all({"ema_val_psnr", "ema_val_psnr_batch", "ema_val_l1"} <= set(r) for r in vals)
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k != "time"} for l in p.read_text().splitlines()]  # noqa
    assert strip(tmp_path / "a" / "metrics.jsonl") == strip(tmp_path / "b" / "metrics.jsonl")
    # best.pt holds whichever of the two validated best, and says which.
    best = max((r[p + "val_psnr"], p) for r in vals for p in ("", "ema_"))
    ckpt = read_checkpoint(tmp_path / "a" / "best.pt")
    assert ckpt["meta"]["best_val_psnr"] == pytest.approx(best[0])
    assert ("weights" in ckpt["meta"]) == (best[1] == "ema_")


def test_best_pt_takes_the_weight_average_when_it_validates_better(tmp_path, monkeypatch):
    import vitca_cli.training.train as loop

    trainer = Trainer(CFG, tcfg(ema=0.5, lr=1e-2), tiny_dataset(), tiny_dataset(8, seed=1))
    for _ in range(2):
        trainer.step()
    figures = {"val_psnr": 10.0, "val_ssim": None, "val_psnr_batch": 9.0, "val_l1": 0.2}
    better = {**figures, **{f"ema_{k}": (v + 2 if v else v) for k, v in figures.items()}}
    monkeypatch.setattr(trainer, "validate", lambda: better)
    with open(tmp_path / "metrics.jsonl", "w") as metrics:
        loop._validate(trainer, tmp_path, metrics)
    saved = read_checkpoint(tmp_path / "best.pt")
    average = trainer.state_dict_model(average=True)
    assert all(torch.equal(saved["model"][k], average[k]) for k in average)
    assert trainer.best["weights"] == "moving average" and saved["meta"]["best_val_psnr"] == 12.0
    monkeypatch.setattr(trainer, "validate", lambda: {**better, "val_psnr": 13.0})  # now the weights lead
    with open(tmp_path / "metrics.jsonl", "a") as metrics:
        loop._validate(trainer, tmp_path, metrics)
    saved, weights = read_checkpoint(tmp_path / "best.pt"), trainer.state_dict_model()
    assert all(torch.equal(saved["model"][k], weights[k]) for k in weights)
    assert trainer.best["weights"] == "weights" and "weights" not in saved["meta"]


@pytest.mark.parametrize("schedule", ["1,1:1,2", "1,1:1,2+detail"])
def test_a_run_trained_with_a_fusion_schedule_is_replayed_by_denoise(tmp_path, schedule):
    photos = photo_folder(tmp_path, 6, (16, 16, 3), seed=4)
    run = tmp_path / "fused"
    res = CliRunner().invoke(app, [
        "train", "--dataset", f"folder:{photos}", "--image-size", "8", "--embed", "16", "--heads", "2", "--mlp", "16",
        "--hidden", "4", "--pos-encoding", "none", "--t-min", "5", "--t-max", "6", "-b", "2", "--mask-max-patch", "2",
        "--val-every", "0", "--no-compile", "--iterations", "2", "--fusion-schedule", schedule, "-o", str(run),
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert read_checkpoint(run / "best.pt")["meta"]["fusion_schedule"] == schedule
    out = tmp_path / "out.png"
    res = CliRunner().invoke(app, ["-v", "denoise", str(photos / "p0.png"), "-w", str(run / "best.pt"), "-o", str(out),
                                   "--iters", "8"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert f"fused {schedule}" in res.output and Image.open(out).size == (16, 16)
    res = CliRunner().invoke(app, ["denoise", str(photos / "p0.png"), "-w", str(run / "best.pt"), "-o", "-",
                                   "--iters", "4"])  # fmt: skip
    assert res.exit_code == 2 and "at least 5" in res.output


def test_a_run_on_drawn_holes_only_picks_its_best_weights_by_the_psnr_inside_the_holes():
    ds = tiny_dataset()
    holes = Trainer(CFG, tcfg(corruptions="scribbles:1, blobs:1"), ds, ds)
    assert holes.selection == "val_psnr_holes"
    figures = holes.validate()
    assert math.isfinite(figures["val_psnr_holes"])
    noise = Trainer(CFG, tcfg(corruptions="gaussian=0.1:1, scribbles:1"), ds, ds)
    assert noise.selection == "val_psnr_batch"
