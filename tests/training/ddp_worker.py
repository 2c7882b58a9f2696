"""One rank of the DDP checks in test_distributed.py, started by torchrun: ``OUT`` holds ``batch.pt`` (the global
grids, targets and update masks); each rank learns one iteration on its half, saves its weights, trains three more
iterations on its own data stream and saves again."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_training import CFG, tcfg, tiny_dataset  # noqa: E402

from vitca_cli.training import distributed  # noqa: E402
from vitca_cli.training.trainer import Trainer  # noqa: E402

out = Path(sys.argv[1])
world, device = distributed.init(torch.device("cpu"))
batch = torch.load(out / "batch.pt")
b = batch["z"].shape[0] // world.size
rows = slice(world.rank * b, (world.rank + 1) * b)
trainer = Trainer(CFG, tcfg(batch_size=2 * b, pool_size=16), tiny_dataset(), None, "cpu", world)
trainer.learn(batch["z"][rows], batch["x"][rows], batch["steps"], batch["masks"][:, rows])
torch.save(trainer.ca.state_dict(), out / f"one.rank{world.rank}.pt")
for _ in range(3):
    trainer.step()
torch.save(trainer.ca.state_dict(), out / f"more.rank{world.rank}.pt")
distributed.shutdown()
