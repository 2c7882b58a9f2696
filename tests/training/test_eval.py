"""``vitca eval`` end to end on a tiny folder dataset, the eval core's determinism, baselines and the linear probe."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitca_cli.io.checkpoint import save_checkpoint
from vitca_cli.nca.config import CAConfig
from vitca_cli.nca.model import CellularAutomaton
from vitca_cli.training.evaluate import batches, eval_combos, evaluate, format_report
from vitca_cli.training.probe import linear_probe, train_linear

CFG = CAConfig(channels=1, image_size=(16, 16), embed=16, heads=2, mlp=16, hidden=8)


class TensorDataset:
    """In-memory images (and labels) with the ImageDataset interface the eval code reads."""

    def __init__(self, images, labels=None):
        self.images, self.labels = images, labels
        self.channels, self.image_size = images.shape[1], tuple(images.shape[-2:])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


@pytest.fixture
def model(randomise_model):
    return randomise_model(CellularAutomaton(CFG)).eval()


def _images(n, seed=0, size=16):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# eval core
# ---------------------------------------------------------------------------------------------------------------------
def test_evaluate_is_deterministic_and_cycles_combos(model):
    ds = TensorDataset(_images(18))
    a = evaluate(model, batches(ds, 2), iters=3, seed=5)
    b = evaluate(model, batches(ds, 2), iters=3, seed=5)
    c = evaluate(model, batches(ds, 2), iters=3, seed=6)
    for report in (a, b, c):  # timings are the only thing allowed to differ
        for row in report["methods"].values():
            row.pop("images_per_s", None)
    assert a == b
    assert a["methods"]["vitca"]["psnr"] != c["methods"]["vitca"]["psnr"]
    # 9 batches of 2: every combo once, 2 images each
    assert [v["images"] for v in a["psnr_per_combo"].values()] == [2] * 9
    assert list(a["psnr_per_combo"]) == [f"p={p:g},patch={s}" for p, s in eval_combos()]
    assert a["images"] == 18 and len(a["methods"]["vitca"]) >= 4


def test_eval_runs_the_ca_with_the_update_masks_of_denoise(model):
    """Same seed, same result: each image's CA output in ``vitca eval --seed S`` is what ``vitca denoise --seed S``
    (``restore.loop.restore``) gives for that corrupted image."""
    from vitca_cli.nca.masking import random_mask
    from vitca_cli.restore.backends import TorchBackend
    from vitca_cli.restore.loop import restore
    from vitca_cli.training.metrics import psnr_per_image

    clean, seed, iters = _images(3, seed=4), 11, 5
    report = evaluate(model, batches(TensorDataset(clean), 3), iters=iters, seed=seed)
    prob, patch = eval_combos()[0]  # the first batch's combo, drawn from the generator seeded with the seed
    corrupted, _ = random_mask(clean, prob, patch, "noise", torch.Generator().manual_seed(seed))
    backend = TorchBackend(model)
    denoised = torch.stack(
        [
            torch.from_numpy(restore(backend, img.permute(1, 2, 0).numpy(), iters=iters, seed=seed).image).permute(
                2, 0, 1
            )
            for img in corrupted
        ]
    )
    expected = psnr_per_image(denoised, clean).mean().item()
    assert report["methods"]["vitca"]["psnr"]["mean"] == pytest.approx(expected, abs=1e-3)
    other = restore(backend, corrupted[0].permute(1, 2, 0).numpy(), iters=iters, seed=seed + 1).image
    assert not np.allclose(other, denoised[0].permute(1, 2, 0).numpy())  # the seed matters

    # --runs: the mean of the runs `vitca denoise --runs` averages, on the same damage
    averaged = evaluate(model, batches(TensorDataset(clean), 3), iters=iters, seed=seed, runs=2)
    means = torch.stack(
        [
            torch.from_numpy(
                restore(backend, img.permute(1, 2, 0).numpy(), iters=iters, seed=seed, runs=2).image
            ).permute(2, 0, 1)
            for img in corrupted
        ]
    )
    assert averaged["runs"] == 2 and report["runs"] == 1
    assert averaged["methods"]["input"]["psnr"] == report["methods"]["input"]["psnr"]
    expected = psnr_per_image(means, clean).mean().item()
    assert averaged["methods"]["vitca"]["psnr"]["mean"] == pytest.approx(expected, abs=1e-3)
    assert averaged["methods"]["vitca"]["psnr"]["mean"] != pytest.approx(report["methods"]["vitca"]["psnr"]["mean"])
    assert "the mean of 2 runs" in format_report(averaged)


def test_corrupted_input_row_matches_the_masking(model):
    # dropout with p=0.25..0.75 zeroes pixels of an all-ones image: input PSNR is -10·log10(fraction dropped)
    ones = TensorDataset(torch.ones(9, 1, 16, 16))
    report = evaluate(model, batches(ones, 1), iters=1, mask_type="dropout", seed=0)
    psnr = report["methods"]["input"]["psnr"]["mean"]
    assert 1.2 < psnr < 6.1  # between -10·log10(0.75) and -10·log10(0.25), within sampling noise
    assert report["methods"]["input"]["ssim"]["mean"] < 1


def test_baselines_restore_better_than_the_input(model):
    pytest.importorskip("skimage")
    pytest.importorskip("cv2")
    # smooth images: the inpainters should recover masked pixels from their neighbours
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 16), torch.linspace(0, 1, 16), indexing="ij")
    smooth = ((xx + yy) / 2).expand(9, 1, 16, 16).clone()
    report = evaluate(
        model,
        batches(TensorDataset(smooth), 3),
        iters=1,
        mask_type="dropout",
        baselines=["median", "tv-chambolle", "nl-means", "biharmonic", "telea"],
    )
    rows = report["methods"]
    assert set(rows) == {"vitca", "input", "median", "tv-chambolle", "nl-means", "biharmonic", "telea"}
    for name in ("biharmonic", "telea"):
        assert rows[name]["psnr"]["mean"] > rows["input"]["psnr"]["mean"] + 10
    assert rows["median"]["psnr"]["mean"] > rows["input"]["psnr"]["mean"] + 1  # isolated dropped pixels are removed
    text = format_report({**report, "dataset": "smooth", "split": "test", "batch_size": 3, "lpips": "skipped: x"})
    assert "biharmonic" in text and "corrupted input" in text and "LPIPS: skipped: x" in text


def test_missing_baseline_extra_is_a_clear_usage_error(monkeypatch):
    import sys

    from vitca_cli.errors import UsageError
    from vitca_cli.training.baselines import check_available

    monkeypatch.setitem(sys.modules, "cv2", None)  # what Python does for a module that cannot be imported
    with pytest.raises(UsageError, match=r"pip install vitca\[baselines\]"):
        check_available()


# ---------------------------------------------------------------------------------------------------------------------
# linear probe
# ---------------------------------------------------------------------------------------------------------------------
def test_train_linear_separates_separable_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    result = train_linear(x[:150], y[:150], x[150:], y[150:], classes=2)
    assert result["test_top1"] >= 0.95 and result["features"] == 5


def test_linear_probe_on_a_synthetic_dataset(model):
    # class k: a bright square in quadrant k — easy from pixels
    def make(n, seed):
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 4, (n,), generator=g)
        images = 0.1 * torch.rand(n, 1, 16, 16, generator=g)
        for i, k in enumerate(labels.tolist()):
            r, c = divmod(k, 2)
            images[i, :, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8] += 0.8
        return TensorDataset(images, labels.tolist())

    report = linear_probe(
        model, make(80, 0), make(40, 1), iters=2, train_limit=None, test_limit=None, max_iter=50, batch_size=16
    )
    assert report["train_images"] == 80 and report["test_images"] == 40 and report["classes"] == 4
    assert report["ca_hidden_mean"]["features"] == CFG.hidden
    assert report["raw_pixels"]["features"] == 16 * 16
    assert report["raw_pixels"]["test_top1"] >= 0.9
    assert 0.0 <= report["ca_hidden_mean"]["test_top1"] <= 1.0
    again = linear_probe(
        model, make(80, 0), make(40, 1), iters=2, train_limit=None, test_limit=None, max_iter=50, batch_size=16
    )
    assert again == report


# ---------------------------------------------------------------------------------------------------------------------
# the commands, end to end on real files
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def files(tmp_path, monkeypatch, randomise_model):
    """A checkpoint and a folder dataset of 9 real PNG photos (RGB, read as grayscale for the model)."""
    monkeypatch.setenv("VITCA_HOME", str(tmp_path / "home"))
    ckpt = tmp_path / "tiny.pt"
    model = randomise_model(CellularAutomaton(CFG))
    save_checkpoint(ckpt, CFG, model.state_dict(), {"mask_type": "dropout"})
    test_dir = tmp_path / "photos" / "test"
    test_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(9):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(test_dir / f"img{i}.png")
    return ckpt, tmp_path / "photos"


def _cli(*args):
    from typer.testing import CliRunner

    from vitca_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_eval_command_json(files):
    ckpt, folder = files
    args = [
        "eval",
        "--weights",
        ckpt,
        "--dataset",
        f"folder:{folder}",
        "--iters",
        2,
        "--batch-size",
        1,
        "--device",
        "cpu",
        "--threads",
        1,
        "--json",
    ]
    result = _cli(*args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["images"] == 9 and report["mask_type"] == "dropout"  # taken from the checkpoint's meta
    assert report["seed"] == 0 and report["iters"] == 2 and report["threads"] == 1 and report["device"] == "cpu"
    assert report["lpips"] == "computed" or report["lpips"].startswith("skipped: ")
    vitca = report["methods"]["vitca"]
    assert vitca["images_per_s"] > 0 and 0 < vitca["psnr"]["mean"] < 100 and vitca["psnr"]["ci95"] > 0
    assert json.loads(_cli(*args).stdout)["methods"]["vitca"]["psnr"] == vitca["psnr"]  # deterministic


def test_eval_fast_runs_the_compiled_step_and_scores_as_the_exact_one(files):
    ckpt, folder = files
    args = ["eval", "-w", ckpt, "-d", f"folder:{folder}", "--iters", 4, "--batch-size", 3, "--threads", 1, "--json"]
    exact, fast = (_cli(*args, *extra) for extra in ([], ["--fast"]))
    assert exact.exit_code == 0 and fast.exit_code == 0, fast.output
    exact, fast = json.loads(exact.stdout), json.loads(fast.stdout)
    assert exact["step"].startswith("exact") and "compiled" in fast["step"]
    assert abs(fast["methods"]["vitca"]["psnr"]["mean"] - exact["methods"]["vitca"]["psnr"]["mean"]) < 0.05


def test_eval_command_table_with_baselines(files):
    pytest.importorskip("skimage")
    pytest.importorskip("cv2")
    ckpt, folder = files
    result = _cli(
        "eval",
        "-w",
        ckpt,
        "-d",
        f"folder:{folder}",
        "--iters",
        2,
        "--limit",
        4,
        "--baselines",
        "--mask-type",
        "noise",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "4 images" in lines[0] and "noise masking" in lines[0]
    for name in ("vitca", "corrupted input", "median", "tv-chambolle", "nl-means", "biharmonic", "telea"):
        assert any(line.startswith(name) for line in lines), name


def test_eval_command_errors(files, tmp_path):
    ckpt, folder = files
    missing = _cli("eval", "-w", tmp_path / "nope.pt", "-d", f"folder:{folder}")
    assert missing.exit_code == 3 and "not found" in missing.output
    bad_patch = _cli("eval", "-w", ckpt, "-d", f"folder:{folder}", "--max-patch", 3, "--device", "cpu")
    assert bad_patch.exit_code == 2 and "do not divide" in bad_patch.output
    no_runs = _cli("eval", "-w", ckpt, "-d", f"folder:{folder}", "--runs", 0)
    assert no_runs.exit_code == 2 and "--runs 0" in no_runs.output
    assert "Traceback" not in missing.output + bad_patch.output + no_runs.output


def test_analyze_command_writes_figure_and_table(files, tmp_path):
    ckpt, folder = files
    out = tmp_path / "analysis"
    result = _cli(
        "analyze",
        "stability",
        "-w",
        ckpt,
        "-d",
        f"folder:{folder}",
        "-o",
        out,
        "--iters",
        10,
        "--limit",
        2,
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert "diverged" in result.stdout
    for name in ("stability.png", "stability.csv", "stability.json"):
        assert (out / name).stat().st_size > 0
    table = json.loads((out / "stability.json").read_text())
    assert table["images"] == 2 and table["table"][-1]["iteration"] == 10


def test_schedule_follows_the_checkpoint():
    from vitca_cli.nca.masking import MaskingSchedule
    from vitca_cli.training.evaluate import schedule_for

    meta = {
        "masking": {"start": 500, "end": 10000, "prob_stages": 3, "max_prob": 0.75, "patch_stages": 3, "max_patch": 8}
    }
    assert {s for _, s in eval_combos(schedule_for(meta))} == {1, 4, 8}
    assert {s for _, s in eval_combos(schedule_for(meta, max_patch=2))} == {1, 2}
    assert schedule_for({}) == MaskingSchedule() and schedule_for({"masking": {"bogus": 1}}) == MaskingSchedule()


def test_random_cell_init_replays_with_the_seed(randomise_model):
    model = randomise_model(CellularAutomaton(CFG.replace(cell_init="random"))).eval()
    ds = TensorDataset(_images(4))
    runs = [evaluate(model, batches(ds, 2), iters=2, seed=1)["methods"]["vitca"]["psnr"] for _ in range(2)]
    assert runs[0] == runs[1]


def test_paper_protocol_full_batches_one_random_combo_each_and_batch_psnr_headline(randomise_model):
    from vitca_cli.nca.config import CAConfig
    from vitca_cli.nca.model import CellularAutomaton
    from vitca_cli.training.evaluate import batches, evaluate, format_report

    model = randomise_model(
        CellularAutomaton(CAConfig(channels=1, image_size=(12, 12), embed=16, heads=2, mlp=16, hidden=4))
    ).eval()
    data = torch.rand(70, 1, 12, 12)
    picked = list(batches(data, 32, drop_last=True))
    assert [len(b) for b in picked] == [32, 32]  # the 6 left over are dropped, as the reference's loader does
    runs = [evaluate(model, batches(data, 32, drop_last=True), iters=2, protocol="paper", seed=s) for s in (0, 0, 1)]
    assert runs[0]["images"] == 64 and runs[0]["protocol"] == "paper" and "batch PSNR" in runs[0]["headline"]
    assert runs[0]["psnr_per_combo"] == runs[1]["psnr_per_combo"]  # the same seed draws the same combos
    assert sum(v["images"] for v in runs[0]["psnr_per_combo"].values()) == 64
    assert "protocol paper" in format_report(runs[0])
    # each batch's PSNR, in order, for paired comparisons; their mean is the headline
    assert len(runs[0]["vitca_batch_psnr"]) == 2 and runs[0]["vitca_batch_psnr"] == runs[1]["vitca_batch_psnr"]
    assert abs(sum(runs[0]["vitca_batch_psnr"]) / 2 - runs[0]["methods"]["vitca"]["psnr_batch"]["mean"]) < 1e-3
    cycled = evaluate(model, batches(data, 32), iters=2)
    assert cycled["protocol"] == "cycled" and cycled["images"] == 70


def test_two_photo_quality_reports_are_compared_photo_by_photo(tmp_path):
    """``bench/compare_eval.py`` on two ``bench/photo_quality.py`` reports: paired per-photo differences, a verdict
    only beyond the interval, and a refusal for reports not made alike."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / "compare_eval.py"

    def report(path, per_kind, photos=("a.png", "b.png", "c.png"), iters=32, seed=0):
        kinds = {k: {"vitca": {"psnr": sum(v) / len(v), "psnr_per_photo": v}} for k, v in per_kind.items()}
        path.write_text(json.dumps({"iters": iters, "size": 512, "seed": seed, "photos": list(photos), "kinds": kinds}))
        return str(path)

    a = report(tmp_path / "a.json", {"clean": [50.0, 52.0, 54.0], "gaussian 0.05": [30.0, 33.0, 36.0]})
    b = report(tmp_path / "b.json", {"clean": [51.0, 53.1, 54.9], "gaussian 0.05": [31.0, 34.1, 36.9]})
    c = report(tmp_path / "c.json", {"clean": [49.0, 53.0, 54.0], "gaussian 0.05": [31.0, 32.0, 36.0]})
    run = lambda x, y: subprocess.run([sys.executable, str(script), x, y], capture_output=True, text=True)  # noqa: E731
    better = run(a, b)
    assert better.returncode == 0 and "B is better beyond the noise" in better.stdout
    assert "B − A = +1.000" in better.stdout.splitlines()[0]
    assert "no difference shown" in run(a, c).stdout  # +1 and -1 on different photos: no verdict
    other = report(tmp_path / "d.json", {"clean": [1.0], "gaussian 0.05": [2.0]}, photos=("z.png",))
    refused = run(a, other)
    assert refused.returncode != 0 and "photos" in refused.stderr
    other_damage = run(a, report(tmp_path / "e.json", {"clean": [1.0] * 3, "gaussian 0.05": [2.0] * 3}, seed=1))
    assert other_damage.returncode != 0 and "seed" in other_damage.stderr
    fewer_steps = run(
        a, report(tmp_path / "f.json", {"clean": [51.0, 53.1, 54.9], "gaussian 0.05": [31.0] * 3}, iters=24)
    )
    assert fewer_steps.returncode == 0 and "differ in: iters 32 → 24" in fewer_steps.stdout


