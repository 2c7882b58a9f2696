"""The pieces of one training iteration (Algorithm 1, steps 2–4): the T-step rollout, the loss, per-parameter
gradient normalisation and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from vitca_cli.nca.model import CellularAutomaton
from vitca_cli.training.config import TrainConfig


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
    """The T training steps: plain, gradient-checkpointed (⌊T/2⌋ segments), or with fusion and mitosis
    (appendix A.1, over ``tcfg.fusion``'s levels).

    With ``precision="bf16"`` the steps run under autocast: the linear layers multiply in bfloat16 (AMX/AVX512-BF16
    on recent CPUs, tensor cores on GPUs) while the cell grid, LayerNorms, residual sums and the returned grid stay
    fp32, so the state carried from step to step (and into the pool) is not rounded to bfloat16."""
    autocast = tcfg.precision == "bf16"
    with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=autocast):
        if tcfg.fusion is not None:
            z = ca(z, steps, generator=generator, fusion=tcfg.fusion)
        else:
            segments = steps // 2 if tcfg.checkpointing and steps > 1 else 0
            z = ca(z, steps, generator=generator, masks=masks, checkpoint_segments=segments)
    return z.float() if autocast else z


def cosine_factor(iteration: int, total: int, floor: float) -> float:
    """Cosine decay from 1 to ``floor`` over ``total`` iterations (closed form, so extending a run stays smooth)."""
    t = min(iteration, total) / max(total, 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def lr_factor(iteration: int, tcfg: TrainConfig) -> float:
    """The learning rate of (0-based) ``iteration`` over ``tcfg.lr``: a linear warm-up over ``tcfg.warmup`` iterations
    (the first one at ``1 / warmup``) times the cosine decay."""
    warm = min(1.0, (iteration + 1) / tcfg.warmup) if tcfg.warmup else 1.0
    return warm * cosine_factor(iteration, tcfg.iterations, tcfg.lr_min / tcfg.lr)
