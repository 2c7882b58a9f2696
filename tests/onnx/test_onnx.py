"""ONNX export of one CA step and the ONNX Runtime backend: real exports, real ORT sessions, real files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import vitca_cli.io.weights as weights_mod
from vitca_cli.cli import app
from vitca_cli.errors import UsageError, WeightsError
from vitca_cli.io.checkpoint import save_checkpoint
from vitca_cli.io.weights import sha256_file
from vitca_cli.nca.attention import attend
from vitca_cli.nca.config import CAConfig, preset
from vitca_cli.nca.model import CellularAutomaton, seed_cells
from vitca_cli.onnx.backend import (
    SHAPED_SESSIONS,
    OnnxBackend,
    _nhwc_array,
    onnx_for_checkpoint,
)
from vitca_cli.onnx.export import export_checkpoint, export_step
from vitca_cli.onnx.format import INPUTS, OUTPUT
from vitca_cli.onnx.graph import EXPORT_TILE, TileGrid, from_tiles, tiled_attention, to_tiles
from vitca_cli.onnx.session import _cuda_driver_present, create_session

SMALL = dict(embed=16, heads=2, mlp=16, hidden=4)


def realistic(cfg: CAConfig, seed: int = 0, head_std: float = 0.005) -> CellularAutomaton:
    """Default initialisation, but a small random head instead of the zero one, so steps change the grid while
    the state stays bounded over 64 steps (as a trained model's does)."""
    torch.manual_seed(seed)
    ca = CellularAutomaton(cfg).eval()
    with torch.no_grad():
        ca.rule.head[1].weight.normal_(0, head_std)
        ca.rule.head[1].bias.normal_(0, head_std)
    return ca


@pytest.fixture(autouse=True)
def isolated_home(weights_dirs):
    """No shipped weights and an empty VITCA_HOME (see conftest)."""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The baseline ViTCA saved as a checkpoint and exported once with the default (dynamo) exporter."""
    d = tmp_path_factory.mktemp("onnx")
    ca = realistic(preset("fashion-mnist"))
    ckpt = d / "fm.pt"
    save_checkpoint(ckpt, ca.cfg, ca.state_dict(), {"mask_type": "noise"})
    path = d / "fm.onnx"
    info = export_checkpoint(ckpt, path)
    return {"ca": ca, "ckpt": ckpt, "path": path, "info": info}


def rollout(step, z, masks):
    for m in masks:
        z = step(z, m)
    return z


# ---------------------------------------------------------------------------------------------------------------------
# The exported file
# ---------------------------------------------------------------------------------------------------------------------
def test_export_passes_checker_with_dynamic_axes_and_metadata(exported):
    model = onnx.load(str(exported["path"]))
    onnx.checker.check_model(model, full_check=True)
    assert 100_000 < exported["path"].stat().st_size < 1_000_000  # a few hundred KB
    assert [i.name for i in model.graph.input] == list(INPUTS)
    assert [o.name for o in model.graph.output] == [OUTPUT]
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    cfg = exported["ca"].cfg
    assert dims[0][:3] == ["batch", "height", "width"] and dims[0][3] == cfg.cell_channels
    assert dims[1][3] == 1
    props = {p.key: p.value for p in model.metadata_props}
    assert CAConfig.from_dict(json.loads(props["vitca.config"])) == cfg
    layout = json.loads(props["vitca.layout"])
    assert layout["output"] == [cfg.output_slice.start, cfg.output_slice.stop]
    assert layout["memory"] == "NHWC"
    assert json.loads(props["vitca.source"])["sha256"] == sha256_file(exported["ckpt"])
    assert json.loads(props["vitca.meta"]) == {"mask_type": "noise"}


@pytest.mark.parametrize("tile", [(2, 2), EXPORT_TILE, (3, 5), (1, 1)])
def test_tiled_attention_equals_the_model_attention(tile):
    g = torch.Generator().manual_seed(0)
    for (h, w), nbh in [((5, 7), (3, 3)), ((9, 4), (5, 7)), ((1, 1), (3, 3)), ((6, 8), (3, 3))]:
        x = torch.randn(2, h, w, 12, generator=g)
        weights = [torch.randn(12, 12, generator=g) for _ in range(3)]
        ref, _ = attend(x, weights, 3, nbh, 0.5)
        grid = TileGrid(h, w, tile)
        out, _ = tiled_attention(to_tiles(x, grid), weights, 3, nbh, 0.5, grid)
        out = from_tiles(out.flatten(-2), grid).unflatten(-1, (3, 4))
        assert torch.allclose(out, ref, atol=1e-5)


def test_tiles_round_trip():
    x = torch.randn(2, 5, 7, 3)
    grid = TileGrid(5, 7, (2, 2))
    tiles = to_tiles(x, grid)
    assert tiles.shape == (2, 3, 4 * 4, 3)
    assert torch.equal(tiles[0, 1, 4 * 2 + 2 * 1 + 0], x[0, 2 * 1 + 1, 2 * 2 + 0])  # tile (1, 2), cell (1, 0)
    assert torch.equal(from_tiles(tiles, grid), x)


# ---------------------------------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,height,width", [(1, 12, 16), (3, 20, 9)])
def test_ort_matches_torch_after_64_steps(exported, batch, height, width):
    ca = exported["ca"]
    backend = OnnxBackend.from_file(exported["path"], "cpu")
    assert backend.cfg == ca.cfg and backend.meta == {"mask_type": "noise"}
    image = torch.rand(batch, 1, height, width, generator=torch.Generator().manual_seed(batch))
    z0 = seed_cells(ca.cfg, image)
    masks = ca.update_masks(z0, 64, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        ref = rollout(ca.step, z0, masks)
    out = rollout(backend.step, z0, masks)
    assert out.shape == ref.shape
    assert (ref - z0).abs().max() > 0.05  # the steps really changed the grid
    assert ref.abs().max() < 20  # and the state stayed bounded
    assert (out - ref).abs().max() < 1e-4
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_steps_run_in_sessions_of_fixed_shape_that_match_the_exported_one(exported):
    backend = OnnxBackend.from_file(exported["path"], "cpu", threads=1)
    cfg = backend.cfg
    shapes = [(1, 12, 16), (2, 9, 7), (1, 5, 30), (3, 6, 6), (1, 7, 7)]  # one more than SHAPED_SESSIONS
    assert len(shapes) == SHAPED_SESSIONS + 1
    for i, (b, h, w) in enumerate(shapes):
        g = torch.Generator().manual_seed(i)
        z = seed_cells(cfg, torch.rand(b, 1, h, w, generator=g))
        mask = (torch.rand(b, 1, h, w, generator=g) < 0.5).float()
        out = backend.step(z, mask)
        shaped = backend.session_for((b, h, w))
        assert shaped is not backend.session and shaped is backend.session_for((b, h, w))  # made once, kept
        feeds = {INPUTS[0]: _nhwc_array(z), INPUTS[1]: _nhwc_array(mask)}
        (dynamic,) = backend.session.run([OUTPUT], feeds)
        assert np.allclose(_nhwc_array(out), dynamic, atol=1e-6)
        with pytest.raises(Exception):  # noqa: B017 - ORT's error type varies: it really is fixed to its shape
            shaped.run([OUTPUT], {k: np.concatenate([v, v]) for k, v in feeds.items()})
    assert list(backend._shaped) == [tuple(s) for s in shapes[1:]]  # the oldest was dropped


def test_step_reads_channels_last_grids_in_place_and_respects_the_mask(exported):
    backend = OnnxBackend.from_file(exported["path"], "cpu")
    cfg = backend.cfg
    z = seed_cells(cfg, torch.rand(2, 1, 8, 8))
    assert np.shares_memory(_nhwc_array(z), z.numpy())  # no copy on the way in
    mask = torch.ones(2, 1, 8, 8)
    mask[:, :, :4] = 0
    out = backend.step(z, mask)
    assert torch.equal(out[:, :, :4], z[:, :, :4])  # cells that do not update keep their state exactly
    assert torch.equal(out[:, : cfg.static_channels], z[:, : cfg.static_channels])  # input never changes
    assert not torch.equal(out[:, :, 4:], z[:, :, 4:])
    assert torch.equal(backend.step(z, torch.zeros_like(mask)), z)  # no cell updates: nothing to compute
    fractional = torch.rand(mask.shape, generator=torch.Generator().manual_seed(3)) * mask  # any mask values
    with torch.inference_mode():
        assert (backend.step(z, fractional) - exported["ca"].step(z, fractional)).abs().max() < 1e-5


def test_denoise_cli_onnx_backend_equals_torch_backend(exported, tmp_path):
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)).save(image)
    outs = {}
    for backend, weights in (("torch", exported["ckpt"]), ("onnx", exported["path"])):
        outs[backend] = tmp_path / f"{backend}.png"
        result = CliRunner().invoke(
            app,
            [
                "denoise",
                str(image),
                "-o",
                str(outs[backend]),
                "--weights",
                str(weights),
                "--backend",
                backend,
                "--iters",
                "8",
                "--device",
                "cpu",
            ],
        )
        assert result.exit_code == 0, result.output
    a, b = (np.asarray(Image.open(outs[k])).astype(int) for k in ("torch", "onnx"))
    assert np.abs(a - b).max() <= 1
    # An .onnx file needs no --backend onnx: the file says what it is (issue 24).
    auto = tmp_path / "auto.png"
    result = CliRunner().invoke(
        app,
        ["denoise", str(image), "-o", str(auto), "--weights", str(exported["path"]), "--iters", "8", "--device", "cpu"],
    )
    assert result.exit_code == 0 and "ONNX Runtime backend" in result.stderr, result.output
    assert np.array_equal(np.asarray(Image.open(auto)), np.asarray(Image.open(outs["onnx"])))


# ---------------------------------------------------------------------------------------------------------------------
# Every neighbourhood and patch size, head masks, other encodings and UNetCA (fast TorchScript exporter)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        dict(neighbourhood=(3, 3), patch_size=1),
        dict(neighbourhood=(5, 5), patch_size=2),
        dict(neighbourhood=(7, 7), patch_size=4),
        dict(neighbourhood=(3, 3), patch_size=8),
        dict(neighbourhood=(7, 5), patch_size=16),
        dict(pos_encoding="nerf"),
        dict(pos_encoding="learned", image_size=(8, 12)),
        dict(arch="unetca", unet_features=8, channels=3),
        dict(channels=3, mask_channel=True, cell_init="input", pos_encoding="none", patch_size=2),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_every_configuration_exports_and_matches(tmp_path, kw):
    cfg = CAConfig(**{**SMALL, "image_size": (16, 16), **kw})
    ca = realistic(cfg, head_std=0.05) if cfg.arch == "vitca" else CellularAutomaton(cfg).eval()
    path = tmp_path / "step.onnx"
    info = export_step(ca, path, exporter="torchscript")
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    backend = OnnxBackend.from_file(path, "cpu")
    assert backend.cfg == cfg  # the whole config (mask channel, cell init) travels in the graph's metadata
    grids = [cfg.image_size] if cfg.pos_encoding == "learned" else [(16, 16), (48, 32)]
    for (h, w), batch in zip(grids, (1, 2)):
        known = (torch.rand(batch, 1, h, w, generator=torch.Generator().manual_seed(h)) < 0.7).float()
        z = seed_cells(cfg, torch.rand(batch, cfg.channels, h, w), known=known)
        mask = (torch.rand(batch, 1, *z.shape[-2:]) < 0.5).float()
        with torch.inference_mode():
            ref = ca.step(z, mask)
        assert (backend.step(z, mask) - ref).abs().max() < 1e-5
    assert info["dynamic"] == ("batch" if cfg.pos_encoding == "learned" else "batch, height, width")
    if cfg.pos_encoding == "learned":  # static grid: a clear error, not ORT's shape complaint
        with pytest.raises(ValueError, match="learned position encoding"):
            backend.step(seed_cells(cfg, torch.rand(1, 1, 8, 8)), torch.ones(1, 1, 8, 8))


@pytest.mark.parametrize(
    "kw",
    [dict(neighbourhood=(7, 7), patch_size=16, **SMALL), dict(arch="unetca", unet_features=8)],
    ids=["vitca", "unetca"],
)
def test_dynamo_exports_the_widest_window_the_largest_patch_and_unetca(tmp_path, kw):
    cfg = CAConfig(image_size=(32, 32), **kw)
    ca = realistic(cfg, head_std=0.05) if cfg.arch == "vitca" else CellularAutomaton(cfg).eval()
    export_step(ca, tmp_path / "s.onnx", exporter="dynamo")
    dims = onnx.load(str(tmp_path / "s.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[:3]] == ["batch", "height", "width"]
    backend = OnnxBackend.from_file(tmp_path / "s.onnx", "cpu")
    for h, w in [(48, 80), (16, 16)]:  # ViTCA: 3×5 and 1×1 grids of 16-pixel patches
        z = seed_cells(cfg, torch.rand(2, 1, h, w))
        mask = torch.ones(2, 1, *z.shape[-2:])
        with torch.inference_mode():
            assert (backend.step(z, mask) - ca.step(z, mask)).abs().max() < 1e-5


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_opset_18_spells_out_gelu_and_20_has_the_op(tmp_path, exporter):
    ca = realistic(CAConfig(**SMALL), head_std=0.05)
    z = seed_cells(ca.cfg, torch.rand(2, 1, 9, 6))
    mask = (torch.rand(2, 1, 9, 6) < 0.5).float()
    for opset in (18, 20):
        path = tmp_path / f"o{opset}.onnx"
        assert export_step(ca, path, opset=opset, exporter=exporter)["opset"] == opset
        ops = {node.op_type for node in onnx.load(str(path)).graph.node}
        assert ("Gelu" in ops, "Erf" in ops) == ((False, True) if opset == 18 else (True, False))
        with torch.inference_mode():
            assert (OnnxBackend.from_file(path, "cpu").step(z, mask) - ca.step(z, mask)).abs().max() < 1e-5


def test_head_mask_input(tmp_path):
    cfg = CAConfig(**{**SMALL, "heads": 4})
    ca = realistic(cfg, head_std=0.05)
    path = tmp_path / "h.onnx"
    assert export_step(ca, path, with_head_mask=True, exporter="torchscript")["inputs"][-1] == "head_mask"
    backend = OnnxBackend.from_file(path, "cpu")
    z = seed_cells(cfg, torch.rand(1, 1, 10, 10))
    mask = torch.ones(1, 1, 10, 10)
    silenced = torch.tensor([1.0, 0.0, 1.0, 0.0])
    with torch.inference_mode():
        ref = ca.step(z, mask, silenced)
        assert not torch.allclose(ref, ca.step(z, mask), atol=1e-4)  # silencing heads matters
    assert (backend.step(z, mask, silenced) - ref).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# Bad files, devices, the CLI
# ---------------------------------------------------------------------------------------------------------------------
def test_corrupt_foreign_and_missing_files_are_weights_errors(exported, tmp_path):
    data = exported["path"].read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 3])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not an onnx model at all" * 10)
    foreign = tmp_path / "foreign.onnx"
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=9)
    onnx.save(model, str(foreign))
    for path, words in [
        (truncated, "not a readable ONNX model"),
        (garbage, "not a readable ONNX model"),
        (foreign, "not a vitca step graph"),
        (tmp_path / "missing.onnx", "not found"),
    ]:
        with pytest.raises(WeightsError, match=words):
            OnnxBackend.from_file(path, "cpu")
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(image)
    result = CliRunner().invoke(
        app, ["denoise", str(image), "-o", str(tmp_path / "o.png"), "--weights", str(garbage), "--backend", "onnx"]
    )
    assert result.exit_code == 3 and "not a readable ONNX model" in result.output


@pytest.mark.skipif(_cuda_driver_present(), reason="a CUDA driver is present")
def test_cuda_without_a_usable_provider_is_an_error(exported):
    with pytest.raises(UsageError, match="--device cuda"):
        create_session(str(exported["path"]), "cuda")
    with pytest.raises(UsageError, match="expected auto, cpu, cuda"):
        create_session(str(exported["path"]), "gpu")
    session, provider = create_session(str(exported["path"]), "auto")  # auto falls back to the CPU quietly
    assert provider == "CPUExecutionProvider" and session.get_providers() == ["CPUExecutionProvider"]


def test_checkpoint_is_exported_once_into_the_cache(exported, tmp_path):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(exported["ckpt"].read_bytes())
    first = onnx_for_checkpoint(ckpt, exporter="torchscript")
    assert first.parent == weights_mod.home_dir() / "onnx" and first.is_file()
    stamp = first.stat().st_mtime_ns
    assert onnx_for_checkpoint(ckpt, exporter="torchscript") == first and first.stat().st_mtime_ns == stamp
    # An .onnx beside the checkpoint, exported from this very file, is used as is.
    sibling = tmp_path / "model.onnx"
    sibling.write_bytes(first.read_bytes())
    assert onnx_for_checkpoint(ckpt) == sibling


def test_export_onnx_cli(exported, tmp_path):
    out = tmp_path / "cli.onnx"
    args = ["export-onnx", "--weights", str(exported["ckpt"]), "-o", str(out), "--exporter", "torchscript"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert OnnxBackend.from_file(out, "cpu").cfg == exported["ca"].cfg
    assert CliRunner().invoke(app, args).exit_code == 2  # exists, no --overwrite
    assert CliRunner().invoke(app, args + ["--overwrite", "--opset", "11"]).exit_code == 2
    missing = CliRunner().invoke(
        app, ["export-onnx", "--weights", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "n.onnx")]
    )
    assert missing.exit_code == 3


# ---------------------------------------------------------------------------------------------------------------------
# int8 quantisation
# ---------------------------------------------------------------------------------------------------------------------
def test_quantize_makes_an_int8_graph_once_and_stays_close_to_fp32(tmp_path):
    """On the shipped trained graph: a random rule's activations span the whole int8 range, and CPUs without VNNI
    saturate their 16-bit pair sums on such products, so only trained weights say how close int8 stays."""
    import shutil

    import onnx

    from vitca_cli.onnx.backend import OnnxBackend
    from vitca_cli.restore.loop import restore

    graph = tmp_path / "fm.onnx"
    shutil.copyfile(Path(weights_mod.__file__).resolve().parents[2] / "weights" / "fashion-mnist.onnx", graph)
    fp32 = OnnxBackend.from_file(graph, "cpu", 1)
    int8 = OnnxBackend.from_file(graph, "cpu", 1, quantize=True)
    assert int8.path != fp32.path and int8.path.parent == weights_mod.home_dir() / "onnx"
    ops = {node.op_type for node in onnx.load(str(int8.path)).graph.node}
    assert "MatMulInteger" in ops and int8.cfg == fp32.cfg
    stamp = int8.path.stat().st_mtime_ns
    assert OnnxBackend.from_file(graph, "cpu", 1, quantize=True).path.stat().st_mtime_ns == stamp
    img = np.random.default_rng(0).random((28, 28, 1), dtype=np.float32)
    a, b = restore(fp32, img, iters=16).image, restore(int8, img, iters=16).image
    assert 0 < np.abs(a - b).mean() < 0.02


def test_cli_quantize_runs_with_onnx_and_is_refused_without(exported, tmp_path):
    from PIL import Image

    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (28, 28), dtype=np.uint8)).save(src)
    ok = CliRunner().invoke(
        app,
        [
            "denoise",
            str(src),
            "-o",
            str(tmp_path / "o.png"),
            "-w",
            str(exported["path"]),
            "--backend",
            "onnx",
            "--quantize",
            "--iters",
            "4",
        ],
    )
    assert ok.exit_code == 0 and (tmp_path / "o.png").is_file()
    bad = CliRunner().invoke(
        app,
        ["denoise", str(src), "-o", str(tmp_path / "p.png"), "-w", str(exported["ckpt"]), "--quantize", "--iters", "4"],
    )
    assert bad.exit_code == 2 and "--backend onnx" in bad.output and not (tmp_path / "p.png").exists()


def test_session_threads_sleep_while_waiting_unless_openmp_was_asked_to_spin(monkeypatch):
    from vitca_cli.onnx.session import session_options

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert session_options(1).get_session_config_entry("session.intra_op.allow_spinning") == "0"
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    assert session_options(1).get_session_config_entry("session.intra_op.allow_spinning") == "1"
