"""The weights registry, `vitca weights`, and training/ship.py, on real checkpoints written by the tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import vitca_cli.io.weights as weights_mod
from vitca_cli.cli import app
from vitca_cli.errors import WeightsError
from vitca_cli.io.checkpoint import read_checkpoint, save_checkpoint
from vitca_cli.io.weights import resolve, write_manifest_entry
from vitca_cli.nca.config import CAConfig
from vitca_cli.nca.model import CellularAutomaton
from vitca_cli.training.ship import ship

CFG = CAConfig(embed=16, heads=2, mlp=16, hidden=4, pos_encoding="none")


@pytest.fixture
def dirs(weights_dirs):
    return weights_dirs


def training_checkpoint(path: Path) -> Path:
    """What a training run writes: model plus optimizer, pool and RNG state."""
    ca = CellularAutomaton(CFG)
    with torch.no_grad():
        ca.rule.head[1].weight.normal_(0, 0.1)
    opt = torch.optim.AdamW(ca.parameters())
    ca(ca.seed(torch.rand(1, 1, 4, 4)), 1).sum().backward()
    opt.step()
    save_checkpoint(
        path,
        CFG,
        ca.state_dict(),
        {"dataset": "tiny", "mask_type": "dropout"},
        optimizer=opt.state_dict(),
        pool={"z": torch.zeros(8, 10, 4, 4)},
        iteration=120,
        rng=torch.get_rng_state(),
    )
    return path


def test_cache_dir_follows_vitca_home(dirs):
    _, home = dirs
    assert weights_mod.cache_dir() == home / "weights"


def test_resolve_by_path_and_by_cached_name(dirs, tmp_path):
    _, home = dirs
    ck = training_checkpoint(tmp_path / "run.pt")
    ref = resolve(str(ck))
    assert ref.path == ck and ref.source == "path"
    (home / "weights").mkdir(parents=True)
    (home / "weights" / "mine.pt").write_bytes(ck.read_bytes())
    ref = resolve("mine")
    assert ref.source == "cache" and ref.path.name == "mine.pt"


def test_unknown_name_and_missing_path(dirs):
    with pytest.raises(WeightsError, match="unknown weights 'nope'"):
        resolve("nope")
    with pytest.raises(WeightsError, match="not found"):
        resolve("some/dir/x.pt")


def test_default_for_channels_and_missing_default(dirs, tmp_path):
    _, home = dirs
    with pytest.raises(WeightsError, match="no default weights for 3-channel"):
        resolve(None, channels=3)
    (home / "weights").mkdir(parents=True)
    (home / "weights" / "photo.pt").write_bytes(training_checkpoint(tmp_path / "p.pt").read_bytes())
    assert resolve(None, channels=3).name == "photo"
    with pytest.raises(WeightsError, match="no default weights for 3-channel"):  # inpaint has its own default
        resolve(None, channels=3, command="inpaint")
    (home / "weights" / "photo-inpaint.pt").write_bytes((home / "weights" / "photo.pt").read_bytes())
    assert resolve(None, channels=3, command="inpaint").name == "photo-inpaint"
    assert resolve(None, channels=3, command="denoise").name == "photo"


def test_ship_strips_training_state_and_writes_a_checked_manifest_entry(dirs, tmp_path):
    shipped, _ = dirs
    run = tmp_path / "run"
    run.mkdir()
    ck = training_checkpoint(run / "best.pt")
    (run / "metrics.jsonl").write_text(
        '{"iteration": 100, "val_psnr": 18.5, "val_ssim": 0.61}\n{"iteration": 120, "val_psnr": 19.25, '
        '"val_ssim": 0.66}\n{"iteration": 140, "loss": 3.0}\n'
    )
    (run / "command.txt").write_text("vitca train --dataset tiny --iters 140")
    entry = ship(ck, "tiny", weights_dir=shipped)
    obj = read_checkpoint(shipped / "tiny.pt")
    assert set(obj) == {"format", "version", "config", "model", "meta"}
    assert obj["meta"]["shipped_from"] == "best.pt"
    assert (shipped / "tiny.pt").stat().st_size < ck.stat().st_size
    assert entry["iterations"] == 120 and entry["val_psnr"] == 19.25 and entry["val_ssim"] == 0.66
    assert entry["dataset"] == "tiny" and entry["channels"] == 1 and entry["image_size"] == [28, 28]
    assert entry["mask_type"] == "dropout" and entry["trained"].startswith("vitca train")
    assert entry["sha256"] == hashlib.sha256((shipped / "tiny.pt").read_bytes()).hexdigest()
    manifest = json.loads((shipped / "manifest.json").read_text())
    assert [m["name"] for m in manifest["models"]] == ["tiny"]
    # the shipped model resolves by name, verified, and loads with the same weights
    ref = resolve("tiny")
    assert ref.source == "shipped" and ref.entry["sha256"] == entry["sha256"]
    same = read_checkpoint(ck)["model"]
    assert all(torch.equal(obj["model"][k], same[k]) for k in same)
    assert "max_iters" not in entry and "max_iters" not in obj["meta"]
    # shipping again replaces the entry instead of duplicating it; max_iters goes into the entry and the meta
    ship(ck, "tiny", weights_dir=shipped, val_psnr=20.0, default_iters=16, max_iters=48)
    manifest = json.loads((shipped / "manifest.json").read_text())
    assert len(manifest["models"]) == 1 and manifest["models"][0]["val_psnr"] == 20.0
    assert manifest["models"][0]["max_iters"] == 48 and manifest["models"][0]["default_iters"] == 16
    assert read_checkpoint(shipped / "tiny.pt")["meta"]["max_iters"] == 48  # what `vitca inpaint` reads


def test_checksum_mismatch_is_a_clear_error(dirs, tmp_path):
    shipped, _ = dirs
    ship(training_checkpoint(tmp_path / "c.pt"), "tiny", weights_dir=shipped)
    data = bytearray((shipped / "tiny.pt").read_bytes())
    data[-10] ^= 0xFF
    (shipped / "tiny.pt").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="checksum mismatch.*delete it and reinstall"):
        resolve("tiny")


def test_listed_but_missing_file(dirs):
    shipped, _ = dirs
    write_manifest_entry({"name": "gone", "file": "gone.pt", "sha256": "0" * 64}, shipped)
    with pytest.raises(WeightsError, match="missing"):
        resolve("gone")


def test_download_into_the_cache_checks_the_sha(dirs, tmp_path):
    shipped, home = dirs
    src = training_checkpoint(tmp_path / "remote.pt")
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    write_manifest_entry({"name": "remote", "file": "remote.pt", "sha256": sha, "url": src.as_uri()}, shipped)
    ref = resolve("remote")
    assert ref.path == home / "weights" / "remote.pt" and ref.path.read_bytes() == src.read_bytes()
    write_manifest_entry({"name": "bad", "file": "bad.pt", "sha256": "f" * 64, "url": src.as_uri()}, shipped)
    with pytest.raises(WeightsError, match="fail their checksum"):
        resolve("bad")
    assert not (home / "weights" / "bad.pt").exists()
    assert [p.name for p in (home / "weights").iterdir()] == ["remote.pt"]  # no temporary left behind


def test_unreadable_manifest(dirs):
    shipped, _ = dirs
    (shipped / "manifest.json").write_text("{not json")
    with pytest.raises(WeightsError, match="manifest"):
        resolve("anything")


def test_weights_commands(dirs, tmp_path):
    shipped, home = dirs
    ship(
        training_checkpoint(tmp_path / "c.pt"),
        "tiny",
        dataset="Tiny set",
        weights_dir=shipped,
        val_psnr=19.0,
        val_ssim=0.7,
    )
    (home / "weights").mkdir(parents=True)
    (home / "weights" / "mine.pt").write_bytes((tmp_path / "c.pt").read_bytes())
    runner = CliRunner()
    result = runner.invoke(app, ["weights", "list"])
    assert result.exit_code == 0
    assert "tiny" in result.stdout and "19.00" in result.stdout and "shipped" in result.stdout
    assert "mine" in result.stdout and "cached" in result.stdout
    rows = json.loads(runner.invoke(app, ["weights", "list", "--json"]).stdout)
    assert {r["name"]: r["status"] for r in rows} == {"tiny": "ok", "mine": "ok"}
    result = runner.invoke(app, ["weights", "path", "tiny"])
    assert result.exit_code == 0 and result.stdout.strip() == str(shipped / "tiny.pt")
    assert runner.invoke(app, ["weights", "path"]).stdout.strip() == str(home / "weights")
    info = json.loads(runner.invoke(app, ["weights", "show", "tiny", "--json"]).stdout)
    assert info["parameters"] > 0 and info["config"]["embed"] == 16 and info["manifest"]["dataset"] == "Tiny set"
    result = runner.invoke(app, ["weights", "show", "nope"])
    assert result.exit_code == 3 and "unknown weights" in result.stderr


def test_each_shipped_checkpoint_carries_its_manifest_entry_run_settings():
    """A run reads its default steps and fusion from the checkpoint's meta; ``vitca weights list`` from the
    manifest: the shipped files must say the same."""
    shipped = Path(__file__).resolve().parents[2] / "weights"
    entries = json.loads((shipped / "manifest.json").read_text())["models"]
    for entry in (e for e in entries if e["file"].endswith(".pt")):
        meta = read_checkpoint(shipped / entry["file"])["meta"]
        for key in ("default_iters", "default_fusion", "max_iters"):
            assert meta.get(key) == entry.get(key), (entry["name"], key)
