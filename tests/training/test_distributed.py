"""Distributed training (issue 21) with real processes: torchrun on loopback, gloo, 2 ranks, a tiny model and data.

Timeout stated for a killed rank: the launch exits non-zero within KILLED_RANK_TIMEOUT_S seconds (torchrun's agent
notices the dead worker and ends the others; a survivor blocked in a collective fails at once on the closed
connection)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_training import CFG, tiny_dataset

from vitca_cli.io.checkpoint import read_checkpoint
from vitca_cli.nca.model import CellularAutomaton
from vitca_cli.training.config import TrainConfig
from vitca_cli.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
KILLED_RANK_TIMEOUT_S = 60
TINY_RUN = [
    "--image-size",
    "8",
    "--embed",
    "16",
    "--heads",
    "2",
    "--mlp",
    "16",
    "--hidden",
    "4",
    "--pos-encoding",
    "none",
    "--batch-size",
    "4",
    "--t-min",
    "2",
    "--t-max",
    "3",
    "--val-every",
    "0",
    "--no-compile",
    "--threads",
    "1",
    "--pool-size",
    "16",
]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("photos")
    for k in range(12):
        arr = np.random.default_rng(k).integers(0, 256, (16, 20, 3), dtype=np.uint8)
        Image.fromarray(arr).save(d / f"p{k}.png")
    return d


def test_one_ddp_iteration_equals_one_process_on_the_whole_batch_and_ranks_stay_identical(tmp_path):
    from test_training import tcfg

    g = torch.Generator().manual_seed(0)
    ca = CellularAutomaton(CFG)
    x = tiny_dataset().batch(list(range(8))).float()
    z = ca.seed(torch.where(torch.rand(x.shape, generator=g) < 0.3, torch.zeros_like(x), x))
    steps = 3
    masks = (torch.rand(steps, 8, 1, *x.shape[-2:], generator=g) < 0.5).float()
    torch.save({"z": z, "x": x, "steps": steps, "masks": masks}, tmp_path / "batch.pt")
    done = subprocess.run(
        torchrun(str(ROOT / "tests" / "training" / "ddp_worker.py"), str(tmp_path)),
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    single = Trainer(CFG, tcfg(batch_size=8, pool_size=16), tiny_dataset(), None, "cpu")
    assert single.tcfg.grad_norm
    single.learn(z, x, steps, masks)
    ranks = [torch.load(tmp_path / f"one.rank{r}.pt") for r in (0, 1)]
    for name, value in single.ca.state_dict().items():
        assert (ranks[0][name] - value).abs().max() <= 1e-6, name
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    trained = [torch.load(tmp_path / f"more.rank{r}.pt") for r in (0, 1)]
    for name in trained[0]:  # three more iterations, each rank on its own data: still the same weights
        assert torch.equal(trained[0][name], trained[1][name]), name
    assert any(not torch.equal(trained[0][n], ranks[0][n]) for n in trained[0])


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vitca_cli", *args], env=env(), capture_output=True, text=True, timeout=300, **kw
    )


def last_iteration(run: Path) -> int:
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
    return max((json.loads(ln)["iteration"] for ln in lines if ln.strip().endswith("}")), default=0)


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (torchrun starts its workers in sessions of their own)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [int(c) for c in subprocess.run(["pgrep", "-P", str(p)], capture_output=True, text=True).stdout.split()]
    return out


def test_killed_hard_mid_run_resumes_to_the_same_weights(tmp_path, photos):
    common = [
        "train",
        "--dataset",
        f"folder:{photos}",
        "--iterations",
        "200",
        "--save-every",
        "4",
        "--log-every",
        "1",
        *TINY_RUN,
    ]
    straight = run_cli(*common, "--nproc", "2", "-o", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitca_cli", *common, "--nproc", "2", "-o", str(run)],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while last_iteration(run) < 10 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    for pid in process_tree(proc.pid):  # every rank and the launcher at once: no saving
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    saved = read_checkpoint(run / "last.pt")["iteration"]
    assert 4 <= saved < 200

    one_rank = run_cli("train", "--resume", str(run))  # another world size: refused in one line
    assert one_rank.returncode == 2 and "resumed with 1" in one_rank.stderr
    resumed = run_cli("train", "--resume", str(run), "--nproc", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (read_checkpoint(d / "last.pt") for d in (tmp_path / "straight", run))
    assert a["iteration"] == b["iteration"] == 200
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    config = json.loads((run / "config.json").read_text())
    assert config["distributed"]["backend"] == "gloo" and config["distributed"]["world_size"] == 2


def test_a_killed_rank_ends_the_launch_with_an_error(tmp_path, photos):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        torchrun(
            "-m",
            "vitca_cli",
            "train",
            "--dataset",
            f"folder:{photos}",
            "--iterations",
            "100000",
            *TINY_RUN,
            "-o",
            str(run),
        ),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while last_iteration(run) < 3 and time.time() < deadline:
            time.sleep(0.05)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2
        os.kill(int(workers[1]), signal.SIGKILL)
        start = time.time()
        code = proc.wait(timeout=KILLED_RANK_TIMEOUT_S)
        assert code != 0 and time.time() - start < KILLED_RANK_TIMEOUT_S
    finally:
        for pid in process_tree(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_the_global_batch_must_split_evenly():
    from vitca_cli.errors import UsageError
    from vitca_cli.training.distributed import World, split_batch

    assert split_batch(32, World(0, 4)) == 8
    with pytest.raises(UsageError, match="multiple of 3"):
        Trainer(
            CFG, TrainConfig(dataset="tiny", batch_size=32, compile=False), tiny_dataset(), None, "cpu", World(0, 3)
        )


def test_sigterm_to_one_rank_saves_once_and_stops_every_rank_at_the_same_iteration(tmp_path, photos):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        torchrun(
            "-m",
            "vitca_cli",
            "train",
            "--dataset",
            f"folder:{photos}",
            "--iterations",
            "100000",
            "--save-every",
            "100000",
            *TINY_RUN,
            "-o",
            str(run),
        ),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while last_iteration(run) < 3 and time.time() < deadline:
            time.sleep(0.05)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        os.kill(int(workers[1]), signal.SIGTERM)
        _, err = proc.communicate(timeout=2 * KILLED_RANK_TIMEOUT_S)
    finally:
        for pid in process_tree(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    saved = read_checkpoint(run / "last.pt")["iteration"]
    assert saved >= 3 and (run / f"last.rank1.it{saved}.pt").is_file()
    assert len(list(run.glob("last.rank1.*.pt"))) == 1
    resumed = run_cli("train", "--resume", str(run), "--nproc", "2", "--iterations", str(saved + 2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_checkpoint(run / "last.pt")["iteration"] == saved + 2
