"""Carrying a run between machines (``python -m vitca_cli.training.carry``): the run folder without the pool, whole or
not at all, resumable by `vitca train --resume` with the same schedule and weights."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.training.test_training import CFG, tcfg, tiny_dataset
from vitca_cli.io.checkpoint import read_checkpoint
from vitca_cli.training.carry import carry, main
from vitca_cli.training.run import read_run
from vitca_cli.training.train import train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def stopped_run(tmp_path):
    """A 12-iteration run stopped at iteration 6 (validation every 3, so it has a best.pt)."""
    run = tmp_path / "run"
    t = tcfg(iterations=12, val_every=3, pool_size=16)
    train(CFG, t, run, train_ds=tiny_dataset(), val_ds=tiny_dataset(8, seed=1), progress=False, stop_at=6)
    (run / "command.txt").write_text("vitca train --iterations 12\n")  # what the CLI appends to it
    return run


def test_the_carried_copy_keeps_the_resumable_state_without_the_pool(stopped_run, tmp_path):
    dest = tmp_path / "carried"
    carry(stopped_run, dest)
    src, got = read_checkpoint(stopped_run / "last.pt"), read_checkpoint(dest / "last.pt")
    assert src["pool"]["z"].shape[0] > 4 and got["pool"] == {}
    assert got["iteration"] == src["iteration"] == 6
    assert all(torch.equal(src["model"][k], got["model"][k]) for k in src["model"])
    moments = lambda c: [s["exp_avg_sq"] for s in c["optimizer"]["state"].values()]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(moments(src), moments(got)))
    assert got["scheduler"] == src["scheduler"] and got["best"] == src["best"]
    assert torch.equal(got["rng"]["device"], src["rng"]["device"])
    assert {p.name for p in dest.iterdir()} == {"last.pt", "best.pt", "config.json", "command.txt", "metrics.jsonl"}
    assert (dest / "metrics.jsonl").read_text() == (stopped_run / "metrics.jsonl").read_text()
    pool_bytes = sum(t.numel() * t.element_size() for t in src["pool"].values())
    assert (stopped_run / "last.pt").stat().st_size - (dest / "last.pt").stat().st_size >= 0.9 * pool_bytes


def test_a_carried_run_resumes_on_the_same_schedule_and_refills_its_pool(stopped_run, tmp_path):
    dest = tmp_path / "carried"
    carry(stopped_run, dest)
    cfg, t, ckpt = read_run(dest)
    out = train(cfg, t, dest, train_ds=tiny_dataset(), val_ds=tiny_dataset(8, seed=1), progress=False,
                resume_from=ckpt)  # fmt: skip
    assert out["status"] == "done" and out["iteration"] == 12
    trainer = out["trainer"]
    assert len(trainer.pool) > t.batch_size  # refilled from fresh batches
    uninterrupted = train(CFG, t, tmp_path / "whole", train_ds=tiny_dataset(), val_ds=tiny_dataset(8, seed=1),
                          progress=False)["trainer"]  # fmt: skip
    assert trainer.sched.state_dict()["last_epoch"] == uninterrupted.sched.state_dict()["last_epoch"]
    assert math.isclose(trainer.opt.param_groups[0]["lr"], uninterrupted.opt.param_groups[0]["lr"])
    assert all(torch.isfinite(p).all() for p in trainer.ca.parameters())


def test_a_run_with_a_weight_average_carries_it(tmp_path):
    run, dest = tmp_path / "run", tmp_path / "carried"
    t = tcfg(iterations=8, val_every=4, pool_size=16, ema=0.9)
    train(CFG, t, run, train_ds=tiny_dataset(), val_ds=tiny_dataset(8, seed=1), progress=False, stop_at=4)
    carry(run, dest)
    src, got = read_checkpoint(run / "last.pt"), read_checkpoint(dest / "last.pt")
    assert got["ema_updates"] == 4 and all(torch.equal(src["ema"][k], got["ema"][k]) for k in src["ema"])
    assert (dest / "ema.pt").read_bytes() == (run / "ema.pt").read_bytes()


def test_an_existing_destination_is_kept_unless_overwrite(stopped_run, tmp_path):
    dest = tmp_path / "carried"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    assert main([str(stopped_run), str(dest)]) == 2
    assert (dest / "keep.txt").read_text() == "mine" and not (dest / "last.pt").exists()
    assert main([str(stopped_run), str(dest), "--overwrite"]) == 0
    assert not (dest / "keep.txt").exists() and read_checkpoint(dest / "last.pt")["pool"] == {}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folders left


def test_the_run_folder_itself_and_folders_without_a_run_are_refused(stopped_run, tmp_path):
    assert main([str(stopped_run), str(stopped_run), "--overwrite"]) == 2
    assert read_checkpoint(stopped_run / "last.pt")["pool"] != {}
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    (weights_only / "last.pt").write_bytes((stopped_run / "best.pt").read_bytes())
    assert main([str(weights_only), str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_the_command_line_reports_a_missing_run_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "vitca_cli.training.carry", str(tmp_path / "nowhere"), str(tmp_path / "dest")],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere'}: no last.pt there (not a vitca run "
                                                "folder, or it never saved)"]  # fmt: skip
    assert not (tmp_path / "dest").exists()


def test_a_run_resumes_with_its_dataset_found_under_another_root(tmp_path):
    """On another machine the same dataset may live elsewhere: --data-dir may change on --resume, the dataset may
    not."""
    from typer.testing import CliRunner

    from tests.training.test_data import write_mnist_like
    from vitca_cli.cli import app

    write_mnist_like(tmp_path / "here" / "mnist", n_train=40, n_test=8)
    run = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "here"), "--image-size",
                              "8", "--embed", "16", "--heads", "2", "--mlp", "16", "--hidden", "4", "-b", "2",
                              "--t-min", "2", "--t-max", "2", "--mask-max-patch", "2", "--val-every", "0",
                              "--no-compile", "--iterations", "4", "--stop-at", "2", "-o", str(run)])  # fmt: skip
    assert res.exit_code == 0, res.output
    carry(run, tmp_path / "carried")
    (tmp_path / "here").rename(tmp_path / "there")
    res = runner.invoke(app, ["train", "--resume", str(tmp_path / "carried")])
    assert res.exit_code != 0 and "Traceback" not in res.output
    res = runner.invoke(app, ["train", "--resume", str(tmp_path / "carried"), "--data-dir", str(tmp_path / "there")])
    assert res.exit_code == 0, res.output
    assert "the pool refills from fresh batches" in res.output
    ckpt = read_checkpoint(tmp_path / "carried" / "last.pt")
    assert ckpt["iteration"] == 4 and ckpt["train"]["data_dir"] == str(tmp_path / "there")
    res = runner.invoke(app, ["train", "--resume", str(tmp_path / "carried"), "--dataset", "fashion-mnist",
                              "--iterations", "6"])  # fmt: skip
    assert res.exit_code == 2 and "cannot change --dataset" in res.output


def test_each_rank_state_of_a_distributed_run_is_carried_without_its_pool(stopped_run, tmp_path):
    from vitca_cli.io.checkpoint import save_checkpoint
    from vitca_cli.nca.config import CAConfig
    from vitca_cli.training.trainer import shard_path

    last = stopped_run / "last.pt"
    ckpt = read_checkpoint(last)
    cfg = CAConfig.from_dict(ckpt["config"])
    rest = {k: v for k, v in ckpt.items() if k not in ("format", "version", "config", "model", "meta", "world_size")}
    save_checkpoint(last, cfg, ckpt["model"], ckpt["meta"], world_size=2, **rest)  # as rank 0 of two writes it
    shard = shard_path(last, 1, 6)
    save_checkpoint(shard, cfg, {}, {}, iteration=6, world_size=2, pool=ckpt["pool"], rng=ckpt["rng"])
    carry(stopped_run, tmp_path / "carried")
    got = read_checkpoint(shard_path(tmp_path / "carried" / "last.pt", 1, 6))
    assert got["pool"] == {} and torch.equal(got["rng"]["data"], ckpt["rng"]["data"])
    shard.unlink()  # a folder missing a rank's state is refused, and nothing is written
    assert main([str(stopped_run), str(tmp_path / "again")]) != 0
    assert not (tmp_path / "again").exists()
