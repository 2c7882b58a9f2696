"""Pool-based training of the CA update rule: the paper's Algorithm 1 (appendix A; reference §4).

One iteration ``i`` (1-based):

1. On even ``i`` once the pool holds more than a batch, take the first ``b`` grids and their targets from the
   (shuffled) pool. Otherwise draw a fresh batch, corrupt it with the curriculum ``mask(X, i)`` and seed cells.
2. ``T ~ U{t_min, t_max}`` (inclusive), run ``T`` stochastic CA steps (plain, gradient-checkpointed in ⌊T/2⌋
   segments, or the fusion/mitosis schedule of appendix A.1).
3. ``L = α·L1(output, target) + β·(output overflow outside [0, 1] + hidden overflow outside [-1, 1])``.
4. Back-propagate through all T steps, normalise each parameter's gradient ``g / (‖g‖ + 1e-8)``, AdamW step,
   cosine learning rate stepped every iteration.
5. Append the detached grids and targets to the pool, shuffle, truncate to the pool size.

A run folder holds ``config.json`` (model and training configuration, seed, command line), ``command.txt``,
``metrics.jsonl``, ``last.pt`` (everything needed to resume exactly: weights, optimizer, scheduler, pool, RNG
states, iteration) and ``best.pt`` (weights of the best validation PSNR at ``val_steps`` CA steps).

Randomness comes from three explicit sources saved in every checkpoint, so a resumed run continues bit for bit:
``gen`` (on the training device: corruption masks, cell init, update masks), ``gen_data`` (CPU: which images,
augmentation, pool shuffles) and ``rng`` (python: T and the curriculum combo). Validation uses its own fixed seed,
so validating (or not) never changes the training trajectory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

from training.config import PRECISIONS, MaskingConfig, TrainConfig  # noqa: F401 - importable from here too
from training.distributed import SINGLE, World, any_rank, barrier, rank_seed, split_batch, wrap
from training.run import BEST, CONFIG_FILE, LAST, read_run  # noqa: F401 - read_run: importable from here too
from vitca_cli import log as logmod
from vitca_cli.errors import UsageError, VitcaError
from vitca_cli.io.checkpoint import read_checkpoint, save_checkpoint
from vitca_cli.io.files import atomic_write_bytes
from vitca_cli.nca.attention import use_compiled_kernels
from vitca_cli.nca.config import CAConfig
from vitca_cli.nca.corruptions import corrupt_batch
from vitca_cli.nca.masking import random_mask
from vitca_cli.nca.model import CellularAutomaton

log = logmod.log
METRICS_FILE = "metrics.jsonl"


# ---------------------------------------------------------------------------------------------------------------------
# Pieces of one iteration
# ---------------------------------------------------------------------------------------------------------------------
def ca_loss(ca: CellularAutomaton, z: torch.Tensor, target: torch.Tensor, alpha: float, beta: float):
    """Algorithm 1's loss on the final grid: α·mean|o − x| + β·(mean|o − clip(o,0,1)| + mean|h − clip(h,−1,1)|).
    Returns (loss, reconstruction L1, overflow)."""
    out, hidden = ca.output(z), ca.hidden(z)
    rec = (out - target).abs().mean()
    overflow = (out - out.clamp(0, 1)).abs().mean() + (hidden - hidden.clamp(-1, 1)).abs().mean()
    return alpha * rec + beta * overflow, rec, overflow


def normalize_gradients(params) -> None:
    """Per-parameter-tensor normalisation ``g ← g / (‖g‖₂ + 1e-8)`` (each tensor separately, not a global norm)."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        norms = torch._foreach_norm(grads)
        torch._foreach_div_(grads, torch._foreach_add(norms, 1e-8))


