"""Carry a training run to another machine: its run folder without Algorithm 1's pool.

    python -m vitca_cli.training.carry RUN_DIR DEST [--overwrite]

A run's ``last.pt`` holds the pool of partially-updated grids (1,024 grids of every cell channel: hundreds of MB
for a 32×32 run), so a run folder is too big to keep beside the code, and a machine that goes away takes the run
with it. The carried copy keeps everything else that resuming needs: the weights, the optimizer's moments, the
learning-rate schedule, the random generators and the best-so-far record, with the folder's ``config.json``,
``command.txt``, ``metrics.jsonl`` and ``best.pt`` (about a megabyte for the paper's model). ``vitca train --resume``
on a copy of it continues the same schedule; its pool starts empty and refills from fresh batches (Algorithm 1 draws
fresh batches until the pool holds more than one), so it differs from an uninterrupted run only in which pool grids
the first iterations after it see. DEST is written whole or not at all; an existing DEST is replaced only with
``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from vitca_cli.errors import UsageError, VitcaError
from vitca_cli.io.checkpoint import read_checkpoint, save_checkpoint
from vitca_cli.nca.config import CAConfig
from vitca_cli.training.run import AVERAGE, BEST, CONFIG_FILE, LAST, read_run
from vitca_cli.training.trainer import shard_path

COPIED = (CONFIG_FILE, "command.txt", "metrics.jsonl", BEST, AVERAGE)


def _without_pool(src: Path, dest: Path) -> None:
    ckpt = read_checkpoint(src)
    extra = {k: v for k, v in ckpt.items() if k not in ("format", "version", "config", "model", "meta", "pool")}
    save_checkpoint(dest, CAConfig.from_dict(ckpt["config"]), ckpt["model"], ckpt["meta"], pool={}, **extra)


def carry(run_dir: Path, dest: Path, overwrite: bool = False) -> list[Path]:
    """Write ``dest``: the run folder ``run_dir`` with its ``last.pt`` (and each rank's state of a distributed run)
    stripped of the pool. Returns the files written."""
    run_dir, dest = Path(run_dir), Path(dest)
    if dest.resolve() == run_dir.resolve():
        raise UsageError(f"{dest} is the run folder itself; carry it to another folder")
    if not (run_dir / LAST).is_file():
        raise UsageError(f"{run_dir}: no {LAST} there (not a vitca run folder, or it never saved)")
    _, _, ckpt = read_run(run_dir)  # refuses a last.pt that holds weights only
    if dest.exists() and not overwrite:
        raise UsageError(f"{dest} exists; pass --overwrite to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a carry that was killed
    tmp.mkdir()
    try:
        _without_pool(run_dir / LAST, tmp / LAST)
        for rank in range(1, int(ckpt.get("world_size", 1))):
            shard = shard_path(run_dir / LAST, rank, int(ckpt["iteration"]))
            _without_pool(shard, shard_path(tmp / LAST, rank, int(ckpt["iteration"])))
        for name in COPIED:
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, tmp / name)
        old = dest.parent / f".{dest.name}.{os.getpid()}.old"
        if dest.exists():
            dest.rename(old)
        try:
            tmp.rename(dest)
        except BaseException:
            if old.exists():
                old.rename(dest)  # the previous copy stays as it was
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(dest.iterdir())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a run folder (it holds last.pt)")
    ap.add_argument("dest", type=Path, help="the carried copy's folder")
    ap.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")
    args = ap.parse_args(argv)
    try:
        files = carry(args.run_dir, args.dest, args.overwrite)
    except VitcaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    size = sum(f.stat().st_size for f in files)
    print(f"carried {args.run_dir} to {args.dest} ({len(files)} files, {size / 1e6:.1f} MB, no pool)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
