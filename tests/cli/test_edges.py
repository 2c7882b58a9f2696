"""The CLI as a new user meets it (issue 24): every rough edge of one trial, each with the check that would have
caught it. Most go through ``vitca_cli.cli.main`` (what the ``vitca`` console script runs), not Typer's runner,
because that is where global flags, numeric limits and error styles are handled."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitca_cli import log
from vitca_cli.cli import hoist_global_flags, main
from vitca_cli.cli.options import handle_errors
from vitca_cli.io.checkpoint import save_checkpoint
from vitca_cli.nca.config import CAConfig
from vitca_cli.nca.model import CellularAutomaton
from vitca_cli.training.evaluate import evaluate, format_report
from vitca_cli.training.probe import train_linear

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(embed=16, heads=2, mlp=16, hidden=4, pos_encoding="none")


@pytest.fixture(autouse=True)
def isolated(weights_dirs):
    yield
    log.setup(0, False)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    torch.manual_seed(0)
    cfg = CAConfig(channels=3, **TINY)
    ca = CellularAutomaton(cfg)
    with torch.no_grad():
        ca.rule.head[1].weight.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("w") / "m.pt"
    save_checkpoint(path, cfg, ca.state_dict(), {"mask_type": "dropout"})
    return str(path)


def photo(path: Path, h=12, w=10) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run ``vitca ARGS`` in-process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err and "╭" not in err, err
    return errors[0]


# 1. numbers that overflow -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["denoise", "x.png", "-o", "y.png", "--iters", "99999999999999999999"],
        ["denoise", "x.png", "-o", "y.png", "--seed", "99999999999999999999"],
        ["denoise", "x.png", "-o", "y.png", "--update-rate", "nan"],
        ["denoise", "x.png", "-o", "y.png", "--iters", "20000"],
        ["train", "--iterations", "99999999999999999999"],
        ["eval", "-w", "x", "-d", "mnist", "--limit", "99999999999999999999"],
    ],
)
def test_overflowing_numbers_are_one_line_usage_errors(capsys, args):
    code, _, err = cli(capsys, *args)
    assert code == 2
    assert re.search(r"too large|finite|at most", one_error_line(err))


def test_with_vv_the_message_does_not_ask_for_vv(capsys):
    @handle_errors
    def broken():
        raise RuntimeError("boom")

    log.setup(2, False)
    with pytest.raises(Exception):  # noqa: B017 - whatever handle_errors re-raises at -vv
        broken()
    err = capsys.readouterr().err
    assert "Traceback" in err and "boom" in err and "run with -vv" not in err


# 2. -q / -v after the command -----------------------------------------------------------------------------------------
def test_global_flags_work_after_the_command(capsys, tmp_path, model_file):
    src = photo(tmp_path / "in.png")
    code, _, err = cli(capsys, "denoise", src, "-o", tmp_path / "o.png", "-w", model_file, "--iters", "2", "-q")
    assert code == 0 and err == ""
    code, _, err = cli(capsys, "denoise", src, "-o", tmp_path / "o2.png", "-w", model_file, "--iters", "2", "-vv")
    assert code == 0 and "weights:" in err
    assert hoist_global_flags(["denoise", "a", "-vv", "--", "-q"]) == ["-vv", "denoise", "a", "--", "-q"]


# 3. help at 80 columns ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["denoise"], ["inpaint"], ["train"], ["eval"]])
def test_help_is_readable_at_80_columns(command):
    env = {**os.environ, "COLUMNS": "80"}
    out = subprocess.run(
        [sys.executable, "-m", "vitca_cli", *command, "--help"], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "<bool>" not in out and "…" not in out
    if command == ["train"]:
        assert "--mask-prob-stages" in out and "--no-checkpointing" in out and "[noise]" in out
    if command == []:
        assert re.search(r"-v, --verbose\s+More logging", out)  # a counted flag, no <int>


# 4. one error style -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["denoise"],
        ["denoise", "x.png", "--iters", "abc"],
        ["analyze", "nonsense"],
        ["nonsense"],
        ["denoise", "x.png", "--no-such-flag"],
    ],
)
def test_parse_errors_are_one_error_line_and_exit_2(capsys, args):
    code, _, err = cli(capsys, *args)
    assert code == 2
    assert "--help" in one_error_line(err)


# 5. messages that say what is wrong ---------------------------------------------------------------------------------
def test_output_under_a_regular_file_says_so(capsys, tmp_path, model_file):
    (tmp_path / "afile").write_bytes(b"")
    code, _, err = cli(
        capsys, "denoise", photo(tmp_path / "in.png"), "-o", tmp_path / "afile" / "out.png", "-w", model_file
    )
    assert code == 1 and "is a file, not a folder" in one_error_line(err)


def test_a_missing_input_is_reported_before_output_problems(capsys, tmp_path, model_file):
    (tmp_path / "afile").write_bytes(b"")
    code, _, err = cli(
        capsys, "denoise", tmp_path / "missing.png", "-o", tmp_path / "afile" / "out.png", "-w", model_file
    )
    assert code == 1 and "no such file" in one_error_line(err)


# 6. no silent changes ----------------------------------------------------------------------------------------------
def test_animated_gif_says_only_the_first_frame_is_restored(capsys, tmp_path, model_file):
    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (0, 128, 255)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    code, _, err = cli(
        capsys, "denoise", tmp_path / "a.gif", "-o", tmp_path / "b.gif", "-w", model_file, "--iters", "1"
    )
    assert code == 0 and "3 frames" in err and "only the first frame" in err


def test_ext_that_contradicts_the_output_name_is_refused(capsys, tmp_path, model_file):
    code, _, err = cli(
        capsys, "denoise", photo(tmp_path / "in.png"), "-o", tmp_path / "q7.png", "--ext", "webp", "-w", model_file
    )
    assert code == 2 and "different formats" in one_error_line(err) and not (tmp_path / "q7.webp").exists()


# 8. threads -----------------------------------------------------------------------------------------------------------
def test_threads_option_and_every_usable_core_by_default_whatever_the_load(capsys, tmp_path, model_file, monkeypatch):
    from vitca_cli import runtime

    code, _, _ = cli(
        capsys,
        "denoise",
        photo(tmp_path / "in.png"),
        "-o",
        tmp_path / "o.png",
        "-w",
        model_file,
        "--iters",
        "1",
        "--threads",
        "1",
    )
    assert code == 0 and torch.get_num_threads() == 1
    monkeypatch.setattr(runtime, "usable_cores", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.2, 2.0, 2.0))  # the last run's load: not a reason to hold back
    assert runtime.choose_threads() == 4 and runtime.choose_threads(3) == 3


def test_passive_openmp_leaves_a_users_wait_setting_alone():
    from vitca_cli.runtime import passive_openmp

    env = {}
    assert passive_openmp(env) and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"):
        env = {name: "ACTIVE" if name == "OMP_WAIT_POLICY" else "1000"}
        assert not passive_openmp(env) and list(env) == [name]


def test_compiled_kernels_are_kept_in_vitcas_cache_folder_unless_the_user_chose(tmp_path, monkeypatch):
    from vitca_cli.runtime import persistent_compile_cache

    monkeypatch.setenv("VITCA_HOME", str(tmp_path))
    env = {}
    assert persistent_compile_cache(env) and env == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "torch-compile")}
    env = {"TORCHINDUCTOR_CACHE_DIR": "/elsewhere"}
    assert not persistent_compile_cache(env) and env == {"TORCHINDUCTOR_CACHE_DIR": "/elsewhere"}


@pytest.mark.parametrize("given", [None, "ACTIVE"])
def test_a_fresh_vitca_process_runs_passive_openmp_unless_the_user_chose(tmp_path, model_file, given):
    """The policy must be in the environment before torch loads OpenMP: checked in a new process, where the
    ``vitca`` entry point runs first and torch is imported later."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = (
        "import sys\nfrom vitca_cli.cli import main\nassert 'torch' not in sys.modules\nsys.argv[0] = 'vitca'\n"
        "try:\n    main()\nfinally:\n    import os\n    print('POLICY', os.environ.get('OMP_WAIT_POLICY'))\n"
    )
    args = ["denoise", photo(tmp_path / "in.png"), "-o", tmp_path / "o.png", "-w", model_file, "--iters", "1", "-vv"]
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )
    want = given or "PASSIVE"
    assert proc.returncode == 0, proc.stderr
    assert f"POLICY {want}" in proc.stdout and f"OpenMP wait policy {want}" in proc.stderr


