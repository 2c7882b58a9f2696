"""Real-world damage (vitca_cli.nca.corruptions), mask-aware cells, input-initialised outputs, known pixels kept exact
in inpainting, and training/eval with a corruption mixture and several crop sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vitca_cli.cli import app
from vitca_cli.errors import UsageError
from vitca_cli.io.checkpoint import read_checkpoint, save_checkpoint
from vitca_cli.nca.config import PRESETS, CAConfig, preset
from vitca_cli.nca.corruptions import Corruption, corrupt_batch, corrupt_one, mixture_str, parse_mixture
from vitca_cli.nca.model import CellularAutomaton, count_parameters
from vitca_cli.restore.backends import TorchBackend
from vitca_cli.restore.loop import restore
from vitca_cli.training.config import TrainConfig
from vitca_cli.training.dataset import ImageDataset
from vitca_cli.training.evaluate import evaluate
from vitca_cli.training.train import train
from vitca_cli.training.trainer import Trainer

MIX = "gaussian=0.05-0.2:3, saltpepper:1, jpeg=10-30:1, strokes:2, rects:1, clean:1"
TINY = dict(embed=16, heads=2, mlp=16, hidden=4, pos_encoding="none")


def photo(h=24, w=20, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([yy, xx, (yy + xx) / 2])
    return (0.8 * base + 0.1 * torch.rand(3, h, w, generator=g)).clamp(0, 1)


# -- the mixture syntax -------------------------------------------------------------------------------------------
def test_mixture_parses_ranges_weights_and_defaults():
    mix = parse_mixture(MIX)
    assert [c.kind for c in mix] == ["gaussian", "saltpepper", "jpeg", "strokes", "rects", "clean"]
    assert mix[0] == Corruption("gaussian", 0.05, 0.2, 3.0)
    assert mix[1].lo == 0.02 and mix[1].hi == 0.2  # the default range
    assert parse_mixture("gaussian=0.1")[0] == Corruption("gaussian", 0.1, 0.1, 1.0)
    assert mixture_str(parse_mixture(mixture_str(mix))) == mixture_str(mix)  # canonical, round-trips


@pytest.mark.parametrize(
    "spec",
    ["blur:1", "gaussian=0.3-0.1", "gaussian=2", "jpeg=0-50", "clean=1-2", "gaussian:0", "gaussian:x", "", "patch=0.5"],
)
def test_bad_mixtures_say_why(spec):
    with pytest.raises(ValueError):
        parse_mixture(spec)


# -- each kind ------------------------------------------------------------------------------------------------------
def test_each_kind_damages_as_described():
    x = photo()
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    clean, k = corrupt_one(x, Corruption("clean", 0, 0), gen())
    assert torch.equal(clean, x) and bool(k.all())
    noisy, k = corrupt_one(x, Corruption("gaussian", 0.1, 0.1), gen())
    assert bool(k.all()) and 0.05 < float((noisy - x).std()) < 0.12 and noisy.min() >= 0 and noisy.max() <= 1
    sp, _ = corrupt_one(x, Corruption("saltpepper", 0.3, 0.3), gen())
    hit = ((sp == 0) | (sp == 1)).all(0) & (sp != x).any(0)
    assert 0.15 < float(hit.float().mean()) < 0.45
    jp, _ = corrupt_one(x, Corruption("jpeg", 5, 5), gen())
    assert jp.shape == x.shape and 0 < float((jp - x).abs().mean()) < 0.2
    for kind in ("strokes", "rects", "scribbles", "blobs", "text"):
        damaged, known = corrupt_one(x, Corruption(kind, 2, 2), gen(), mask_type="dropout")
        missing = known[0] == 0
        assert 0 < int(missing.sum()) < missing.numel()
        assert bool((damaged[:, missing] == 0).all()) and torch.equal(damaged[:, ~missing], x[:, ~missing])
    patched, known = corrupt_one(x.new_ones(3, 24, 20), Corruption("patch", 0, 0), gen(), "dropout", (0.5, 4))
    assert set(known.unique().tolist()) == {0.0, 1.0} and torch.equal(patched, known.expand(3, -1, -1))


def test_batch_draws_by_weight_and_replays_for_a_seed():
    x = photo().expand(64, -1, -1, -1).contiguous()
    a, ka, kinds = corrupt_batch(x, parse_mixture("gaussian:3, clean:1"), torch.Generator().manual_seed(0))
    b, kb, _ = corrupt_batch(x, parse_mixture("gaussian:3, clean:1"), torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and torch.equal(ka, kb)
    assert 30 < kinds.count("gaussian") < 60 and kinds.count("clean") > 4


# -- mask-aware cells and input-initialised outputs ---------------------------------------------------------------
def test_paper_presets_keep_their_parameter_counts_and_the_mask_channel_adds_one_input():
    for name, cfg in PRESETS.items():
        assert not cfg.mask_channel and cfg.cell_init == "constant", name
    base = count_parameters(CellularAutomaton(preset("cifar10")))
    aware = count_parameters(CellularAutomaton(preset("cifar10", mask_channel=True)))
    assert aware - base == preset("cifar10").embed  # one more column of the embedding
    cfg = preset("cifar10", mask_channel=True, patch_size=2)
    assert cfg.known_channels == 4 and cfg.static_channels == 3 * 4 + 4
    assert cfg.output_slice.start == cfg.static_channels


def test_seed_fills_the_known_channel_and_starts_outputs_at_the_input():
    cfg = CAConfig(channels=3, mask_channel=True, cell_init="input", patch_size=2, **TINY)
    x = photo(8, 8)[None]
    known = torch.ones(1, 1, 8, 8)
    known[..., :4, :1] = 0
    ca = CellularAutomaton(cfg)
    z = ca.seed(x, known=known)
    assert torch.equal(
        z[:, cfg.known_slice].sum(1, keepdim=True)[0, 0], torch.tensor([[2.0, 4, 4, 4]] * 2 + [[4.0] * 4] * 2)
    )  # per 2×2 cell: how many of its pixels are known
    out = ca.output(z)
    assert torch.equal(out[..., 4:, :], x[..., 4:, :]) and torch.equal(out[..., 1:], x[..., 1:])
    assert bool((out[..., :4, :1] == 0.5).all())
    # The zero-initialised head makes an untrained rule the identity: it returns the damaged image unchanged.
    z = ca(ca.seed(x), 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ca.output(z), x)


def test_restore_keeps_known_pixels_exactly_also_tiled(randomise_model):
    cfg = CAConfig(channels=3, mask_channel=True, cell_init="input", **TINY)
    backend = TorchBackend(randomise_model(CellularAutomaton(cfg)))
    img = photo(40, 36).permute(1, 2, 0).numpy()
    missing = np.zeros((40, 36), bool)
    missing[10:20, 5:30] = True
    damaged = np.where(missing[..., None], 0.0, img).astype(np.float32)
    whole = restore(backend, damaged, 4, seed=3, known=~missing)
    tiled = restore(backend, damaged, 4, seed=3, known=~missing, tile=24, holes_only=False)
    assert tiled.plan.count > 1
    assert np.array_equal(whole.image[~missing], img[~missing])
    assert not np.allclose(whole.image[missing], 0)  # the holes were filled
    np.testing.assert_allclose(tiled.image, whole.image, atol=1e-5)
    # The mask reaches the model: the same damaged pixels without it restore differently.
    blind = restore(backend, damaged, 4, seed=3)
    assert not np.allclose(blind.image[missing], whole.image[missing])


def test_cli_inpaint_returns_every_unmasked_pixel_bit_for_bit(tmp_path, weights_dirs):
    torch.manual_seed(0)
    cfg = CAConfig(channels=3, mask_channel=True, cell_init="input", **TINY)
    ca = CellularAutomaton(cfg)
    with torch.no_grad():
        ca.rule.head[1].weight.normal_(0, 0.3)
    save_checkpoint(tmp_path / "m.pt", cfg, ca.state_dict(), {"mask_type": "dropout"})
    rng = np.random.RandomState(0)
    pixels = rng.randint(0, 256, (30, 26, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    mask = np.zeros((30, 26), np.uint8)
    mask[5:12, 3:20] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    res = CliRunner().invoke(
        app,
        [
            "inpaint",
            str(tmp_path / "in.png"),
            "-o",
            str(tmp_path / "out.png"),
            "--mask",
            str(tmp_path / "mask.png"),
            "-w",
            str(tmp_path / "m.pt"),
            "--iters",
            "3",
        ],
    )
    assert res.exit_code == 0, res.output
    out = np.asarray(Image.open(tmp_path / "out.png"))
    keep = mask == 0
    assert np.array_equal(out[keep], pixels[keep])
    assert not np.array_equal(out[~keep], pixels[~keep])


# -- training and eval with a mixture ----------------------------------------------------------------------------
def photo_folder(tmp_path) -> ImageDataset:
    files = []
    for k in range(6):
        arr = (photo(40, 48, seed=k).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        files.append(tmp_path / f"p{k}.png")
        Image.fromarray(arr).save(files[-1])
    return ImageDataset("photos", files=files, channels=3, image_size=(8, 8), augment=True)


def mix_tcfg(**kw) -> TrainConfig:
    base = dict(
        dataset="photos",
        iterations=8,
        batch_size=4,
        pool_size=8,
        t_min=2,
        t_max=3,
        val_every=4,
        val_size=4,
        val_steps=2,
        log_every=1,
        compile=False,
        corruptions=MIX,
        crop_sizes=(8, 16),
        mask_type="dropout",
    )
    base.update(kw)
    return TrainConfig.from_dict(base)  # flat mask_* keys, as older runs stored them


def test_train_config_records_a_canonical_mixture_and_refuses_a_bad_one():
    t = mix_tcfg(corruptions="clean:1,gaussian")
    assert t.corruptions == "clean:1, gaussian=0.01-0.25:1" and not t.paper_masking
    assert TrainConfig().paper_masking
    with pytest.raises(UsageError):
        mix_tcfg(corruptions="fog:1")


def test_mixture_training_with_two_crop_sizes_resumes_exactly(tmp_path):
    ds = photo_folder(tmp_path)
    cfg = CAConfig(channels=3, image_size=(8, 8), mask_channel=True, cell_init="input", **TINY)
    straight = train(cfg, mix_tcfg(), tmp_path / "a", train_ds=ds, val_ds=ds, progress=False)
    train(cfg, mix_tcfg(), tmp_path / "b", train_ds=ds, val_ds=ds, stop_at=5, progress=False)
    resumed = read_checkpoint(tmp_path / "b" / "last.pt")
    assert resumed["iteration"] == 5 and set(resumed["pool"]["sizes"]) == {"8", "16"}
    again = train(cfg, mix_tcfg(), tmp_path / "b", train_ds=ds, val_ds=ds, resume_from=resumed, progress=False)
    for k, v in straight["trainer"].ca.state_dict().items():
        assert torch.equal(v, again["trainer"].ca.state_dict()[k]), k
    sizes = {len(p.x[0, 0]) for p in straight["trainer"].pools.values() if len(p)}
    assert sizes == {8, 16}
    meta = read_checkpoint(tmp_path / "a" / "best.pt")["meta"]
    assert meta["corruptions"] == mix_tcfg().corruptions and meta["crop_sizes"] == [8, 16]


def test_trainer_batch_shrinks_with_the_crop_area(tmp_path):
    ds = photo_folder(tmp_path)
    cfg = CAConfig(channels=3, image_size=(8, 8), **TINY)
    trainer = Trainer(cfg, mix_tcfg(batch_size=8), ds)
    assert trainer.batch_size_at(8) == 8 and trainer.batch_size_at(16) == 2
    z, x = trainer.fresh_batch(1, 16)
    assert x.shape == (2, 3, 16, 16) and z.shape[-1] == 16


def test_eval_with_corruptions_reports_per_kind_and_keeps_known_pixels(randomise_model):
    cfg = CAConfig(channels=3, image_size=(16, 16), mask_channel=True, cell_init="input", **TINY)
    model = randomise_model(CellularAutomaton(cfg)).eval()
    data = [torch.stack([photo(16, 16, seed=s) for s in range(8)])]
    report = evaluate(
        model, data, iters=2, corruptions="rects:1, gaussian=0.1:1", mask_type="dropout", baselines=["telea"]
    )
    assert report["corruptions"] == "rects=1-4:1, gaussian=0.1-0.1:1"
    assert set(report["psnr_per_combo"]) <= {"rects", "gaussian"} and report["images"] == 8
    assert report["methods"]["vitca"]["psnr"]["mean"] > 0


def test_cli_eval_rejects_a_bad_mixture_in_one_line(tmp_path):
    res = CliRunner().invoke(app, ["eval", "-w", "x.pt", "-d", "mnist", "--corruptions", "fog"])
    assert res.exit_code == 2 and "fog" in res.output


def test_photo_collection_splits_by_source_and_adds_half_size_copies(tmp_path):
    from vitca_cli.training.photos import OPENCV_TEST, OPENCV_TRAIN, OPENCV_VAL, SKIMAGE_TRAIN, collect

    names = [n.rsplit(".", 1)[0] for n in OPENCV_TRAIN + OPENCV_VAL + OPENCV_TEST] + SKIMAGE_TRAIN
    assert len(names) == len(set(names))  # no source photo in two splits
    counts = collect(tmp_path)
    stems = {p.stem for p in (tmp_path / "train").glob("*.png")}
    assert counts["train"] == len(stems) > 0
    halves = {s for s in stems if s.endswith("-half")}
    assert halves and all(s.removesuffix("-half") in stems for s in halves)
    for half in halves:
        full, small = (Image.open(tmp_path / "train" / f"{s}.png").size for s in (half.removesuffix("-half"), half))
        assert small == (full[0] // 2, full[1] // 2)
    held_out = {p.stem for d in ("test", "val-photos") for p in (tmp_path / d).glob("*.png")}
    assert not held_out & {s.removesuffix("-half") for s in stems}


def test_photo_collection_can_add_enlarged_copies_and_crops_at_those_scales(tmp_path):
    from vitca_cli.training.photos import _save, test_crops

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 260, 3), dtype=np.uint8))
    assert _save(photo, tmp_path / "p", half=True, upscale=(2, 4)) == 4
    sizes = {p.stem: Image.open(p).size for p in tmp_path.glob("*.png")}
    assert sizes == {"p": (260, 300), "p-half": (130, 150), "p-x2": (520, 600), "p-x4": (1040, 1200)}
    (tmp_path / "val-photos").mkdir()
    photo.save(tmp_path / "val-photos" / "v.png")
    assert test_crops(tmp_path, size=32, per_image=3, split="val", dest=tmp_path / "val", scales=(1, 4)) == 6
    crops = sorted(p.stem for p in (tmp_path / "val").glob("*.png"))
    assert crops == ["v-00", "v-01", "v-02", "v-x4-00", "v-x4-01", "v-x4-02"]
    # an enlarged crop is smoother than a crop at the photo's own scale
    roughness = {
        tag: np.mean([np.abs(np.diff(np.asarray(Image.open(p), float), axis=1)).mean() for p in group])
        for tag, group in (("1", (tmp_path / "val").glob("v-0*.png")), ("4", (tmp_path / "val").glob("v-x4-*.png")))
    }
    assert roughness["4"] < roughness["1"] / 2


def test_camera_noise_is_signal_dependent_and_correlated_across_pixels_and_channels():
    from vitca_cli.nca.corruptions import camera_noise, srgb_to_linear

    gen = torch.Generator().manual_seed(0)
    dark, bright = torch.full((3, 64, 64), 0.2), torch.full((3, 64, 64), 0.8)
    linear = {
        name: srgb_to_linear(camera_noise(x, 0.05, 0.0, gen)) - srgb_to_linear(x)
        for name, x in (("dark", dark), ("bright", bright))
    }
    # shot noise: in linear light its variance grows with the signal
    assert linear["bright"].std() > 2 * linear["dark"].std() > 0
    n = camera_noise(bright, 0.05, 0.0, gen) - bright
    across = np.corrcoef(n.reshape(3, -1).numpy())[0, 1]
    sideways = np.corrcoef(n[1, :, 1:].flatten().numpy(), n[1, :, :-1].flatten().numpy())[0, 1]
    assert across > 0.2 and sideways > 0.2  # demosaicking spreads each site's noise


def test_noise_saved_as_a_4_2_0_jpeg_keeps_its_luminance_and_loses_its_chroma():
    c = parse_mixture("gaussjpeg=0.08-0.08")[0]
    x = torch.full((3, 64, 64), 0.5)
    noisy, known = corrupt_one(x, c, torch.Generator().manual_seed(1))
    n = (noisy - x).reshape(3, -1).numpy()
    assert known.all() and n.std() > 0.02
    assert np.corrcoef(n)[0, 2] > 0.5  # what is left is mostly the same in R, G and B
    assert str(parse_mixture("camera, gaussjpeg")[0]) == "camera=0.02-0.2:1"


def test_scribbles_run_from_thin_to_thirty_pixels_wide_and_text_draws_letters():
    from scipy import ndimage

    from vitca_cli.nca.corruptions import hole_mask

    depths = []
    for seed in range(12):  # one stroke each: its half width is the farthest a missing pixel lies from a known one
        missing = hole_mask("scribbles", 256, 256, 1, torch.Generator().manual_seed(seed))
        depths.append(float(ndimage.distance_transform_edt(missing).max()))
    assert min(depths) <= 3 and max(depths) >= 9  # from 2 px wide to past 18
    text = hole_mask("text", 96, 96, 3, torch.Generator().manual_seed(1))
    _, parts = ndimage.label(text)
    assert 0.005 < text.mean() < 0.3 and parts >= 3  # several separate glyphs, not one block