def test_two_eval_reports_pair_on_the_damage_whatever_the_steps(tmp_path):
    """``bench/compare_eval.py`` on two ``vitca eval --json`` reports: batch-by-batch differences when the damage is
    the same (even with other steps or update rate, which are printed), a refusal when the masks differ."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / "compare_eval.py"
    base = {"dataset": "fashion-mnist", "split": "test", "images": 96, "protocol": "paper", "mask_type": "noise"}
    base |= {"combos": "nine, one per batch", "weights": "w.pt", "iters": 64, "update_rate": 0.5}

    def report(name, per_batch, **over):
        (tmp_path / name).write_text(json.dumps(base | {"seed": 0, "vitca_batch_psnr": per_batch} | over))
        return str(tmp_path / name)

    run = lambda x, y: subprocess.run([sys.executable, str(script), x, y], capture_output=True, text=True)  # noqa: E731
    a = report("a.json", [20.0, 22.0, 24.0])
    more = run(a, report("b.json", [20.5, 22.4, 24.6], iters=96, update_rate=1.0))
    assert more.returncode == 0 and "differ in: iters 64 → 96, update_rate 0.5 → 1.0" in more.stdout
    assert "B − A = +0.500" in more.stdout and "B is better beyond the noise" in more.stdout
    other_masks = run(a, report("c.json", [20.5, 22.4, 24.6], seed=1))
    assert other_masks.returncode != 0 and "seed" in other_masks.stderr
    # an evaluation with --limit pairs with the first batches of a longer one, if its batches are all whole
    whole = run(report("d.json", [20.5, 22.4], images=64, batch_size=32), report("e.json", [20.0, 22.0, 24.0],
                                                                                 batch_size=32))  # fmt: skip
    assert whole.returncode == 0 and "paired over the first 2 batches (64 images)" in whole.stdout
    assert "B − A = -0.450" in whole.stdout
    ragged = run(a, report("f.json", [20.5, 22.4], images=50))
    assert ragged.returncode != 0 and "not all whole" in ragged.stderr


def test_a_limited_evaluation_scores_the_first_batches_of_a_longer_one_exactly(model):
    """What lets ``bench/compare_eval.py`` pair a ``--limit`` report with a whole-split one: damage, combos and
    update masks are drawn batch by batch in order, so the first batches come out the same."""
    data = TensorDataset(_images(96, seed=3))
    short, long = (
        evaluate(model, batches(data, 32, limit=n, drop_last=True), iters=3, protocol="paper")["vitca_batch_psnr"]
        for n in (64, 96)
    )
    assert len(short) == 2 and len(long) == 3 and short == long[:2]


def test_the_learning_curve_fit_reads_its_data_file_and_recovers_a_known_line():
    """``bench/learning_curve.py``: every measured row of the FashionMNIST 32×32 learning curve is read from its data
    file (the paper's row, whose images are unknown, is not), the docs show that file's table as ``--markdown``
    renders it, and the fit gives back a line's slope and zero residual."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("learning_curve", root / "bench" / "learning_curve.py")
    curve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curve)
    data = curve.load_rows()
    rows = curve.read_curve(data)
    assert len(rows) >= 10 and all(not label.startswith("paper") for label, _, _ in rows)
    assert rows[0][1] < rows[-1][1] and all(15 < psnr < 30 for _, _, psnr in rows)
    assert all(r["images"] is None or r["images"] >= r["iterations"] for r in data)
    assert curve.markdown(data) in (root / "docs" / "fashion-mnist-32-runs.md").read_text(encoding="utf-8")
    intercept, slope, sd = curve.fit([(10**x, 3.0 + 0.5 * x) for x in (4, 5, 6, 7)])
    assert abs(slope - 0.5) < 1e-9 and abs(intercept - 3.0) < 1e-9 and sd < 1e-9