def rollout(
    ca, z: torch.Tensor, steps: int, tcfg: TrainConfig, generator: torch.Generator, masks: torch.Tensor | None = None
) -> torch.Tensor:
    """The T training steps: plain, gradient-checkpointed (⌊T/2⌋ segments), or fusion/mitosis (appendix A.1).

    With ``precision="bf16"`` the steps run under autocast: the linear layers multiply in bfloat16 (AMX/AVX512-BF16
    on recent CPUs, tensor cores on GPUs) while the cell grid, LayerNorms, residual sums and the returned grid stay
    fp32, so the state carried from step to step (and into the pool) is not rounded to bfloat16."""
    autocast = tcfg.precision == "bf16"
    with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=autocast):
        if tcfg.fusion_mitosis:
            z = ca(z, steps, generator=generator, fusion_mitosis=True)
        else:
            segments = steps // 2 if tcfg.checkpointing and steps > 1 else 0
            z = ca(z, steps, generator=generator, masks=masks, checkpoint_segments=segments)
    return z.float() if autocast else z


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


def cosine_factor(iteration: int, total: int, floor: float) -> float:
    """Cosine decay from 1 to ``floor`` over ``total`` iterations (closed form, so extending a run stays smooth)."""
    t = min(iteration, total) / max(total, 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def lr_factor(iteration: int, tcfg: TrainConfig) -> float:
    """The learning rate of (0-based) ``iteration`` over ``tcfg.lr``: a linear warm-up over ``tcfg.warmup`` iterations
    (the first one at ``1 / warmup``) times the cosine decay."""
    warm = min(1.0, (iteration + 1) / tcfg.warmup) if tcfg.warmup else 1.0
    return warm * cosine_factor(iteration, tcfg.iterations, tcfg.lr_min / tcfg.lr)


# ---------------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------------
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
        if tcfg.compile:
            # Fuse the memory-bound localised attention and bias epilogues into compiled kernels; the matrix
            # products, rollout loop, checkpointing and fusion/mitosis stay eager.
            use_compiled_kernels(True)

    @property
    def selection(self) -> str:
        """The validation figure that picks ``best.pt``: the per-image mean PSNR for the paper's masks; for a
        mixture, the per-batch PSNR (undamaged images make per-image PSNRs unbounded, and would dominate a mean)."""
        return "val_psnr" if self.tcfg.paper_masking else "val_psnr_batch"

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
                z = self.ca.seed(random_mask(x, prob, patch, self.tcfg.mask_type, self.gen), self.gen)
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
        return z, {"loss": value, "l1": rec.item(), "overflow": overflow.item(), "lr": lr}

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
                batches.append((random_mask(x, prob, patch, self.tcfg.mask_type, gen), None, x))
            else:
                cpu_gen = torch.Generator().manual_seed(30_000 + self.tcfg.seed + start)
                damaged, known, _ = corrupt_batch(x, self.tcfg.mixture, cpu_gen, self.tcfg.mask_type, (prob, patch))
                batches.append((damaged, known, x))
        return batches

    @torch.no_grad()
    def validate(self) -> dict:
        """PSNR and SSIM of clipped outputs after ``val_steps`` CA steps on the fixed corrupted validation subset
        (per-image means; ``val_psnr_batch`` is the reference's per-batch PSNR, averaged over batches)."""
        from training.metrics import psnr_batch, psnr_per_image, ssim_per_image

        if self._val_batches is None:
            self._val_batches = self._prepare_validation()
        gen = torch.Generator(self.device).manual_seed(20_000 + self.tcfg.seed)
        self.ca.eval()
        psnr, ssim, batch_psnr, l1 = [], [], [], []
        for masked, known, x in self._val_batches:
            z = self.ca(self.ca.seed(masked, gen, known), self.tcfg.val_steps, generator=gen)
            out = self.ca.output(z)
            psnr.append(psnr_per_image(out, x))
            if min(x.shape[-2:]) >= 11:
                ssim.append(ssim_per_image(out, x))
            batch_psnr.append(psnr_batch(out, x))
            l1.append(float((out.clamp(0, 1) - x).abs().mean()))
        self.ca.train()
        return {
            "val_psnr": float(torch.cat(psnr).mean()),
            "val_ssim": float(torch.cat(ssim).mean()) if ssim else None,
            "val_psnr_batch": sum(batch_psnr) / len(batch_psnr),
            "val_l1": sum(l1) / len(l1),
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
            "seed": t.seed,
        }

    def state_dict_model(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.ca.state_dict().items()}

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

    def save_best(self, path: Path) -> None:
        """Weights and meta only (no optimizer or pool): what gets shipped."""
        save_checkpoint(path, self.cfg, self.state_dict_model(), self.meta(), train=self.tcfg.to_dict())

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


# ---------------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------------
def _write_json(path: Path, data) -> None:
    atomic_write_bytes(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


def _trim_metrics(path: Path, iteration: int) -> None:
    """On resume, drop metric lines written after the checkpoint, so the log matches the resumed trajectory."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("iteration", 0) <= iteration:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    atomic_write_bytes(path, lambda f: f.write("".join(k + "\n" for k in keep).encode()))


class _StopFlag:
    """First Ctrl-C or SIGTERM: finish the current iteration, save, stop. Second Ctrl-C: stop at once (the last save
    stays)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.stop = False
        self._previous: dict = {}

    def __enter__(self):
        def handler(signum, frame):
            if self.stop and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop = True
            log.warning(
                f"{signal.Signals(signum).name}: finishing this iteration and saving (Ctrl-C again to quit "
                "without saving)"
            )

        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave the signals alone
            self._previous = {}
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def train(
    cfg: CAConfig,
    tcfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    train_ds,
    val_ds=None,
    device="cpu",
    resume_from: dict | None = None,
    init_state: dict | None = None,
    stop_at: int | None = None,
    argv: list[str] | None = None,
    progress: bool = True,
    world: World = SINGLE,
) -> dict:
    """Train (or resume) a run in ``run_dir``; returns a summary dict. ``init_state`` (a model state dict for ``cfg``)
    starts a new run from trained weights instead of a fresh initialisation. ``stop_at`` ends this session after that
    iteration (saving), leaving the rest of the schedule for ``--resume``. ``world``: this rank of a distributed run
    (``training.distributed``); rank 0 alone validates and writes the metrics, ``config.json`` and ``best.pt``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, tcfg, train_ds, val_ds, device, world)
    metrics_path = run_dir / METRICS_FILE
    if resume_from is not None:
        trainer.load(resume_from, run_dir / LAST)
        if world.main:
            _trim_metrics(metrics_path, trainer.iteration)
        log.info(f"resuming {run_dir} at iteration {trainer.iteration} of {tcfg.iterations}")
    elif init_state is not None:
        trainer.ca.load_state_dict(init_state)
    config = {
        "model": cfg.to_dict(),
        "train": tcfg.to_dict(),
        "seed": tcfg.seed,
        "device": str(device),
        "distributed": {**world.describe(), "rank": None, "local_rank": None, "batch_per_rank": trainer.local_batch},
    }
    if argv is not None and world.main:
        config["argv"] = list(argv)
        import shlex

        with open(run_dir / "command.txt", "a") as f:  # every session's command, in order
            f.write(shlex.join(argv) + "\n")
    if world.main:
        _write_json(run_dir / CONFIG_FILE, config)
    barrier(world)  # metrics trimmed before any rank goes on

    end = tcfg.iterations if stop_at is None else min(stop_at, tcfg.iterations)
    save_every = tcfg.save_every or tcfg.val_every or 500
    status = "done"
    last_val = None
    window: list[dict] = []
    start_time, start_iter = time.perf_counter(), trainer.iteration
    display = _Progress(progress and world.main, trainer.iteration, end)
    metrics_file = open(metrics_path, "a") if world.main else open(os.devnull, "w")
    with _StopFlag() as flag, display, metrics_file as metrics:
        while trainer.iteration < end:
            try:
                rec = trainer.step()
            except NonFiniteLoss as exc:
                last = run_dir / LAST
                where = f"{last} (iteration {read_checkpoint(last)['iteration']})" if last.is_file() else "none saved"
                raise VitcaError(
                    f"{exc}; training stopped. Last good checkpoint: {where}. Try a lower " + "{0} or {1}.",
                    settings=("lr", "beta"),
                ) from None
            i = trainer.iteration
            window.append(rec)
            if i % tcfg.log_every == 0 or i == end:
                mean = {k: sum(r[k] for r in window) / len(window) for k in ("loss", "l1", "overflow")}
                elapsed = time.perf_counter() - start_time
                metrics.write(
                    json.dumps({"iteration": i, **mean, "lr": rec["lr"], "T": rec["T"], "time": round(elapsed, 2)})
                    + "\n"
                )
                metrics.flush()
                window.clear()
            validated = False
            if val_ds is not None and tcfg.val_every and (i % tcfg.val_every == 0 or i == tcfg.iterations):
                validated = True
                if world.main:
                    last_val = trainer.validate()
                    if last_val[trainer.selection] > trainer.best["val_psnr"]:
                        trainer.best = {
                            "val_psnr": last_val[trainer.selection],
                            "val_ssim": last_val["val_ssim"],
                            "iteration": i,
                            "metric": trainer.selection,
                        }
                        trainer.save_best(run_dir / BEST)
                    metrics.write(json.dumps({"iteration": i, **last_val}) + "\n")
                    metrics.flush()
                barrier(world)
            stop = any_rank(world, flag.stop, trainer.device)  # a signal to any rank stops them all here
            if i % save_every == 0 or i == end or stop:
                trainer.save(run_dir / LAST)
            rate = (i - start_iter) / max(time.perf_counter() - start_time, 1e-9)
            display.update(i, rec["loss"], last_val, rate, validated)
            if stop:
                status = "interrupted"
                break
    if val_ds is None and world.main and not (run_dir / BEST).is_file():
        trainer.save_best(run_dir / BEST)  # no validation: the final weights stand in for the best
    return {
        "status": status,
        "iteration": trainer.iteration,
        "best_val_psnr": trainer.best["val_psnr"] if math.isfinite(trainer.best["val_psnr"]) else None,
        "best_val_ssim": trainer.best["val_ssim"],
        "last_val": last_val,
        "seconds": time.perf_counter() - start_time,
        "run_dir": str(run_dir),
        "trainer": trainer,
    }


class _Progress:
    """A rich progress line on stderr when it is a terminal; otherwise a plain log line now and then."""

    def __init__(self, enabled: bool, start: int, end: int):
        self.enabled, self.start, self.end = enabled, start, end
        self.bar = None
        self.tty = sys.stderr.isatty()
        self._last_line = time.monotonic()

    def __enter__(self):
        if self.enabled and self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  val PSNR {task.fields[psnr]}  {task.fields[rate]} it/s"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.bar.__enter__()
            self.task = self.bar.add_task("train", total=self.end, completed=self.start, loss="-", psnr="-", rate="-")
        return self

    def update(self, i, loss, val, rate, validated):
        psnr = f"{val['val_psnr']:.2f} dB" if val else "-"
        if self.bar is not None:
            self.bar.update(self.task, completed=i, loss=f"{loss:.3f}", psnr=psnr, rate=f"{rate:.2f}")
        elif self.enabled and (validated or time.monotonic() - self._last_line > 30 or i == self.end):
            eta = (self.end - i) / rate if rate > 0 else float("nan")
            log.info(
                f"iteration {i}/{self.end}  loss {loss:.3f}  val PSNR {psnr}  {rate:.2f} it/s  ETA {eta / 60:.1f} min"
            )
            self._last_line = time.monotonic()

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
