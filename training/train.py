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
states, iteration; with ``--ema``, the weight average too), ``best.pt`` (weights of the best validation PSNR at
``val_steps`` CA steps: the weights, or their average where that validated better) and, with ``--ema``, ``ema.pt``
(the weight average as of ``last.pt``, in ``best.pt``'s format).

The trainer (model, optimizer, pools, generators, checkpoints) is in ``training/trainer.py``, the pieces of one
iteration in ``training/step.py`` and the pool in ``training/pool.py``; this module runs the loop.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

from vitca_cli import log as logmod
from vitca_cli.errors import VitcaError
from vitca_cli.io.checkpoint import read_checkpoint
from vitca_cli.io.files import atomic_write_bytes
from vitca_cli.nca.config import CAConfig
from vitca_cli.progress import Progress
from vitca_cli.training.config import TrainConfig
from vitca_cli.training.distributed import SINGLE, World, any_rank, barrier
from vitca_cli.training.run import AVERAGE, BEST, CONFIG_FILE, LAST
from vitca_cli.training.trainer import NonFiniteLoss, Trainer

log = logmod.log
METRICS_FILE = "metrics.jsonl"


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
    _start_run(trainer, run_dir, device, resume_from, init_state, argv)

    end = tcfg.iterations if stop_at is None else min(stop_at, tcfg.iterations)
    save_every = tcfg.save_every or tcfg.val_every or 500
    status = "done"
    last_val = None
    window: list[dict] = []
    start_time, start_iter = time.perf_counter(), trainer.iteration
    display = Progress(  # a bar on a terminal; in a log, a line after each validation, every 30 s and at the end
        "train",
        end,
        unit="iterations",
        start=trainer.iteration,
        every_s=30.0,
        final=True,
        transient=False,
        enabled=progress and world.main,
        status=_status(),
    )
    metrics_file = open(metrics_path, "a") if world.main else open(os.devnull, "w")
    with _StopFlag() as flag, display, metrics_file as metrics:
        if init_state is not None and resume_from is None and val_ds is not None and tcfg.val_every:
            # The learning curve's origin: the weights it starts from, on this run's validation damage.
            if world.main:
                last_val = _validate(trainer, run_dir, metrics)
                log.info(
                    f"iteration 0 (the initial weights): validation PSNR {last_val['val_psnr']:.2f} dB per image, "
                    f"{last_val['val_psnr_batch']:.2f} dB per batch"
                )
            barrier(world)
        while trainer.iteration < end:
            try:
                rec = trainer.step()
            except NonFiniteLoss as exc:
                raise _stopped_error(exc, run_dir / LAST) from None
            i = trainer.iteration
            window.append(rec)
            if i % tcfg.log_every == 0 or i == end:
                _write_losses(metrics, i, window, rec, time.perf_counter() - start_time)
            validated = False
            if val_ds is not None and tcfg.val_every and (i % tcfg.val_every == 0 or i == tcfg.iterations):
                validated = True
                if world.main:
                    last_val = _validate(trainer, run_dir, metrics)
                barrier(world)
            stop = any_rank(world, flag.stop, trainer.device)  # a signal to any rank stops them all here
            if i % save_every == 0 or i == end or stop:
                trainer.save(run_dir / LAST)
                if trainer.average is not None and world.main:
                    trainer.save_best(run_dir / AVERAGE, average=True)
            rate = (i - start_iter) / max(time.perf_counter() - start_time, 1e-9)
            display.update(i, status=_status(rec["loss"], last_val, rate), force=validated)
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


def _start_run(trainer: Trainer, run_dir: Path, device, resume_from, init_state, argv) -> None:
    """Resume from ``resume_from`` (trimming the metrics to its iteration) or load ``init_state``; then write
    ``config.json`` and append the command line to ``command.txt`` (rank 0)."""
    cfg, tcfg, world = trainer.cfg, trainer.tcfg, trainer.world
    if resume_from is not None:
        trainer.load(resume_from, run_dir / LAST)
        if world.main:
            _trim_metrics(run_dir / METRICS_FILE, trainer.iteration)
        log.info(f"resuming {run_dir} at iteration {trainer.iteration} of {tcfg.iterations}")
        if not any(len(pool) for pool in trainer.pools.values()):
            log.info("its checkpoint holds no pool (a carried run): the pool refills from fresh batches")
    elif init_state is not None:
        trainer.ca.load_state_dict(init_state)
        trainer.reset_average()
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


def _stopped_error(exc: NonFiniteLoss, last: Path) -> VitcaError:
    """The error that ends a run whose loss became non-finite, naming the last good checkpoint."""
    where = f"{last} (iteration {read_checkpoint(last)['iteration']})" if last.is_file() else "none saved"
    return VitcaError(
        f"{exc}; training stopped. Last good checkpoint: {where}. Try a lower " + "{0} or {1}.",
        settings=("lr", "beta"),
    )


def _write_losses(metrics, i: int, window: list[dict], rec: dict, elapsed: float) -> None:
    """One metrics line: the loss terms averaged over the iterations since the last line; ``window`` is emptied."""
    mean = {k: sum(r[k] for r in window) / len(window) for k in ("loss", "l1", "overflow")}
    metrics.write(
        json.dumps({"iteration": i, **mean, "lr": rec["lr"], "T": rec["T"], "time": round(elapsed, 2)}) + "\n"
    )
    metrics.flush()
    window.clear()


def _validate(trainer: Trainer, run_dir: Path, metrics) -> dict:
    """Validate, write ``best.pt`` when the selection figure improves, and log the figures; returns them."""
    i = trainer.iteration
    last_val = trainer.validate()
    sel = trainer.selection
    # The weights, or their moving average where it validates better.
    prefix = "ema_" if last_val.get(f"ema_{sel}", -math.inf) > last_val[sel] else ""
    if last_val[prefix + sel] > trainer.best["val_psnr"]:
        trainer.best = {
            "val_psnr": last_val[prefix + sel],
            "val_ssim": last_val[prefix + "val_ssim"],
            "iteration": i,
            "metric": sel,
            "weights": "moving average" if prefix else "weights",
        }
        trainer.save_best(run_dir / BEST, average=bool(prefix))
    metrics.write(json.dumps({"iteration": i, **last_val}) + "\n")
    metrics.flush()
    return last_val


def _status(loss: float | None = None, val: dict | None = None, rate: float | None = None) -> str:
    """What the progress display shows after the iterations: the loss, the last validation PSNR, the speed."""
    psnr = f"{val['val_psnr']:.2f} dB" if val else "-"
    if val and "ema_val_psnr" in val:
        psnr += f" (average {val['ema_val_psnr']:.2f})"
    loss_text, rate_text = ("-" if loss is None else f"{loss:.3f}"), ("-" if rate is None else f"{rate:.2f}")
    return f"loss {loss_text}  val PSNR {psnr}  {rate_text} it/s"