# 9. progress in logs ------------------------------------------------------------------------------------------------
def test_progress_lines_when_stderr_is_not_a_terminal(capsys, tmp_path, model_file, monkeypatch):
    from vitca_cli.cli import denoise

    monkeypatch.setattr(denoise, "PROGRESS_EVERY_S", 0.0)
    code, _, err = cli(
        capsys, "denoise", photo(tmp_path / "in.png"), "-o", tmp_path / "o.png", "-w", model_file, "--iters", "4"
    )
    assert code == 0 and re.search(r"in\.png: \d+/4 tile-steps \(\d+%\), ETA", err) and "None" not in err


def test_one_progress_display_paces_its_log_lines(capsys):
    """``vitca_cli.progress.Progress`` as eval (a line each 10% and at the end) and training (forced lines, a final
    one, none between within 30 s) use it when stderr is not a terminal; disabled, it says nothing."""
    from vitca_cli.progress import Progress

    log.setup()
    with Progress("eval", 20, unit="images", every_s=0.0, every_fraction=0.1, final=True) as shown:
        for _ in range(20):
            shown.advance(1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 and lines[-1].startswith("eval: 20/20 images (100%), ETA")
    with Progress("train", 10, unit="iterations", start=4, every_s=30.0, final=True, status="loss -") as shown:
        for i in range(5, 11):
            shown.update(i, status=f"loss {i}", force=i == 6)
    assert [line.split(", ETA")[0] for line in capsys.readouterr().err.splitlines()] == [
        "train: 6/10 iterations (60%), loss 6",
        "train: 10/10 iterations (100%), loss 10",
    ]
    Progress("quiet", 2, enabled=False, every_s=0.0).update(1)
    assert capsys.readouterr().err == ""


# 10. eval intervals -------------------------------------------------------------------------------------------------
def test_eval_prints_no_interval_from_one_or_two_batches(randomise_model):
    model = randomise_model(CellularAutomaton(CAConfig(channels=1, image_size=(12, 12), **TINY))).eval()
    data = [torch.rand(4, 1, 12, 12), torch.rand(4, 1, 12, 12)]
    report = evaluate(model, data, iters=2, mask_type="noise")
    batch = report["methods"]["vitca"]["psnr_batch"]
    assert batch["ci95"] is None and batch["n"] == 2
    text = format_report({**report, "lpips": "skipped (why)"})
    assert "(n=2)" in text and text.count("skipped (why)") == 1
    assert report["methods"]["vitca"]["psnr"]["ci95"] > 0  # 8 images: a real interval


# 11. probe validation -------------------------------------------------------------------------------------------------
def test_probe_validation_is_large_enough_to_mean_something():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=g), torch.arange(64) % 4
    result = train_linear(x, y, x[:8], y[:8], classes=4, max_iter=5)
    assert result["val_images"] == 16


