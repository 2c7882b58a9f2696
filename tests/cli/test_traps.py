"""Small traps a new user fell into (issue 53, item 6): a folder run that restores vitca's own earlier outputs, a
mask of another aspect ratio stretched without a word, a weights list too wide for a terminal and silent about the
defaults."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitca_cli import log
from vitca_cli.cli import main
from vitca_cli.io.checkpoint import save_checkpoint
from vitca_cli.io.weights import sha256_file
from vitca_cli.nca.config import CAConfig
from vitca_cli.nca.model import CellularAutomaton

TINY = dict(embed=16, heads=2, mlp=16, hidden=4, pos_encoding="none")


@pytest.fixture(autouse=True)
def isolated(weights_dirs):
    yield
    log.setup(0, False)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    torch.manual_seed(0)
    cfg = CAConfig(channels=3, **TINY)
    path = tmp_path_factory.mktemp("w") / "m.pt"
    save_checkpoint(path, cfg, CellularAutomaton(cfg).state_dict(), {"mask_type": "dropout"})
    return str(path)


def photo(path, h=12, w=10):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


# (a) a folder run and vitca's own outputs ---------------------------------------------------------------------------
def test_a_folder_run_leaves_out_vitcas_outputs_unless_asked(capsys, tmp_path, model_file):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.png", "a.restored.png", "b.input.png", "c.restored.input.png"):
        photo(src / name)
    run = ("denoise", src, "-w", model_file, "--iters", 1)
    code, _, err = cli(capsys, *run, "-o", tmp_path / "out")
    assert code == 0 and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]
    assert "3 file(s) named as vitca's own outputs" in err and "--include-outputs" in err
    code, _, _ = cli(capsys, "denoise", f"{src}/*.png", "-w", model_file, "--iters", 1, "-o", tmp_path / "glob")
    assert code == 0 and sorted(p.name for p in (tmp_path / "glob").iterdir()) == ["a.png"]  # a quoted glob too
    code, _, _ = cli(capsys, *run, "-o", tmp_path / "all", "--include-outputs")
    assert code == 0 and len(list((tmp_path / "all").iterdir())) == 4
    code, _, _ = cli(
        capsys, "denoise", src / "a.restored.png", "-w", model_file, "--iters", 1, "-o", tmp_path / "x.png"
    )
    assert code == 0 and (tmp_path / "x.png").is_file()  # a file named on its own is always taken

    only = tmp_path / "only"
    only.mkdir()
    photo(only / "a.restored.png")
    code, _, err = cli(capsys, "denoise", only, "-w", model_file, "--iters", 1, "-o", tmp_path / "none")
    (line,) = error_lines(err)
    assert code == 1 and "no images in folder but vitca's own outputs (add --include-outputs" in line


# (b) a mask of another aspect ratio ---------------------------------------------------------------------------------
def test_a_mask_of_another_aspect_ratio_is_refused_unless_stretching_is_asked(capsys, tmp_path, model_file):
    Image.fromarray(np.full((4, 8), 255, np.uint8)).save(tmp_path / "mask.png")  # 8×4 for a 10×12 image
    run = ("inpaint", photo(tmp_path / "in.png"), "--mask", tmp_path / "mask.png", "-w", model_file, "--iters", 1)
    code, _, err = cli(capsys, *run, "-o", tmp_path / "o.png")
    (line,) = error_lines(err)
    assert code == 2 and "8×4, a different aspect ratio from the image's 10×12" in line and "--stretch-mask" in line
    assert not (tmp_path / "o.png").exists()
    code, _, err = cli(capsys, *run, "-o", tmp_path / "o.png", "--stretch-mask")
    assert code == 0 and "aspect ratio NOT kept" in err and (tmp_path / "o.png").is_file()

    Image.fromarray(np.full((6, 5), 255, np.uint8)).save(tmp_path / "half.png")  # same aspect ratio, half size
    code, _, err = cli(capsys, *run[:3], tmp_path / "half.png", *run[4:], "-o", tmp_path / "h.png")
    assert code == 0 and "5×6 resized to the image's 10×12" in err and "same aspect ratio" in err


def test_the_api_refuses_a_mask_of_another_size(model_file):
    from vitca_cli import inpaint

    with pytest.raises(ValueError, match="mask"):
        inpaint(np.zeros((12, 10, 3), np.uint8), np.zeros((6, 5), bool), weights=model_file, iters=1)


# (c) weights list ---------------------------------------------------------------------------------------------------
def test_weights_list_fits_80_columns_and_marks_each_commands_default(capsys, weights_dirs):
    shipped, _ = weights_dirs
    entries = []
    names = (("fashion-mnist", 1), ("photo", 3), ("a-model-with-a-name-too-long-for-a-column", 3), ("photo-inpaint", 3))
    for name, channels in names:
        cfg = CAConfig(channels=channels, **TINY)
        save_checkpoint(shipped / f"{name}.pt", cfg, CellularAutomaton(cfg).state_dict(), {})
        text = "a long dataset description, of the kind the shipped models carry, that no column could hold " * 3
        entries.append(
            {"name": name, "file": f"{name}.pt", "dataset": text, "channels": channels, "image_size": [32, 32],
             "iterations": 123456, "val_psnr": 27.5, "val_ssim": 0.9, "sha256": sha256_file(shipped / f"{name}.pt")}
        )  # fmt: skip
    entries[1]["default_iters"] = 32
    manifest = {"format": "vitca-weights-manifest", "version": 1, "models": entries}
    (shipped / "manifest.json").write_text(json.dumps(manifest))
    code, out, _ = cli(capsys, "weights", "list")
    lines = out.splitlines()
    assert code == 0 and max(len(line) for line in lines) <= 80
    rows = {line.split()[0]: line.split() for line in lines[1:5]}
    assert rows["photo-inpaint"][1:3] == ["colour", "inpaint"]  # inpaint's own default for colour images
    assert rows["fashion-mnist"][1] == "grey" and rows["photo"][1] == "colour"
    assert rows["fashion-mnist"][5] == "64" and rows["photo"][5] == "32"  # each model's own steps
    assert any(name.endswith("…") for name in rows) and "default:" in out and "denoise, inpaint" in out
    code, out, _ = cli(capsys, "weights", "list", "--json")
    by_name = {r["name"]: r for r in json.loads(out)}
    assert by_name["photo"]["default_for"] == ["colour"] and by_name["photo"]["dataset"].startswith("a long")
