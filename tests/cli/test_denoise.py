"""`vitca denoise` and `vitca inpaint` through Typer's CliRunner and real subprocesses, on real image files."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vitca_cli.cli import app
from vitca_cli.io.checkpoint import save_checkpoint
from vitca_cli.nca.config import CAConfig
from vitca_cli.nca.model import CellularAutomaton

TINY = dict(embed=16, heads=2, mlp=16, hidden=4, pos_encoding="none")
ITERS = ["--iters", "3"]


def make_checkpoint(path: Path, channels: int = 1, **kw) -> Path:
    """A real (untrained) checkpoint whose head is non-zero, so the output depends on the input and the seed."""
    torch.manual_seed(channels)
    cfg = CAConfig(channels=channels, **{**TINY, **kw})
    ca = CellularAutomaton(cfg)
    with torch.no_grad():
        ca.rule.head[1].weight.normal_(0, 0.3)
    save_checkpoint(path, cfg, ca.state_dict(), {"mask_type": "dropout"})
    return path


@pytest.fixture(autouse=True)
def isolated_weights(weights_dirs):
    """No shipped weights and an empty VITCA_HOME (see conftest)."""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    return {1: str(make_checkpoint(d / "grey.pt", 1)), 3: str(make_checkpoint(d / "rgb.pt", 3))}


def png(path: Path, h=12, w=10, channels=1, seed=0) -> Path:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    Image.fromarray(arr[..., 0] if channels == 1 else arr).save(path)
    return path


def run(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def error_lines(result) -> list[str]:
    assert "Traceback" not in result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------------------------------------------------------------
# It works, reproducibly
# ---------------------------------------------------------------------------------------------------------------------
def test_png_in_png_out_same_seed_same_bytes(tmp_path, ckpt):
    src = png(tmp_path / "in.png")
    r1 = run("denoise", src, "-o", tmp_path / "a.png", "--weights", ckpt[1], *ITERS)
    assert r1.exit_code == 0, r1.stderr
    r2 = run("denoise", src, "-o", tmp_path / "b.png", "--weights", ckpt[1], *ITERS)
    r3 = run("denoise", src, "-o", tmp_path / "c.png", "--weights", ckpt[1], *ITERS, "--seed", "5")
    assert r2.exit_code == 0 and r3.exit_code == 0
    a = (tmp_path / "a.png").read_bytes()
    assert a == (tmp_path / "b.png").read_bytes()
    assert a != (tmp_path / "c.png").read_bytes()
    out = Image.open(tmp_path / "a.png")
    assert out.format == "PNG" and out.size == (10, 12) and out.mode == "L"
    assert "seed 0" in r1.stderr and r1.stdout == ""  # logs on stderr only


def test_runs_write_the_mean_of_the_seeds_runs(tmp_path, ckpt):
    src = png(tmp_path / "in.png")
    for name, extra in (("s0", []), ("s1", ["--seed", "1"]), ("mean", ["--runs", "2"])):
        r = run("denoise", src, "-o", tmp_path / f"{name}.png", "--weights", ckpt[1], *ITERS, *extra)
        assert r.exit_code == 0, r.stderr
    s0, s1, mean = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.float64) for n in ("s0", "s1", "mean"))
    assert not np.array_equal(s0, s1)
    # the mean of the two runs, clipped and rounded: between the two runs' outputs, and equal to neither
    assert (mean >= np.minimum(s0, s1) - 1).all() and (mean <= np.maximum(s0, s1) + 1).all()
    assert not np.array_equal(mean, s0) and not np.array_equal(mean, s1)
    assert "3 steps × 2 runs" in r.stderr


def test_stdin_to_stdout(tmp_path, ckpt):
    data = png(tmp_path / "in.png", 9, 7).read_bytes()
    result = CliRunner().invoke(app, ["denoise", "-", "-o", "-", "--weights", ckpt[1], *ITERS], input=data)
    assert result.exit_code == 0, result.stderr
    out = Image.open(io.BytesIO(result.stdout_bytes))
    assert out.format == "PNG" and out.size == (7, 9)
    # the same bytes as a file run
    run("denoise", tmp_path / "in.png", "-o", tmp_path / "f.png", "--weights", ckpt[1], *ITERS)
    assert (tmp_path / "f.png").read_bytes() == result.stdout_bytes


def test_rgba_keeps_alpha_and_jpeg_keeps_format(tmp_path, ckpt):
    arr = np.random.default_rng(0).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    assert run("denoise", tmp_path / "a.png", "-o", tmp_path / "o.png", "-w", ckpt[3], *ITERS).exit_code == 0
    out = Image.open(tmp_path / "o.png")
    assert out.mode == "RGBA" and np.array_equal(np.asarray(out)[..., 3], arr[..., 3])
    Image.fromarray(arr[..., :3]).save(tmp_path / "j.jpg")
    d = tmp_path / "outdir"
    assert run("denoise", tmp_path / "j.jpg", tmp_path / "a.png", "-o", d, "-w", ckpt[3], *ITERS).exit_code == 0
    assert Image.open(d / "j.jpg").format == "JPEG"
    assert (
        run("denoise", tmp_path / "j.jpg", "-o", tmp_path / "x", "-w", ckpt[3], "--ext", "png", *ITERS).exit_code == 0
    )
    assert Image.open(tmp_path / "x.png").format == "PNG"


def test_channel_mismatch_is_converted_with_a_notice(tmp_path, ckpt):
    src = png(tmp_path / "rgb.png", channels=3)
    result = run("denoise", src, "-o", tmp_path / "o.png", "-w", ckpt[1], *ITERS)
    assert result.exit_code == 0
    assert "converted" in result.stderr
    assert Image.open(tmp_path / "o.png").mode == "L"


def test_folders_recursive_mirror_and_globs(tmp_path, ckpt):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    png(src / "a.png")
    png(src / "sub" / "b.png")
    result = run("denoise", src, "-r", "-o", tmp_path / "out", "-w", ckpt[1], *ITERS)
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out" / "a.png").is_file() and (tmp_path / "out" / "sub" / "b.png").is_file()
    result = run("denoise", str(src / "*.png"), "-o", tmp_path / "g", "-w", ckpt[1], *ITERS)
    assert result.exit_code == 0 and sorted(p.name for p in (tmp_path / "g").iterdir()) == ["a.png"]


def test_corrupt_save_input_animate_compare(tmp_path, ckpt):
    src = png(tmp_path / "in.png", 8, 8)
    out = tmp_path / "o.png"
    result = run(
        "denoise",
        src,
        "-o",
        out,
        "-w",
        ckpt[1],
        "--iters",
        "4",
        "--corrupt",
        "p=0.5,patch=2,type=dropout",
        "--save-input",
        "--animate",
        tmp_path / "a.gif",
        "--frames",
        "4",
        "--compare",
        tmp_path / "c.png",
    )
    assert result.exit_code == 0, result.stderr
    corrupted = np.asarray(Image.open(tmp_path / "o.input.png"))
    assert (corrupted == 0).any() and not np.array_equal(corrupted, np.asarray(Image.open(src)))
    assert Image.open(tmp_path / "a.gif").n_frames == 5  # the input, then 4 frames
    assert Image.open(tmp_path / "c.png").size[0] > 3 * 8  # clean | corrupted | output


def test_inpaint_single_mask_resized_and_masks_by_stem(tmp_path, ckpt):
    src = png(tmp_path / "in.png", 8, 8)
    m = np.zeros((4, 4), np.uint8)
    m[:2] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    result = run(
        "inpaint", src, "--mask", tmp_path / "mask.png", "-o", tmp_path / "o.png", "-w", ckpt[1], *ITERS, "--save-input"
    )
    assert result.exit_code == 0, result.stderr
    assert "resized" in result.stderr and "same aspect ratio" in result.stderr
    masked = np.asarray(Image.open(tmp_path / "o.input.png"))
    assert (masked[:4] == 0).all()  # dropout, as the checkpoint says it was trained
    assert np.array_equal(masked[4:], np.asarray(Image.open(src))[4:])
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(masks / "in.png")
    result = run(
        "inpaint",
        src,
        png(tmp_path / "other.png", 8, 8),
        "--mask",
        masks,
        "-o",
        tmp_path / "out",
        "-w",
        ckpt[1],
        *ITERS,
    )
    assert result.exit_code == 1
    assert (tmp_path / "out" / "in.png").is_file() and not (tmp_path / "out" / "other.png").exists()
    assert len(error_lines(result)) == 1 and "no mask named other" in result.stderr


def test_default_weights_by_channels_named_in_the_log(tmp_path, ckpt):
    home = Path(os.environ["VITCA_HOME"]) / "weights"
    home.mkdir(parents=True)
    make_checkpoint(home / "fashion-mnist.pt", 1)
    result = run("denoise", png(tmp_path / "g.png"), "-o", tmp_path / "o.png", *ITERS)
    assert result.exit_code == 0, result.stderr
    assert "weights: fashion-mnist" in result.stderr


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one line each, the right exit code, the batch goes on
# ---------------------------------------------------------------------------------------------------------------------
def bad_files(tmp_path: Path) -> dict[str, Path]:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8) + 7).save(buf, "PNG", compress_level=0)
    files = {
        "not an image": tmp_path / "text.png",
        "corrupt or truncated": tmp_path / "trunc.png",
        "empty file": tmp_path / "zero.png",
        "no such file": tmp_path / "missing.png",
    }
    files["not an image"].write_text("hello")
    files["corrupt or truncated"].write_bytes(buf.getvalue()[:200])
    files["empty file"].write_bytes(b"")
    return files


@pytest.mark.parametrize("reason", ["not an image", "corrupt or truncated", "empty file", "no such file"])
def test_each_bad_input_is_one_line_and_exit_1(tmp_path, ckpt, reason):
    bad = bad_files(tmp_path)[reason]
    result = run("denoise", bad, "-o", tmp_path / "o.png", "-w", ckpt[1], *ITERS)
    assert result.exit_code == 1
    lines = error_lines(result)
    assert len(lines) == 1 and reason in lines[0] and bad.name in lines[0]
    assert not (tmp_path / "o.png").exists()


def test_batch_with_one_bad_file_goes_on_and_fail_fast_stops(tmp_path, ckpt):
    bad = bad_files(tmp_path)["not an image"]
    good1, good2 = png(tmp_path / "a.png"), png(tmp_path / "b.png")
    result = run("denoise", good1, bad, good2, "-o", tmp_path / "out", "-w", ckpt[1], *ITERS)
    assert result.exit_code == 1
    assert (tmp_path / "out" / "a.png").is_file() and (tmp_path / "out" / "b.png").is_file()
    assert len(error_lines(result)) == 1
    result = run("denoise", bad, good1, "-o", tmp_path / "ff", "-w", ckpt[1], *ITERS, "--fail-fast")
    assert result.exit_code == 1 and not (tmp_path / "ff" / "a.png").exists()
    assert list(tmp_path.glob("**/*.tmp")) == []  # no half images anywhere


def test_existing_output_refused_overwrite_and_skip(tmp_path, ckpt):
    src = png(tmp_path / "in.png")
    out = tmp_path / "o.png"
    out.write_bytes(b"keep me")
    result = run("denoise", src, "-o", out, "-w", ckpt[1], *ITERS)
    assert result.exit_code == 1 and "exists" in error_lines(result)[0] and out.read_bytes() == b"keep me"
    result = run("denoise", src, "-o", out, "-w", ckpt[1], *ITERS, "--skip-existing")
    assert result.exit_code == 0 and out.read_bytes() == b"keep me" and "skipped" in result.stderr
    result = run("denoise", src, "-o", out, "-w", ckpt[1], *ITERS, "--overwrite")
    assert result.exit_code == 0 and Image.open(out).size == (10, 12)


def test_output_equal_to_input_is_refused_even_with_overwrite(tmp_path, ckpt):
    src = png(tmp_path / "in.png")
    before = src.read_bytes()
    result = run("denoise", src, "-o", src, "-w", ckpt[1], *ITERS, "--overwrite")
    assert result.exit_code == 1 and "is the input" in error_lines(result)[0]
    assert src.read_bytes() == before


def test_unwritable_output(tmp_path, ckpt):
    (tmp_path / "afile").write_bytes(b"")
    result = run("denoise", png(tmp_path / "in.png"), "-o", tmp_path / "afile" / "o.png", "-w", ckpt[1], *ITERS)
    assert result.exit_code == 1 and "is a file, not a folder" in error_lines(result)[0]


def test_unreadable_mask(tmp_path, ckpt):
    (tmp_path / "m.png").write_text("not a mask")
    result = run(
        "inpaint",
        png(tmp_path / "in.png"),
        "--mask",
        tmp_path / "m.png",
        "-o",
        tmp_path / "o.png",
        "-w",
        ckpt[1],
        *ITERS,
    )
    assert result.exit_code == 1
    assert "mask" in error_lines(result)[0] and "not an image" in result.stderr
    result = run(
        "inpaint",
        tmp_path / "in.png",
        "--mask",
        tmp_path / "nomask.png",
        "-o",
        tmp_path / "o.png",
        "-w",
        ckpt[1],
        *ITERS,
    )
    assert result.exit_code == 2 and len(error_lines(result)) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["--iters", "0"],
        ["--iters", "-3"],
        ["--update-rate", "0"],
        ["--runs", "0"],
        ["--runs", "65"],
        ["--corrupt", "p=2"],
        ["--tile", "-1"],
        ["--ext", "xyz"],
        ["--overwrite", "--skip-existing"],
    ],
)
def test_usage_errors_exit_2(tmp_path, ckpt, args):
    result = run("denoise", png(tmp_path / "in.png"), "-o", tmp_path / "o.png", "-w", ckpt[1], *args)
    assert result.exit_code == 2
    assert len(error_lines(result)) == 1
    assert not (tmp_path / "o.png").exists()


def test_stdout_with_many_inputs_is_a_usage_error(tmp_path, ckpt):
    result = run("denoise", png(tmp_path / "a.png"), png(tmp_path / "b.png"), "-o", "-", "-w", ckpt[1], *ITERS)
    assert result.exit_code == 2 and len(error_lines(result)) == 1


def test_unknown_weights_name_exit_3(tmp_path):
    result = run("denoise", png(tmp_path / "in.png"), "-o", tmp_path / "o.png", "--weights", "no-such-model")
    assert result.exit_code == 3
    assert "unknown weights 'no-such-model'" in error_lines(result)[0]


def test_missing_default_weights_exit_3_with_a_hint(tmp_path):
    result = run("denoise", png(tmp_path / "in.png", channels=3), "-o", tmp_path / "o.png", *ITERS)
    assert result.exit_code == 3
    line = error_lines(result)[0]
    assert "3-channel" in line and "--weights" in line


def test_corrupt_weights_file_exit_3(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    result = run("denoise", png(tmp_path / "in.png"), "-o", tmp_path / "o.png", "--weights", tmp_path / "bad.pt")
    assert result.exit_code == 3 and "re-download or re-train" in error_lines(result)[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_a_clear_usage_error(tmp_path, ckpt):
    result = run("denoise", png(tmp_path / "in.png"), "-o", tmp_path / "o.png", "-w", ckpt[1], "--device", "cuda")
    assert result.exit_code == 2
    assert "no CUDA GPU" in error_lines(result)[0]


# ---------------------------------------------------------------------------------------------------------------------
# Real subprocesses
# ---------------------------------------------------------------------------------------------------------------------
def vitca(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = "import sys; from vitca_cli.cli import main; sys.argv[0] = 'vitca'; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, env=env, timeout=120, **kw
    )


def test_subprocess_batch_with_a_bad_file_and_stdout(tmp_path, ckpt):
    good = png(tmp_path / "a.png")
    (tmp_path / "bad.png").write_text("nope")
    proc = vitca("denoise", good, tmp_path / "bad.png", "-o", tmp_path / "out", "-w", ckpt[1], *ITERS)
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert "Traceback" not in err and err.count("error:") == 1 and "bad.png" in err
    assert Image.open(tmp_path / "out" / "a.png").size == (10, 12)
    proc = vitca("denoise", "-", "-o", "-", "-w", ckpt[1], *ITERS, input=good.read_bytes())
    assert proc.returncode == 0
    assert proc.stdout == (tmp_path / "out" / "a.png").read_bytes()  # same seed, same bytes, across processes


def test_help_and_version_do_not_import_torch():
    for flag in ("--help", "--version"):
        code = (
            "import sys\nsys.argv = ['vitca', %r]\nfrom vitca_cli.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'onnxruntime') if m in sys.modules]\n"
            "print('HEAVY', heavy, file=sys.stderr)\n" % flag
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
        assert proc.returncode == 0
        assert "HEAVY []" in proc.stderr.decode(), proc.stderr.decode()


def test_settle_logs_the_skipped_cell_steps_and_precision_is_checked(tmp_path):
    photo = Path(__file__).resolve().parents[2] / "weights" / "photo.pt"
    src = tmp_path / "in.png"
    Image.fromarray(np.full((40, 48, 3), 128, dtype=np.uint8)).save(src)  # flat grey: every cell settles early
    runner = CliRunner()
    ok = runner.invoke(
        app, ["denoise", str(src), "-o", str(tmp_path / "o.png"), "-w", str(photo), "--iters", "32", "--settle", "0.01"]
    )
    assert ok.exit_code == 0, ok.output
    assert "cell-steps skipped as settled" in ok.output and " 0% of" not in ok.output
    bad = runner.invoke(app, ["denoise", str(src), "-o", str(tmp_path / "p.png"), "-w", str(photo), "--settle", "-1"])
    assert bad.exit_code == 2 and not (tmp_path / "p.png").exists()
    bad = runner.invoke(
        app,
        [
            "denoise",
            str(src),
            "-o",
            str(tmp_path / "p.png"),
            "-w",
            str(photo),
            "--backend",
            "onnx",
            "--precision",
            "bf16",
        ],
    )
    assert bad.exit_code == 2 and "--quantize" in bad.output


def test_the_log_names_the_step_and_the_compiled_step_writes_what_the_exact_one_does(tmp_path):
    photo = Path(__file__).resolve().parents[2] / "weights" / "photo.pt"
    src = png(tmp_path / "in.png", 36, 40, channels=3)
    outs = {}
    for name in ("exact", "compiled"):
        outs[name] = tmp_path / f"{name}.png"
        flags = ["--compile", "off" if name == "exact" else "on", "--precision", "fp32"]
        result = run("-v", "denoise", src, "-o", outs[name], "-w", photo, "--iters", 8, *flags)
        assert result.exit_code == 0, result.output
        assert ("compiled" in result.output) == (name == "compiled"), result.output
    exact, compiled = (np.asarray(Image.open(outs[k]), dtype=int) for k in ("exact", "compiled"))
    assert np.abs(exact - compiled).max() <= 1  # float rounding may move a value by one 8-bit level
    bad = run("denoise", src, "-o", tmp_path / "x.png", "-w", photo, "--backend", "onnx", "--compile", "on")
    assert bad.exit_code == 2 and "--compile" in bad.output and not (tmp_path / "x.png").exists()


def test_fusion_on_and_off_from_the_command_line(tmp_path, ckpt):
    src = png(tmp_path / "in.png", 20, 18, channels=3)
    plain, fused = tmp_path / "plain.png", tmp_path / "fused.png"
    a = run("denoise", src, "-o", plain, "-w", ckpt[3], "--iters", "8", "--no-fusion")
    b = run("denoise", src, "-o", fused, "-w", ckpt[3], "--iters", "8", "--fusion")
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    assert "fused" in b.output and "fused" not in a.output
    pa, pb = np.asarray(Image.open(plain)), np.asarray(Image.open(fused))
    assert pa.shape == pb.shape == (20, 18, 3) and not np.array_equal(pa, pb)
    short = run("denoise", src, "-o", tmp_path / "short.png", "-w", ckpt[3], "--iters", "3", "--fusion")
    assert short.exit_code == 2 and len(error_lines(short)) == 1 and "at least 4" in short.stderr
    assert not (tmp_path / "short.png").exists()


def test_a_large_image_on_the_default_photo_model_gets_one_hint_of_the_faster_one(tmp_path, ckpt, monkeypatch):
    import vitca_cli.restore.batch as batch

    monkeypatch.setattr(batch, "LARGE_PIXELS", 200)
    home = Path(os.environ["VITCA_HOME"]) / "weights"
    home.mkdir(parents=True)
    make_checkpoint(home / "photo.pt", 3)
    big = [png(tmp_path / f"big{i}.png", 16, 16, channels=3, seed=i) for i in range(2)]
    small = png(tmp_path / "small.png", 12, 10, channels=3)
    hint = "-w photo-fused restores it about 3.5x faster"
    both = run("denoise", *big, "-o", tmp_path / "out", *ITERS)
    assert both.exit_code == 0, both.stderr
    assert both.stderr.count(hint) == 1
    assert hint not in run("denoise", small, "-o", tmp_path / "s.png", *ITERS).stderr
    assert hint not in run("denoise", big[0], "-o", tmp_path / "f.png", "--iters", "4", "--fusion").stderr
    assert hint not in run("denoise", big[0], "-o", tmp_path / "w.png", "-w", ckpt[3], *ITERS).stderr