# 13. a default output -----------------------------------------------------------------------------------------------
def test_without_o_outputs_go_beside_inputs_and_are_never_overwritten(capsys, tmp_path, model_file):
    src = photo(tmp_path / "in.png")
    code, _, _ = cli(capsys, "denoise", src, "-w", model_file, "--iters", "1")
    assert code == 0 and (tmp_path / "in.restored.png").is_file()
    code, _, err = cli(capsys, "denoise", src, "-w", model_file, "--iters", "1")
    assert code == 1 and "exists" in one_error_line(err)
    code, _, _ = cli(capsys, "denoise", tmp_path, "-w", model_file, "--iters", "1", "--overwrite")
    assert code == 0 and not (tmp_path / "in.restored.restored.png").exists()  # earlier outputs are not inputs


# 14. the README's quick start ---------------------------------------------------------------------------------------
def test_quick_start_uses_two_fresh_environments_and_leaves_the_checkout_clean():
    text = (ROOT / "README.md").read_text()
    start = text.index("## Quick start")
    blocks = re.findall(r"```bash\n(.*?)\n```", text[start : text.index("\n## ", start + 5)], re.S)
    assert len(blocks) == 2
    venvs = [re.search(r"python3 -m venv (\S+)", b).group(1) for b in blocks]
    assert venvs[0] != venvs[1]
    assert "--index-url https://download.pytorch.org/whl/cpu" in text[start:]
    ignored = (ROOT / ".gitignore").read_text().split()
    for out in re.findall(r"(?:-o|--compare) (\S+)", blocks[0]):
        assert any(out.startswith(i.strip("/")) for i in ignored), out


