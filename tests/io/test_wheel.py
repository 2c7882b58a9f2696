"""The wheel: what `pip wheel .` builds installs vitca_cli alone (training and the shipped weights under its
namespace, no generic top-level name), and `vitca denoise` runs from it, outside the repository."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_installs_only_the_vitca_cli_namespace_and_restores_from_it(tmp_path):
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("vitca-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"vitca_cli", wheel.name.split("-py")[0] + ".dist-info"}
    assert "vitca_cli/training/trainer.py" in names and "vitca_cli/shipped_weights/manifest.json" in names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    imported = {"torch", "numpy", "scipy", "pillow", "typer", "rich", "platformdirs"}  # what `vitca denoise` imports
    required = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert imported <= {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in required}
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    assert not (site / "training").exists()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    code = (
        "import sys, vitca_cli, vitca_cli.training.trainer\n"
        f"assert vitca_cli.__file__.startswith({str(site)!r}), vitca_cli.__file__\n"
        "from vitca_cli.cli import main\n"
        "sys.argv[0] = 'vitca'\n"
        "main()\n"
    )
    args = ["denoise", "in.png", "-o", "out.png", "--iters", "2", "--threads", "1"]
    run = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r})\n" + code, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert Image.open(tmp_path / "out.png").size == (20, 24)
