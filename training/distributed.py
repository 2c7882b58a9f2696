"""Data-parallel training on PyTorch's own distributed stack: torchrun launches, ``torch.distributed`` talks.

``vitca train`` runs distributed when it is started by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment):

    torchrun --standalone --nproc-per-node 2 -m vitca_cli train ...                     # one machine
    torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:PORT \\
             --nproc-per-node 4 -m vitca_cli train ...                                   # several machines
    vitca train --nproc 2 ...                          # the same as the first line, through torch's launcher API

The backend follows the device: gloo on CPU, NCCL on CUDA (one GPU per local rank, ``cuda:LOCAL_RANK``). Every rank
runs Algorithm 1 on its share of the global batch with its own pool, data stream and generators (seeded from
(seed, rank); rank 0's are those of a one-process run); ``DistributedDataParallel`` averages the gradients, and
the per-tensor gradient normalisation runs on those averages, so every rank takes the same step. Stop requests
(Ctrl-C, SIGTERM) and non-finite losses are agreed on every iteration with one small all-reduce, so all ranks stop
at the same iteration. A rank that dies is noticed by torchrun's agent, which ends the others.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from vitca_cli.errors import SettingError, UsageError

TIMEOUT_S = 600  # collective operations give up after this long (a hung peer that torchrun did not end)
RANK_STRIDE = 1_000_003  # seeds of rank r: seed + r·RANK_STRIDE (rank 0 keeps the one-process seeds)


@dataclass(frozen=True)
class World:
    """Where this process sits in a distributed run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict:
        """What ``config.json`` records about the layout."""
        return {
            "backend": self.backend,
            "world_size": self.size,
            "rank": self.rank,
            "local_rank": self.local_rank,
            "nodes": int(os.environ.get("GROUP_WORLD_SIZE", os.environ.get("NNODES", "1")) or 1),
        }


SINGLE = World()


def launched() -> bool:
    """Whether torchrun (or any launcher setting ``WORLD_SIZE``) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA) and return the world and this rank's
    device (``cuda:LOCAL_RANK`` on GPUs). A one-process run returns ``SINGLE`` and ``device`` unchanged."""
    if not launched():
        return SINGLE, device
    import torch.distributed as dist

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend, timeout=datetime.timedelta(seconds=TIMEOUT_S), device_id=device if backend == "nccl" else None
        )
    return World(rank, size, local_rank, backend), device


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears its group down while a peer still talks to it (gloo aborts otherwise)
        dist.destroy_process_group()


def any_rank(world: World, flag: bool, device) -> bool:
    """True on every rank when ``flag`` is true on any (one all-reduce of one number)."""
    if not world.distributed:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def wrap(module: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """``module`` in ``DistributedDataParallel`` for a distributed run (its parameters are broadcast from rank 0),
    else ``module`` itself."""
    if not world.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def same_on_all_ranks(world: World, value):
    """Rank 0's ``value`` on every rank (a picklable object)."""
    if not world.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def split_batch(global_batch: int, world: World) -> int:
    """This rank's share of ``--batch-size`` (the global batch); it must divide evenly, so that averaging the ranks'
    gradients equals the gradient of the whole batch."""
    if global_batch % world.size:
        raise SettingError(
            "batch_size",
            f"{global_batch} does not split evenly over {world.size} ranks; use a multiple of {world.size}",
        )
    return global_batch // world.size


def rank_seed(seed: int, world: World) -> int:
    return seed + world.rank * RANK_STRIDE


def launch_local(nproc: int, argv: list[str]) -> int:
    """Start ``nproc`` local ranks of ``vitca ARGV`` through torch's launcher (``torch.distributed.run``, what the
    ``torchrun`` command runs) and return its exit status."""
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "vitca_cli", *argv])
    try:
        run(args)
    except Exception as exc:  # noqa: BLE001 - ChildFailedError: a rank failed; its own error line is already out
        from vitca_cli import log

        log.log.error(f"distributed run failed: {type(exc).__name__}")
        return 1
    return 0