def test_the_readme_and_docs_link_only_to_files_that_exist():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    links = 0
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            links += 1
            assert (page.parent / target.split("#")[0]).exists(), f"{page.name} links to {target}, which is missing"
    assert links >= 1  # the README links to the training history in docs/


# 15. the update rate a model was trained at -------------------------------------------------------------------------
def test_a_model_trained_at_another_update_rate_runs_at_its_own_rate_by_default(capsys, tmp_path):
    import json

    from vitca_cli.training.config import TrainConfig
    from vitca_cli.training.dataset import ImageDataset
    from vitca_cli.training.train import train

    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (8, 1, 12, 12)).astype(np.uint8)
    cfg = CAConfig(channels=1, image_size=(12, 12), update_rate=0.25, **TINY)
    tcfg = TrainConfig(
        dataset="tiny", iterations=3, batch_size=4, pool_size=0, t_min=2, t_max=2, lr=0.05, val_every=0, compile=False
    )
    train(cfg, tcfg, tmp_path / "run", train_ds=ImageDataset("tiny", array=images), progress=False)
    weights = tmp_path / "run" / "best.pt"
    folder = tmp_path / "photos"
    folder.mkdir()
    for k in range(4):
        Image.fromarray(images[k, 0]).save(folder / f"p{k}.png")
    src = folder / "p0.png"

    def denoise(name, *rate):
        code, _, err = cli(capsys, "denoise", src, "-o", tmp_path / name, "-w", weights, "--iters", "6", *rate)
        assert code == 0, err
        return (tmp_path / name).read_bytes()

    default = denoise("default.png")
    assert default == denoise("trained.png", "--update-rate", "0.25")
    assert default != denoise("half.png", "--update-rate", "0.5")  # not the usual 0.5: the rate matters here
    mask = tmp_path / "mask.png"
    Image.fromarray(np.where(np.arange(144).reshape(12, 12) % 3 == 0, 255, 0).astype(np.uint8)).save(mask)
    runs = []
    for name, rate in (("i1.png", ()), ("i2.png", ("--update-rate", "0.25"))):
        code, _, err = cli(
            capsys, "inpaint", src, "--mask", mask, "-o", tmp_path / name, "-w", weights, "--iters", "6", *rate
        )
        assert code == 0, err
        runs.append((tmp_path / name).read_bytes())
    assert runs[0] == runs[1]
    code, out, err = cli(
        capsys,
        "eval",
        "-w",
        weights,
        "-d",
        f"folder:{folder}",
        "--iters",
        "2",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["update_rate"] == 0.25
