"""Algorithm 1's pool of cell grids and their clean targets."""

from __future__ import annotations

import torch


class Pool:
    """Algorithm 1's pool of (cell grid, clean target) pairs, kept as two stacked tensors on the device."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.z: torch.Tensor | None = None
        self.x: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.z is None else len(self.z)

    def take(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``b`` grids and targets (the pool is reshuffled on every update)."""
        return self.z[:b], self.x[:b]

    def update(self, z, x, from_pool: bool, overwrite: bool, generator: torch.Generator) -> None:
        """Append (or, with ``overwrite`` and a pool batch, replace the first entries), shuffle, truncate."""
        z, x = z.detach(), x.detach()
        if self.z is None:
            new_z, new_x = z, x
        elif from_pool and overwrite:
            new_z, new_x = torch.cat([z, self.z[len(z) :]]), torch.cat([x, self.x[len(x) :]])
        else:
            new_z, new_x = torch.cat([self.z, z]), torch.cat([self.x, x])
        perm = torch.randperm(len(new_z), generator=generator)[: self.capacity].to(new_z.device)
        self.z, self.x = new_z[perm], new_x[perm]

    def state(self) -> dict:
        return {"z": self.z, "x": self.x} if self.z is not None else {}

    def load(self, state: dict, device) -> None:
        if state.get("z") is not None:
            self.z, self.x = state["z"].to(device), state["x"].to(device)
