"""The trainer: the model, optimizer, schedule, pools and random generators of one run, one iteration of Algorithm 1
(``Trainer.step``), validation and exact checkpoints.

Randomness comes from three explicit sources saved in every checkpoint, so a resumed run continues bit for bit:
``gen`` (on the training device: corruption masks, cell init, update masks), ``gen_data`` (CPU: which images,
augmentation, pool shuffles) and ``rng`` (python: T and the curriculum combo). Validation uses its own fixed seed,
so validating (or not) never changes the training trajectory.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
from pathlib import Path

import torch

from vitca_cli.errors import UsageError, VitcaError
from vitca_cli.io.checkpoint import read_checkpoint, save_checkpoint
from vitca_cli.nca.attention import use_compiled_kernels
from vitca_cli.nca.config import CAConfig
from vitca_cli.nca.corruptions import corrupt_batch
from vitca_cli.nca.masking import random_mask
from vitca_cli.nca.model import CellularAutomaton
from vitca_cli.training.config import TrainConfig
from vitca_cli.training.distributed import SINGLE, World, any_rank, barrier, rank_seed, split_batch, wrap
from vitca_cli.training.pool import Pool
from vitca_cli.training.step import ca_loss, lr_factor, normalize_gradients, rollout


class Trainer:
    """Holds the model, optimizer, scheduler, pool and RNGs of one run; ``step()`` is one iteration of Algorithm 1."""

    def __init__(self, cfg: CAConfig, tcfg: TrainConfig, train_ds, val_ds=None, device="cpu", world: World = SINGLE):
        self.cfg, self.tcfg, self.world = cfg, tcfg, world
        self.device = torch.device(device)
        self.train_ds, self.val_ds = train_ds, val_ds
        self.local_batch = split_batch(tcfg.batch_size, world)
        torch.manual_seed(tcfg.seed)  # parameter initialisation (the same on every rank)
        self.ca = CellularAutomaton(cfg).to(self.device)
        self.model = wrap(self.ca, world, self.device)  # what the rollout calls: DDP averages the gradients
        self.params = [p for p in self.ca.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda it: lr_factor(it, self.tcfg))
        # One pool per crop size (grids of one size stack into one tensor), the capacity shared between them.
        sizes = tcfg.crop_sizes or (None,)
        self.pools = {s: Pool(tcfg.pool_size // world.size // len(sizes)) for s in sizes}
        seed = rank_seed(tcfg.seed, world)  # each rank its own streams; rank 0 those of a one-process run
        self.gen = torch.Generator(self.device).manual_seed(seed)
        self.gen_data = torch.Generator().manual_seed(seed + 1)
        self.rng = random.Random(seed)
        self.iteration = 0
        self.best = {"val_psnr": -math.inf, "val_ssim": None, "iteration": 0}
        self.schedule = tcfg.schedule
        self._val_batches = None
        self.reset_average()
        if tcfg.compile:
            # Fuse the memory-bound localised attention and bias epilogues into compiled kernels; the matrix
            # products, rollout loop, checkpointing and fusion/mitosis stay eager.
            use_compiled_kernels(True)

    @property
    def selection(self) -> str:
        """The validation figure that picks ``best.pt``: the per-image mean PSNR for the paper's masks; for a
        mixture of drawn holes only, the PSNR inside the holes (what ``vitca inpaint`` returns: the given pixels
        are pasted back); for any other mixture, the per-batch PSNR (undamaged images make per-image PSNRs
        unbounded, and would dominate a mean)."""
        from vitca_cli.nca.corruptions import DRAWN

        if self.tcfg.paper_masking:
            return "val_psnr"
        return "val_psnr_holes" if all(c.kind in DRAWN for c in self.tcfg.mixture) else "val_psnr_batch"

    @property
    def pool(self) -> Pool:
        """The pool of a run with one training size (``pools`` holds one per crop size)."""
        if len(self.pools) != 1:
            raise AttributeError("this run keeps one pool per crop size; see Trainer.pools")
        return next(iter(self.pools.values()))

    # -- one iteration ------------------------------------------------------------------------------------------
    def batch_size_at(self, size: int | None) -> int:
        """Images per batch at crop ``size``: ``batch_size`` at the first crop size, scaled to keep the cell count."""
        if size is None:
            return self.local_batch
        base = self.tcfg.crop_sizes[0]
        return max(1, round(self.local_batch * base * base / (size * size)))

    def fresh_batch(self, i: int, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A new batch: images (random ``size``×``size`` crops for file datasets), the corruption for iteration
        ``i`` (the paper's curriculum masks, or one draw per image from the mixture), seeded cells."""
        b = self.batch_size_at(size)
        idx = torch.randint(len(self.train_ds), (b,), generator=self.gen_data)
        crop = {} if size is None else {"size": (size, size)}
        x = self.train_ds.batch(idx.tolist(), self.gen_data, **crop).to(self.device)
        prob, patch = self.schedule(i, self.rng)
        with torch.no_grad():
            if self.tcfg.paper_masking:
                z = self.ca.seed(random_mask(x, prob, patch, self.tcfg.mask_type, self.gen)[0], self.gen)
            else:
                damaged, known, _ = corrupt_batch(
                    x, self.tcfg.mixture, self.gen_data, self.tcfg.mask_type, (prob, patch)
                )
                z = self.ca.seed(damaged, self.gen, known)
        return z, x

    def step(self) -> dict:
        """Run iteration ``self.iteration + 1`` of Algorithm 1; returns its loss terms (floats)."""
        i = self.iteration + 1
        t = self.tcfg
        size = None
        if t.crop_sizes:
            size = t.crop_sizes[self.rng.randrange(len(t.crop_sizes))] if len(t.crop_sizes) > 1 else t.crop_sizes[0]
        pool, b = self.pools[size], self.batch_size_at(size)
        from_pool = len(pool) > b and i % 2 == 0
        z, x = pool.take(b) if from_pool else self.fresh_batch(i, size)
        steps = self.rng.randint(t.t_min, t.t_max)
        z, rec = self.learn(z, x, steps)
        pool.update(z, x, from_pool, t.pool_overwrite, self.gen_data)
        self.iteration = i
        return {**rec, "T": steps, "pool": from_pool, "size": x.shape[-1]}

    def learn(self, z: torch.Tensor, x: torch.Tensor, steps: int, masks: torch.Tensor | None = None):
        """Steps 2–4 of iteration ``self.iteration + 1`` on grids ``z`` and targets ``x``: the rollout (with the
        given update ``masks``, else drawn from ``gen``), the loss, back-propagation, gradient normalisation (of the
        ranks' averaged gradients in a distributed run) and the optimizer and schedule steps. Returns the final
        grids (detached by the pool) and the loss terms."""
        t = self.tcfg
        self.ca.train()
        z = rollout(self.model, z, steps, t, self.gen, masks)
        loss, rec, overflow = ca_loss(self.ca, z, x, t.alpha, t.beta)
        value = loss.item()
        if any_rank(self.world, not math.isfinite(value), self.device):  # every rank stops at the same iteration
            raise NonFiniteLoss(self.iteration + 1, value)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_norm:
            normalize_gradients(self.params)
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        if self.average is not None:
            self._update_average()
        return z, {"loss": value, "l1": rec.item(), "overflow": overflow.item(), "lr": lr}

    # -- the weight average -------------------------------------------------------------------------------------
    def reset_average(self) -> None:
        """Start the exponential moving average of the weights (``tcfg.ema``) at the present weights; None without
        one."""
        self.average = copy.deepcopy(self.ca).eval().requires_grad_(False) if self.tcfg.ema else None
        self.average_updates = 0

    @torch.no_grad()
    def _update_average(self) -> None:
        """average ← decay · average + (1 − decay) · weights, after each optimizer step."""
        for a, w in zip(self.average.parameters(), self.ca.parameters()):
            a.lerp_(w, 1.0 - self.tcfg.ema)
        self.average_updates += 1

    # -- validation ---------------------------------------------------------------------------------------------
    def _prepare_validation(self):
        """Corrupt a fixed validation subset once, with the test masking (all nine combos, one per batch)."""
        n = min(self.tcfg.val_size, len(self.val_ds))
        gen = torch.Generator(self.device).manual_seed(10_000 + self.tcfg.seed)
        rng = random.Random(10_000 + self.tcfg.seed)
        batches = []
        for start in range(0, n, self.tcfg.batch_size):
            x = self.val_ds.batch(list(range(start, min(n, start + self.tcfg.batch_size)))).to(self.device)
            prob, patch = self.schedule(-1, rng)
            if self.tcfg.paper_masking:
                batches.append((random_mask(x, prob, patch, self.tcfg.mask_type, gen)[0], None, x))
            else:
                cpu_gen = torch.Generator().manual_seed(30_000 + self.tcfg.seed + start)
                damaged, known, _ = corrupt_batch(x, self.tcfg.mixture, cpu_gen, self.tcfg.mask_type, (prob, patch))
                batches.append((damaged, known, x))
        return batches

    def validate(self) -> dict:
        """PSNR and SSIM of clipped outputs after ``val_steps`` CA steps (with fusion/mitosis when the run trains with
        it) on the fixed corrupted validation subset (per-image means; ``val_psnr_batch`` is the reference's per-batch
        PSNR, averaged over batches). With a weight average, its figures too, as ``ema_val_psnr`` and so on."""
        figures = self._score(self.ca)
        if self.average is not None:
            figures.update({f"ema_{k}": v for k, v in self._score(self.average).items()})
        return figures

    @torch.no_grad()
    def _score(self, model: CellularAutomaton) -> dict:
        """:meth:`validate`'s figures for ``model`` (the run's weights or their average)."""
        from vitca_cli.training.metrics import hole_psnr, psnr_batch, psnr_per_image, ssim_per_image

        if self._val_batches is None:
            self._val_batches = self._prepare_validation()
        gen = torch.Generator(self.device).manual_seed(20_000 + self.tcfg.seed)
        training = model.training
        model.eval()
        psnr, ssim, batch_psnr, l1, holes = [], [], [], [], []
        for masked, known, x in self._val_batches:
            z = model(
                model.seed(masked, gen, known),
                self.tcfg.val_steps,
                generator=gen,
                fusion=self.tcfg.fusion,
            )
            out = model.output(z)
            psnr.append(psnr_per_image(out, x))
            if min(x.shape[-2:]) >= 11:
                ssim.append(ssim_per_image(out, x))
            batch_psnr.append(psnr_batch(out, x))
            l1.append(float((out.clamp(0, 1) - x).abs().mean()))
            holes.append(hole_psnr(out, x, known))
        model.train(training)
        return {
            "val_psnr": float(torch.cat(psnr).mean()),
            "val_ssim": float(torch.cat(ssim).mean()) if ssim else None,
            "val_psnr_batch": sum(batch_psnr) / len(batch_psnr),
            "val_l1": sum(l1) / len(l1),
            "val_psnr_holes": float(torch.cat(holes).mean()) if sum(len(h) for h in holes) else None,
        }

    # -- checkpoints --------------------------------------------------------------------------------------------
    def meta(self, iteration: int | None = None) -> dict:
        """What ``training/ship.py`` and ``vitca eval`` need to know about the weights."""
        t = self.tcfg
        return {
            "dataset": t.dataset,
            "iterations": self.iteration if iteration is None else iteration,
            "best_val_psnr": self.best["val_psnr"] if math.isfinite(self.best["val_psnr"]) else None,
            "best_metric": self.selection,
            "best_val_ssim": self.best["val_ssim"],
            "best_iteration": self.best["iteration"],
            "val_steps": t.val_steps,
            "image_size": list(self.cfg.image_size),
            "mask_type": t.mask_type,
            "masking": dataclasses.asdict(self.schedule),
            "corruptions": t.corruptions,
            "crop_sizes": list(t.crop_sizes),
            "batch_size": t.batch_size,
            "pool_size": t.pool_size,
            "t_range": [t.t_min, t.t_max],
            "checkpointing": t.checkpointing,
            "fusion_mitosis": t.fusion_mitosis,
            "fusion_schedule": str(t.fusion) if t.fusion else None,
            "seed": t.seed,
        }

    def state_dict_model(self, average: bool = False) -> dict:
        """The weights (or, with ``average``, the weight average) on the CPU."""
        model = self.average if average else self.ca
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def _average_state(self) -> dict:
        if self.average is None:
            return {}
        return {"ema": self.state_dict_model(average=True), "ema_updates": self.average_updates}

    def _rank_state(self) -> dict:
        """What differs between ranks: the pool and the random generators."""
        return {
            "pool": self._pool_state(),
            "rng": {"device": self.gen.get_state(), "data": self.gen_data.get_state(), "python": self.rng.getstate()},
        }

    def save(self, path: Path) -> None:
        """Everything needed to resume exactly, written atomically. In a distributed run every rank r ≥ 1 first
        writes its pool and generators to ``last.rankR.itI.pt`` beside ``path``; then rank 0 writes ``path`` (the
        weights, optimizer and schedule are the same on every rank, plus rank 0's own pool and generators); then
        older shards go. A crash at any point leaves a ``last.pt`` whose shards are all on disk."""
        path = Path(path)
        if self.world.rank > 0:
            save_checkpoint(
                shard_path(path, self.world.rank, self.iteration),
                self.cfg,
                {},
                {},
                iteration=self.iteration,
                world_size=self.world.size,
                **self._rank_state(),
            )
        barrier(self.world)
        if self.world.main:
            save_checkpoint(
                path,
                self.cfg,
                self.state_dict_model(),
                self.meta(),
                train=self.tcfg.to_dict(),
                iteration=self.iteration,
                optimizer=self.opt.state_dict(),
                scheduler=self.sched.state_dict(),
                best=dict(self.best),
                world_size=self.world.size,
                **self._average_state(),
                **self._rank_state(),
            )
        barrier(self.world)
        if self.world.rank > 0:
            for old in path.parent.glob(f"{path.stem}.rank{self.world.rank}.it*.pt"):
                if old != shard_path(path, self.world.rank, self.iteration):
                    old.unlink(missing_ok=True)

    def _pool_state(self) -> dict:
        if None in self.pools:
            return self.pools[None].state()
        return {"sizes": {str(size): pool.state() for size, pool in self.pools.items()}}

    def save_best(self, path: Path, average: bool = False) -> None:
        """Weights (or, with ``average``, the weight average) and meta only (no optimizer or pool): what gets
        shipped."""
        meta = self.meta()
        if average:
            meta["weights"] = f"moving average (decay {self.tcfg.ema}, {self.average_updates} iterations)"
        save_checkpoint(path, self.cfg, self.state_dict_model(average), meta, train=self.tcfg.to_dict())

    def load(self, ckpt: dict, path: Path | None = None) -> None:
        """Restore a ``last.pt`` written by :meth:`save` (``path``: where it is, to find this rank's shard)."""
        saved_world = int(ckpt.get("world_size", 1))
        if saved_world != self.world.size:
            raise UsageError(
                f"this run was saved by {saved_world} rank(s) and is resumed with {self.world.size}; "
                "resume with {0}"
                f" giving {saved_world} ranks in all (each rank's pool and random "
                "streams are saved per rank)",
                settings=("nproc",),
            )
        self.ca.load_state_dict(ckpt["model"])
        self.reset_average()  # a resume that turns the average on starts it at the resumed weights
        if self.average is not None and "ema" in ckpt:
            self.average.load_state_dict(ckpt["ema"])
            self.average_updates = int(ckpt["ema_updates"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        if self.world.rank > 0:
            shard = shard_path(Path(path), self.world.rank, int(ckpt["iteration"]))
            if not shard.is_file():
                raise UsageError(
                    f"{shard}: rank {self.world.rank}'s state for iteration {ckpt['iteration']} is "
                    f"missing; the run folder is incomplete"
                )
            ckpt = {**ckpt, **{k: v for k, v in read_checkpoint(shard).items() if k in ("pool", "rng")}}
        state = ckpt.get("pool", {})
        for size, pool in self.pools.items():
            pool.load(state.get("sizes", {}).get(str(size), {}) if size is not None else state, self.device)
        rng = ckpt["rng"]
        self.gen.set_state(rng["device"])
        self.gen_data.set_state(rng["data"])
        version, internal, gauss = rng["python"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.iteration = int(ckpt["iteration"])
        self.best = dict(ckpt.get("best", self.best))
        if self.best.get("metric", "val_psnr") != self.selection:  # chosen by another figure: start the choice anew
            self.best = {"val_psnr": -math.inf, "val_ssim": None, "iteration": 0}


def shard_path(last: Path, rank: int, iteration: int) -> Path:
    """Where rank ``rank`` keeps its pool and generators for ``last`` at ``iteration``."""
    return last.with_name(f"{last.stem}.rank{rank}.it{iteration}.pt")


class NonFiniteLoss(VitcaError):
    def __init__(self, iteration: int, value: float):
        super().__init__(f"loss became {value} at iteration {iteration}")
        self.iteration = iteration
